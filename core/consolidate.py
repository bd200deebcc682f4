"""A run's checkpoint (any engine) as one full fp32 state dict, in one process (no ranks), each
tensor read when it is asked for (core/lazy_tensors.py).

Used by `vlscale export` and by a staged recipe's `task.init_from` (stage 2 starts from stage 1's
weights whatever engine stage 1 ran). Each engine reads its own format (`read_checkpoint` in
core/engines/); DeepSpeed is imported only to read a ZeRO checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
import yaml

from . import lazy_tensors
from .checkpoint import list_checkpoints
from .engines import engine_class
from .lazy_tensors import LazyTensors, metas


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


def read_state(step_dir: Path, kind: str) -> LazyTensors:
    """The full fp32 model state of one checkpoint directory written by engine `kind` (its
    class's `read_checkpoint`; an unknown kind is a ConfigError naming the engines), each tensor
    read when asked for."""
    return engine_class(kind).read_checkpoint(Path(step_dir))


def run_state(run_dir: str | Path, step: int | None = None) -> tuple[dict, LazyTensors]:
    """(the run's resolved config.yaml as a dict, its checkpoint's full state dict). A dict, not
    a Config: core/recipe.py turns it into one where the task kinds are known."""
    tree = yaml.safe_load((Path(run_dir) / "config.yaml").read_text())
    return tree, read_state(checkpoint_dir(run_dir, step), tree["engine"]["kind"])


def fit_state(
    state: Mapping[str, torch.Tensor], shapes: dict[str, torch.Tensor], source: str
) -> Mapping[str, torch.Tensor]:
    """`state` in the shapes of a module's state dict, fp32: FSDP2 and ZeRO-3 store 0-d
    parameters as 1-element tensors. Missing keys are an error naming them. A LazyTensors state
    gives LazyTensors (nothing is read here), a dict a dict."""
    missing = shapes.keys() - state.keys()
    if missing:
        raise KeyError(f"{source} lacks {len(missing)} tensors, e.g. {sorted(missing)[:5]}")
    known = metas(state)
    wrong = [
        f"{k}: {tuple(known[k].shape)} vs {tuple(shapes[k].shape)}"
        for k in shapes
        if known[k].numel() != shapes[k].numel()
    ]
    if wrong:
        raise ValueError(
            f"{source} has another architecture: {len(wrong)} tensors differ in shape "
            f"(checkpoint vs model), e.g. {'; '.join(wrong[:3])}"
        )
    if isinstance(state, LazyTensors):
        fitted = {k: torch.empty(shapes[k].shape, device="meta") for k in shapes}
        return LazyTensors(fitted, lambda k: state[k].reshape(shapes[k].shape).float())
    # stand-ins (an fsdp build's init_from) stay stand-ins
    return {k: lazy_tensors.as_float(state[k], shapes[k].shape) for k in shapes}


def load_run_weights(module: torch.nn.Module, run_dir: str | Path, source: str,
                     merge=None) -> dict:  # fmt: skip
    """Copy a previous run's newest checkpoint (any engine's) over every weight of `module`
    (`task.init_from`); returns that run's config tree. `merge(tree, state) -> state` adapts its
    state first (folding LoRA adapters). While stand-ins are active (an fsdp build) nothing is
    read here: the module gets stand-ins of the checkpoint's tensors (derived ones where merged
    or cast), and each rank reads its rows into its shards, one tensor at a time."""
    previous, state = run_state(run_dir)
    stand_ins = lazy_tensors.active()
    if stand_ins is not None:
        state = stand_ins.from_lazy(state)
    if merge is not None:
        state = merge(previous, state)
    fitted = fit_state(state, module.state_dict(), source)
    if stand_ins is None:
        module.load_state_dict(fitted)
    else:
        lazy_tensors.assign(module, fitted)
    return previous
