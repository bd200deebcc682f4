"""End-to-end training: the loop, checkpoints, exact resume, non-finite handling, evaluation."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from core.checkpoint import list_checkpoints
from core.data.synthetic import write_synthetic_shards
from core.recipe import load_config

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    write_synthetic_shards(out, n_train=1024, n_val=128, seed=0, shard_size=256, image_size=32)
    return out


def tiny_overrides(shapes: Path, run_dir: Path, steps: int, **extra) -> list[str]:
    """A model small enough that a step takes a few milliseconds."""
    over = {
        "run_dir": str(run_dir),
        "model.vision_config.hidden_size": 32,
        "model.vision_config.intermediate_size": 64,
        "model.vision_config.num_hidden_layers": 2,
        "model.vision_config.num_attention_heads": 2,
        "model.vision_config.image_size": 32,
        "model.text_config.hidden_size": 32,
        "model.text_config.intermediate_size": 64,
        "model.text_config.num_hidden_layers": 2,
        "model.text_config.num_attention_heads": 2,
        "model.text_config.num_key_value_heads": 1,
        "model.text_config.head_dim": 16,
        "model.tokenizer": str(shapes / "tokenizer"),
        "task.embed_dim": 32,
        "data.train": str(shapes / "train-{000000..000003}.tar"),
        "data.val": str(shapes / "val-000000.tar"),
        "data.batch_size": 16,
        "data.num_workers": 1,
        "optim.max_steps": steps,
        "optim.warmup_steps": 5,
        "optim.lr": 2e-3,
        "logging.every": 1,
        "logging.progress": "false",
        "logging.wandb.mode": "disabled",
        "logging.report": "false",  # ~1 s a run; drawn by test_loss_goes_down_and_eval_is_written
        "checkpoint.every": 5,
        "eval.every": 0,
        "eval.batch_size": 64,
    }
    over.update(extra)
    return [f"{k}={v}" for k, v in over.items()]


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def final_params(run_dir: Path) -> dict[str, torch.Tensor]:
    (_, last), *_ = reversed(list_checkpoints(run_dir / "checkpoints"))
    return load_file(last / "model.safetensors")


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(args: list[str], nproc: int = 1, **popen) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if nproc == 1:
        cmd = [sys.executable, "-m", "launch.cli", *args]
    else:
        port = str(free_port())  # not one per test process: a hung run must not block the next
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={port}", "-m", "launch.cli", *args]  # fmt: skip
    return subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True, **popen)


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants at once, as a node failure would. (torchrun
    starts its workers in sessions of their own, so killing its process group is not enough.)"""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    for p in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


def test_loss_goes_down_and_eval_is_written(shapes, tmp_path, monkeypatch):
    """Training lowers the loss and writes eval.json; the run then exports for transformers and
    the Hub (tests/test_export.py check_siglip_export)."""
    from test_export import check_siglip_export

    from core.loop import train

    over = tiny_overrides(shapes, tmp_path / "run", 60, **{"logging.report": "true"})
    result = train(load_config("tiny_siglip", over))
    rows = [r for r in metrics(tmp_path / "run") if "loss" in r]
    assert len(rows) == 60
    first = sum(r["loss"] for r in rows[:5]) / 5
    last = sum(r["loss"] for r in rows[-5:]) / 5
    assert last < 0.7 * first, (first, last)
    for field in ("lr", "samples_per_s", "tokens_per_s", "data_wait_frac", "grad_norm"):
        assert field in rows[-1]
    ev = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert ev["num_pairs"] == 128  # the whole split, not a batch
    for key in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "zeroshot_acc"):
        assert 0.0 <= ev[key] <= 1.0
    assert ev["i2t_r10"] > 3 * 10 / 128, ev  # well above chance after 60 tiny steps
    assert result["i2t_r1"] == ev["i2t_r1"]
    assert (tmp_path / "run" / "report.png").stat().st_size > 0
    assert (tmp_path / "run" / "config.yaml").exists()
    check_siglip_export(tmp_path / "run", tmp_path / "export", monkeypatch)


@pytest.mark.slow
def test_sigkill_and_restart_is_bitwise_exact_on_two_ranks(shapes, tmp_path):
    steps = 40
    straight = tmp_path / "straight"
    args = ["train", "tiny_siglip", *tiny_overrides(shapes, straight, steps)]
    assert run_cli(args, nproc=2).wait(timeout=600) == 0

    killed = tmp_path / "killed"
    args = ["train", "tiny_siglip", *tiny_overrides(shapes, killed, steps)]
    proc = run_cli(args, nproc=2)
    deadline = time.time() + 600
    while not any(r.get("step", 0) >= 17 for r in metrics(killed)):
        assert proc.poll() is None, "run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    kill_tree(proc.pid)
    proc.wait()
    assert list_checkpoints(killed / "checkpoints")[-1][0] < steps
    assert run_cli(args, nproc=2).wait(timeout=600) == 0  # the same command resumes

    assert_bitwise_equal(final_params(straight), final_params(killed))
    events = [r for r in metrics(killed) if r.get("event") == "resume"]
    assert len(events) == 1 and events[0]["step"] in (15, 20)


