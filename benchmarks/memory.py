"""Measured per-rank memory of every engine: parameters, gradients, optimizer state, and the
activation memory with and without activation checkpointing.

    python benchmarks/memory.py                        # 1 rank, every engine
    torchrun --nproc_per_node=2 benchmarks/memory.py   # 2 ranks
    python benchmarks/memory.py --activations          # activation checkpointing, 1 process

Model state is counted tensor by tensor on each rank after one step and one more backward (so
optimizer state and gradients exist): parameters = this rank's parameter storage plus any fp32
master copy the engine keeps (DeepSpeed); gradients = the gradient storage the engine holds for
the optimizer (DeepSpeed's partitioned gradient buffers); optimizer = AdamW state. Distinct
storages are counted once. Communication buckets (DDP's reducer, DeepSpeed's reduce buckets)
are not model state and are left out.

Activation memory is measured as the bytes a forward leaves allocated for backward: the
process's heap in use (glibc mallinfo2) after forward minus before, on CPU; peak allocated
bytes on CUDA.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _local(t: torch.Tensor) -> torch.Tensor:
    t = getattr(t, "ds_tensor", t)  # ZeRO-3: this rank's partition
    return t.to_local() if hasattr(t, "to_local") else t  # FSDP2: DTensor shard


def _bytes(tensors) -> int:
    """Bytes of the union of the tensors' memory: views of one buffer count once."""
    spans = []
    for t in tensors:
        if t is None or not torch.is_tensor(t) or t.numel() == 0 or t.device.type == "meta":
            continue
        spans.append((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()))
    total, end = 0, -1
    for lo, hi in sorted(spans):
        if hi > end:
            total += hi - max(lo, end)
            end = hi
    return total


def model_state_bytes(engine) -> dict[str, int]:
    """Per-rank bytes of parameters, gradients and optimizer state held by `engine`."""
    params = [_local(p) for p in engine.task.parameters()]
    grads = [_local(p.grad) if p.grad is not None else None for p in engine.task.parameters()]
    base = getattr(engine, "base_optimizer", None) or engine.optimizer
    zero = getattr(engine, "optimizer", None) if hasattr(engine, "base_optimizer") else None
    if zero is not None:  # DeepSpeed: fp32 master partitions and partitioned gradients
        for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
            params += list(getattr(zero, name, []))
        for name in ("averaged_gradients", "grad_partitions_flat_buffer"):
            held = getattr(zero, name, None)
            if isinstance(held, dict):
                grads += [t for v in held.values() for t in (v if isinstance(v, list) else [v])]
            elif torch.is_tensor(held):
                grads.append(held)
    state = [_local(v) for s in base.state.values() for v in s.values() if torch.is_tensor(v)]
    return {"params": _bytes(params), "grads": _bytes(grads), "optimizer": _bytes(state)}


def measure_engine(kind: str, overrides: list[str]) -> dict:
    from core.distributed import init_distributed
    from core.engines import build_engine
    from core.loop import seed_everything, train_step
    from core.recipe import load_config
    from core.tasks import build_task

    cfg = load_config("tiny_siglip", [*overrides, f"engine.kind={kind}"])
    dist = init_distributed("gloo")
    seed_everything(cfg.seed)
    task = build_task(cfg)
    n_params = sum(p.numel() for p in task.parameters())
    n_trained = sum(p.numel() for p in task.parameters() if p.requires_grad)
    engine = build_engine(task, cfg, dist, cfg.optim.lr, 10)
    batches = iter(task.train_stream(dist))
    train_step(task, engine, batches, 1, dist)  # optimizer state exists from here
    engine.forward_backward(next(batches), 1.0, sync=True)  # gradients held for a step
    out = model_state_bytes(engine)
    engine.step(loss_is_finite=True)
    return {"engine": kind, "world_size": dist.world_size, "rank": dist.rank,
            "n_params": n_params, "n_trained": n_trained, **out}  # fmt: skip


def _heap_in_use() -> int:
    class Mallinfo2(ctypes.Structure):
        names = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
        _fields_ = [(n, ctypes.c_size_t) for n in names.split()]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = Mallinfo2
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


def activation_bytes(task: torch.nn.Module, batch: dict, repeats: int = 3) -> int:
    """Bytes one forward keeps alive for backward (min over repeats: the allocator's noise only
    ever adds)."""
    results = []
    for _ in range(repeats):
        task.zero_grad(set_to_none=True)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            loss = task(batch).loss
            held = torch.cuda.max_memory_allocated() - before
        else:
            before = _heap_in_use()
            loss = task(batch).loss
            held = _heap_in_use() - before
        loss.backward()
        del loss
        results.append(held)
    return min(results)


class _Autocast(torch.nn.Module):
    """The task's forward under bf16 autocast, as ddp runs it in a bf16 run."""

    def __init__(self, task: torch.nn.Module):
        super().__init__()
        self.task = task

    def forward(self, batch: dict):
        device = batch["pixel_values"].device.type
        with torch.autocast(device, dtype=torch.bfloat16):
            return self.task(batch)


def measure_activations(
    overrides: list[str], batch_size: int, modes=("none", "every_k", "full"), compute="weights"
) -> dict[str, int]:
    """Activation memory of the tiny_siglip model, per AC mode (one process, no engine).
    `compute`: "weights" runs in the dtype the task is built in (fp32); "bf16" casts the task
    and the pixels to bf16 (the sharded engines' bf16 weights); "autocast" keeps fp32 weights
    under bf16 autocast (ddp's bf16)."""
    from core.engines.wrap import apply_activation_checkpointing
    from core.recipe import load_config
    from core.tasks import build_task

    cfg = load_config("tiny_siglip", overrides)
    g = torch.Generator().manual_seed(0)
    size = cfg.model.vision_config["image_size"]
    batch = {
        "pixel_values": torch.randn(batch_size, 3, size, size, generator=g),
        "input_ids": torch.randint(0, 100, (batch_size, cfg.data.max_text_len), generator=g),
        "attention_mask": torch.ones(batch_size, cfg.data.max_text_len, dtype=torch.long),
    }
    if compute == "bf16":
        batch["pixel_values"] = batch["pixel_values"].bfloat16()
    out = {}
    for mode in modes:
        torch.manual_seed(0)
        task = build_task(cfg)
        apply_activation_checkpointing(task.blocks(), mode, every_k=2)
        if compute == "bf16":
            task = task.bfloat16()
        elif compute == "autocast":
            task = _Autocast(task)
        out[mode] = activation_bytes(task, batch)
    return out


def main() -> None:
    from core.engines import ENGINES

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--engines", default=",".join(ENGINES), help="registered engine kinds")
    parser.add_argument("--activations", action="store_true", help="measure AC instead")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", default="", help="append JSON lines here (rank 0)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    base = ["data.num_workers=0", "logging.wandb.mode=disabled", "engine.precision=fp32"]
    overrides = [*base, *args.overrides]
    if args.activations:
        rows = [{"activations": measure_activations(overrides, args.batch_size)}]
    else:
        rows = [measure_engine(kind, overrides) for kind in args.engines.split(",")]
    if int(os.environ.get("RANK", "0")) == 0:
        for row in rows:
            print(json.dumps(row))
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
