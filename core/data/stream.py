"""ShardStream: seeded, exactly resumable batches from webdataset tar shards.

Split. Each rank runs `num_workers` DataLoader workers (or reads in-process when 0); each
(rank, worker) pair is a *slot*. With at least as many shards as slots, every epoch's
seeded shard permutation is dealt round-robin to the slots. With fewer shards (said once
per process: a warning for training, INFO for evaluation), every slot reads every shard but
keeps every k-th sample of the shard's (shared) sample permutation, k = number of slots.
Either way an epoch delivers every sample exactly once across all slots. The fallback
keeps every slot fed (a slot without data would stall the in-order DataLoader) for any shard
count; local tars are indexed, so a slot reads only its own samples' bytes, while streamed
shards are read once per slot. Each slot runs through its own epochs, so with uneven shards per
slot, slots drift apart.

Order and resume. A slot reads its shards in groups of `interleave` consecutive shards of its
list (1 by default: shard by shard); within a group, samples are read in one seeded
permutation of all the group's samples (local tars by seeking to indexed offsets; streamed
`pipe:`/http/`hf://` shards are buffered in memory, `interleave` of them at a time). Reading
several shards at once is what mixes a batch: with a mixture of subsets stored shard by shard,
interleave 1 would give batches of one subset each, and a model trained on them learns from
whichever subset came last. A slot's position is therefore just (epoch, group cursor, sample
cursor), plus its bad-data counters. Each batch carries its slot's position after it; the
stream records it when the batch is *delivered* to the loop, together with the slot due next.
DataLoader serves its workers round-robin, so on resume physical worker i serves slot (i +
next slot) mod W and the batch sequence continues bit for bit. Before each sample is decoded,
python/numpy/torch RNGs are seeded from (seed, epoch, shard, sample), so random augmentations
resume exactly too (in-process, the caller's RNG states are restored around each batch).

Layouts: resuming on another number of ranks. The slots above belong to the run's *logical*
layout, fixed when it first starts: R0 ranks x B0 samples per batch, W workers. Global
micro-batch k is the concatenation, in rank order, of the R0 logical ranks' k-th batches (all
ranks take one batch per micro-step, so every logical rank is at the same slot, k + rotation
mod W). A stream on physical rank p of R with batch B, where R x B = R0 x B0, takes samples
[p B, (p+1) B) of that concatenation: it runs the slot readers of every logical rank
overlapping that range, and its worker i runs the readers of worker slot i of all of them,
collating their shares into one batch. Same layout: logical rank p, all of its batch, which is
exactly the plain stream (one code path; the same reads and positions). Fewer ranks: each
logical rank is read by exactly one physical rank, whole, so nothing is read twice. More
ranks: a logical rank's batch is split between physical ranks; each of them decodes every
sample of it (which samples are bad is only known by decoding them, and decoding is seeded
per sample, so all of them skip the same ones and agree on which samples form the batch) and
collates only its share. The state records the logical layout and the positions of the
logical ranks a rank reads, so a run can change its number of ranks any number of times and
still deliver the global batch sequence it would have delivered uninterrupted. A resume that
changes num_workers, the global micro-batch R x B, the shard list, seed or shuffle cannot
continue the old sequence: it restarts every slot at the epoch after the furthest saved one
(no sample of that epoch twice) and logs why.

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
import dataclasses
import glob
import hashlib
import logging
import random
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlparse

import numpy as np
import torch
from braceexpand import braceexpand
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from core.data.errors import BadSample, DataError
from core.data.shards import listed_samples, open_shard

log = logging.getLogger(__name__)
# (shard URLs, world size, slots per rank, training?) already told about reading every shard
_SPLIT_SAID: set[tuple] = set()

MIN_SEEN_FOR_BAD_CHECK = 100  # one early bad sample must not stop a run
MAX_EMPTY_PASSES = 10  # a slot may draw only broken shards in an epoch, but not every time
# 1: one rank's slots, its layout being the logical one. 2: + the logical layout, positions of
# every logical rank the rank reads, and a fingerprint of the shard names.
STATE_VERSION = 2
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


def shard_fingerprint(urls: list[str]) -> str:
    """The shard list by file name (not directory: moving the data keeps a run's position)."""
    names = "\n".join(url.rstrip("/").rsplit("/", 1)[-1] for url in urls)
    return hashlib.sha256(names.encode()).hexdigest()[:16]


def shares(rank: int, batch_size: int, logical_batch: int) -> tuple[tuple[int, int, int], ...]:
    """(logical rank, first, end) for every logical rank whose batch overlaps samples
    [rank x batch_size, (rank + 1) x batch_size) of the global micro-batch: this rank takes
    samples [first, end) of that logical rank's batch."""
    start, stop = rank * batch_size, (rank + 1) * batch_size
    found = []
    for logical in range(start // logical_batch, -(-stop // logical_batch)):
        offset = logical * logical_batch
        found.append((logical, max(start - offset, 0), min(stop - offset, logical_batch)))
    return tuple(found)


@dataclass(frozen=True)
class _Plan:
    """What every slot reads, in which order (the same on every rank and worker), and which
    logical ranks' batches this rank takes a share of. `world_size` and `batch_size` are the
    logical layout's."""

    urls: list[str]
    decode: Callable[[dict], dict]
    collate: Callable[[list[dict]], dict]
    batch_size: int
    world_size: int
    slots_per_rank: int
    seed: int
    shuffle: bool
    epochs: int | None
    drop_last: bool
    max_bad_fraction: float
    shares: tuple[tuple[int, int, int], ...]
    interleave: int = 1

    @property
    def total_slots(self) -> int:
        return self.world_size * self.slots_per_rank

    @property
    def split_samples(self) -> bool:
        return len(self.urls) < self.total_slots

    def shard_order(self, global_slot: int, epoch: int) -> list[int]:
        order = self._permutation(len(self.urls), self.seed, epoch)
        return order if self.split_samples else order[global_slot :: self.total_slots]

    def groups(self, global_slot: int, epoch: int) -> list[list[int]]:
        """This slot's shards of the epoch, in groups read together."""
        order, k = self.shard_order(global_slot, epoch), self.interleave
        return [order[i : i + k] for i in range(0, len(order), k)]

    def sample_order(
        self, global_slot: int, epoch: int, shard_ids: list[int], sizes: list[int]
    ) -> list[tuple[int, int]]:
        """(position in the group, sample index) in reading order. One shard: its seeded
        permutation, as it always was; a group: one permutation of all its samples."""
        members = [(j, i) for j, size in enumerate(sizes) for i in range(size)]
        order = self._permutation(len(members), self.seed, epoch, *shard_ids)
        order = [members[m] for m in order]
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
    """One logical slot's batches from its position onwards: (this rank's share of the batch's
    decoded samples, the slot's position after it); the last item is (None, final position)."""

    def __init__(self, plan: _Plan, share: tuple[int, int, int], slot: int, position: dict):
        self.plan, self.slot, self.pos = plan, slot, position
        self.rank, self.first, self.end = share
        self.global_slot = self.rank * plan.slots_per_rank + slot
        self.counts = Counter(position["counts"])
        self.kept: list[dict] = []  # decoded samples of the batch in [first, end)
        self.filled = 0  # good samples of the batch so far, kept or not

    def batches(self) -> Iterator[tuple[list[dict] | None, dict]]:
        plan, pos = self.plan, self.pos
        empty_passes = 0
        while plan.epochs is None or pos["epoch"] < plan.epochs:
            seen = self.counts["seen"]
            groups = plan.groups(self.global_slot, pos["epoch"])
            while pos["shard"] < len(groups):
                yield from self._group_batches(groups[pos["shard"]])
                pos["shard"], pos["sample"] = pos["shard"] + 1, 0
            empty_passes = empty_passes + 1 if self.counts["seen"] == seen else 0
            if plan.epochs is None and empty_passes == MAX_EMPTY_PASSES:
                # Without this, its worker would spin forever and stall the in-order DataLoader.
                raise DataError(
                    f"rank {self.rank} slot {self.slot} found no samples in {empty_passes} "
                    f"passes over its shards (e.g. {plan.urls[groups[0][0]]}): are they all "
                    "unreadable, or are there fewer samples than ranks x workers?"
                )
            pos["epoch"], pos["shard"] = pos["epoch"] + 1, 0
        if self.filled and not plan.drop_last:
            yield self._emit()
        yield None, self._position()  # the slot's final position and counts

    def _group_batches(self, shard_ids: list[int]) -> Iterator[tuple[list[dict], dict]]:
        pos = self.pos
        opening = pos["sample"] == 0  # count a bad shard once, not again when resuming inside it
        opened: list[tuple[int, object]] = []
        try:
            for shard_id in shard_ids:
                shard = self._open(shard_id, opening)
                if shard is not None:
                    opened.append((shard_id, shard))
            sizes = [len(shard) for _, shard in opened]
            ids = [shard_id for shard_id, _ in opened]
            order = self.plan.sample_order(self.global_slot, pos["epoch"], ids, sizes)
            while pos["sample"] < len(order):
                member, index = order[pos["sample"]]
                pos["sample"] += 1
                shard_id, shard = opened[member]
                # Every sample is decoded, kept or not: only decoding tells a bad one.
                sample = self._decode(
                    shard, self.plan.urls[shard_id], (pos["epoch"], shard_id, index)
                )
                if sample is not None:
                    if self.first <= self.filled < self.end:
                        self.kept.append(sample)
                    self.filled += 1
                    if self.filled == self.plan.batch_size:
                        yield self._emit()
        finally:
            for _, shard in opened:
                shard.close()

    def _open(self, shard_id: int, opening: bool):
        """The shard, or None when it cannot be read (logged; counted once per pass)."""
        url = self.plan.urls[shard_id]
        try:
            shard = open_shard(url)
        except (OSError, EOFError, tarfile.TarError, ValueError) as exc:
            log.error("skipping unreadable shard %s: %s", url, exc)
            if opening:
                self.counts["bad_shards"] += 1
            return None
        if shard.truncated and opening:
            log.warning(
                "shard %s is truncated: reading the %d samples before the cut", url, len(shard)
            )
            self.counts["bad_shards"] += 1
        return shard

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

    def _emit(self) -> tuple[list[dict], dict]:
        self.counts["samples"] += self.filled  # the logical slot's count, whoever takes them
        kept, self.kept, self.filled = self.kept, [], 0
        return kept, self._position()

    def _position(self) -> dict:
        position = {key: self.pos[key] for key in ("epoch", "shard", "sample")}
        return {**position, "counts": dict(self.counts)}


class _SlotDataset(IterableDataset):
    """What each DataLoader worker runs: worker slot (worker id + rotation) mod W of every
    logical rank this rank takes a share of, their shares collated into one batch."""

    def __init__(self, plan: _Plan, positions: dict[int, list[dict]], rotation: int):
        self.plan, self.positions, self.rotation = plan, positions, rotation

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        slot = ((info.id if info else 0) + self.rotation) % self.plan.slots_per_rank
        batches = self._batches(slot)
        if info is not None:
            yield from batches
            return
        while True:  # in-process: the sample seeding must not disturb the caller's RNGs
            with _caller_rng_kept():
                batch = next(batches, None)
            if batch is None:
                return
            yield batch

    def _batches(self, slot: int) -> Iterator[dict]:
        readers = {
            share[0]: _SlotReader(
                self.plan, share, slot, copy.deepcopy(self.positions[share[0]][slot])
            ).batches()
            for share in self.plan.shares
        }
        while readers:
            samples, positions = [], {}
            for rank, items in list(readers.items()):
                item = next(items, None)
                if item is None:
                    del readers[rank]
                    continue
                kept, positions[rank] = item
                samples += kept or []
            if positions:  # without samples: final positions only (the stream yields nothing)
                batch = self.plan.collate(samples) if samples else {}
                batch[POSITION_KEY] = {"slot": slot, "ranks": positions}
                yield batch


def _unchanged(batch: dict) -> dict:
    return batch


def _upgraded(state: Mapping) -> dict:
    """A saved state in the current format (version 1: one rank's slots, logical = physical)."""
    version = state.get("version")
    if version == 1 and "slots" in state:
        logical = {"world_size": state["world_size"], "batch_size": state["batch_size"]}
        return {"interleave": 1, **state, "version": 2, "logical": logical,
                "slots": {str(state["rank"]): state["slots"]}}  # fmt: skip
    if version != STATE_VERSION:
        raise ValueError(f"unknown data state version {version}")
    return {"interleave": 1, **state}  # saved before shards were interleaved


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
        interleave: int = 1,
    ):
        if batch_size < 1 or num_workers < 0 or interleave < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad {batch_size=}, {num_workers=} or {rank=} of {world_size=}")
        self.urls = expand_urls(urls)
        self._fingerprint = shard_fingerprint(self.urls)
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self._plan = _Plan(
            urls=self.urls,
            decode=decode,
            collate=collate,
            batch_size=batch_size,
            world_size=world_size,
            slots_per_rank=max(num_workers, 1),
            seed=seed,
            shuffle=shuffle,
            epochs=epochs,
            drop_last=drop_last,
            max_bad_fraction=max_bad_fraction,
            shares=shares(rank, batch_size, batch_size),
            interleave=interleave,
        )
        self._warn_if_split_samples()
        self._restart()

    def _warn_if_split_samples(self) -> None:
        """Say once per process and stream layout that every slot reads every shard.

        What a researcher needs to know: the split is still exact (each sample once per epoch),
        but every slot opens every shard, so streamed shards are downloaded once per slot and
        a training run should get more shards (a warning). An evaluation stream (finite) over
        a small validation split of one or two shards is the expected case and harmless (local
        tars are indexed: a slot reads only its own samples' bytes), so it is said at INFO
        level. Evaluators build a fresh stream at every evaluation: without the once-only
        rule the same line would be repeated at every evaluation of a run.
        """
        plan = self._plan
        if not plan.split_samples:
            return
        key = (tuple(plan.urls), plan.world_size, plan.slots_per_rank, plan.epochs is None)
        if key in _SPLIT_SAID:
            return
        _SPLIT_SAID.add(key)
        log.log(
            logging.WARNING if plan.epochs is None else logging.INFO,
            "%d shards < %d ranks x %d workers: every slot reads all shards and keeps every "
            "%d-th sample%s; give at least %d shards to split by shard",
            len(plan.urls), plan.world_size, plan.slots_per_rank, plan.total_slots,
            "" if plan.epochs is None else " (evaluation: every sample is still read once)",
            plan.total_slots,
        )  # fmt: skip

    def _set_logical(self, world_size: int, batch_size: int) -> None:
        """Emulate the logical layout world_size x batch_size (this rank's own: the plain one)."""
        plan = dataclasses.replace(
            self._plan,
            world_size=world_size,
            batch_size=batch_size,
            shares=shares(self.rank, self.batch_size, batch_size),
        )
        warn = plan.split_samples and not self._plan.split_samples
        self._plan = plan
        if warn:
            self._warn_if_split_samples()

    def _restart(self) -> None:
        workers = range(self._plan.slots_per_rank)
        self._slots = {rank: [_initial_position() for _ in workers] for rank, *_ in self._shares}
        self._next_slot = 0
        self._batches = 0

    @property
    def _shares(self) -> tuple[tuple[int, int, int], ...]:
        return self._plan.shares

    def _all_slots(self) -> list[dict]:
        return [slot for slots in self._slots.values() for slot in slots]

    def _finished(self) -> bool:
        epochs = self._plan.epochs
        return epochs is not None and all(s["epoch"] >= epochs for s in self._all_slots())

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
                tag = batch.pop(POSITION_KEY)
                for rank, position in tag["ranks"].items():
                    self._slots[rank][tag["slot"]] = position
                self._next_slot = (tag["slot"] + 1) % self._plan.slots_per_rank
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
        return listed_samples(self.urls)

    def state_dict(self) -> dict:
        """Position of what was delivered to the loop; JSON-serialisable, one per rank.

        Version 2: this rank's layout (`rank`, `world_size`, `batch_size`, `num_workers`) and
        the data's (`num_shards`, `shards` fingerprint, `seed`, `shuffle`); `logical`, the
        layout the run started with ({world_size, batch_size}); `slots`, logical rank (a
        string) -> the positions of its W slots, for every logical rank this rank reads;
        `next_slot`, the worker slot due next (the same for all); `batches` delivered."""
        return {
            "version": STATE_VERSION,
            **self._layout(),
            "logical": {"world_size": self._plan.world_size, "batch_size": self._plan.batch_size},
            "batches": self._batches,
            "next_slot": self._next_slot,
            "slots": {str(rank): copy.deepcopy(slots) for rank, slots in self._slots.items()},
        }

    def load_state_dict(self, state: Mapping | Sequence[Mapping]) -> None:
        """The next iteration continues exactly after the last batch delivered before `state`.

        `state`: this rank's `state_dict()` from a run with the same layout (else ValueError),
        or a sequence of the states of every rank of a run with another number of ranks (read
        lazily: only the ranks holding the logical ranks this one reads are accessed). From
        those, the stream continues the same global batch sequence when the global micro-batch
        and num_workers are unchanged, and otherwise restarts at the next epoch boundary."""
        if isinstance(state, Mapping):
            self._load_own(_upgraded(state))
        else:
            self._load_from_layout(state)

    def _load_own(self, state: dict) -> None:
        now = self._layout()
        mismatched = {
            k: (state.get(k), v) for k, v in now.items() if k != "shards" and state.get(k) != v
        }
        if mismatched:
            raise ValueError(f"data state does not fit this stream (saved, now): {mismatched}")
        if state.get("shards", now["shards"]) != now["shards"]:
            log.warning("the shard names changed since the data state was saved (same count): "
                        "continuing from the saved positions")  # fmt: skip
        logical = state["logical"]
        reads = [rank for rank, *_ in shares(self.rank, self.batch_size, logical["batch_size"])]
        slots = {int(rank): copy.deepcopy(slots) for rank, slots in state["slots"].items()}
        if sorted(slots) != reads:
            raise ValueError(f"data state holds logical ranks {sorted(slots)}, not {reads}")
        self._set_logical(logical["world_size"], logical["batch_size"])
        self._slots = slots
        self._next_slot = state["next_slot"]
        self._batches = state["batches"]

    def _load_from_layout(self, saved: Sequence[Mapping]) -> None:
        first = _upgraded(saved[0])
        why = self._why_not_continued(first, len(saved))
        slots = None if why else self._logical_slots(saved, first)
        if why is None and slots is None:
            why = "the saved ranks' states disagree"
        if why is not None:
            epochs = [slot["epoch"] for state in map(_upgraded, saved)
                      for slots in state["slots"].values() for slot in slots]  # fmt: skip
            self._set_logical(self.world_size, self.batch_size)
            self._restart()
            for slot in self._all_slots():
                slot["epoch"] = max(epochs) + 1
            log.warning(
                "data state of %d ranks x batch %d resumed on %d x %d: %s; the data continues "
                "at epoch %d", len(saved), first["batch_size"], self.world_size, self.batch_size,
                why, max(epochs) + 1,
            )  # fmt: skip
            return
        logical = first["logical"]
        self._set_logical(logical["world_size"], logical["batch_size"])
        self._slots = slots
        self._next_slot = first["next_slot"]
        self._batches = first["batches"]
        log.info(
            "data state of %d ranks x batch %d continued exactly on %d x %d (logical layout "
            "%d x %d); rank %d reads logical ranks %s", len(saved), first["batch_size"],
            self.world_size, self.batch_size, logical["world_size"], logical["batch_size"],
            self.rank, [rank for rank, *_ in self._shares],
        )  # fmt: skip

    def _logical_slots(self, saved: Sequence[Mapping], first: dict) -> dict | None:
        """Positions of the logical ranks this rank reads, each from the saved rank its batch
        started on; None if the states read disagree (they must come from one step)."""
        logical_batch, saved_batch = first["logical"]["batch_size"], first["batch_size"]
        slots, read = {}, {0: first}
        for rank, *_ in shares(self.rank, self.batch_size, logical_batch):
            holder = rank * logical_batch // saved_batch
            if holder not in read:
                read[holder] = _upgraded(saved[holder])
            slots[rank] = copy.deepcopy(read[holder]["slots"].get(str(rank)))
        agreed = ("logical", "world_size", "batch_size", "num_workers", "next_slot", "batches")
        if any(s.get(k) != first[k] for s in read.values() for k in agreed):
            return None
        return None if None in slots.values() else slots

    def _why_not_continued(self, saved: dict, saved_ranks: int) -> str | None:
        """Why the saved global batch sequence cannot be continued on this layout, or None."""
        now, logical = self._layout(), saved["logical"]
        if saved["world_size"] != saved_ranks:
            return f"{saved_ranks} states saved by a run of {saved['world_size']} ranks"
        if saved["num_workers"] != now["num_workers"]:
            return (f"num_workers changed ({saved['num_workers']} -> {now['num_workers']}); "
                    "slots are (rank, worker) pairs")  # fmt: skip
        if saved["num_shards"] != now["num_shards"]:
            return f"the shard list changed ({saved['num_shards']} -> {now['num_shards']} shards)"
        if saved.get("shards", now["shards"]) != now["shards"]:
            return "the shard list changed (other shard names)"
        for key in ("seed", "shuffle", "interleave"):
            if saved[key] != now[key]:
                return f"{key} changed ({saved[key]} -> {now[key]})"
        if logical["world_size"] * logical["batch_size"] != self.world_size * self.batch_size:
            return (
                f"the global micro-batch changed ({logical['world_size']} x "
                f"{logical['batch_size']} -> {self.world_size} x {self.batch_size}); keep ranks x "
                "data.batch_size to continue it exactly"
            )
        return None

    def stats(self) -> dict:
        """Delivered so far: samples, skipped/<reason>, bad_shards (broken shards met: once per
        epoch, or once per slot in the sample-split fallback), epoch (passes every slot this
        rank reads has completed). Counts are those of the logical ranks whose batches start
        on this rank (its own, in the same layout), so that they add up over ranks."""
        totals = Counter()
        for rank, first, _ in self._shares:
            if first == 0:
                for slot in self._slots[rank]:
                    totals.update(slot["counts"])
        skipped = {k: totals[k] for k in sorted(totals) if k.startswith("skipped/")}
        return {
            "samples": totals["samples"],
            **skipped,
            "bad_shards": totals["bad_shards"],
            "epoch": min(slot["epoch"] for slot in self._all_slots()),
        }

    def _layout(self) -> dict:
        plan = self._plan
        return {
            "num_shards": len(plan.urls),
            "shards": self._fingerprint,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_workers": self.num_workers,
            "batch_size": self.batch_size,
            "seed": plan.seed,
            "shuffle": plan.shuffle,
            "interleave": plan.interleave,
        }
