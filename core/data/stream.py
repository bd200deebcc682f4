"""ShardStream: seeded, exactly resumable batches from webdataset tar shards.

Split. Each rank runs `num_workers` DataLoader workers (or reads in-process when 0); each
(rank, worker) pair is a *slot*. With at least as many shards as slots, every epoch's
seeded shard permutation is dealt round-robin to the slots. With fewer shards, a warning
is logged and every slot reads every shard but keeps every k-th sample of the shard's
(shared) sample permutation, k = number of slots. Either way an epoch delivers every
sample exactly once across all slots. The fallback keeps every slot fed (a slot without
data would stall the in-order DataLoader) for any shard count; local tars are indexed,
so a slot reads only its own samples' bytes, while streamed shards are read once per slot.
Each slot runs through its own epochs, so with uneven shards per slot, slots drift apart.

Order and resume. Within a shard, samples are read in a seeded permutation (local tars by
seeking to indexed offsets; streamed `pipe:`/http/`hf://` shards are buffered in memory).
A slot's position is therefore just (epoch, shard cursor, sample cursor), plus its bad-data
counters. Each batch carries its slot's position after it; the stream records it when the
batch is *delivered* to the loop, together with the slot due next. DataLoader serves its
workers round-robin, so on resume physical worker i serves slot (i + next slot) mod W and
the batch sequence continues bit for bit. Before each sample is decoded, python/numpy/
torch RNGs are seeded from (seed, epoch, shard, sample), so random augmentations resume
exactly too (in-process, the caller's RNG states are restored around each batch).

Bad data. `decode` raises BadSample(reason) for unusable samples (truncated tar members
raise it too): they are skipped and counted per reason. Unreadable shards are logged and
skipped, truncated ones logged and their intact samples used; both count as bad_shards.
When a slot's skipped samples exceed `max_bad_fraction` of those it has seen (after
MIN_SEEN_FOR_BAD_CHECK), DataError names the shard and the most common reason.

Workers are not persistent: each iteration must start them from the stream's current
position, which a persistent worker (holding its first copy of the dataset) cannot see.
The cost is one worker start per iteration (per eval pass; training iterates once).
"""

from __future__ import annotations

import contextlib
import copy
import glob
import logging
import random
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch
from braceexpand import braceexpand
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from core.data.errors import BadSample, DataError
from core.data.shards import open_shard, read_sizes

log = logging.getLogger(__name__)

MIN_SEEN_FOR_BAD_CHECK = 100  # one early bad sample must not stop a run
MAX_EMPTY_PASSES = 10  # a slot may draw only broken shards in an epoch, but not every time
STATE_VERSION = 1
POSITION_KEY = "_pos"


def expand_urls(urls: str | list[str]) -> list[str]:
    """Shard URLs from paths, globs and brace patterns; a string may join several with '::'."""
    items = urls.split("::") if isinstance(urls, str) else list(urls)
    expanded: list[str] = []
    for item in items:
        for url in braceexpand(item):
            if urlparse(url).scheme == "" and any(c in url for c in "*?["):
                matches = sorted(glob.glob(url))
                if not matches:
                    raise FileNotFoundError(f"no shards match {url!r}")
                expanded += matches
            else:
                expanded.append(url)
    if not expanded:
        raise ValueError(f"no shards in {urls!r}")
    return expanded


