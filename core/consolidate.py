"""A run's checkpoint (any engine) as one full fp32 state dict, in one process (no ranks).

Used by `vlscale export` and by a staged recipe's `task.init_from` (stage 2 starts from stage 1's
weights whatever engine stage 1 ran). DeepSpeed is imported only to read a ZeRO checkpoint, DCP
only for FSDP.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file


def checkpoint_dir(run_dir: str | Path, step: int | None = None) -> Path:
    """The run's checkpoint of `step`, or its newest complete one."""
    from .checkpoint import list_checkpoints

    run_dir = Path(run_dir)
    found = dict(list_checkpoints(run_dir / "checkpoints"))
    if not found:
        raise FileNotFoundError(f"{run_dir}/checkpoints holds no complete checkpoint")
    if step is None:
        return found[max(found)]
    if step not in found:
        raise FileNotFoundError(f"no complete checkpoint of step {step}; have {sorted(found)}")
    return found[step]


def read_state(step_dir: Path, kind: str) -> dict[str, torch.Tensor]:
    """The full fp32 model state of one checkpoint directory written by engine `kind`."""
    if kind == "ddp":
        return load_file(step_dir / "model.safetensors")
    if kind in ("zero2", "zero3"):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        from .engines.zero import TAG

        state = get_fp32_state_dict_from_zero_checkpoint(str(step_dir), tag=TAG)
        return {k: v.detach().clone() for k, v in state.items()}
    if kind == "fsdp":
        from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

        loaded = _load_state_dict_from_keys({"model"}, checkpoint_id=str(step_dir / "dcp"))
        return {k: v.detach().clone() for k, v in loaded["model"].items()}
    raise ValueError(f"unknown engine kind {kind!r}")


def run_state(run_dir: str | Path, step: int | None = None):
    """(the run's Config, its checkpoint's full state dict)."""
    from .config import load_config

    cfg = load_config(Path(run_dir) / "config.yaml")
    return cfg, read_state(checkpoint_dir(run_dir, step), cfg.engine.kind)


def fit_state(
    state: dict[str, torch.Tensor], shapes: dict[str, torch.Tensor], source: str
) -> dict[str, torch.Tensor]:
    """`state` in the shapes of a module's state dict: FSDP2 and ZeRO-3 store 0-d parameters as
    1-element tensors. Missing keys are an error naming them."""
    missing = shapes.keys() - state.keys()
    if missing:
        raise KeyError(f"{source} lacks {len(missing)} tensors, e.g. {sorted(missing)[:5]}")
    wrong = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(shapes[k].shape)}"
        for k in shapes
        if state[k].numel() != shapes[k].numel()
    ]
    if wrong:
        raise ValueError(
            f"{source} has another architecture: {len(wrong)} tensors differ in shape "
            f"(checkpoint vs model), e.g. {'; '.join(wrong[:3])}"
        )
    return {k: state[k].reshape(shapes[k].shape).float() for k in shapes}
