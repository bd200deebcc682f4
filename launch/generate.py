"""`vlscale generate RUN_DIR --image PATH --prompt TEXT`: answer with a trained VLM run.

Loads the run's newest checkpoint (any engine; LoRA adapters included), builds the same ChatML
prompt as training, and decodes with the KV cache: greedy by default, or sampling (temperature,
top-k, top-p) or beam search. Several --prompt (or a --batch JSONL of {"prompt", "images"}) are
answered in one left-padded batch.

Under torchrun (`torchrun --nproc_per_node N -m launch.cli generate RUN_DIR ...`) every rank
builds the run's engine and loads its part of the checkpoint (`vlscale eval`'s
`load_run_sharded`), answers its share of the requests through the sharded model in lockstep
(fsdp, zero3: no rank holds the whole model), and rank 0 prints every answer in the requests'
order.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a VLM training run directory")
    parser.add_argument("--image", action="append", default=[], help="image file (repeatable)")
    parser.add_argument("--prompt", action="append", default=[], help="question (repeatable)")
    parser.add_argument("--batch", type=Path, help='JSONL of {"prompt": str, "images": [paths]}')
    parser.add_argument("--step", type=int, default=None, help="default: the newest checkpoint")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--num-beams", type=int, default=1)
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy/beams")
    parser.add_argument("--seed", type=int, default=0)


def requests(args) -> list[tuple[str, list[Path]]]:
    items = [(prompt, [Path(p) for p in args.image]) for prompt in args.prompt]
    if args.batch:
        for line in args.batch.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                items.append((row["prompt"], [Path(p) for p in row.get("images", [])]))
    if not items:
        raise SystemExit("vlscale generate: give --prompt (with --image) or --batch")
    return items


def answer(task, items: list[tuple[str, list[Path]]], device, max_new_tokens: int,
           **options) -> list[str]:  # fmt: skip
    """One left-padded batch of (prompt, image files) answered by a Generative task."""
    batch = task.prompt_batch(
        [(prompt, [p.read_bytes() for p in images]) for prompt, images in items]
    )
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    return task.generate(batch, max_new_tokens, **options)


def main(args) -> int:
    import os

    from core.tasks import Generative
    from launch.export import consolidated

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return _main_distributed(args)
    task, cfg, _ = consolidated(args.run_dir, args.step)
    if not isinstance(task, Generative):
        raise SystemExit(f"vlscale generate: {args.run_dir} is a task.kind={cfg.task.kind} run, "
                         "whose task does not generate")  # fmt: skip
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    task = task.to(device).eval()
    torch.manual_seed(args.seed)
    items = requests(args)
    answers = answer(
        task, items, device, max_new_tokens=args.max_new_tokens, do_sample=args.sample,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        num_beams=args.num_beams,
    )  # fmt: skip
    show(items, answers)
    return 0


def show(items: list[tuple[str, list[Path]]], answers: list[str]) -> None:
    """Every request and its answer, in one write: under torchrun the other ranks' log lines
    (DeepSpeed's) share stdout and must not land inside one of them."""
    lines = []
    for (prompt, images), text in zip(items, answers, strict=True):
        where = ", ".join(str(p) for p in images) or "no image"
        lines.append(f"[{where}] {prompt}\n-> {text}\n")
    sys.stdout.write("".join(lines))
    sys.stdout.flush()


def _main_distributed(args) -> int:
    """Every rank answers requests rank, rank + W, ... (a rank with none answers the first and
    drops it: every forward is a collective); rank 0 gathers and prints them in order."""
    from core import distributed
    from core.tasks import Generative
    from launch.evaluate import load_run_sharded

    items = requests(args)  # bad arguments fail before the checkpoint is read
    engine, cfg, _, dist = load_run_sharded(args.run_dir, args.step)
    if not isinstance(engine.task, Generative):
        raise SystemExit(f"vlscale generate: {args.run_dir} is a task.kind={cfg.task.kind} run, "
                         "whose task does not generate")  # fmt: skip
    torch.manual_seed(args.seed + dist.rank)
    mine = items[dist.rank :: dist.world_size] or items[:1]
    with engine.evaluation(cfg.eval.sharded) as (model, _):
        answers = answer(
            model, mine, dist.device, max_new_tokens=args.max_new_tokens, do_sample=args.sample,
            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
            num_beams=args.num_beams,
        )  # fmt: skip
    if dist.rank >= len(items):
        answers = []  # the borrowed request's
    gathered = distributed.all_gather_object(answers)
    if dist.is_main:
        ordered = [None] * len(items)
        for rank, theirs in enumerate(gathered):
            ordered[rank :: dist.world_size] = theirs
        show(items, ordered)
    distributed.cleanup()
    return 0
