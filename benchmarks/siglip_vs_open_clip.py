"""vlscale vs open_clip: one two-tower SigLIP configuration trained by each, side by side.

    python benchmarks/siglip_vs_open_clip.py            # all: speed at 1 and 2 ranks, loss memory
                                                        # at 1, 2, 4 ranks (starts torchrun itself)
    torchrun --nproc_per_node=2 benchmarks/siglip_vs_open_clip.py --part speed    # one world size
    torchrun --nproc_per_node=4 benchmarks/siglip_vs_open_clip.py --part memory

Runs in vlscale's own environment (pip install -e '.[eval]': open-clip-torch) with no torchvision.
open_clip's package __init__ imports torchvision for its image transforms, so `import open_clip`
fails there; this script loads open_clip's model and loss modules from the installed package by
path instead (`load_open_clip`), which is its unmodified model code. The one import of torchvision
those modules make is `open_clip/utils.py`'s `FrozenBatchNorm2d`, used only to freeze ResNet batch
norms (not part of these models): where torchvision cannot be imported, it is answered by a class
that raises if anything constructs it. Where torchvision works, plain `import open_clip` is used.

**speed**: both frameworks train the same configuration on the same batches (random images and
full-length random token ids, different per rank), with the same AdamW settings (lr, weight decay,
betas, eps, warmup, gradient clipping at 1.0), in one process per rank, timed in alternating rounds
(vlscale, open_clip, open_clip, vlscale, ...) so that the machine's drift hits both alike.
  vlscale   `SigLIPTask` (ViT vision tower, CLS pooling; Qwen2 text tower with bidirectional
            attention, last-token pooling) trained by `train_step` under its `ddp` engine.
  open_clip `CLIP` (its VisionTransformer with CLS pooling and no ln_pre; its TextTransformer
            without causal mask, last-token pooling), `SigLipLoss` (default dist_impl 'bidir'),
            torch DDP, AdamW with open_clip_train's parameter groups and `cosine_lr` schedule,
            and the step of `open_clip_train.train.train_one_epoch` (fp32, accum_freq 1).
  Same widths, depths, heads, MLP FLOPs (Qwen2's SwiGLU gets intermediate 8/3 x width, the FLOPs
  of a 4 x width GELU MLP), patch grid and sequence length; what differs is the text tower's
  normalisation and position encoding (RMSNorm + RoPE vs LayerNorm + learned table), printed
  parameter counts show the rest.

**memory**: the peak bytes allocated during one forward + backward of the loss alone, on features
of a fixed local batch, as the world size grows (torch's profiler counts every CPU allocation and
free; the features themselves are allocated before and not counted, their gradients are).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import itertools
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core.data.tokenizer import train_bpe_tokenizer  # noqa: E402
from core.distributed import init_distributed  # noqa: E402
from core.engines import build_engine  # noqa: E402
from core.loop import seed_everything, train_step  # noqa: E402
from core.losses import sigmoid_loss  # noqa: E402
from core.recipe import load_config  # noqa: E402
from core.tasks import build_task  # noqa: E402


# ------------------------------------------------------------------------------ open_clip
def _torchvision_stand_in() -> dict[str, types.ModuleType]:
    """torchvision.ops.misc with only FrozenBatchNorm2d, which raises when constructed."""

    class FrozenBatchNorm2d:
        def __init__(self, *args, **kwargs):
            raise RuntimeError("open_clip's freeze_batch_norm_2d needs torchvision")

    mods = {
        n: types.ModuleType(n) for n in ("torchvision", "torchvision.ops", "torchvision.ops.misc")
    }
    mods["torchvision.ops.misc"].FrozenBatchNorm2d = FrozenBatchNorm2d
    return mods


def load_open_clip() -> tuple[types.ModuleType, types.ModuleType, types.ModuleType]:
    """open_clip.model, open_clip.loss and open_clip_train.scheduler, without torchvision."""
    try:
        import open_clip  # noqa: F401 - works where torchvision does
    except (ImportError, RuntimeError, OSError):  # absent, or a torchvision built for another torch
        spec = importlib.util.find_spec("open_clip")  # locates the package, executes nothing
        if spec is None:
            raise SystemExit("open_clip is not installed: pip install -e '.[eval]'") from None
        for name in list(sys.modules):  # what the failed attempt half-imported
            if name.split(".")[0] in ("open_clip", "torchvision"):
                del sys.modules[name]
        package = importlib.util.module_from_spec(spec)  # the package without its __init__
        sys.modules["open_clip"] = package
        # transformers probes for torchvision when imported (open_clip.hf_model imports it):
        # import it first, so it never sees the stand-in.
        import transformers.modeling_outputs  # noqa: F401

        stand_in = _torchvision_stand_in()
        sys.modules.update(stand_in)
        try:
            importlib.import_module("open_clip.utils")  # the one torchvision import
        finally:
            for name in stand_in:
                del sys.modules[name]
    model = importlib.import_module("open_clip.model")
    loss = importlib.import_module("open_clip.loss")
    train_spec = importlib.util.find_spec("open_clip_train")
    path = Path(train_spec.submodule_search_locations[0]) / "scheduler.py"  # imports only math
    sched_spec = importlib.util.spec_from_file_location("open_clip_train_scheduler", path)
    scheduler = importlib.util.module_from_spec(sched_spec)
    sched_spec.loader.exec_module(scheduler)
    return model, loss, scheduler


# ------------------------------------------------------------------------------ the models
def vlscale_config(args, tokenizer_dir: Path, run_dir: Path):
    w, layers, heads = args.width, args.layers, args.heads
    recipe = {
        "name": "siglip_vs_open_clip",
        "run_dir": str(run_dir),
        "seed": 0,
        "model": {
            "vision_config": {
                "model_type": "vit",
                # transformers' task-model layout: a ViT without the pooler CLS pooling skips
                "architectures": ["ViTForImageClassification"],
                "hidden_size": w,
                "intermediate_size": 4 * w,
                "num_hidden_layers": layers,
                "num_attention_heads": heads,
                "image_size": args.image_size,
                "patch_size": args.patch_size,
            },
            "text_config": {
                "model_type": "qwen2",
                "hidden_size": w,
                "intermediate_size": round(8 * w / 3),  # SwiGLU with a 4 x w GELU MLP's FLOPs
                "num_hidden_layers": layers,
                "num_attention_heads": heads,
                "num_key_value_heads": heads,
                "max_position_embeddings": args.text_len,
                "tie_word_embeddings": True,
            },
            "tokenizer": str(tokenizer_dir),
        },
        "task": {
            "kind": "siglip",
            "embed_dim": args.embed_dim,
            "pooling": "cls",
            "text_pooling": "last",
            "text_attention": "bidirectional",
        },
        "data": {
            "batch_size": args.batch,
            "max_text_len": args.text_len,
        },
        "optim": {
            "lr": args.lr,
            "weight_decay": args.wd,
            "warmup_steps": args.warmup,
            "max_steps": args.total_steps,
            "grad_clip": 1.0,
        },
        "engine": {"kind": "ddp", "precision": "fp32"},
        "logging": {"wandb": {"mode": "disabled"}, "progress": False},
    }
    path = run_dir.parent / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return load_config(path)


def open_clip_model(oc_model, args, vocab_size: int):
    vision = oc_model.CLIPVisionCfg(
        layers=args.layers,
        width=args.width,
        head_width=args.width // args.heads,
        mlp_ratio=4.0,
        patch_size=args.patch_size,
        image_size=args.image_size,
        no_ln_pre=True,
        pool_type="tok",
    )
    text = oc_model.CLIPTextCfg(
        context_length=args.text_len,
        vocab_size=vocab_size,
        width=args.width,
        heads=args.heads,
        layers=args.layers,
        mlp_ratio=4.0,
        no_causal_mask=True,
        pool_type="last",
    )
    return oc_model.CLIP(
        args.embed_dim,
        vision,
        text,
        init_logit_scale=math.log(10.0),
        init_logit_bias=-10.0,
        output_dict=True,
    )


def open_clip_optimizer(model, cfg):
    """open_clip_train/main.py's AdamW groups: no decay for gains, biases and logit_scale."""

    def exclude(n, p):
        return p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return torch.optim.AdamW(
        [
            {"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
            {
                "params": [p for n, p in named if not exclude(n, p)],
                "weight_decay": cfg.weight_decay,
            },
        ],
        lr=cfg.lr,
        betas=tuple(cfg.betas),
        eps=cfg.eps,
    )


def open_clip_step(model, loss_fn, optimizer, scheduler, step: int, images, texts, clip: float):
    """open_clip_train.train.train_one_epoch's body for fp32, accum_freq 1, no distillation."""
    scheduler(step)
    optimizer.zero_grad()
    model_out = model(images, texts)
    losses = loss_fn(**model_out, output_dict=True)
    total_loss = sum(losses.values())
    total_loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip, norm_type=2.0)
    optimizer.step()
    with torch.no_grad():
        unwrapped = model.module if hasattr(model, "module") else model
        unwrapped.logit_scale.clamp_(0, math.log(100))
    return total_loss.detach()