@dataclass(frozen=True)
class _Plan:
    """What every slot reads, in which order: the same on every rank and worker."""

    urls: list[str]
    decode: Callable[[dict], dict]
    collate: Callable[[list[dict]], dict]
    batch_size: int
    rank: int
    world_size: int
    slots_per_rank: int
    seed: int
    shuffle: bool
    epochs: int | None
    drop_last: bool
    max_bad_fraction: float

    @property
    def total_slots(self) -> int:
        return self.world_size * self.slots_per_rank

    @property
    def split_samples(self) -> bool:
        return len(self.urls) < self.total_slots

    def shard_order(self, global_slot: int, epoch: int) -> list[int]:
        order = self._permutation(len(self.urls), self.seed, epoch)
        return order if self.split_samples else order[global_slot :: self.total_slots]

    def sample_order(self, global_slot: int, epoch: int, shard_id: int, size: int) -> list[int]:
        order = self._permutation(size, self.seed, epoch, shard_id)
        return order[global_slot :: self.total_slots] if self.split_samples else order

    def _permutation(self, size: int, *seed: int) -> list[int]:
        if not self.shuffle:
            return list(range(size))
        return np.random.default_rng(list(seed)).permutation(size).tolist()


def _initial_position() -> dict:
    return {"epoch": 0, "shard": 0, "sample": 0, "counts": {"seen": 0, "samples": 0}}


def _seed_rngs(*values: int) -> None:
    first, second = np.random.SeedSequence(list(values)).generate_state(2).tolist()
    random.seed(first)
    np.random.seed(first)
    torch.default_generator.manual_seed(second)


@contextlib.contextmanager
def _caller_rng_kept():
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


class _SlotReader:
    """Produces one slot's batches from its position onwards, each tagged with the position."""

    def __init__(self, plan: _Plan, slot: int, position: dict):
        self.plan, self.slot, self.pos = plan, slot, position
        self.global_slot = plan.rank * plan.slots_per_rank + slot
        self.counts = Counter(position["counts"])

    def batches(self) -> Iterator[dict]:
        plan, pos = self.plan, self.pos
        buffer: list[dict] = []
        empty_passes = 0
        while plan.epochs is None or pos["epoch"] < plan.epochs:
            seen = self.counts["seen"]
            shard_ids = plan.shard_order(self.global_slot, pos["epoch"])
            while pos["shard"] < len(shard_ids):
                yield from self._shard_batches(shard_ids[pos["shard"]], buffer)
                pos["shard"], pos["sample"] = pos["shard"] + 1, 0
            empty_passes = empty_passes + 1 if self.counts["seen"] == seen else 0
            if plan.epochs is None and empty_passes == MAX_EMPTY_PASSES:
                # Without this, its worker would spin forever and stall the in-order DataLoader.
                raise DataError(
                    f"rank {plan.rank} slot {self.slot} found no samples in {empty_passes} "
                    f"passes over its shards (e.g. {plan.urls[shard_ids[0]]}): are they all "
                    "unreadable, or are there fewer samples than ranks x workers?"
                )
            pos["epoch"], pos["shard"] = pos["epoch"] + 1, 0
        if buffer and not plan.drop_last:
            yield self._emit(buffer)
        yield {POSITION_KEY: self._position()}  # the slot's final position and counts

    def _shard_batches(self, shard_id: int, buffer: list[dict]) -> Iterator[dict]:
        url, pos = self.plan.urls[shard_id], self.pos
        opening = pos["sample"] == 0  # count a bad shard once, not again when resuming inside it
        try:
            shard = open_shard(url)
        except (OSError, EOFError, tarfile.TarError, ValueError) as exc:
            log.error("skipping unreadable shard %s: %s", url, exc)
            if opening:
                self.counts["bad_shards"] += 1
            return
        try:
            if shard.truncated and opening:
                log.warning(
                    "shard %s is truncated: reading the %d samples before the cut", url, len(shard)
                )
                self.counts["bad_shards"] += 1
            order = self.plan.sample_order(self.global_slot, pos["epoch"], shard_id, len(shard))
            while pos["sample"] < len(order):
                index = order[pos["sample"]]
                pos["sample"] += 1
                sample = self._decode(shard, url, (pos["epoch"], shard_id, index))
                if sample is not None:
                    buffer.append(sample)
                    if len(buffer) == self.plan.batch_size:
                        yield self._emit(buffer)
        finally:
            shard.close()

    def _decode(self, shard, url: str, where: tuple[int, int, int]) -> dict | None:
        self.counts["seen"] += 1
        _seed_rngs(self.plan.seed, *where)
        try:
            return self.plan.decode(shard.read(where[2]))
        except BadSample as bad:
            self.counts[f"skipped/{bad.reason}"] += 1
            self._check_bad_fraction(url)
            return None

    def _check_bad_fraction(self, url: str) -> None:
        seen = self.counts["seen"]
        reasons = Counter({k: v for k, v in self.counts.items() if k.startswith("skipped/")})
        skipped = sum(reasons.values())
        if seen >= MIN_SEEN_FOR_BAD_CHECK and skipped > self.plan.max_bad_fraction * seen:
            reason, count = reasons.most_common(1)[0]
            raise DataError(
                f"{skipped} of {seen} samples skipped (more than {self.plan.max_bad_fraction:.1%})"
                f" at shard {url}; most common reason: {reason.removeprefix('skipped/')} "
                f"({count} samples)"
            )

    def _emit(self, buffer: list[dict]) -> dict:
        batch = self.plan.collate(buffer)
        self.counts["samples"] += len(buffer)
        buffer.clear()
        batch[POSITION_KEY] = self._position()
        return batch

    def _position(self) -> dict:
        pos = {key: self.pos[key] for key in ("epoch", "shard", "sample")}
        return {"slot": self.slot, **pos, "counts": dict(self.counts)}


