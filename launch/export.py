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

Streaming: the task is built on the meta device and loaded with stand-ins (core/lazy_tensors.py);
each tensor is read from the checkpoint (any engine's format) when the file it belongs to is
written, so the export's memory is about its largest tensor whatever the model's size. Files
larger than --max-shard-size (default 5GB) are written as shards with an index
(model-00001-of-0000N.safetensors + model.safetensors.index.json, as transformers writes them).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
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


def streamed(run_dir: str | Path, step: int | None, stand_ins):
    """As `consolidated`, but every weight of the task is a stand-in that reads its tensor from
    the checkpoint when it is written (core/lazy_tensors.py): nothing is read here. The weights
    the task rebuilds are left on the meta device (an export leaves them out)."""
    from core.consolidate import fit_state, run_state
    from core.engines.base import check_loaded
    from core.recipe import config_from_dict
    from core.tasks import build_task

    tree, state = run_state(run_dir, step)
    cfg = config_from_dict(tree)
    with torch.device("meta"):
        task = build_task(cfg)
    rebuilt = task.rebuilt_prefixes()
    shapes = {k: v for k, v in task.state_dict().items() if not (rebuilt and k.startswith(rebuilt))}
    lazy = fit_state(state, shapes, f"{run_dir} checkpoint")
    state = {k: stand_ins.stand_in(lazy.meta(k), lambda k=k: lazy[k]) for k in lazy}
    check_loaded(task.load_state_dict(state, assign=True, strict=False), task, run_dir)
    return task, cfg, state


def export(run_dir: str | Path, out: str | Path, step: int | None = None,
           max_shard_bytes: int = hub.MAX_SHARD_BYTES) -> Path:  # fmt: skip
    """Write OUT one tensor at a time: each is read from the checkpoint when its file is
    written, so the peak memory is about the largest tensor, whatever the model's size."""
    from core.consolidate import checkpoint_dir
    from core.export import model_card
    from core.lazy_tensors import StandIns

    if step is None:  # the newest checkpoint's, step_<N>
        step = int(checkpoint_dir(run_dir).name.rsplit("_", 1)[1])
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with StandIns().active() as stand_ins, hub.shards_of(max_shard_bytes):
        task, cfg, state = streamed(run_dir, step, stand_ins)
        task.export_hf(tmp, state)
        hub.save_state_dict(state, tmp)
    (tmp / "config.yaml").write_text(cfg.to_yaml())
    evaluation = Path(run_dir) / "eval.json"
    evaluation = json.loads(evaluation.read_text()) if evaluation.is_file() else None
    card = model_card(tmp, cfg, step=step, evaluation=evaluation, **task.model_card())
    (tmp / "README.md").write_text(card)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def main(args) -> int:
    out = export(args.run_dir, args.out, args.step, args.max_shard_size)
    print(f"exported {args.run_dir} -> {out}")
    return 0
