"""Process-group set-up for every launcher: plain python, torchrun, the deepspeed launcher, SLURM.

Ranks come from whichever launcher started us (torchrun and deepspeed set RANK/WORLD_SIZE/
LOCAL_RANK; a bare `srun` task sets SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID). nccl on CUDA,
gloo on CPU, chosen automatically unless the config says otherwise.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def initialized(self) -> bool:
        return self.world_size > 1


def _env_int(*names: str, default: int) -> int:
    for name in names:
        if name in os.environ:
            return int(os.environ[name])
    return default


def init_distributed(backend: str = "auto", timeout_minutes: int = 30) -> DistInfo:
    rank = _env_int("RANK", "SLURM_PROCID", default=0)
    world = _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)
    local_rank = _env_int("LOCAL_RANK", "SLURM_LOCALID", default=0)
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        dist.init_process_group(
            backend,
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(minutes=timeout_minutes),
            device_id=device if device.type == "cuda" else None,
        )
    return DistInfo(rank, world, local_rank, device)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: list[torch.Tensor]) -> list[float]:
    """Sum a few scalar tensors (on this rank's device) across ranks: one collective, one sync."""
    t = torch.stack([torch.as_tensor(v).to(torch.float64) for v in values])
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def all_gather_object(obj):
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def decided_on_rank0(decide, expected: type[Exception], what: str):
    """Collective: `decide()` runs on rank 0 only and every rank returns its value, or raises
    the same `expected` error (its message) that rank 0 raised. Any other error on rank 0 is
    raised there and as a RuntimeError elsewhere: no rank waits for rank 0 forever."""
    outcome, failure = None, None
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            outcome = ("ok", decide())
        except expected as err:
            outcome = ("expected", str(err))
        except Exception as err:  # noqa: BLE001 - re-raised below, after the others heard
            outcome, failure = ("failed", f"{type(err).__name__}: {err}"), err
    status, value = broadcast_object(outcome)
    if failure is not None:
        raise failure
    if status == "failed":
        raise RuntimeError(f"rank 0 could not {what}: {value}")
    if status == "expected":
        raise expected(value)
    return value


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch's tensors on `device` (asynchronously from pinned memory); the rest as is."""
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
        for k, v in batch.items()
    }


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
