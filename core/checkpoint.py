"""Atomic step checkpoints: `checkpoints/step_<N>/` is complete or absent.

Every rank writes into `checkpoints/.tmp-step_<N>/`; after a barrier rank 0 writes `meta.json`
last and renames the directory. A crash at any point leaves at most a `.tmp-` directory, which
`latest()` never returns and the next save removes. The engine writes model and optimizer in its
own format; this module adds what every run needs: step, RNG of every rank, data position.

Durable, not only atomic: before `meta.json` is written every file under the `.tmp-` directory
is fsynced (whatever wrote it: the engine's DCP or DeepSpeed directory, safetensors, the rank
files). The page cache is per host and an fsync flushes a file's dirty pages on its host
whichever process wrote them, so the ranks of each host split one pass over the files among
them. Rank 0 fsyncs every directory of it, `meta.json`, and `checkpoints/` after the rename (so
the rename itself survives a power loss). `meta.json` lists every file with its size
(`checkpoint_problems` checks a directory against it).

No complete checkpoint is ever deleted before its replacement is complete, and nothing half
deleted is ever listed. Replacing `step_<N>` (a rerun reaching the same step): the old one is
renamed to `.old-step_<N>`, the new one renamed in, then the old one deleted; `list_checkpoints`
returns an `.old-step_<N>` only while `step_<N>` is missing (a crash between the two renames:
it is complete, having been renamed whole). Deleting (pruning, leftovers): renamed to
`.del-...` first, never listed, then removed. The next save, and `latest()` (rank 0 of a job,
which holds the run directory's lock, core/runlock.py), clean up: `.tmp-` and `.del-`
directories go, an `.old-step_<N>` whose `step_<N>` is missing is renamed back.

Resuming on another number of ranks, the engine reshards model and optimizer; each per-rank
entry of the saved state (e.g. the data position) is handed over as the sequence of every saved
rank's value, read on demand from the shared filesystem, for its owner to rebuild its own part
from (the data stream reads only the ranks holding the positions it continues).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import re
import shutil
import socket
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .config import ConfigError
from .distributed import DistInfo, all_gather_object, barrier, broadcast_object, decided_on_rank0
from .engines import ENGINES

log = logging.getLogger(__name__)
STEP_DIR = re.compile(r"^step_(\d+)$")
TMP, OLD, TRASH = ".tmp-", ".old-", ".del-"  # being written / being replaced / being deleted


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
    """Complete checkpoints, oldest first. Reads only (tools call it while a job writes):
    an `.old-step_<N>` stands in for a missing `step_<N>` (a replacement cut short)."""
    if not root.is_dir():
        return []
    found, aside = {}, {}
    for path in root.iterdir():
        old = path.name.startswith(OLD)
        match = STEP_DIR.match(path.name[len(OLD) :] if old else path.name)
        if match and (path / "meta.json").is_file():
            (aside if old else found)[int(match.group(1))] = path
    return sorted({**aside, **found}.items())


def checkpoint_problems(path: Path) -> list[str]:
    """What is wrong with a checkpoint directory: no meta.json, a file meta.json lists that is
    missing or of another size, a rank file missing. [] for a complete checkpoint."""
    try:
        meta = json.loads((Path(path) / "meta.json").read_text())
    except (OSError, ValueError) as err:
        return [f"meta.json: {err}"]
    problems = []
    files = meta.get("files")  # None: written before meta.json listed its files
    for rank in range(meta["world_size"]):
        name = f"rank_{rank:05d}.pt"
        if files is not None and name not in files:
            problems.append(f"{name}: not listed in meta.json")
        elif files is None and not (Path(path) / name).is_file():
            problems.append(f"{name}: missing")
    files = files or {}
    for name, size in files.items():
        try:
            actual = (Path(path) / name).stat().st_size
        except OSError:
            problems.append(f"{name}: missing")
            continue
        if actual != size:
            problems.append(f"{name}: {actual} bytes, meta.json says {size}")
    return problems


class Checkpointer:
    def __init__(self, run_dir: str | Path, dist: DistInfo, keep: int):
        self.root = Path(run_dir) / "checkpoints"
        self.dist = dist
        self.keep = keep
        self._host_share: tuple[int, int] | None = None  # (index among this host's ranks, count)
        self._run_dir_synced = False

    def latest(self) -> Path | None:
        """The newest complete checkpoint. Rank 0 (of a job holding the run directory's lock)
        first cleans up what a crash may have left (see the module docstring)."""
        if self.dist.is_main:
            self.clean_up()
        found = list_checkpoints(self.root)
        return found[-1][1] if found else None

    def clean_up(self) -> None:
        """Rank 0 of the job holding the run's lock: an `.old-step_<N>` whose `step_<N>` is missing
        is renamed back; other `.old-`, `.tmp-` and `.del-` directories are removed."""
        if not self.root.is_dir():
            return
        trash = []
        for path in sorted(self.root.iterdir()):
            name = path.name
            if name.startswith(OLD):
                final = self.root / name[len(OLD) :]
                if STEP_DIR.match(final.name) and not final.exists():
                    os.replace(path, final)  # its replacement never came in: still the one
                    fsync_dir(self.root)
                else:
                    trash.append(path)
            elif name.startswith(TMP):
                trash.append(path)
        self._delete(trash)
        for stale in self.root.glob(f"{TRASH}*"):  # never read: any order, any crash is fine
            shutil.rmtree(stale, ignore_errors=True)

    def _delete(self, paths: list[Path]) -> None:
        """Rename each aside to `.del-...` (durably) before removing it: no crash leaves a half
        deleted directory under a name `list_checkpoints` returns."""
        if not paths:
            return
        moved = []
        for path in paths:
            moved.append(self.root / f"{TRASH}{path.name}.{time.time_ns()}")
            os.replace(path, moved[-1])
        fsync_dir(self.root)
        for path in moved:
            shutil.rmtree(path, ignore_errors=True)

    def save(self, step: int, engine, extra: dict) -> Path:
        """Collective. `extra` is this rank's own state (e.g. its data position)."""
        final = self.root / f"step_{step}"
        tmp = self.root / f".tmp-step_{step}"
        start = time.perf_counter()
        if self.dist.is_main:
            self.clean_up()  # what an earlier crash left (this step's .tmp- too)
            tmp.mkdir(parents=True)
        barrier()
        engine.save(tmp)
        torch.save(
            {"rng": rng_state(), **extra}, tmp / f"rank_{self.dist.rank:05d}.pt"
        )  # fmt: skip
        barrier()
        files = self._sync(tmp)  # durable before meta.json says it is complete
        barrier()
        if self.dist.is_main:
            meta = {"step": step, "world_size": self.dist.world_size, "time": time.time()}
            _write_json(tmp / "meta.json", {**meta, "files": files})
            fsync_dir(tmp)
            aside = self.root / f"{OLD}{final.name}"
            if final.exists():  # a rerun reaching the same step: the old one stays until then
                os.replace(final, aside)
            os.replace(tmp, final)
            fsync_dir(self.root)  # the renames are durable
            if not self._run_dir_synced:  # checkpoints/ itself, once
                fsync_dir(self.root.parent)
                self._run_dir_synced = True
            self._prune(also=[aside] if aside.exists() else [])
            log.info("checkpoint step %d written in %.1fs", step, time.perf_counter() - start)
        barrier()
        return final

    def _sync(self, directory: Path) -> dict[str, int]:
        """Collective: fsync every file under `directory`, each once per host (the ranks of a
        host split them: an fsync flushes the file's dirty pages on this host, whichever of its
        processes wrote them); rank 0 also fsyncs every directory. Returns {relative path:
        size} of every file (rank 0; {} elsewhere)."""
        if self._host_share is None:
            hosts = all_gather_object(socket.gethostname())
            mine = [rank for rank, host in enumerate(hosts) if host == hosts[self.dist.rank]]
            self._host_share = (mine.index(self.dist.rank), len(mine))
        index, count = self._host_share
        files, dirs = [], []
        for parent, _, names in os.walk(directory):
            dirs.append(Path(parent))
            files += [Path(parent, name) for name in names]
        files.sort()
        for path in files[index::count]:
            fsync_file(path)
        if not self.dist.is_main:
            return {}
        for path in dirs:
            fsync_dir(path)
        return {str(path.relative_to(directory)): path.stat().st_size for path in files}

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
        return decided_on_rank0(
            lambda: compare(path, self.root.parent, cfg, self.dist.world_size),
            ConfigError, "compare the config with the run's",
        )  # fmt: skip

    def _prune(self, also: list[Path]) -> None:
        """Delete `also` and all but the newest `keep` checkpoints."""
        self._delete([*also, *(path for _, path in list_checkpoints(self.root)[: -self.keep])])


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
    with open(tmp, "w") as f:
        f.write(json.dumps(obj))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make the entries of directory `path` durable (where the filesystem can: some network
    filesystems refuse to fsync a directory, and make its entries durable anyway)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF):
            raise
    finally:
        os.close(fd)
