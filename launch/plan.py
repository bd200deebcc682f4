"""`vlscale plan RECIPE --gpus N --gpu-mem GiB [key=value ...]`: per-GPU memory of every engine.

Model state per rank (bytes; N parameters, T trained, W ranks, b = 2 in bf16 else 4):
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

ENGINES = ["ddp", "zero2", "zero3", "fsdp"]
GiB = 2**30


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="a recipe YAML path, or a name in recipes/")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    parser.add_argument("--gpus", type=int, required=True, help="data-parallel ranks")
    parser.add_argument("--gpu-mem", type=float, required=True, help="GiB per GPU")


def model_state(kind: str, offload: str, precision: str, n: int, t: int, w: int) -> dict:
    """Per-GPU bytes of parameters, gradients and optimizer state (see the module doc)."""
    b = 2 if precision == "bf16" else 4
    if kind == "ddp":
        out = {"params": 4 * n, "grads": 4 * t, "optimizer": 8 * t}
    elif kind == "zero2":
        master = 0 if offload != "none" else 4 * t / w
        out = {"params": b * n + master, "grads": b * t / w, "optimizer": 8 * t / w}
    elif kind == "zero3":
        master = 0 if offload != "none" else 4 * t / w
        shards = 0 if offload == "optimizer+params" else b * n / w
        out = {"params": shards + master, "grads": b * t / w, "optimizer": 8 * t / w}
    elif kind == "fsdp":
        out = {"params": 4 * n / w, "grads": 4 * t / w, "optimizer": 8 * t / w}
        if offload == "optimizer+params":
            out = dict.fromkeys(out, 0)
    else:
        raise ValueError(f"unknown engine kind {kind!r}")
    if offload != "none":
        out["optimizer"] = 0
    return {k: int(v) for k, v in out.items()}


def count_parameters(cfg) -> tuple[int, int]:
    """(all, trained) parameters of the recipe's task, built on the meta device."""
    from core.engines.wrap import freeze
    from core.tasks import build_task

    with torch.device("meta"):
        task = build_task(cfg)
    freeze(task, cfg.engine.freeze)
    params = list(task.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def _towers(cfg) -> list[dict]:
    """(tokens, hidden, intermediate, heads, blocks) of each tower, from the recipe."""
    from core.engines.wrap import tower_blocks
    from core.tasks import build_task

    with torch.device("meta"):
        task = build_task(cfg)
    towers = []
    for name, blocks in tower_blocks(task).items():
        tower = task.get_submodule(name)
        weights = [p for p in blocks[0].parameters() if p.ndim == 2]
        hidden = getattr(tower, "hidden_size", None) or weights[0].shape[1]
        intermediate = max(max(p.shape) for p in weights)
        if hasattr(tower, "image_size"):
            patch = getattr(tower, "patch_size", None) or cfg.model.vision_config.get("patch_size")
            tokens = (tower.image_size // patch) ** 2 + int(getattr(tower, "has_cls_token", False))
            heads = cfg.model.vision_config.get("num_attention_heads", 12)
        else:
            tokens = cfg.data.max_text_len
            heads = cfg.model.text_config.get("num_attention_heads", 12)
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


def plan(cfg, gpus: int, gpu_mem_gib: float) -> list[dict]:
    n, t = count_parameters(cfg)
    act = {mode: activations(cfg, mode) for mode in ("none", "full")}
    rows = []
    options = [("ddp", "none"), ("zero2", "none"), ("zero2", "optimizer"), ("zero3", "none"),
               ("zero3", "optimizer"), ("zero3", "optimizer+params"), ("fsdp", "none"),
               ("fsdp", "optimizer+params")]  # fmt: skip
    for kind, offload in options:
        state = model_state(kind, offload, cfg.engine.precision, n, t, gpus)
        states = sum(state.values())
        rows.append({
            "engine": kind, "offload": offload, **state,
            "activations": act["none"], "activations_ac": act["full"],
            "fits": states + act["none"] <= gpu_mem_gib * GiB,
            "fits_ac": states + act["full"] <= gpu_mem_gib * GiB,
        })  # fmt: skip
    return rows


def main(args) -> int:
    from core.config import load_config

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
