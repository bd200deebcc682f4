"""`vlscale plan RECIPE --gpus N --gpu-mem GiB [key=value ...]`: per-GPU memory of every engine.

One row per registered engine (core.engines.ENGINES) and engine.offload value it supports (its
`offloads`). Model state per rank is the engine's own `memory_per_rank` (N parameters, T
trained, W ranks, b = 2 in bf16 else 4; the formulas are in each engine's docstring), in short:
  ddp    params 4N (fp32 weights, bf16 by autocast)  grads 4T        optimizer 8T (AdamW m, v)
  zero2  params bN + 4T/W (fp32 master partition)    grads bT/W      optimizer 8T/W
  zero3  params bN/W + 4T/W                          grads bT/W      optimizer 8T/W
  fsdp   params 4N/W (fp32 shards; bf16 gathered per block while it runs)  grads 4T/W  opt 8T/W
Offload moves the master partition and optimizer state (offload=optimizer), and for zero3 the
parameter partitions too, to CPU; FSDP's CPUOffloadPolicy moves all three.
These formulas are what benchmarks/memory.py measures (tested within 10%).

Activations per micro-batch are estimated per transformer block and token as
(10 h + 2 i) b + heads * tokens * b bytes (inputs of norms, projections and the MLP, attention
scores), times the blocks; activation checkpointing keeps a block's input (h b per token) for
every checkpointed block and one block's full activations while it is recomputed. Communication
buckets, the CUDA context and fragmentation are not counted: keep ~10-20% headroom.
"""

from __future__ import annotations

import argparse

import torch

GiB = 2**30


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="a recipe YAML path, or a name in recipes/")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    parser.add_argument("--gpus", type=int, required=True, help="data-parallel ranks")
    parser.add_argument("--gpu-mem", type=float, required=True, help="GiB per GPU")


def model_state(kind: str, offload: str, precision: str, n: int, t: int, w: int) -> dict:
    """Per-GPU bytes of parameters, gradients and optimizer state: engine `kind`'s
    `memory_per_rank` (an unknown kind is a ConfigError naming the engines)."""
    from core.engines import engine_class

    return engine_class(kind).memory_per_rank(offload, precision, n, t, w)


def count_parameters(cfg) -> tuple[int, int]:
    """(all, trained) parameters of the recipe's task, built on the meta device."""
    from core.tasks import build_task

    with torch.device("meta"):
        task = build_task(cfg)  # trainable patterns applied
    params = list(task.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def _towers(cfg) -> list[dict]:
    """(tokens, hidden, intermediate, heads, blocks) of each tower, from the recipe."""
    from core.tasks import build_task

    with torch.device("meta"):
        task = build_task(cfg)
    towers = []
    tokens_per_sample = task.tokens_per_sample()
    for name, blocks in task.blocks().items():
        tower = task.get_submodule(name)
        weights = [p for p in blocks[0].parameters() if p.ndim == 2]
        hidden = getattr(tower, "hidden_size", None) or weights[0].shape[1]
        intermediate = max(max(p.shape) for p in weights)
        tokens = tokens_per_sample[name]
        heads = tower.num_heads
        towers.append(dict(tokens=tokens, hidden=hidden, intermediate=intermediate,
                           heads=heads, blocks=len(blocks)))  # fmt: skip
    return towers


def activations(cfg, mode: str) -> int:
    """Estimated activation bytes of one micro-batch on one GPU."""
    b = 2 if cfg.engine.precision == "bf16" else 4
    total = 0
    for t in _towers(cfg):
        per_token = (10 * t["hidden"] + 2 * t["intermediate"]) * b + t["heads"] * t["tokens"] * b
        block = cfg.data.batch_size * t["tokens"] * per_token
        block_input = cfg.data.batch_size * t["tokens"] * t["hidden"] * b
        k = max(cfg.engine.ac_every_k, 1)
        checkpointed = {"none": 0, "full": t["blocks"], "every_k": -(-t["blocks"] // k)}[mode]
        total += (t["blocks"] - checkpointed) * block + checkpointed * block_input
        if checkpointed:
            total += block  # one block's activations while it is recomputed
    return int(total)


def options() -> list[tuple[str, str]]:
    """(kind, offload) of every registered engine and engine.offload value it supports."""
    from core.engines import ENGINES

    return [(kind, offload) for kind, cls in ENGINES.items() for offload in cls.offloads]


def plan(cfg, gpus: int, gpu_mem_gib: float) -> list[dict]:
    n, t = count_parameters(cfg)
    act = {mode: activations(cfg, mode) for mode in ("none", "full")}
    return plan_rows(n, t, cfg.engine.precision, act["none"], act["full"], gpus, gpu_mem_gib)


def plan_rows(n: int, t: int, precision: str, act: int, act_ac: int, gpus: int,
              gpu_mem_gib: float) -> list[dict]:  # fmt: skip
    """One row per `options()`: model state per GPU, activations without and with activation
    checkpointing, and whether each fits in `gpu_mem_gib`."""
    rows = []
    for kind, offload in options():
        state = model_state(kind, offload, precision, n, t, gpus)
        states = sum(state.values())
        rows.append({
            "engine": kind, "offload": offload, **state,
            "activations": act, "activations_ac": act_ac,
            "fits": states + act <= gpu_mem_gib * GiB,
            "fits_ac": states + act_ac <= gpu_mem_gib * GiB,
        })  # fmt: skip
    return rows


def main(args) -> int:
    from core.recipe import load_config

    cfg = load_config(args.recipe, args.overrides)
    n, t = count_parameters(cfg)
    rows = plan(cfg, args.gpus, args.gpu_mem)
    print(f"{cfg.name}: {n / 1e6:.1f}M parameters ({t / 1e6:.1f}M trained), "
          f"{cfg.engine.precision}, micro-batch {cfg.data.batch_size}/GPU, {args.gpus} GPUs x "
          f"{args.gpu_mem:g} GiB; per GPU in GiB:")  # fmt: skip
    head = ("engine", "offload", "params", "grads", "optim", "acts", "acts+AC", "fits", "fits+AC")
    print("{:<6} {:<16} {:>8} {:>8} {:>8} {:>8} {:>8} {:>5} {:>8}".format(*head))
    for r in rows:
        gib = [r[k] / GiB for k in ("params", "grads", "optimizer", "activations",
                                    "activations_ac")]  # fmt: skip
        print("{:<6} {:<16} {:>8.3f} {:>8.3f} {:>8.3f} {:>8.3f} {:>8.3f} {:>5} {:>8}".format(
            r["engine"], r["offload"], *gib, "yes" if r["fits"] else "no",
            "yes" if r["fits_ac"] else "no"))  # fmt: skip
    return 0
