"""SLURM: `vlscale submit` on a real two-node cluster (started by the session), preemption and
timeout requeues that resume exactly, `--resume`, `vlscale status`, and the sbatch templates."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from slurm_cluster import job_info, logs, slurm_cluster, wait_job  # noqa: F401 (fixture)
from test_train import assert_bitwise_equal, final_params, metrics, tiny_overrides

from core.checkpoint import list_checkpoints

ROOT = Path(__file__).resolve().parent.parent
STEPS = 60  # the straight / preempted / resumed runs
TIMEOUT_STEPS = 110  # at >= 0.5 s a step (slowed shards) it cannot finish inside one minute


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """One 16-sample shard per rank and step, so a `pipe:sleep` per shard bounds a step's time
    from below: runs are long enough to be interrupted however fast the machine is."""
    from core.data.synthetic import write_synthetic_shards

    out = tmp_path_factory.mktemp("slurm_shapes")
    write_synthetic_shards(out, n_train=1024, n_val=64, seed=0, shard_size=16, image_size=32)
    return out


def overrides(shards: Path, run_dir: Path, steps: int, delay: float = 0.1, **extra) -> list[str]:
    data = {
        "data.train": f"pipe:sleep {delay}; cat {shards}/train-{{000000..000063}}.tar",
        "data.val": f"{shards}/val-{{000000..000003}}.tar",
        # Not tiny_siglip's linear_probe: it reads its images from data.train, here slowed shards
        # (~80 s at 0.5 s a shard), which would put the final evaluation past the time limit.
        "eval.evaluators": '["retrieval", "zeroshot"]',
    }
    return tiny_overrides(shards, run_dir, steps, **data, **extra)


def vlscale(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "launch.cli", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    if check:
        assert proc.returncode == 0, f"vlscale {args[0]} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def submit(*args: str) -> str:
    out = vlscale("submit", *args).stdout
    match = re.search(r"job id:\s+(\d+)", out)
    assert match, out
    return match.group(1)


def wait_step(run_dir: Path, step: int, job_id: str, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not any(r.get("step", 0) >= step and "loss" in r for r in metrics(run_dir)):
        state = job_info(job_id).get("JobState")
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), (state, logs(run_dir / "slurm"))
        assert time.time() < deadline, f"step {step} not reached: {logs(run_dir / 'slurm')}"
        time.sleep(0.1)


def events(run_dir: Path, name: str) -> list[dict]:
    return [r for r in metrics(run_dir) if r.get("event") == name]


def test_time_limits_and_ports():
    from launch.submit import job_port, parse_time_minutes

    assert parse_time_minutes("24:00:00") == 1440
    assert parse_time_minutes("1-00:00:00") == 1440
    assert parse_time_minutes("2-12") == 3600
    assert parse_time_minutes("00:01:00") == 1
    assert parse_time_minutes("90") == 90
    assert parse_time_minutes("00:00:30") == 1  # rounded up: never shorter than asked
    with pytest.raises(ValueError, match="--time"):
        parse_time_minutes("00:00:00")
    ports = {job_port(str(job)) for job in range(1000, 1100)}
    assert len(ports) == 100 and all(1024 < p < 65536 for p in ports)
    assert job_port("123") == job_port("123")


def test_dry_run_prints_the_sbatch_script(tmp_path):
    run = tmp_path / "run"
    proc = vlscale(
        "submit", "tiny_siglip", f"run_dir={run}", "--nodes", "4", "--gpus-per-node", "8",
        "--partition", "gpu", "--time", "1-00:00:00", "--account", "vl", "--qos", "high",
        "--constraint", "a100", "--mem", "400G", "--cpus-per-task", "10", "--exclusive",
        "--max-requeues", "5", "--dry-run",
    )  # fmt: skip
    script = proc.stdout
    for line in (
        "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=8",  # one task per GPU
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --partition=gpu",
        "#SBATCH --time=1440",
        "#SBATCH --account=vl",
        "#SBATCH --qos=high",
        "#SBATCH --constraint=a100",
        "#SBATCH --mem=400G",
        "#SBATCH --cpus-per-task=10",
        "#SBATCH --exclusive",
        "#SBATCH --requeue",
        "#SBATCH --signal=USR2@90",
    ):
        assert line in script.splitlines(), (line, script)
    assert f"srun --unbuffered --output {run}/slurm/%j_%t_log.out" in script
    assert not run.exists()  # nothing submitted, nothing written

    bad = vlscale("submit", "tiny_siglip", "--time", "soon", "--dry-run", check=False)
    assert bad.returncode == 2 and "--time 'soon'" in bad.stderr


@pytest.fixture(scope="module")
def timeout_jobs(request, shards, tmp_path_factory) -> dict[str, tuple[str, Path]]:
    """Submitted before the other SLURM tests run, so its minute-long segments overlap theirs."""
    request.getfixturevalue("slurm_cluster")
    jobs = {}
    for max_requeues in ("6", "0"):
        run = tmp_path_factory.mktemp(f"timeout{max_requeues}") / "run"
        job = submit(
            "tiny_siglip", *overrides(shards, run, TIMEOUT_STEPS, delay=0.5),
            "--nodes", "1", "--time", "00:01:00", "--signal-delay", "5",
            "--max-requeues", max_requeues,
        )  # fmt: skip
        jobs[max_requeues] = job, run
    return jobs


@pytest.mark.slow
@pytest.mark.slurm
@pytest.mark.usefixtures("slurm_cluster", "timeout_jobs")
def test_submit_two_nodes_completes(shards, tmp_path_factory):
    run = tmp_path_factory.mktemp("straight") / "run"
    job = submit("tiny_siglip", *overrides(shards, run, STEPS), "--nodes", "2", "--time", "10")
    info = wait_job(job, 300, run / "slurm")
    assert info["JobState"] == "COMPLETED", logs(run / "slurm")
    assert info["NodeList"] == "vln[1-2]"
    ev = json.loads((run / "eval.json").read_text())
    assert ev["step"] == STEPS and ev["num_pairs"] == 64
    (step, last), *_ = reversed(list_checkpoints(run / "checkpoints"))
    assert step == STEPS
    assert json.loads((last / "meta.json").read_text())["world_size"] == 2
    assert not events(run, "interrupted") and not events(run, "resume")
    status = json.loads(vlscale("status", str(run), "--json").stdout)
    assert status["finished"] and status["step"] == STEPS
    assert [(j["job_id"], j["state"]) for j in status["jobs"]] == [(job, "COMPLETED")]
    test_submit_two_nodes_completes.run = run  # the uninterrupted reference for the tests below


def straight_run() -> Path:
    run = getattr(test_submit_two_nodes_completes, "run", None)
    if run is None:
        pytest.skip("needs the uninterrupted run of test_submit_two_nodes_completes")
    return run


@pytest.mark.slow
@pytest.mark.slurm
@pytest.mark.usefixtures("slurm_cluster")
def test_preempted_job_requeues_and_resumes_bitwise_exact(shards, tmp_path):
    straight = straight_run()
    run = tmp_path / "run"
    job = submit("tiny_siglip", *overrides(shards, run, STEPS), "--nodes", "2", "--time", "10")
    wait_step(run, 10, job)
    # What a preempting scheduler sends: the warning signal to every task of the job.
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    info = wait_job(job, 420, run / "slurm")
    assert info["JobState"] == "COMPLETED", logs(run / "slurm")
    assert info["Restarts"] == "1"

    (stop,) = events(run, "interrupted")
    (requeue,) = events(run, "requeue")
    (resume,) = events(run, "resume")
    assert 10 <= stop["step"] < STEPS and stop["signal"] == "SIGUSR2"
    assert requeue["reason"] == "preemption" and requeue["timeouts_left"] == 3  # not counted
    assert requeue["step"] == resume["step"] == stop["step"]
    assert resume["checkpoint"].endswith(f"step_{stop['step']}")
    logged = [r["step"] for r in metrics(run) if "loss" in r]
    assert logged == list(range(1, STEPS + 1))  # no step lost, none repeated
    assert_bitwise_equal(final_params(straight), final_params(run))

    status = json.loads(vlscale("status", str(run), "--json").stdout)
    assert status["finished"] and status["checkpoint_step"] == STEPS
    assert status["jobs"][0]["state"] == "COMPLETED" and status["jobs"][0]["restarts"] == 1
    text = vlscale("status", str(run)).stdout
    assert f"step:       {STEPS} / {STEPS}  (finished)" in text and "requeue" in text


@pytest.mark.slow
@pytest.mark.slurm
@pytest.mark.usefixtures("slurm_cluster")
def test_cancelled_job_continues_with_submit_resume(shards, tmp_path):
    straight = straight_run()
    run = tmp_path / "run"
    job = submit("tiny_siglip", *overrides(shards, run, STEPS), "--nodes", "2", "--time", "10")
    wait_step(run, 12, job)
    subprocess.run(["scancel", job], check=True)  # a hard end: no warning, no checkpoint
    wait_job(job, 120)
    assert list_checkpoints(run / "checkpoints")[-1][0] < STEPS

    resumed = submit("--resume", str(run))  # the saved config and SLURM options
    assert resumed != job
    info = wait_job(resumed, 300, run / "slurm")
    assert info["JobState"] == "COMPLETED", logs(run / "slurm")
    assert info["NodeList"] == "vln[1-2]"
    assert len(events(run, "resume")) == 1
    assert_bitwise_equal(final_params(straight), final_params(run))
    status = json.loads(vlscale("status", str(run), "--json").stdout)
    assert [j["job_id"] for j in status["jobs"]] == [job, resumed]
    assert [j["resume"] for j in status["jobs"]] == [False, True]


@pytest.mark.slow
@pytest.mark.slurm
def test_one_minute_time_limit_checkpoints_requeues_and_finishes(timeout_jobs):
    job, run = timeout_jobs["6"]
    info = wait_job(job, 600, run / "slurm")
    assert info["JobState"] == "COMPLETED", logs(run / "slurm")
    requeues = events(run, "requeue")
    assert len(requeues) >= 1 and int(info["Restarts"]) == len(requeues)
    assert all(r["reason"] == "timeout" for r in requeues)
    # every timeout spends one of --max-requeues
    assert [r["timeouts_left"] for r in requeues] == list(range(5, 5 - len(requeues), -1))
    stops = events(run, "interrupted")
    resumes = events(run, "resume")
    assert (
        [s["step"] for s in stops] == [r["step"] for r in resumes] == [r["step"] for r in requeues]
    )
    assert [r["step"] for r in metrics(run) if "loss" in r] == list(range(1, TIMEOUT_STEPS + 1))
    assert json.loads((run / "eval.json").read_text())["step"] == TIMEOUT_STEPS


@pytest.mark.slow
@pytest.mark.slurm
def test_timeout_without_requeues_left_stops_with_a_checkpoint(timeout_jobs):
    job, run = timeout_jobs["0"]
    info = wait_job(job, 300, run / "slurm")
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", logs(run / "slurm")
    (stop,) = events(run, "interrupted")
    (refused,) = events(run, "not_requeued")
    assert refused["reason"] == "timeout" and refused["step"] == stop["step"] < TIMEOUT_STEPS
    assert list_checkpoints(run / "checkpoints")[-1][0] == stop["step"]
    assert "vlscale submit --resume" in logs(run / "slurm")
    status = json.loads(vlscale("status", str(run), "--json").stdout)
    assert status["jobs"][0]["state"] == "FAILED" and not status["finished"]


@pytest.mark.slow
@pytest.mark.slurm
@pytest.mark.usefixtures("slurm_cluster")
@pytest.mark.parametrize("template", ["train_torchrun.sbatch", "train_deepspeed.sbatch"])
def test_sbatch_template_preempted_requeues_and_finishes_exact(shards, tmp_path, template):
    straight = straight_run()
    run = tmp_path / "run"
    env = {**os.environ, "VLSCALE_PYTHON": sys.executable, "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run(
        ["sbatch", "--parsable", f"--output={tmp_path}/slurm-%j.out",
         str(ROOT / "slurm" / template), "tiny_siglip", *overrides(shards, run, STEPS)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.strip().split(";")[0]
    wait_step(run, 10, job)
    # As at the time limit with --signal=B:USR2@90: only the batch shell gets the warning.
    subprocess.run(["scancel", "--batch", "--signal=USR2", job], check=True)
    info = wait_job(job, 420, tmp_path)
    assert info["JobState"] == "COMPLETED", logs(tmp_path)
    assert info["NodeList"] == "vln[1-2]" and info["Restarts"] == "1"
    (stop,) = events(run, "interrupted")
    (resume,) = events(run, "resume")
    assert 10 <= stop["step"] == resume["step"] < STEPS
    (step, last), *_ = reversed(list_checkpoints(run / "checkpoints"))
    assert step == STEPS and json.loads((last / "meta.json").read_text())["world_size"] == 2
    assert json.loads((run / "eval.json").read_text())["step"] == STEPS
    assert_bitwise_equal(final_params(straight), final_params(run))
