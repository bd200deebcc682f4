"""What every engine shares: evaluation precision, the current learning rate, restoring the
schedule from a checkpoint, and (for sharded engines) a full-weight copy for evaluation."""

from __future__ import annotations

import contextlib

import torch


def without_rebuilt(state: dict, task) -> dict:
    """`state` minus the task's rebuilt weights (Task.rebuilt_prefixes): what checkpoints hold."""
    prefixes = task.rebuilt_prefixes()
    return {k: v for k, v in state.items() if not k.startswith(prefixes)} if prefixes else state


def check_loaded(result, task, source) -> None:
    """A non-strict load_state_dict's result: only the task's rebuilt weights (which keep their
    built values) may be missing from a checkpoint, and nothing may be left over."""
    prefixes = task.rebuilt_prefixes()
    missing = [k for k in result.missing_keys if not k.startswith(prefixes)]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"{source} does not fit the model: missing {missing[:5]}, unexpected "
            f"{list(result.unexpected_keys)[:5]}"
        )


class Engine:
    """Subclasses set `dist`, `scheduler` (driving the optimizer whose groups hold the lr) and
    `autocast_dtype` (bf16 or None), and implement forward_backward, step, save, load,
    consolidated_state_dict and parameters_finite; and, without an instance (for tools, see
    core/engines/__init__.py), `read_checkpoint(step_dir)`, `memory_per_rank(offload,
    precision, n, t, w)` and `offloads`. `register_engine` checks those three."""

    autocast_dtype: torch.dtype | None = None
    can_reshard: bool = False  # its checkpoints load into another world size (load_resharded)
    # The loop builds the task with stand-ins for the weights of Hugging Face checkpoints
    # (core/lazy_tensors.py) and the engine reads each rank's shards of them (fsdp).
    loads_into_shards: bool = False
    # bf16 runs train under autocast over fp32 weights (ddp), rather than with bf16 weights: what
    # `vlscale plan` needs to know, as autocast keeps more activations (launch/plan.py).
    trains_under_autocast: bool = False

    @staticmethod
    def buffers_per_rank(cfg, t: int, w: int) -> int:
        """Bytes a rank holds, beyond model state and activations, in buffers the engine
        allocates at a size of its own (communication buckets), for a run config `cfg` with T
        trained parameters on W ranks. None here: ddp's buckets are the gradients
        (gradient_as_bucket_view), fsdp reduces one block's gradients at a time."""
        return 0

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
        """The current learning rate of optim.lr's parameters."""
        return self.lrs["default"]

    @property
    def lrs(self) -> dict[str, float]:
        """The current learning rate by param-group name (the groups' "name", core/optim.py):
        "default" (optim.lr's; the schedule's value even when every trained parameter went to
        an lr_groups pattern) and each optim.lr_groups pattern."""
        sched = self.scheduler
        lrs = {}
        for group in sched.optimizer.param_groups:
            lrs.setdefault(group.get("name", "default"), group["lr"])
        if "default" not in lrs:  # DeepSpeed drops empty groups
            default = sched.optimizer.defaults["lr"] * sched.lr_lambdas[0](sched.last_epoch)
            lrs = {"default": default, **lrs}
        return lrs

    def load_scheduler(self, state: dict) -> None:
        """The schedule's position from a checkpoint; its base learning rates stay this run's
        (optim.lr and optim.lr_groups, scaled), and every group's lr is set to the schedule's at
        that position. The same config gives the very values the run had; a longer
        optim.max_steps, or a new lr (resume_changes=allow), applies from the first step."""
        sched = self.scheduler
        base_lrs = list(sched.base_lrs)  # the optimizer's groups may hold the saved ones by now
        sched.load_state_dict(state)
        sched.base_lrs = base_lrs
        groups = sched.optimizer.param_groups
        for group, base, factor in zip(groups, base_lrs, sched.lr_lambdas, strict=True):
            group["initial_lr"] = base
            group["lr"] = base * factor(sched.last_epoch)  # what LambdaLR.step computes
        sched._last_lr = [group["lr"] for group in groups]

    # Its parameters are sharded over the ranks (fsdp, zero3): evaluating through the task
    # itself makes every forward a collective (distributed.lockstep).
    shards_parameters: bool = False

    def full_model(self):
        """The task with full weights on every rank, for evaluation (collective for sharded
        engines: an unsharded copy filled from the consolidated state)."""
        return self.eval_copy(self.consolidated_state_dict())

    def sharded_model(self):
        """Context manager: the task itself, sharded, for evaluation in lockstep (engines that
        shard their parameters)."""
        return contextlib.nullcontext(self.task)

    @contextlib.contextmanager
    def evaluation(self, sharded: bool, fp32_masters: bool = False):
        """(model, whether it is the sharded task) to evaluate or generate with on every rank,
        in eval mode and without gradients: the sharded task in lockstep where
        `evaluates_sharded(sharded)` (every forward a collective: the ranks keep pace), else a
        full copy; bf16 autocast in bf16 runs. `fp32_masters` in a bf16 run: the fp32 master
        weights in the full copy, without autocast (the sharded task computes in the bf16
        weights it trains with). The model is back in train mode afterwards."""
        from ..distributed import lockstep

        masters = fp32_masters and self.autocast_dtype is not None
        sharded = self.evaluates_sharded(sharded and not masters)
        autocast = contextlib.nullcontext() if masters else self.autocast()
        with self.eval_model(sharded) as model, lockstep(sharded), torch.no_grad(), autocast:
            model.eval()
            try:
                yield model, sharded
            finally:
                model.train()

    def evaluates_sharded(self, sharded: bool) -> bool:
        """Whether evaluation runs through the sharded task (eval.sharded on an engine that
        shards its parameters): every forward is then a collective."""
        return sharded and self.shards_parameters

    def eval_model(self, sharded: bool):
        """Context manager of the task to evaluate: the sharded task itself where
        `evaluates_sharded(sharded)`, else one with full weights on every rank."""
        return self.sharded_model() if self.evaluates_sharded(sharded) else self.full_model()
