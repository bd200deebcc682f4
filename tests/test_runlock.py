"""One live job per run directory (core/runlock.py): the rules for a recorded holder (dead pid,
stale lease), the flock dying with its holder (not kept by a forked child), a requeue waiting
for its previous incarnation; and real launches: a second `vlscale train` on a running run
directory is refused while the first carries on, and a rerun after SIGKILL starts at once."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from test_train import kill_tree, metrics, run_cli, tiny_overrides

from core import runlock
from core.checkpoint import list_checkpoints
from core.distributed import DistInfo
from core.runlock import RunLock, RunLocked, holder_blocks, identity

ROOT = Path(__file__).resolve().parent.parent
HOST = socket.gethostname()


def write_record(run: Path, **record) -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / ".lock").write_text(json.dumps(record))


@pytest.fixture
def sleeper():
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    proc.kill()
    proc.wait()


def test_holder_rules_dead_pid_zombie_reused_pid_and_lease(sleeper):
    now = time.time()
    me = identity()
    alive = {**me, "pid": sleeper.pid, "pid_start": runlock._start_time(sleeper.pid), "lease": 0}
    assert holder_blocks(alive, now)  # same host, process alive: blocks, whatever its lease
    assert not holder_blocks({**alive, "pid_start": "1"}, now)  # pid reused by another process
    assert not holder_blocks({**alive, "released": now}, now)
    assert not holder_blocks(None, now) and not holder_blocks({}, now)

    done = subprocess.Popen(["true"])
    start = runlock._start_time(done.pid)
    deadline = time.time() + 10
    while runlock._proc_stat(done.pid)[0] != "Z":  # exited, not yet reaped: a zombie
        assert time.time() < deadline
        time.sleep(0.01)
    zombie = {**me, "pid": done.pid, "pid_start": start, "lease": now}
    assert not holder_blocks(zombie, now)
    done.wait()
    assert not holder_blocks(zombie, now)  # gone: a dead pid never blocks, lease or not

    other = {**alive, "host": "node-17", "lease": now - 10}
    assert holder_blocks(other, now, lease_s=60)  # another host: its lease is fresh
    assert not holder_blocks(other, now, lease_s=5)  # expired: its holder is gone
    rebooted = {**alive, "boot_id": "another-kernel", "lease": now - 100}
    assert not holder_blocks(rebooted, now, lease_s=60)  # same name, another boot: the lease


def test_network_filesystem_rules_when_flock_is_free(tmp_path, sleeper):
    """Where flock may not reach other hosts (local=False), the record decides."""
    run = tmp_path / "run"
    write_record(run, host="node-17", boot_id="b", pid=4242, job_id="77", started=time.time(),
                 lease=time.time() - 5)  # fmt: skip
    with pytest.raises(RunLocked) as err:
        RunLock(run, lease_s=60, local=False).acquire()
    text = str(err.value)
    assert "pid 4242 on host node-17 (SLURM job 77)" in text and "lease renewed 5s ago" in text
    assert "`kill 4242` on node-17 or `scancel 77`" in text and "rerun this command" in text

    write_record(run, host="node-17", boot_id="b", pid=4242, lease=time.time() - 61)
    lock = RunLock(run, lease_s=60, local=False)
    lock.acquire()  # an expired lease does not block
    lock.release()

    here = {**identity(), "pid": sleeper.pid, "pid_start": runlock._start_time(sleeper.pid)}
    write_record(run, **here, lease=0)
    with pytest.raises(RunLocked, match=f"pid {sleeper.pid} on host {HOST}"):
        RunLock(run, local=False).acquire()  # this host, alive: blocks with any lease
    sleeper.kill()
    sleeper.wait()
    lock = RunLock(run, local=False)
    lock.acquire()  # this host, dead: never blocks, fresh lease or not
    lock.release()

    # On a local filesystem a free flock settles it, whatever the record says.
    write_record(run, host="node-17", boot_id="b", pid=4242, lease=time.time())
    lock = RunLock(run)
    lock.acquire()
    lock.release()


HOLDER = """
import os, sys, time
from core.runlock import RunLock
lock = RunLock(sys.argv[1], renew_s=0.1)
lock.acquire()
if os.fork() == 0:  # a forked child (a data-loader worker) must not keep the lock
    time.sleep(60)
    os._exit(0)
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
lock.release()
"""


def start_holder(run: Path, seconds: float, **env) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(HOLDER), str(run), str(seconds)],
        cwd=ROOT, env={**os.environ, **env}, stdout=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_flock_held_blocks_and_dies_with_its_holder_not_with_its_child(tmp_path):
    run = tmp_path / "run"
    holder = start_holder(run, 60)
    try:
        record = json.loads((run / ".lock").read_text())
        assert record["pid"] == holder.pid and record["host"] == HOST
        time.sleep(0.3)
        assert json.loads((run / ".lock").read_text())["lease"] > record["lease"]  # renewed
        with pytest.raises(RunLocked, match=f"pid {holder.pid} on host {HOST}"):
            RunLock(run).acquire()
        os.kill(holder.pid, signal.SIGKILL)  # the holder only: its forked child lives on
        holder.wait()
        start = time.monotonic()
        lock = RunLock(run)
        lock.acquire()  # at once: the OS dropped the flock, and the record names a dead pid
        assert time.monotonic() - start < 1
        assert json.loads((run / ".lock").read_text())["pid"] == os.getpid()
        lock.release()
        assert json.loads((run / ".lock").read_text())["released"]
    finally:
        kill_tree(holder.pid)
        with contextlib.suppress(ProcessLookupError):  # the orphaned child, in its session
            os.killpg(holder.pid, signal.SIGKILL)


def test_requeue_of_the_holders_job_waits_for_it_others_refuse_at_once(tmp_path, monkeypatch):
    run = tmp_path / "run"
    holder = start_holder(run, 2.0, SLURM_JOB_ID="4711")
    try:
        monkeypatch.setenv("SLURM_JOB_ID", "4712")
        monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
        start = time.monotonic()
        with pytest.raises(RunLocked, match="SLURM job 4711"):
            RunLock(run, wait_s=30).acquire()
        assert time.monotonic() - start < 2

        monkeypatch.setenv("SLURM_JOB_ID", "4711")  # requeued: same job id
        lock = RunLock(run, wait_s=30)
        lock.acquire()  # waits for the old incarnation's release
        assert holder.poll() is not None or time.monotonic() - start > 1.5
        lock.release()
    finally:
        kill_tree(holder.pid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(holder.pid, signal.SIGKILL)


def test_hold_raises_the_same_error_and_releases_on_any_exit(tmp_path):
    run = tmp_path / "run"
    dist = DistInfo(0, 1, 0, None)
    with pytest.raises(KeyError), runlock.hold(run, dist):
        raise KeyError("a crash in training")
    with runlock.hold(run, dist) as lock:
        with pytest.raises(RunLocked, match=f"pid {os.getpid()} on host {HOST}"):
            RunLock(run).acquire()  # another descriptor, even in this process, is refused
        assert lock.fd is not None
    assert lock.fd is None and runlock._held == []


# ----------------------------------------------------------------------------- real launches


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    from core.data.synthetic import write_synthetic_shards

    out = tmp_path_factory.mktemp("shapes")
    write_synthetic_shards(out, n_train=512, n_val=64, seed=0, shard_size=16, image_size=32)
    return out


def slow_overrides(shapes: Path, run: Path, steps: int) -> list[str]:
    """A shard per rank and step behind a short sleep: a step takes at least 30 ms."""
    train = f"pipe:sleep 0.03; cat {shapes}/train-{{000000..000031}}.tar"
    extra = {"data.train": train, "data.val": f"{shapes}/val-{{000000..000003}}.tar"}
    return tiny_overrides(shapes, run, steps, **{**extra, "checkpoint.every": 20})


def wait_for_step(run: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not any(r.get("step", 0) >= step and "loss" in r for r in metrics(run)):
        assert proc.poll() is None, "the run ended early"
        assert time.time() < deadline
        time.sleep(0.05)


def test_second_launch_is_refused_while_the_first_runs_on_and_finishes(shapes, tmp_path):
    run = tmp_path / "run"
    args = ["train", "tiny_siglip", *slow_overrides(shapes, run, 300)]
    log = tmp_path / "first.log"
    with open(log, "w") as f:
        first = run_cli(args, stdout=f, stderr=subprocess.STDOUT)
    try:
        wait_for_step(run, 3, first)
        config = (run / "config.yaml").stat().st_mtime_ns
        second = run_cli(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = second.communicate(timeout=300)
        assert second.returncode == 2, err[-3000:]
        assert f"pid {first.pid} on host {HOST}" in err, err[-3000:]
        assert "vlscale train: error: run directory" in err and "Traceback" not in err
        assert first.poll() is None, "the first run stopped"
        assert (run / "config.yaml").stat().st_mtime_ns == config  # nothing written by it
        step = max(r["step"] for r in metrics(run) if "loss" in r)
        wait_for_step(run, step + 5, first)  # the first carries on
        assert first.wait(timeout=600) == 0, log.read_text()[-3000:]
    finally:
        kill_tree(first.pid)
    assert [r["step"] for r in metrics(run) if "loss" in r] == list(range(1, 301))
    assert len([r for r in metrics(run) if r.get("event") == "start"]) == 1
    assert json.loads((run / ".lock").read_text())["released"]


def _workers(launcher_pid: int, n: int, timeout: float = 60) -> dict[int, int]:
    """rank -> pid of the torchrun workers (its direct children)."""
    from test_launchers import _worker_pid

    return {rank: _worker_pid(launcher_pid, rank, timeout) for rank in range(n)}


@pytest.mark.slow
def test_sigkilled_torchrun_agent_leaves_workers_that_hold_the_run_dir(shapes, tmp_path):
    """The issue: SIGKILL the torchrun agent alone; its workers train on. Relaunching the same
    command is refused (naming rank 0's worker), until those are killed too; then the rerun
    starts at once and resumes."""
    run = tmp_path / "run"
    args = ["train", "tiny_siglip", *slow_overrides(shapes, run, 150)]
    agent = run_cli(args, nproc=2, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers = _workers(agent.pid, 2)
    try:
        wait_for_step(run, 3, agent)
        os.kill(agent.pid, signal.SIGKILL)
        agent.wait()
        step = max(r["step"] for r in metrics(run) if "loss" in r)
        deadline = time.time() + 120
        while not any(r.get("step", 0) >= step + 3 for r in metrics(run)):  # they train on
            assert time.time() < deadline
            time.sleep(0.05)

        second = run_cli(args, nproc=2, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        out = second.communicate(timeout=300)[0].decode()
        assert second.returncode != 0, out[-3000:]
        assert f"pid {workers[0]} on host {HOST}" in out, out[-3000:]
        assert "exitcode  : 2" in out, out[-3000:]
        assert all(Path(f"/proc/{pid}").exists() for pid in workers.values())
    finally:
        for pid in workers.values():
            kill_tree(pid)
    time.sleep(0.5)
    saved = list_checkpoints(run / "checkpoints")[-1][0]
    start = time.monotonic()
    third = run_cli(args, nproc=2, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = third.communicate(timeout=600)[0].decode()
    assert third.returncode == 0, out[-3000:]
    assert "waiting" not in out
    (resume,) = [r for r in metrics(run) if r.get("event") == "resume"]
    assert resume["step"] == saved
    assert list_checkpoints(run / "checkpoints")[-1][0] == 150
    assert time.monotonic() - start < 600
