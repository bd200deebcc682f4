"""One live job per run directory: the lock `RUN_DIR/.lock`.

Why: SIGKILLing a `torchrun` agent leaves its workers (in sessions of their own) training, and a
rerun of the same command would then put a second job into the same run directory, both
writing checkpoints, `metrics.jsonl` and `config.yaml`.

Design:
- Rank 0 takes the lock in `core.loop.train` before anything is written to the run directory
  (before a crash's leftovers are cleaned up and `config.yaml` is written) and broadcasts the
  outcome: every rank fails together with the same `RunLocked` error (`vlscale train` exits with
  code 2), which names the holder's host, pid, SLURM job and start time and says what to do.
- The lock is `fcntl.flock(LOCK_EX | LOCK_NB)` on `RUN_DIR/.lock`, held for the job's life. The
  OS releases a flock when the last descriptor of it is closed, i.e. when the process dies
  however it dies, so a crash, a SIGKILL or an OOM kill never blocks the rerun. Forked children
  (data-loader workers) close their copy of the descriptor at once, so none of them keeps the
  lock after rank 0 is gone; exec'd children never get it (close-on-exec).
- The holder writes a record into the file: host, pid, the pid's start time, the kernel's boot
  id, SLURM job id, start time and `lease` (rewritten in place: renaming a new file over it
  would lose the flock). Rank 0 renews `lease` every RENEW_S seconds from a daemon thread.
- A held flock (EWOULDBLOCK) always blocks: some live process holds it. A free one settles it
  on a local filesystem (ext4, xfs, btrfs, tmpfs, overlay, ...: every process that can open the
  file shares one kernel). On a network filesystem flock may not reach across hosts (NFS mounted
  `nolock`, Lustre `localflock`, some FUSE filesystems), so there, and where flock is not
  supported at all (ENOSYS, ENOLCK), the record decides too: a holder on this host (same
  hostname and boot id) blocks while its process (pid with the same start time, not a zombie)
  is alive; a holder on another host blocks while its lease is fresh (younger than LEASE_S). An
  expired lease (its holder crashed, or its node died, with nothing to release it) never
  blocks. Hosts' clocks must agree to well within LEASE_S - RENEW_S (NTP; munge needs it too).
- Release: on every exit from `train` (finished, `Interrupted`, an exception) the record is
  marked released and the descriptor closed. After a crash the record stays; the rules above
  ignore it.
- Requeues. `vlscale submit`'s own requeue (launch/submit.py) runs `scontrol requeue` after
  `train` raised `Interrupted`, i.e. after the lock was released, and the sbatch templates
  requeue from the batch shell once the ranks have exited; SLURM starts the requeued job only
  after the old job's processes are gone. Where the old holder's node died, though, a network
  filesystem may keep its flock (until the lock server notices) or its lease (up to LEASE_S):
  so a job whose SLURM job id is the holder's (a requeue keeps the id) or which SLURM restarted
  (SLURM_RESTART_COUNT > 0) waits for the lock up to WAIT_S = 2 x LEASE_S instead of failing.
  Any other job refuses at once: wait for the holder to finish, or stop it and rerun the same
  command, which resumes from the newest checkpoint.
- Limits: only rank 0 holds the lock, so the other ranks of a job whose rank 0 died may live on
  until their next collective fails; a holder suspended (SIGSTOP, `scontrol suspend`) for longer
  than LEASE_S looks dead to another host on a filesystem without cross-host flock; and two
  jobs starting at the same moment on such a filesystem may both get in.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
LEASE_S = 60.0  # a lease older than this does not block (holder on another host)
RENEW_S = 15.0  # rank 0 renews its lease this often
WAIT_S = 2 * LEASE_S  # a requeued job waits this long for its previous incarnation's lock
RECORD_BYTES = 1024  # the record, padded: one write of a fixed size, never a short file
LOCAL_FILESYSTEMS = {
    "ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "ramfs", "overlay", "zfs", "f2fs", "jfs",
    "reiserfs", "bcachefs", "vfat", "exfat", "ntfs", "ntfs3", "hfsplus", "apfs",
}  # fmt: skip

_held: list[int] = []  # descriptors of locks this process holds: closed in forked children


def _close_in_child() -> None:
    for fd in _held:
        with contextlib.suppress(OSError):
            os.close(fd)  # the parent's flock stays: it goes with the last descriptor only
    _held.clear()


os.register_at_fork(after_in_child=_close_in_child)


class RunLocked(Exception):  # noqa: N818 - reads as a state: "the run is locked"
    """Another live job holds the run directory."""


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _proc_stat(pid: int) -> list[str] | None:
    """/proc/PID/stat from field 3 (state) on; None if unreadable."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _start_time(pid: int) -> str | None:
    stat = _proc_stat(pid)
    return stat[19] if stat and len(stat) > 19 else None  # field 22: start time, in ticks