class _SlotDataset(IterableDataset):
    """What each DataLoader worker runs: the slot its worker id maps to under `rotation`."""

    def __init__(self, plan: _Plan, positions: list[dict], rotation: int):
        self.plan, self.positions, self.rotation = plan, positions, rotation

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        slot = ((info.id if info else 0) + self.rotation) % self.plan.slots_per_rank
        batches = _SlotReader(self.plan, slot, copy.deepcopy(self.positions[slot])).batches()
        if info is not None:
            yield from batches
            return
        while True:  # in-process: the sample seeding must not disturb the caller's RNGs
            with _caller_rng_kept():
                batch = next(batches, None)
            if batch is None:
                return
            yield batch


def _unchanged(batch: dict) -> dict:
    return batch


class ShardStream:
    """Batches (dicts from `collate`) over tar shards, split across ranks and workers.

    `epochs=None` streams forever (training); `epochs=1, shuffle=False, drop_last=False`
    yields every sample of the shards exactly once across all ranks (evaluation). Iterating
    continues from the delivered position (start, `load_state_dict`, or where the last
    iteration stopped); a finite stream that was consumed to the end starts over.
    """

    def __init__(
        self,
        urls: str | list[str],
        *,
        decode: Callable[[dict], dict],
        collate: Callable[[list[dict]], dict],
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 2,
        seed: int = 0,
        shuffle: bool = True,
        epochs: int | None = None,
        drop_last: bool = True,
        max_bad_fraction: float = 0.01,
        pin_memory: bool = False,
    ):
        if batch_size < 1 or num_workers < 0 or not 0 <= rank < world_size:
            raise ValueError(f"bad {batch_size=}, {num_workers=} or {rank=} of {world_size=}")
        self.urls = expand_urls(urls)
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self._plan = _Plan(
            urls=self.urls,
            decode=decode,
            collate=collate,
            batch_size=batch_size,
            rank=rank,
            world_size=world_size,
            slots_per_rank=max(num_workers, 1),
            seed=seed,
            shuffle=shuffle,
            epochs=epochs,
            drop_last=drop_last,
            max_bad_fraction=max_bad_fraction,
        )
        if self._plan.split_samples:
            log.warning(
                "%d shards < %d ranks x %d workers: every slot reads all shards and keeps every "
                "%d-th sample; give at least %d shards to split by shard",
                len(self.urls), world_size, max(num_workers, 1), self._plan.total_slots,
                self._plan.total_slots,
            )  # fmt: skip
        self._restart()

    def _restart(self) -> None:
        self._slots = [_initial_position() for _ in range(self._plan.slots_per_rank)]
        self._next_slot = 0
        self._batches = 0

    def _finished(self) -> bool:
        epochs = self._plan.epochs
        return epochs is not None and all(s["epoch"] >= epochs for s in self._slots)

    def __iter__(self) -> Iterator[dict]:
        if self._finished():
            self._restart()
        dataset = _SlotDataset(self._plan, copy.deepcopy(self._slots), self._next_slot)
        loader = DataLoader(
            dataset,
            batch_size=None,
            collate_fn=_unchanged,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            # Its own generator: DataLoader would otherwise draw worker seeds from the caller's.
            generator=torch.Generator().manual_seed(self._plan.seed),
        )
        batches = iter(loader)
        try:
            for batch in batches:
                position = batch.pop(POSITION_KEY)
                slot = position.pop("slot")
                self._slots[slot] = position
                self._next_slot = (slot + 1) % self._plan.slots_per_rank
                if batch:  # a slot's final marker carries only its position
                    self._batches += 1
                    yield batch
        except BaseException:
            # A worker's error leaves the loader referenced by the traceback; shut its workers
            # down now, as DataLoader's own shutdown stalls ~5 s when run later by the GC.
            shutdown = getattr(batches, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
            raise

    def num_samples(self) -> int | None:
        """Samples in one pass over all ranks' shards, from the sizes.json beside them; None
        when a shard is remote or not listed."""
        total, sizes = 0, {}
        for url in self.urls:
            parsed = urlparse(url)
            if parsed.scheme not in ("", "file"):
                return None
            path = Path(parsed.path if parsed.scheme else url)
            if path.parent not in sizes:
                sizes[path.parent] = read_sizes(path.parent)
            if path.name not in sizes[path.parent]:
                return None
            total += sizes[path.parent][path.name]
        return total

    def state_dict(self) -> dict:
        """Position of what was delivered to the loop; JSON-serialisable, one per rank."""
        return {
            "version": STATE_VERSION,
            **self._layout(),
            "batches": self._batches,
            "next_slot": self._next_slot,
            "slots": copy.deepcopy(self._slots),
        }

    def load_state_dict(self, state: dict) -> None:
        """The next iteration continues exactly after the last batch delivered before `state`."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unknown data state version {state.get('version')}")
        if "next_epoch" in state:  # positions of another rank layout: start at an epoch boundary
            self._restart()
            for slot in self._slots:
                slot["epoch"] = state["next_epoch"]
            return
        mismatched = {k: (state.get(k), v) for k, v in self._layout().items() if state.get(k) != v}
        if mismatched:
            raise ValueError(f"data state does not fit this stream (saved, now): {mismatched}")
        self._slots = copy.deepcopy(state["slots"])
        self._next_slot = state["next_slot"]
        self._batches = state["batches"]

    def stats(self) -> dict:
        """Delivered so far: samples, skipped/<reason>, bad_shards (broken shards met: once per
        epoch, or once per slot in the sample-split fallback), epoch (passes every slot of this
        rank has completed)."""
        totals = Counter()
        for slot in self._slots:
            totals.update(slot["counts"])
        skipped = {k: totals[k] for k in sorted(totals) if k.startswith("skipped/")}
        return {
            "samples": totals["samples"],
            **skipped,
            "bad_shards": totals["bad_shards"],
            "epoch": min(slot["epoch"] for slot in self._slots),
        }

    def _layout(self) -> dict:
        plan = self._plan
        return {
            "num_shards": len(plan.urls),
            "rank": plan.rank,
            "world_size": plan.world_size,
            "num_workers": self.num_workers,
            "batch_size": plan.batch_size,
            "seed": plan.seed,
            "shuffle": plan.shuffle,
        }