KILL_IN_SAVE = """
import os, sys
import core.checkpoint as ckpt
real_replace = os.replace
def dying_replace(src, dst):
    if str(dst).endswith("step_10"):
        os._exit(9)  # killed after the files are written, before the rename
    real_replace(src, dst)
ckpt.os.replace = dying_replace
from launch.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_kill_while_writing_checkpoint_resumes_from_previous(shapes, tmp_path):
    from core.loop import train

    run = tmp_path / "run"
    over = tiny_overrides(shapes, run, 15)
    script = tmp_path / "die.py"
    script.write_text(textwrap.dedent(KILL_IN_SAVE))
    proc = subprocess.run(
        [sys.executable, str(script), "train", "tiny_siglip", *over], cwd=ROOT, timeout=300
    )
    assert proc.returncode == 9
    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [5]
    assert (run / "checkpoints" / ".tmp-step_10").exists()  # the half-written one
    train(load_config("tiny_siglip", over))
    assert [r for r in metrics(run) if r.get("event") == "resume"][0]["step"] == 5
    assert not (run / "checkpoints" / ".tmp-step_10").exists()

    straight = tmp_path / "straight"
    train(load_config("tiny_siglip", tiny_overrides(shapes, straight, 15)))
    assert_bitwise_equal(final_params(straight), final_params(run))


def test_nonfinite_steps_are_skipped_then_stop_the_run(shapes, tmp_path, monkeypatch):
    from core.loop import NonFiniteLossError, train
    from core.tasks.siglip import SigLIPTask

    poisoned = {7, 12, 13, 14}  # one isolated NaN step, then three in a row
    calls = {"n": 0}
    real_forward = SigLIPTask.forward

    def forward(self, batch):
        calls["n"] += 1
        out = real_forward(self, batch)
        if calls["n"] in poisoned:
            out = out._replace(loss=out.loss * float("nan"))
        return out

    monkeypatch.setattr(SigLIPTask, "forward", forward)
    run = tmp_path / "run"
    cfg = load_config(
        "tiny_siglip", tiny_overrides(shapes, run, 30, **{"optim.max_nonfinite_in_a_row": 3})
    )
    with pytest.raises(NonFiniteLossError, match="3 optimizer steps in a row"):
        train(cfg)
    skipped = [r["step"] for r in metrics(run) if r.get("event") == "skipped_step"]
    assert skipped == [7, 12, 13, 14]
    # Checkpoints were written at 5 and 10 only, and hold finite parameters.
    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [5, 10]
    assert all(torch.isfinite(t).all() for t in final_params(run).values())


def test_bf16_run_and_wandb_run_id_survives_resume(shapes, tmp_path):
    from core.loop import train

    run = tmp_path / "run"
    extra = {"engine.precision": "bf16", "logging.wandb.mode": "offline", "checkpoint.keep": 2}
    train(load_config("tiny_siglip", tiny_overrides(shapes, run, 6, **extra)))
    run_id = (run / "wandb_id").read_text()
    train(load_config("tiny_siglip", tiny_overrides(shapes, run, 8, **extra)))  # resumes at 6
    assert (run / "wandb_id").read_text() == run_id
    offline_runs = list((run / "wandb").glob("offline-run-*"))
    assert offline_runs and all(p.name.endswith(run_id) for p in offline_runs)
    rows = [r for r in metrics(run) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [6, 8]  # keep=2


def test_first_step_logged_only_when_asked(shapes, tmp_path):
    """logging.first_step adds step 1 to the rows of `logging.every`, with step 1's own loss:
    the first row of a run logged every step (the same seed and data) has that loss too."""
    from core.loop import train

    runs = {}
    for name, extra in (("every4", {"logging.every": 4}),
                        ("first", {"logging.every": 4, "logging.first_step": "true"}),
                        ("each", {"logging.every": 1})):  # fmt: skip
        runs[name] = tmp_path / name
        train(load_config("tiny_siglip", tiny_overrides(shapes, runs[name], 8, **extra)))
    steps = {name: [r["step"] for r in metrics(run) if "loss" in r] for name, run in runs.items()}
    assert steps["every4"] == [4, 8] and steps["first"] == [1, 4, 8]
    loss = {name: [r["loss"] for r in metrics(run) if "loss" in r] for name, run in runs.items()}
    assert loss["first"][0] == loss["each"][0] and loss["first"][1:] == loss["every4"]
    assert not (runs["first"] / "report.png").exists()  # logging.report=false
