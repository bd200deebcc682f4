"""Atomic step checkpoints: `checkpoints/step_<N>/` is complete or absent.

Every rank writes into `checkpoints/.tmp-step_<N>/`; after a barrier rank 0 writes `meta.json`
last and renames the directory. A crash at any point leaves at most a `.tmp-` directory, which
`latest()` never returns and the next save removes. The engine writes model and optimizer in its
own format; this module adds what every run needs: step, RNG of every rank, data position.

Resuming on another number of ranks, the engine reshards model and optimizer; each per-rank
entry of the saved state (e.g. the data position) is handed over as the sequence of every saved
rank's value, read on demand from the shared filesystem, for its owner to rebuild its own part
from (the data stream reads only the ranks holding the positions it continues).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .config import ConfigError
from .distributed import DistInfo, barrier, broadcast_object
from .engines import ENGINES

log = logging.getLogger(__name__)
STEP_DIR = re.compile(r"^step_(\d+)$")


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = STEP_DIR.match(path.name)
        if match and (path / "meta.json").is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


class Checkpointer:
    def __init__(self, run_dir: str | Path, dist: DistInfo, keep: int):
        self.root = Path(run_dir) / "checkpoints"
        self.dist = dist
        self.keep = keep

    def latest(self) -> Path | None:
        found = list_checkpoints(self.root)
        return found[-1][1] if found else None

    def save(self, step: int, engine, extra: dict) -> Path:
        """Collective. `extra` is this rank's own state (e.g. its data position)."""
        final = self.root / f"step_{step}"
        tmp = self.root / f".tmp-step_{step}"
        start = time.perf_counter()
        if self.dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        engine.save(tmp)
        torch.save(
            {"rng": rng_state(), **extra}, tmp / f"rank_{self.dist.rank:05d}.pt"
        )  # fmt: skip
        barrier()
        if self.dist.is_main:
            meta = {"step": step, "world_size": self.dist.world_size, "time": time.time()}
            _write_json(tmp / "meta.json", meta)
            if final.exists():  # a re-run reaching the same step: replace atomically enough
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._prune()
            log.info("checkpoint step %d written in %.1fs", step, time.perf_counter() - start)
        barrier()
        return final

    def load(self, path: Path, engine) -> tuple[int, dict]:
        """Restore engine state and this rank's RNG; returns (step, extra state): each per-rank
        entry (the data position) as the `SavedRanks` sequence of every saved rank's value,
        whatever the world size. The data stream continues from them exactly, or from the next
        epoch when its layout changed (data.num_workers, the global micro-batch), which a
        resume on the same number of ranks may do too (core.config.RESUME_MAY_CHANGE)."""
        meta = json.loads((path / "meta.json").read_text())
        if meta["world_size"] != self.dist.world_size:
            return meta["step"], self._load_resharded(path, meta["world_size"], engine)
        engine.load(path)
        state = _load_rank(path, self.dist.rank)
        set_rng_state(state.pop("rng"))
        return meta["step"], {key: SavedRanks(path, meta["world_size"], key) for key in state}

    def _load_resharded(self, path: Path, saved_world: int, engine) -> dict:
        """Another world size: the engine reshards model and optimizer (DCP, DeepSpeed universal
        checkpoints, DDP's full replica). Every other per-rank entry comes back as a
        `SavedRanks` sequence over all saved ranks (the data stream continues from them; RNG
        states belong to the old ranks and are not restored)."""
        if not engine.can_reshard:
            can = ", ".join(k for k, cls in ENGINES.items() if cls.can_reshard)
            raise RuntimeError(
                f"{path} was written by {saved_world} ranks, this run has "
                f"{self.dist.world_size}; the {type(engine).__name__} cannot reshard it "
                f"(engine.kind {can} can)"
            )
        engine.load_resharded(path)
        log.warning(
            "%s: written by %d ranks, resumed on %d", path, saved_world, self.dist.world_size
        )
        keys = [key for key in _load_rank(path, 0) if key != "rng"]
        return {key: SavedRanks(path, saved_world, key) for key in keys}

    def resolve_resume(self, resume: str) -> Path | None:
        """`auto`: newest complete checkpoint of the run (rank 0 decides, all agree)."""
        if resume == "none":
            return None
        if resume == "auto":
            path = self.latest() if self.dist.is_main else None
            path = broadcast_object(str(path) if path else None)
            return Path(path) if path else None
        path = Path(resume)
        if not (path / "meta.json").is_file():
            raise FileNotFoundError(f"resume={resume}: not a complete checkpoint (no meta.json)")
        return path

    def check_config(self, path: Path, cfg, compare) -> dict:
        """Before anything is written: the config resuming checkpoint `path` against the config
        of the run that wrote it, by `compare(path, run_dir, cfg, world_size)`
        (core.recipe.config_changes). Rank 0 compares; every rank raises the same ConfigError,
        or returns the changes resume_changes=allow let through."""
        outcome, failure = None, None
        if self.dist.is_main:
            try:
                changes = compare(path, self.root.parent, cfg, self.dist.world_size)
                outcome = ("ok", changes)
            except ConfigError as err:
                outcome = ("error", str(err))
            except Exception as err:  # noqa: BLE001 - no rank may wait for rank 0 forever
                outcome, failure = ("failed", f"{type(err).__name__}: {err}"), err
        status, value = broadcast_object(outcome)
        if failure is not None:
            raise failure
        if status == "failed":
            raise RuntimeError(f"rank 0 could not compare the config with the run's: {value}")
        if status == "error":
            raise ConfigError(value)
        return value

    def _prune(self) -> None:
        for _, path in list_checkpoints(self.root)[: -self.keep]:
            shutil.rmtree(path, ignore_errors=True)
        for stale in self.root.glob(".tmp-step_*"):
            shutil.rmtree(stale, ignore_errors=True)


class SavedRanks(Sequence):
    """One entry (e.g. "data") of every rank's saved state, in rank order. Each access reads
    that rank's file: nothing stays in memory, and only the ranks asked for are read."""

    def __init__(self, path: Path, world_size: int, key: str):
        self.path, self.world_size, self.key = path, world_size, key

    def __len__(self) -> int:
        return self.world_size

    def __getitem__(self, rank):
        if isinstance(rank, slice):
            return [self[i] for i in range(*rank.indices(len(self)))]
        if not -len(self) <= rank < len(self):
            raise IndexError(f"rank {rank} of {len(self)} saved ranks")
        return _load_rank(self.path, rank % len(self))[self.key]


def _load_rank(path: Path, rank: int) -> dict:
    return torch.load(path / f"rank_{rank:05d}.pt", weights_only=True)


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)
