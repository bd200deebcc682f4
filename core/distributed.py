"""Process-group set-up for every launcher: plain python, torchrun, the deepspeed launcher, SLURM.

Ranks come from whichever launcher started us (torchrun and deepspeed set RANK/WORLD_SIZE/
LOCAL_RANK; a bare `srun` task sets SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID). nccl on CUDA,
gloo on CPU, chosen automatically unless the config says otherwise.
"""

from __future__ import annotations

import contextlib
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


# ------------------------------------------------------------------------------ lockstep
# Sharded evaluation (fsdp, zero3: no rank holds the whole model) runs every forward as a
# collective: each rank must run as many as every other, in the same order, although its share
# of the data, and the steps a generation of it takes, are its own. Evaluators iterate their
# data through `Lockstep` (a rank out of data repeats a batch whose results it drops) and
# decoding loops end through `finished` (a rank done early runs padding forwards until every
# rank is done). Outside `lockstep()` both are the plain loops, with no collective.

_LOCKSTEP = False


@contextlib.contextmanager
def lockstep(enabled: bool = True):
    """Within: model calls are collectives, evaluation and decoding loops keep pace across ranks."""
    global _LOCKSTEP
    before, _LOCKSTEP = _LOCKSTEP, enabled and dist.is_initialized()
    try:
        yield
    finally:
        _LOCKSTEP = before


def in_lockstep() -> bool:
    return _LOCKSTEP


def _vote(values: list[int], device: torch.device | None = None) -> list[int]:
    """Element-wise sums over ranks of small integers (one all-reduce)."""
    device = device or _collective_device()
    t = torch.tensor(values, dtype=torch.int64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def finished(done: bool, pad) -> bool:
    """Whether a decoding loop ends here. Alone: `done`. In lockstep the ranks end together: a
    rank that is done while another is not calls `pad()` (a forward whose result it drops) once
    for each step the others still take, voting again after each. Every decoding loop must
    therefore vote at every step, and vote done at its last one (all ranks reach it together)."""
    if not _LOCKSTEP:
        return done
    while True:
        (not_done,) = _vote([0 if done else 1])
        if not_done == 0:
            return True
        if not done:
            return False
        pad()


_END = object()


class Lockstep:
    """Iterate `items` (this rank's share of an evaluation) as (item, real) pairs. Alone, or
    outside `lockstep()`: every item, real. In lockstep: one pair per step on every rank until
    no rank has items left; a rank whose items ran out (or that called `stop()`) gets its last
    item again, not real, so that it runs the same forwards as the others and drops the results.
    A rank that had no item at all borrows the first item of the lowest rank that has one (one
    broadcast). `prepare(item)` (e.g. moving a batch to the device) runs on each pair's item."""

    def __init__(self, items, prepare=None):
        self.items, self.prepare = iter(items), prepare or (lambda item: item)
        self.stopped = False

    def stop(self) -> None:
        """This rank wants no more items (a limit was reached); it pads until the others stop."""
        self.stopped = True

    def __iter__(self):
        if not _LOCKSTEP:
            while not self.stopped:  # stopped: not one more item read (a batch decoded for nothing)
                item = next(self.items, _END)
                if item is _END:
                    return
                yield self.prepare(item), True
            return
        last, rank = _END, dist.get_rank()
        while True:
            item = _END if self.stopped else next(self.items, _END)
            has = item is not _END
            if has:
                last = item
            having, lacking = _vote([int(has), int(last is _END)])
            if having == 0:
                return
            if lacking:  # once at most: every rank has a `last` afterwards
                source = self._lowest_having(has, dist.get_world_size())
                borrowed = broadcast_object(item if rank == source else None, src=source)
                if last is _END:
                    last = borrowed
            yield self.prepare(item if has else last), has

    @staticmethod
    def _lowest_having(has: bool, world: int) -> int:
        flags = torch.tensor([1 if has else 0], dtype=torch.int64, device=_collective_device())
        gathered = [torch.zeros_like(flags) for _ in range(world)]
        dist.all_gather(gathered, flags)
        return next(r for r, f in enumerate(gathered) if f.item())


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