def identity() -> dict:
    """This process as a lock record names it."""
    pid = os.getpid()
    return {
        "host": socket.gethostname(),
        "boot_id": _boot_id(),
        "pid": pid,
        "pid_start": _start_time(pid),
        "job_id": os.environ.get("SLURM_JOB_ID", ""),
    }


def process_alive(record: dict) -> bool:
    """Whether the process `record` names is running on this host (not a zombie, not a newer
    process that got its pid)."""
    pid = record.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, another user's
    stat = _proc_stat(pid)
    if stat is None:
        return True  # no /proc: the signal said it exists
    if stat[0] in ("Z", "X"):
        return False
    return record.get("pid_start") in (None, stat[19])


def holder_blocks(record: dict | None, now: float, lease_s: float = LEASE_S) -> bool:
    """Whether the holder `record` names may still be running, where flock cannot tell: on this
    host (hostname and boot id) while its process is alive, on another while its lease is
    fresh. A released record, or none, never blocks."""
    if not record or record.get("released") or "pid" not in record:
        return False
    me = identity()
    if record.get("host") == me["host"] and record.get("boot_id") == me["boot_id"]:
        return process_alive(record)
    return now - float(record.get("lease", 0)) < lease_s


def filesystem_type(path: str | Path) -> str | None:
    """The type of the filesystem holding `path` (/proc/self/mountinfo), None if unknown."""
    real = os.path.realpath(path)
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    best, fstype = "", None
    for line in lines:
        left, _, right = line.partition(" - ")
        fields = left.split()
        if len(fields) < 5 or not right:
            continue
        mount = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
        inside = real == mount or real.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best):  # the last of equal mount points is on top
            best, fstype = mount, right.split()[0]
    return fstype


