"""`vlscale export`'s work, streamed: a run's checkpoint (any engine) written as HF-layout
safetensors one tensor at a time (launch/export.py says what OUT holds; the CLI, and the end of a
run with `checkpoint.export`, call `export_run`).

The task is built on the meta device and loaded with stand-ins (core/lazy_tensors.py); each
tensor is read from the checkpoint (every engine's `read_checkpoint` is lazy) when the file it
belongs to is written, so the memory is about the largest tensor whatever the model's size. Files
larger than max_shard_bytes (default 5GB) are written as shards with an index
(model-00001-of-0000N.safetensors + model.safetensors.index.json, as transformers writes them).
OUT appears whole or not at all: it is written as OUT.tmp and renamed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from .consolidate import checkpoint_dir, fit_state, run_state
from .engines.base import check_loaded
from .export import model_card
from .lazy_tensors import StandIns
from .models import hub
from .recipe import config_from_dict
from .tasks import build_task


def streamed_task(run_dir: str | Path, step: int | None, stand_ins: StandIns):
    """(task, config, state dict) of a run, as launch/export.py's `consolidated`, but every
    weight of the task is a stand-in that reads its tensor from the checkpoint when it is written
    (core/lazy_tensors.py): nothing is read here. The weights the task rebuilds are left on the
    meta device (an export leaves them out)."""
    tree, state = run_state(run_dir, step)
    cfg = config_from_dict(tree)
    with torch.device("meta"):
        task = build_task(cfg)
    rebuilt = task.rebuilt_prefixes()
    shapes = {k: v for k, v in task.state_dict().items() if not (rebuilt and k.startswith(rebuilt))}
    lazy = fit_state(state, shapes, f"{run_dir} checkpoint")
    state = stand_ins.from_lazy(lazy)
    check_loaded(task.load_state_dict(state, assign=True, strict=False), task, run_dir)
    return task, cfg, state


def export_run(run_dir: str | Path, out: str | Path, step: int | None = None,
               max_shard_bytes: int = hub.MAX_SHARD_BYTES) -> Path:  # fmt: skip
    """Write OUT one tensor at a time: each is read from the checkpoint when its file is
    written, so the peak memory is about the largest tensor, whatever the model's size."""
    if step is None:  # the newest checkpoint's, step_<N>
        step = int(checkpoint_dir(run_dir).name.rsplit("_", 1)[1])
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with StandIns().active() as stand_ins, hub.shards_of(max_shard_bytes):
        task, cfg, state = streamed_task(run_dir, step, stand_ins)
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
