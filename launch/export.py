"""`vlscale export RUN_DIR OUT [--step N]`: a run's checkpoint (any engine) as HF-layout
safetensors.

The task writes its towers as Hugging Face checkpoints (config.json + model.safetensors, loadable
by transformers and by `core.models.from_pretrained`) with what transformers needs besides
(core/export.py): image towers a preprocessor_config.json (AutoImageProcessor), text towers and
LMs their tokenizer (AutoTokenizer; a VLM's with its chat template), LMs a generation_config.json.
SigLIP OUT/vision/ and OUT/text/ (a whole SigLIP: OUT/siglip/, one SiglipModel); a VLM
OUT/vision/, OUT/projector.safetensors, OUT/lm/ (LoRA merged) and, for LoRA runs, OUT/lm_adapter/
(a peft adapter) on OUT/lm_base/.
OUT/model.safetensors holds every tensor of the task under its module names (but those the task
rebuilds from its init_from, Task.rebuilt_prefixes: stage 4's frozen reference); OUT/config.yaml is
the run's config; OUT/README.md a model card (Hub front matter, how to load each part, the
training data, the run's last evaluation, the config). Reading the result needs only
safetensors: DeepSpeed is imported only to consolidate a ZeRO checkpoint, DCP only for FSDP.

The export streams, one tensor at a time (core/streamed_export.py): its memory is about the
largest tensor whatever the model's size. Files larger than --max-shard-size (default 5GB) are
written as shards with an index, as transformers writes them. `checkpoint.export: true` exports
a run to RUN_DIR/export when it ends.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch

from core.models import hub


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a training run directory (holds config.yaml)")
    parser.add_argument("out", help="output directory")
    parser.add_argument("--step", type=int, default=None, help="default: the newest checkpoint")
    parser.add_argument("--max-shard-size", default="5GB", type=shard_bytes,
                        help="largest safetensors file; bigger checkpoints are sharded with an "
                        "index, as transformers writes them (default 5GB)")  # fmt: skip


def shard_bytes(text: str) -> int:
    """'5GB' -> 5e9 bytes; also KB, MB, KiB, MiB, GiB, or a plain number of bytes (the units of
    transformers' max_shard_size)."""
    units = {"": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20,
             "GIB": 2**30}  # fmt: skip
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B)?\s*", text.upper())
    if not found:
        raise argparse.ArgumentTypeError(f"{text!r}: a size like 5GB, 500MB, 2GiB or bytes")
    return int(float(found[1]) * units[found[2] or ""])


def consolidated(run_dir: str | Path, step: int | None = None):
    """(task with the checkpoint's weights, its config, the state dict) of a run, in memory (for
    evaluation and generation; `export` streams instead). Weights the checkpoint leaves out to be
    rebuilt (Task.rebuilt_prefixes) are rebuilt as training built them (the task built for real,
    seeded as the loop seeds it, init_from read); the returned state dict leaves them out too."""
    from core.consolidate import fit_state, run_state
    from core.loop import seed_everything
    from core.recipe import config_from_dict
    from core.tasks import build_task

    tree, state = run_state(run_dir, step)
    cfg = config_from_dict(tree)
    with torch.device("meta"):
        task = build_task(cfg)
    rebuilt = task.rebuilt_prefixes()
    if rebuilt:
        seed_everything(cfg.seed)
        built = build_task(cfg).state_dict()
        state = {k: state[k] for k in state if not k.startswith(rebuilt)}
        full = fit_state({**built, **state}, task.state_dict(), f"{run_dir} checkpoint")
        task.load_state_dict(full, assign=True)
        return task, cfg, {k: v for k, v in full.items() if not k.startswith(rebuilt)}
    state = dict(fit_state(state, task.state_dict(), f"{run_dir} checkpoint"))
    task.load_state_dict(state, assign=True)
    return task, cfg, state


def export(run_dir: str | Path, out: str | Path, step: int | None = None,
           max_shard_bytes: int = hub.MAX_SHARD_BYTES) -> Path:  # fmt: skip
    """OUT, written one tensor at a time (core/streamed_export.py)."""
    from core.streamed_export import export_run

    return export_run(run_dir, out, step, max_shard_bytes)


def main(args) -> int:
    out = export(args.run_dir, args.out, args.step, args.max_shard_size)
    print(f"exported {args.run_dir} -> {out}")
    return 0