def batches(args, vocab_size: int, rank: int, n: int = 4) -> list[dict]:
    gen = torch.Generator().manual_seed(1000 + rank)
    size, b, t = args.image_size, args.batch, args.text_len
    return [
        {
            "pixel_values": torch.randn(b, 3, size, size, generator=gen),
            "input_ids": torch.randint(0, vocab_size, (b, t), generator=gen),
            "attention_mask": torch.ones(b, t, dtype=torch.long),
        }
        for _ in range(n)
    ]


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


# ------------------------------------------------------------------------------ parts
def part_speed(args, oc) -> dict:
    oc_model, oc_loss, oc_sched = oc
    info = init_distributed()
    work = Path(tempfile.mkdtemp(prefix="siglip_vs_open_clip_"))
    words = [
        f"a {c} {s} on the {p}"
        for c in ("red", "green", "blue", "white", "black")
        for s in ("circle", "square", "triangle", "star")
        for p in ("left", "right", "top")
    ]
    tokenizer = train_bpe_tokenizer(words, work / "tokenizer", vocab_size=args.vocab)
    cfg = vlscale_config(args, work / "tokenizer", work / "run")
    seed_everything(0)
    task = build_task(cfg)
    engine = build_engine(task, cfg, info, cfg.optim.lr, cfg.optim.max_steps)
    vocab = len(tokenizer)

    torch.manual_seed(0)
    model = open_clip_model(oc_model, args, vocab)
    ddp_model = model
    if info.world_size > 1:
        ddp_model = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = open_clip_optimizer(model, cfg.optim)
    scheduler = oc_sched.cosine_lr(
        optimizer, cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.max_steps
    )
    loss_fn = oc_loss.SigLipLoss(rank=info.rank, world_size=info.world_size)
    data = batches(args, vocab, info.rank)
    oc_step = itertools.count()

    def run_vlscale() -> float:
        cycle = itertools.cycle(data)
        start = time.perf_counter()
        for _ in range(args.steps):
            train_step(task, engine, cycle, 1, info)
        return time.perf_counter() - start

    def run_open_clip() -> float:
        start = time.perf_counter()
        for i in range(args.steps):
            b = data[i % len(data)]
            open_clip_step(
                ddp_model,
                loss_fn,
                optimizer,
                scheduler,
                next(oc_step),
                b["pixel_values"],
                b["input_ids"],
                cfg.optim.grad_clip,
            )
        return time.perf_counter() - start

    run_vlscale(), run_open_clip()  # warm-up
    ours, theirs = [], []
    for r in range(args.rounds):
        order = (run_vlscale, run_open_clip) if r % 2 == 0 else (run_open_clip, run_vlscale)
        for fn in order:
            (ours if fn is run_vlscale else theirs).append(fn())
    shutil.rmtree(work, ignore_errors=True)
    samples = args.steps * args.batch * info.world_size
    return {
        "part": "speed",
        "world": info.world_size,
        "local_batch": args.batch,
        "threads": torch.get_num_threads(),
        "params": {"vlscale": count(task), "open_clip": count(model)},
        # open_clip's visual holds its projection; vlscale's is task.image_proj
        "params_vision": {
            "vlscale": count(task.vision) + count(task.image_proj),
            "open_clip": count(model.visual),
        },
        "vlscale_sps": [samples / t for t in ours],
        "open_clip_sps": [samples / t for t in theirs],
    }


