"""Data-parallel engine: full replicas, gradients all-reduced by torch DDP.

An engine owns everything that differs between parallelism strategies: how the task is wrapped,
backward (with or without gradient sync), the optimizer step, and the checkpoint format.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel

from ..config import Config, ConfigError
from ..distributed import DistInfo
from ..lazy_tensors import LazyTensors
from ..models.hub import lazy_safetensors
from ..optim import (
    build_optimizer,
    build_scheduler,
    group_hyperparameters,
    restore_hyperparameters,
)
from .base import Engine, check_loaded, without_rebuilt
from .wrap import prepare


class DDPEngine(Engine):
    trains_under_autocast = True

    def __init__(self, task: torch.nn.Module, cfg: Config, dist: DistInfo, lr: float, total: int):
        self.task = task.to(dist.device)
        self.dist = dist
        self.cfg = cfg
        self.model = task
        prepare(task, cfg.engine)
        if cfg.engine.offload != "none":
            raise ConfigError(
                f"engine.offload={cfg.engine.offload} needs kind zero2, zero3 or fsdp"
            )
        if dist.world_size > 1:
            self.model = DistributedDataParallel(
                task,
                device_ids=[dist.device.index] if dist.device.type == "cuda" else None,
                # gradients are views into the all-reduce buckets: without it every rank holds
                # a second copy of the gradients (4 bytes per trained parameter)
                gradient_as_bucket_view=True,
            )
        self.params = [p for p in task.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(task, cfg.optim, lr)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, total)
        self.autocast_dtype = torch.bfloat16 if cfg.engine.precision == "bf16" else None

    def forward_backward(self, batch: dict, loss_scale: float, sync: bool):  # -> TaskOutput
        """One micro-step. `sync=False` skips the gradient all-reduce (inner accumulation steps)."""
        no_sync = isinstance(self.model, DistributedDataParallel) and not sync
        with self.model.no_sync() if no_sync else contextlib.nullcontext():
            with self.autocast():
                out = self.model(batch)
            (out.loss * loss_scale).backward()
        return out

    def step(self, loss_is_finite: bool) -> tuple[float, bool]:
        """Clip; step unless the loss or gradient norm is non-finite. Returns (norm, stepped)."""
        max_norm = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm, foreach=True).item()
        stepped = loss_is_finite and math.isfinite(grad_norm)
        if stepped:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()  # the schedule follows the step count, skipped or not
        return grad_norm, stepped

    def full_model(self):
        """The task with full weights, for evaluation: a replica already is."""
        return contextlib.nullcontext(self.task)

    # ---------------------------------------------------------------- checkpoints
    # DDP replicas are identical: rank 0 writes the model and optimizer once.

    def save(self, directory: Path) -> None:
        if not self.dist.is_main:
            return
        state = without_rebuilt(self.task.state_dict(), self.task)
        save_file(unshared(state), directory / "model.safetensors")
        torch.save(
            {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
            directory / "optimizer.pt",
        )

    def load(self, directory: Path) -> None:
        state = load_file(directory / "model.safetensors", device=str(self.dist.device))
        check_loaded(self.task.load_state_dict(state, strict=False), self.task, directory)
        opt = torch.load(
            directory / "optimizer.pt", map_location=self.dist.device, weights_only=True
        )
        hyper = group_hyperparameters(self.optimizer)  # this run's config's
        self.optimizer.load_state_dict(opt["optimizer"])
        restore_hyperparameters(self.optimizer, hyper)
        self.load_scheduler(opt["scheduler"])

    can_reshard = True  # a full replica loads into any world size

    def consolidated_state_dict(self) -> dict[str, torch.Tensor]:
        return self.task.state_dict()

    def parameters_finite(self) -> bool:
        return all(bool(torch.isfinite(p).all()) for p in self.task.parameters())

    # ---------------------------------------------------------------- formats (no instance)

    offloads: tuple[str, ...] = ("none",)  # the engine.offload values DDP supports

    @staticmethod
    def read_checkpoint(step_dir: Path) -> LazyTensors:
        """The full fp32 model state of one checkpoint directory, offline in one process, one
        tensor at a time: the replica rank 0 wrote (model.safetensors)."""
        return lazy_safetensors([step_dir / "model.safetensors"])

    @staticmethod
    def memory_per_rank(offload: str, precision: str, n: int, t: int, w: int) -> dict:
        """Bytes per rank of parameters, gradients and optimizer state (N parameters, T
        trained, W ranks; no offload, the same in fp32 and bf16):
          params 4N (fp32 weights, bf16 by autocast)   grads 4T   optimizer 8T (AdamW m, v)"""
        return {"params": int(4 * n), "grads": int(4 * t), "optimizer": int(8 * t)}


def unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (tied embeddings): the second name gets a
    copy. Loading copies both into the one tied parameter, so the tie survives."""
    seen, out = set(), {}
    for key, value in state.items():
        value = value.detach()
        storage = value.untyped_storage().data_ptr()
        out[key] = value.clone() if storage in seen else value.contiguous()
        seen.add(storage)
    return out
