"""A run's checkpoint (any engine) as one full fp32 state dict, in one process (no ranks).

Used by `vlscale export` and by a staged recipe's `task.init_from` (stage 2 starts from stage 1's
weights whatever engine stage 1 ran). Each engine reads its own format (`read_checkpoint` in
core/engines/); DeepSpeed is imported only to read a ZeRO checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from .checkpoint import list_checkpoints
from .engines import engine_class


def checkpoint_dir(run_dir: str | Path, step: int | None = None) -> Path:
    """The run's checkpoint of `step`, or its newest complete one."""
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
    """The full fp32 model state of one checkpoint directory written by engine `kind` (its
    class's `read_checkpoint`; an unknown kind is a ConfigError naming the engines)."""
    return engine_class(kind).read_checkpoint(Path(step_dir))


def run_state(run_dir: str | Path, step: int | None = None) -> tuple[dict, dict]:
    """(the run's resolved config.yaml as a dict, its checkpoint's full state dict). A dict, not
    a Config: core/recipe.py turns it into one where the task kinds are known."""
    tree = yaml.safe_load((Path(run_dir) / "config.yaml").read_text())
    return tree, read_state(checkpoint_dir(run_dir, step), tree["engine"]["kind"])


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