def peak_bytes(fn) -> int:
    """The largest net bytes allocated at any moment while fn runs (CPU allocator events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    current = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        current += event.nbytes()
        peak = max(peak, current)
    return peak


def part_memory(args, oc) -> dict:
    _, oc_loss, _ = oc
    info = init_distributed()
    gen = torch.Generator().manual_seed(info.rank)
    b, d = args.mem_batch, args.embed_dim
    img = F.normalize(torch.randn(b, d, generator=gen), dim=-1)
    txt = F.normalize(torch.randn(b, d, generator=gen), dim=-1)
    scale, bias = torch.tensor(math.log(10.0)), torch.tensor(-10.0)
    leaves = lambda: [t.clone().requires_grad_() for t in (img, txt, scale, bias)]  # noqa: E731

    def vlscale(chunk_size=None):
        i, t, s, c = leaves()
        return lambda: sigmoid_loss(i, t, s, c, chunk_size=chunk_size).backward()

    def open_clip(impl: str):
        i, t, s, c = leaves()
        loss_fn = oc_loss.SigLipLoss(rank=info.rank, world_size=info.world_size, dist_impl=impl)
        return lambda: loss_fn(i, t, s.exp(), c).backward()

    runs = {
        "vlscale": vlscale(),
        f"vlscale_chunk{args.chunk}": vlscale(args.chunk),
        "open_clip_bidir": open_clip("bidir"),
        "open_clip_shift": open_clip("shift"),
    }
    peaks = {}
    for name, fn in runs.items():
        fn_peaks = []
        for _ in range(2):  # the first call may allocate one-off buffers
            if dist.is_initialized():
                dist.barrier()
            fn_peaks.append(peak_bytes(fn))
        peaks[name] = fn_peaks[-1]
    # every rank's peak; the table shows the largest
    gathered = [peaks]
    if info.world_size > 1:
        gathered = [None] * info.world_size
        dist.all_gather_object(gathered, peaks)
    return {
        "part": "memory",
        "world": info.world_size,
        "local_batch": b,
        "dim": d,
        "peak_bytes": {k: max(p[k] for p in gathered) for k in peaks},
    }


# ------------------------------------------------------------------------------ driver
def run_parts(args) -> None:
    """Start torchrun for each part and world size; print the tables."""
    rows = []
    plan = [("speed", w) for w in args.speed_worlds] + [("memory", w) for w in args.mem_worlds]
    passthrough = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k in SHARED]
    for part, world in plan:
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            cmd = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc_per_node={world}",
                __file__,
                "--part",
                part,
                "--out",
                out.name,
                *passthrough,
            ]
            env = dict(os.environ)
            env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // world)))
            print(f"$ torchrun --nproc_per_node={world} ... --part {part}", flush=True)
            subprocess.run(cmd, check=True, env=env)
            rows.append(json.loads(Path(out.name).read_text()))
    print_tables(rows, args)


def print_tables(rows: list[dict], args) -> None:
    speed = [r for r in rows if r["part"] == "speed"]
    if speed:
        r0 = speed[0]
        print(
            f"\nspeed: width {args.width}, {args.layers} layers x2 towers, {args.heads} heads, "
            f"image {args.image_size}/patch {args.patch_size}, text {args.text_len} tokens, "
            f"embed {args.embed_dim}, local batch {args.batch}, fp32, {args.rounds} rounds x "
            f"{args.steps} steps; parameters vlscale {r0['params']['vlscale']:,} "
            f"(vision + projection {r0['params_vision']['vlscale']:,}), open_clip "
            f"{r0['params']['open_clip']:,} (vision {r0['params_vision']['open_clip']:,})"
        )
        print(
            "| ranks | threads/rank | vlscale samples/s | open_clip samples/s | ratio | "
            "paired ratio (min-max) |\n|---|---|---|---|---|---|"
        )
        for r in speed:
            ours, theirs = r["vlscale_sps"], r["open_clip_sps"]
            pairs = [a / b for a, b in zip(ours, theirs, strict=True)]
            print(
                f"| {r['world']} | {r['threads']} | {statistics.median(ours):.1f} | "
                f"{statistics.median(theirs):.1f} | "
                f"**{statistics.median(ours) / statistics.median(theirs):.3f}** | "
                f"{statistics.median(pairs):.3f} ({min(pairs):.3f}-{max(pairs):.3f}) |"
            )
    memory = [r for r in rows if r["part"] == "memory"]
    if memory:
        names = list(memory[0]["peak_bytes"])
        m0 = memory[0]
        print(
            f"\nloss memory: peak MiB allocated during forward + backward of the loss, local "
            f"batch {m0['local_batch']}, features {m0['dim']} (largest over ranks)"
        )
        print("| ranks | " + " | ".join(names) + " |\n" + "|---" * (len(names) + 1) + "|")
        for r in memory:
            cells = " | ".join(f"{r['peak_bytes'][n] / 2**20:.2f}" for n in names)
            print(f"| {r['world']} | {cells} |")


# the options each part takes from the driver
SHARED = (
    "width",
    "layers",
    "heads",
    "image_size",
    "patch_size",
    "text_len",
    "vocab",
    "embed_dim",
    "batch",
    "steps",
    "rounds",
    "lr",
    "wd",
    "warmup",
    "mem_batch",
    "chunk",
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=["speed", "memory"], help="one part (under torchrun)")
    p.add_argument("--out", help="where rank 0 writes the part's JSON")
    p.add_argument("--speed-worlds", type=int, nargs="*", default=[1, 2])
    p.add_argument("--mem-worlds", type=int, nargs="*", default=[1, 2, 4])
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--patch-size", type=int, default=8)
    p.add_argument("--text-len", type=int, default=32)
    p.add_argument("--vocab", type=int, default=1024, help="BPE tokenizer size (upper bound)")
    p.add_argument("--embed-dim", type=int, default=256)
    p.add_argument("--batch", type=int, default=32, help="per rank, speed part")
    p.add_argument("--steps", type=int, default=5, help="steps per timed round")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--wd", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--mem-batch", type=int, default=1024, help="per rank, memory part")
    p.add_argument("--chunk", type=int, default=256, help="vlscale chunk_size column")
    args = p.parse_args()
    args.total_steps = args.warmup + (args.rounds + 1) * args.steps * 2
    if args.part is None:
        return run_parts(args)
    oc = load_open_clip()
    result = (part_speed if args.part == "speed" else part_memory)(args, oc)
    if int(os.environ.get("RANK", 0)) == 0:
        Path(args.out).write_text(json.dumps(result)) if args.out else print_tables([result], args)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
