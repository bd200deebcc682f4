"""What every engine shares: evaluation precision, the current learning rate, restoring the
schedule from a checkpoint, and (for sharded engines) a full-weight copy for evaluation."""

from __future__ import annotations

import contextlib

import torch


class Engine:
    """Subclasses set `dist`, `scheduler` (driving the optimizer whose groups hold the lr) and
    `autocast_dtype` (bf16 or None), and implement forward_backward, step, save, load,
    consolidated_state_dict and parameters_finite; and, without an instance (for tools, see
    core/engines/__init__.py), `read_checkpoint(step_dir)`, `memory_per_rank(offload,
    precision, n, t, w)` and `offloads`. `register_engine` checks those three."""

    autocast_dtype: torch.dtype | None = None
    can_reshard: bool = False  # its checkpoints load into another world size (load_resharded)

    def load_resharded(self, directory) -> None:
        """Load a checkpoint written by another number of ranks (only if `can_reshard`). Formats
        that are independent of the world size (a full replica, DCP) load as they are."""
        self.load(directory)

    def autocast(self):
        """bf16 autocast when the run is bf16 (DDP trains in it; sharded engines evaluate in it)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.dist.device.type, dtype=self.autocast_dtype)

    @property
    def lr(self) -> float:
        return self.scheduler.optimizer.param_groups[0]["lr"]

    def load_scheduler(self, state: dict) -> None:
        """The schedule's position, and the learning rates it implies set on the optimizer."""
        self.scheduler.load_state_dict(state)
        for group, lr in zip(self.scheduler.optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr

    def full_model(self):
        """The task with full weights on every rank, for evaluation (collective for sharded
        engines: an unsharded copy filled from the consolidated state)."""
        return self.eval_copy(self.consolidated_state_dict())
