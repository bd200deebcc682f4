"""`vlscale plan RECIPE --gpus N --gpu-mem GiB [key=value ...]`: per-GPU memory of every engine.

One row per registered engine (core.engines.ENGINES) and engine.offload value it supports (its
`offloads`). Model state per rank is the engine's own `memory_per_rank` (N parameters, T
trained, W ranks, b = 2 in bf16 else 4; the formulas are in each engine's docstring), in short:
  ddp    params 4N (fp32 weights, bf16 by autocast)  grads 4T        optimizer 8T (AdamW m, v)
  zero2  params bN + 4T/W (fp32 master partition)    grads 4T/W      optimizer 8T/W
  zero3  params bN/W + 4T/W                          grads 4T/W      optimizer 8T/W
  fsdp   params 4N/W (fp32 shards; bf16 gathered per block while it runs)  grads 4T/W  opt 8T/W
Offload moves the master partition and optimizer state (offload=optimizer), and for zero3 the
parameter partitions too, to CPU; FSDP's CPUOffloadPolicy moves all three.
These formulas are what benchmarks/memory.py measures (tested within 10%).

Activations per micro-batch are counted per transformer block and token from the block's own
modules, as autograd keeps them (`block_bytes_per_token`: norms' inputs and outputs, q, k, v and
the attention output, the MLP's up projections and activation; no T x T scores, which SDPA and
flash attention do not keep), for data.batch_size samples each as long as the task allows, plus
the fp32 log-probabilities at the positions where the task applies its LM head. A frozen tower
with nothing trained before it (a frozen vision tower, stage 4's reference) keeps nothing; a
frozen one behind a trained part (an LM behind a trained projector) keeps what its input's
gradient needs. Activation checkpointing keeps a block's input (h b per token) for every
checkpointed block and one block's full activations while it is recomputed. ddp in bf16 trains
under autocast over fp32 weights, which keeps more (fp32 norms, bf16 copies of the weights;
`block_bytes_per_token`) than the sharded engines' bf16 weights. Held to measured forwards in
tests/test_plan.py. `buffers` are the engine's own fixed-size buffers
(`buffers_per_rank`: ZeRO-2's and ZeRO-3's gradient buckets of `reduce_bucket_size`, 24 MiB
each at ds_configs/' 6.25M elements in fp32, whatever the model's size). The CUDA context,
the process itself and fragmentation are not counted: keep ~10-20% headroom.
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


def buffers(cfg, kind: str, offload: str, t: int, w: int) -> int:
    """Per-GPU bytes of engine `kind`'s own fixed-size buffers (its `buffers_per_rank`: ZeRO's
    gradient buckets) for this run config with engine.kind and engine.offload set to `kind` and
    `offload` (a DeepSpeed JSON of the user's counts only for its own kind)."""
    import dataclasses

    from core.engines import engine_class

    e = cfg.engine
    engine = dataclasses.replace(e, kind=kind, offload=offload,
                                 ds_config=e.ds_config if kind == e.kind else "")  # fmt: skip
    return engine_class(kind).buffers_per_rank(dataclasses.replace(cfg, engine=engine), t, w)


def count_parameters(cfg) -> tuple[int, int]:
    """(all, trained) parameters of the recipe's task, built on the meta device."""
    from core.tasks import build_task

    with torch.device("meta"):
        task = build_task(cfg)  # trainable patterns applied
    params = list(task.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def block_bytes_per_token(
    block: torch.nn.Module, hidden: int, trained: bool, b: int, autocast: bool = False
) -> int:
    """Bytes one token leaves saved for backward in one transformer block (b bytes an element),
    counted from the block's modules as autograd saves them:
      norms      input, output (+ the normalised tensor our RMSNorm multiplies by its weight);
                 a frozen norm keeps only its input (its output feeds frozen projections)
      attention  every projection of the hidden state (q, k, v) and the attention output, which
                 SDPA / flash attention keep (no T x T scores)
      MLP        each up projection's output and the activation's (SwiGLU: gate, up, silu(gate),
                 their product = 4 i); frozen, the input of the down projection is not kept
    Frozen here: the block's weights do not train but its input needs a gradient (something
    upstream trains), as a frozen LM behind a trained projector.
    `autocast` (ddp in bf16: fp32 weights, bf16 autocast): the norms run in fp32 on the fp32
    residual stream, so what they keep is 4 bytes an element, and the projection after each norm
    keeps its own bf16 copy of the norm's output (2 bytes); the rest is bf16 as it is with bf16
    weights. Measured on tiny_siglip: autocast keeps 1.28x what bf16 weights do."""
    from core.models.decoder import RMSNorm

    linears = [m for m in block.modules() if isinstance(m, torch.nn.Linear)]
    inter = max(max(m.weight.shape) for m in linears)
    attention = hidden + sum(m.out_features for m in linears
                             if m.in_features == hidden and m.out_features != inter)  # fmt: skip
    ups = sum(1 for m in linears if m.in_features == hidden and m.out_features == inter)
    mlp = (2 * ups if trained else 2 * ups - 1) * inter
    norms = 0
    for m in block.modules():
        if isinstance(m, (RMSNorm, torch.nn.LayerNorm)):
            # a norm narrower than the block (Qwen3's q/k norms) runs over q and k: count the
            # block's width for it (k is at most as wide as q)
            kept = (3 if isinstance(m, RMSNorm) else 2) if trained else 1
            if not autocast:
                norms += kept * hidden * b
            else:  # fp32 elements, one of them (the output) as the next projection's bf16 cast
                norms += (kept * 4 - 2 if trained else 4) * hidden
    return norms + (attention + mlp) * (2 if autocast else b)


def _towers(cfg, autocast: bool = False) -> tuple[list[dict], int]:
    """Per `blocks()` tower of the recipe's task (built on the meta device): tokens per sample,
    width, blocks, activation bytes per token and block, whether backward keeps them, and (under
    `autocast`) the bytes of the bf16 weight copies its projections keep for backward; and the
    bytes of the log-probabilities one sample keeps at its LM head."""
    from core.tasks import build_task

    with torch.device("meta"):
        task = build_task(cfg)
    b = 2 if cfg.engine.precision == "bf16" else 4
    tokens_per_sample = task.tokens_per_sample()
    keeps = task.keeps_activations()
    towers = []
    for name, blocks in task.blocks().items():
        tower = task.get_submodule(name)
        weights = [p for p in blocks[0].parameters() if p.ndim == 2]
        hidden = getattr(tower, "hidden_size", None) or weights[0].shape[1]
        trained = any(p.requires_grad for p in blocks[0].parameters())
        per_token = block_bytes_per_token(blocks[0], hidden, trained, b, autocast)
        # Autocast's bf16 copy of every projection weight, kept for the input gradient.
        casts = 2 * sum(p.numel() for p in blocks.parameters() if p.ndim == 2) if autocast else 0
        towers.append(dict(tokens=tokens_per_sample[name], hidden=hidden, blocks=len(blocks),
                           keeps=keeps[name], per_token=per_token, weight_casts=casts))  # fmt: skip
    positions, vocab = task.logits_per_sample()
    return towers, positions * vocab * 4  # log-softmax of fp32 logits, kept for the loss


def activations(cfg, mode: str, autocast: bool | None = None) -> int:
    """Estimated activation bytes of one micro-batch (data.batch_size samples, each as long as
    the task allows: `Task.tokens_per_sample`) on one GPU: the blocks of every tower whose
    activations backward needs (`Task.keeps_activations`), and the LM head's log-probabilities
    at the positions it computes them (`Task.logits_per_sample`). `autocast`: whether the engine
    trains bf16 under autocast over fp32 weights (default: what cfg.engine.kind does)."""
    from core.engines import engine_class

    b = 2 if cfg.engine.precision == "bf16" else 4
    if autocast is None:
        autocast = b == 2 and engine_class(cfg.engine.kind).trains_under_autocast
    towers, logits = _towers(cfg, autocast)
    total = cfg.data.batch_size * logits
    for t in towers:
        if not t["keeps"]:
            continue  # frozen, nothing trained before it: run without keeping anything
        block = cfg.data.batch_size * t["tokens"] * t["per_token"]
        # a checkpointed block keeps its input: under autocast the fp32 residual stream
        block_input = cfg.data.batch_size * t["tokens"] * t["hidden"] * (4 if autocast else b)
        k = max(cfg.engine.ac_every_k, 1)
        checkpointed = {"none": 0, "full": t["blocks"], "every_k": -(-t["blocks"] // k)}[mode]
        total += (t["blocks"] - checkpointed) * block + checkpointed * block_input
        if checkpointed:
            total += block  # one block's activations while it is recomputed
        # a checkpointed block's weight casts are made again when it is recomputed, not kept
        total += t["weight_casts"] * (t["blocks"] - checkpointed) // t["blocks"]
    return int(total)


def options() -> list[tuple[str, str]]:
    """(kind, offload) of every registered engine and engine.offload value it supports."""
    from core.engines import ENGINES

    return [(kind, offload) for kind, cls in ENGINES.items() for offload in cls.offloads]


def plan(cfg, gpus: int, gpu_mem_gib: float) -> list[dict]:
    n, t = count_parameters(cfg)
    from core.engines import engine_class

    # Per engine: ddp trains bf16 under autocast over fp32 weights, the sharded engines with
    # bf16 weights, and autocast keeps more (block_bytes_per_token).
    # Each estimate builds the task on the meta device: once per mode and autocast, not engine.
    autocast = {k: cfg.engine.precision == "bf16" and engine_class(k).trains_under_autocast
                for k, _ in options()}  # fmt: skip
    by = {(m, a): activations(cfg, m, a) for m in ("none", "full") for a in set(autocast.values())}
    act = {k: by["none", a] for k, a in autocast.items()}
    act_ac = {k: by["full", a] for k, a in autocast.items()}
    bufs = {(k, o): buffers(cfg, k, o, t, gpus) for k, o in options()}
    return plan_rows(n, t, cfg.engine.precision, act, act_ac, gpus, gpu_mem_gib, bufs)


def plan_rows(n: int, t: int, precision: str, act: int | dict, act_ac: int | dict, gpus: int,
              gpu_mem_gib: float, bufs: dict | None = None) -> list[dict]:  # fmt: skip
    """One row per `options()`: model state per GPU, the engine's buffers (`bufs`, by (kind,
    offload); none if not given), activations without and with activation checkpointing (one
    figure, or one per engine kind), and whether each fits in `gpu_mem_gib`."""
    rows = []
    for kind, offload in options():
        a = act[kind] if isinstance(act, dict) else act
        a_ac = act_ac[kind] if isinstance(act_ac, dict) else act_ac
        state = model_state(kind, offload, precision, n, t, gpus)
        state["buffers"] = (bufs or {}).get((kind, offload), 0)
        states = sum(state.values())
        rows.append({
            "engine": kind, "offload": offload, **state,
            "activations": a, "activations_ac": a_ac,
            "fits": states + a <= gpu_mem_gib * GiB,
            "fits_ac": states + a_ac <= gpu_mem_gib * GiB,
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
    head = ("engine", "offload", "params", "grads", "optim", "buffers", "acts", "acts+AC", "fits",
            "fits+AC")  # fmt: skip
    print("{:<6} {:<16} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>5} {:>8}".format(*head))
    for r in rows:
        gib = [r[k] / GiB for k in ("params", "grads", "optimizer", "buffers", "activations",
                                    "activations_ac")]  # fmt: skip
        row = "{:<6} {:<16}" + " {:>8.3f}" * len(gib) + " {:>5} {:>8}"
        print(row.format(r["engine"], r["offload"], *gib, "yes" if r["fits"] else "no",
                         "yes" if r["fits_ac"] else "no"))  # fmt: skip
    return 0