class RunLock:
    """`RUN_DIR/.lock`, see the module docstring. `local`: whether a free flock settles it
    (None: a local filesystem; the tests force the network rules with False)."""

    def __init__(
        self,
        run_dir: str | Path,
        lease_s: float = LEASE_S,
        renew_s: float = RENEW_S,
        wait_s: float = WAIT_S,
        local: bool | None = None,
    ):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.lease_s, self.renew_s, self.wait_s = lease_s, renew_s, wait_s
        self.local = local
        self.fd: int | None = None
        self.record: dict = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        """Take the lock, or raise RunLocked naming the holder (after waiting up to `wait_s` when
        this job is a requeue of the holder's)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.local is None:
            self.local = filesystem_type(self.run_dir) in LOCAL_FILESYSTEMS
        deadline = None
        while True:
            holder = self._try()
            if holder is None:
                return
            if deadline is None:
                wait = self.wait_s if self._requeue_of(holder) else 0.0
                deadline = time.monotonic() + wait
                if wait:
                    log.warning("%s; this job is a requeue of it: waiting up to %.0fs for it "
                                "to exit", self._message(holder), wait)  # fmt: skip
            if time.monotonic() >= deadline:
                raise RunLocked(self._message(holder))
            time.sleep(min(1.0, self.lease_s / 10))

    def _try(self) -> dict | None:
        """Take the lock (None) or return the holder's record (possibly {} when unknown)."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            authoritative = self.local
        except BlockingIOError:
            holder = self._read_holder(fd)
            os.close(fd)
            return holder
        except OSError as err:
            if err.errno not in (errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                os.close(fd)
                raise
            log.warning("%s: flock unsupported (%s); relying on the holder record", self.path, err)
            authoritative = False
        if not authoritative:
            holder = _read(fd)
            if holder_blocks(holder, time.time(), self.lease_s):
                os.close(fd)  # drops our flock too
                return holder
        self.fd = fd
        _held.append(fd)
        now = time.time()
        self.record = {**identity(), "started": now, "lease": now, "lease_s": self.lease_s}
        self._write(self.record)
        self._stop.clear()
        self._thread = threading.Thread(target=self._renew, name="runlock-lease", daemon=True)
        self._thread.start()
        return None

    def _read_holder(self, fd: int) -> dict:
        """The record of a flock's holder: it may not have written it yet, so wait a moment for
        one that is not released."""
        for _ in range(10):
            holder = _read(fd)
            if holder and not holder.get("released"):
                return holder
            time.sleep(0.1)
        return {}

    def _requeue_of(self, holder: dict) -> bool:
        job = os.environ.get("SLURM_JOB_ID", "")
        restarted = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0
        return bool(job and holder.get("job_id") == job) or restarted

    def _message(self, holder: dict) -> str:
        if not holder:
            who = f"a process that holds {self.path} (it wrote no record yet)"
        else:
            who = f"pid {holder.get('pid')} on host {holder.get('host')}"
            if holder.get("job_id"):
                who += f" (SLURM job {holder['job_id']})"
            if holder.get("started"):
                started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["started"]))
                who += f", started {started}"
            if holder.get("lease"):
                who += f", lease renewed {max(0.0, time.time() - holder['lease']):.0f}s ago"
        stop = f"`kill {holder['pid']}` on {holder.get('host')}" if holder.get("pid") else "it"
        if holder.get("job_id"):
            stop += f" or `scancel {holder['job_id']}`"
        return (
            f"run directory {self.run_dir} is in use by another job: {who}. One job at a time "
            f"may train in a run directory: wait for that one to finish, or stop it ({stop}; "
            "its other ranks follow) and rerun this command, which resumes from the newest "
            "checkpoint."
        )

    def _write(self, record: dict) -> None:
        data = json.dumps(record).encode().ljust(RECORD_BYTES - 1) + b"\n"
        os.pwrite(self.fd, data, 0)
        os.ftruncate(self.fd, len(data))

    def _renew(self) -> None:
        while not self._stop.wait(self.renew_s):
            self.record["lease"] = time.time()
            try:
                self._write(self.record)
            except (OSError, TypeError) as err:  # TypeError: released meanwhile (fd None)
                log.warning("%s: could not renew the lease: %s", self.path, err)

    def release(self) -> None:
        if self.fd is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        try:
            self._write({**self.record, "released": time.time()})
        except OSError as err:
            log.warning("%s: could not mark the lock released: %s", self.path, err)
        finally:
            _held.remove(self.fd)
            os.close(self.fd)  # the flock goes with it
            self.fd = None


def _read(fd: int) -> dict | None:
    for _ in range(3):  # a read racing the holder's rewrite: read again
        try:
            text = os.pread(fd, 2 * RECORD_BYTES, 0).decode().strip()
            return json.loads(text) if text else None
        except (OSError, ValueError):
            time.sleep(0.05)
    return None


@contextlib.contextmanager
def hold(run_dir: str | Path, dist, **options) -> Iterator[RunLock | None]:
    """Collective: rank 0 holds the run directory's lock for the duration; every rank raises
    the same RunLocked when another job holds it. Yields rank 0's RunLock (None elsewhere)."""
    from .distributed import decided_on_rank0

    lock = RunLock(run_dir, **options) if dist.is_main else None
    decided_on_rank0(lambda: lock.acquire(), RunLocked, "lock the run directory")
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()
