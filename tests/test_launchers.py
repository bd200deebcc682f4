"""The README's launchers on 2 CPU processes: the `deepspeed` launcher and `torchrun`, including a
warning signal to one rank only (all ranks stop after the same step, one checkpoint, exact resume).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_train import assert_bitwise_equal, final_params, metrics, run_cli, tiny_overrides

from core.checkpoint import list_checkpoints

ROOT = Path(__file__).resolve().parent.parent
STEPS = 40


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    from core.data.synthetic import write_synthetic_shards

    out = tmp_path_factory.mktemp("launcher_shapes")
    write_synthetic_shards(out, n_train=512, n_val=64, seed=0, shard_size=16, image_size=32)
    return out


def overrides(shards: Path, run_dir: Path) -> list[str]:
    # One shard per rank and step behind a short sleep: a step takes at least 50 ms, so a run is
    # still going when the test signals it, however fast the machine.
    train = f"pipe:sleep 0.05; cat {shards}/train-{{000000..000031}}.tar"
    extra = {"data.train": train, "data.val": f"{shards}/val-{{000000..000003}}.tar"}
    return tiny_overrides(shards, run_dir, STEPS, **extra)


@pytest.fixture(scope="module")
def deepspeed_run(shards, tmp_path_factory) -> Path:
    """`deepspeed --num_gpus 2 --module launch.cli train ...` on CPU, uninterrupted."""
    run = tmp_path_factory.mktemp("deepspeed") / "run"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    port = str(29700 + os.getpid() % 500)
    cmd = [
        str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", port,
        "--no_local_rank", "--module", "launch.cli", "train", "tiny_siglip",
        *overrides(shards, run),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run


@pytest.mark.slow
def test_deepspeed_launcher_runs_two_ranks(deepspeed_run):
    (step, last), *_ = reversed(list_checkpoints(deepspeed_run / "checkpoints"))
    assert step == STEPS
    assert json.loads((last / "meta.json").read_text())["world_size"] == 2
    assert (last / "rank_00000.pt").is_file() and (last / "rank_00001.pt").is_file()
    assert json.loads((deepspeed_run / "eval.json").read_text())["step"] == STEPS
    rows = [r for r in metrics(deepspeed_run) if "loss" in r]
    assert len(rows) == STEPS
    assert rows[0]["samples_per_s"] > 0


def _worker_pid(launcher_pid: int, rank: int, timeout: float = 60) -> int:
    """The torchrun worker with RANK=rank (torchrun starts workers as its direct children)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                if int(stat.read_text().rsplit(")", 1)[1].split()[1]) != launcher_pid:
                    continue
                environ = (stat.parent / "environ").read_bytes().split(b"\0")
            except (OSError, IndexError, ValueError):
                continue
            if f"RANK={rank}".encode() in environ:
                return int(stat.parent.name)
        time.sleep(0.1)
    raise AssertionError(f"no worker with RANK={rank} under pid {launcher_pid}")


@pytest.mark.slow
def test_torchrun_signal_on_one_rank_stops_all_ranks_and_resumes_exactly(
    shards, tmp_path, deepspeed_run
):
    run = tmp_path / "run"
    args = ["train", "tiny_siglip", *overrides(shards, run)]
    proc = run_cli(args, nproc=2, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    rank1 = _worker_pid(proc.pid, rank=1)
    deadline = time.time() + 300
    while not any(r.get("step", 0) >= 10 for r in metrics(run)):
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        assert time.time() < deadline
        time.sleep(0.05)
    os.kill(rank1, signal.SIGUSR2)  # rank 0 never sees a signal: the all-reduce tells it
    out = proc.communicate(timeout=300)[0].decode()
    assert proc.returncode != 0, out[-3000:]  # workers exit 3: torchrun reports it as failure
    assert "exitcode  : 3" in out, out[-3000:]

    (stop,) = [r for r in metrics(run) if r.get("event") == "interrupted"]
    assert 10 <= stop["step"] < STEPS
    assert list_checkpoints(run / "checkpoints")[-1][0] == stop["step"]
    assert not (run / "eval.json").exists()

    assert run_cli(args, nproc=2).wait(timeout=600) == 0  # the same command resumes
    (resume,) = [r for r in metrics(run) if r.get("event") == "resume"]
    assert resume["step"] == stop["step"]
    assert [r["step"] for r in metrics(run) if "loss" in r] == list(range(1, STEPS + 1))
    assert_bitwise_equal(final_params(deepspeed_run), final_params(run))


@pytest.mark.parametrize("kind", ["zero3", "fsdp"])
def test_torchrun_with_one_process_runs_the_sharded_engines(shards, tmp_path, kind):
    """`torchrun --nproc_per_node=1` (one GPU, or debugging a sharded recipe): the sharded engine
    makes its one-rank process group through torchrun's rendezvous store. With a store of its
    own it waited forever for a server (torchrun's workers join the agent's store as clients)."""
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    port = str(29650 + os.getpid() % 300)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1",
           f"--master_port={port}", "-m", "launch.cli", "train", "tiny_siglip",
           *tiny_overrides(shards, run, 3), f"engine.kind={kind}",
           "eval.evaluators=[]"]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [r["step"] for r in metrics(run) if "loss" in r] == [1, 2, 3]
