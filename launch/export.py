"""`vlscale export RUN_DIR OUT [--step N]`: a run's checkpoint (any engine) as HF-layout
safetensors.

OUT/vision/ and OUT/text/ are Hugging Face checkpoints of the towers (config.json +
model.safetensors, loadable by transformers and by `core.models.from_pretrained`);
OUT/model.safetensors holds every tensor of the task under its module names (towers, projections,
logit scale and bias); OUT/config.yaml is the run's config. Reading the result needs only
safetensors: DeepSpeed is imported only to consolidate a ZeRO checkpoint, DCP only for FSDP.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a training run directory (holds config.yaml)")
    parser.add_argument("out", help="output directory")
    parser.add_argument("--step", type=int, default=None, help="default: the newest checkpoint")


def checkpoint_dir(run_dir: Path, step: int | None) -> Path:
    from core.checkpoint import list_checkpoints

    found = dict(list_checkpoints(run_dir / "checkpoints"))
    if not found:
        raise FileNotFoundError(f"{run_dir}/checkpoints holds no complete checkpoint")
    if step is None:
        return found[max(found)]
    if step not in found:
        raise FileNotFoundError(f"no complete checkpoint of step {step}; have {sorted(found)}")
    return found[step]


def read_state(step_dir: Path, kind: str) -> dict[str, torch.Tensor]:
    """The full fp32 model state of one checkpoint directory, in one process (no ranks)."""
    if kind == "ddp":
        return load_file(step_dir / "model.safetensors")
    if kind in ("zero2", "zero3"):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        from core.engines.zero import TAG

        state = get_fp32_state_dict_from_zero_checkpoint(str(step_dir), tag=TAG)
        return {k: v.detach().clone() for k, v in state.items()}
    if kind == "fsdp":
        from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

        loaded = _load_state_dict_from_keys({"model"}, checkpoint_id=str(step_dir / "dcp"))
        return {k: v.detach().clone() for k, v in loaded["model"].items()}
    raise ValueError(f"unknown engine kind {kind!r}")


def consolidated(run_dir: str | Path, step: int | None = None):
    """(task with the checkpoint's weights, its config, the state dict) of a run."""
    from core.config import load_config
    from core.tasks import build_task

    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    state = read_state(checkpoint_dir(run_dir, step), cfg.engine.kind)
    with torch.device("meta"):
        task = build_task(cfg)
    shapes = task.state_dict()
    missing = shapes.keys() - state.keys()
    if missing:
        raise KeyError(f"checkpoint lacks {sorted(missing)[:5]}")
    # FSDP2 and ZeRO-3 store 0-d parameters as 1-element tensors: back to the model's shapes.
    state = {k: state[k].reshape(shapes[k].shape).float() for k in shapes}
    task.load_state_dict(state, assign=True)
    return task, cfg, state


def export(run_dir: str | Path, out: str | Path, step: int | None = None) -> Path:
    from core.models import hub, save_pretrained

    task, cfg, state = consolidated(run_dir, step)
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in ("vision", "text"):
        save_pretrained(getattr(task, name), tmp / name)
    hub.save_state_dict(state, tmp)
    (tmp / "config.yaml").write_text(cfg.to_yaml())
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def main(args) -> int:
    out = export(args.run_dir, args.out, args.step)
    print(f"exported {args.run_dir} -> {out}")
    return 0
