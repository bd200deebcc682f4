"""Progress in any log: plain step lines with an ETA, `time`/`elapsed` on every metrics row,
`vlscale status` on epoch-based runs, TensorBoard event files, and the split-shards message said
once per process."""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
from pathlib import Path

import pytest
from test_train import metrics, run_cli, tiny_overrides

from core.config import Config
from core.data.stream import ShardStream
from core.logger import MetricsLogger, format_duration, format_eval, format_progress
from launch import status

EPOCH_STEPS = 12  # 2 epochs x 96 train samples / batch 16


def logger_config(run_dir: Path, **logging_options) -> Config:
    cfg = Config(name="t", run_dir=str(run_dir))
    cfg.logging.wandb.mode = "disabled"
    for key, value in logging_options.items():
        setattr(cfg.logging, key, value)
    return cfg


@pytest.fixture(scope="module")
def epoch_run(shapes_dir, tmp_path_factory) -> tuple[Path, str]:
    """A finished epoch-based run started as `vlscale train ... 2> stderr.log` (stderr a file,
    as in a SLURM log): logging every 2 steps, evaluation at 4 and 8 and the end, TensorBoard on.
    Returns the run directory and its stderr."""
    root = tmp_path_factory.mktemp("progress")
    run = root / "run"
    over = tiny_overrides(
        shapes_dir, run, 1000,  # optim.max_steps stays 1000 in config.yaml: epochs decide
        **{
            "data.train": str(shapes_dir / "train-{000000..000002}.tar"),
            "data.num_workers": 2,  # the one val shard < 2 workers: every slot reads it
            "optim.epochs": 2,
            "logging.every": 2,
            "logging.progress": "true",
            "logging.tensorboard": "true",
            "eval.every": 4,
        },
    )  # fmt: skip
    log_file = root / "stderr.log"
    with open(log_file, "w") as err:
        proc = run_cli(["train", "tiny_siglip", *over], stderr=err)
        assert proc.wait(timeout=600) == 0, log_file.read_text()[-4000:]
    return run, log_file.read_text()


def test_plain_progress_line_and_eta():
    row = {
        "loss": 2.34123,
        "lr": 9.8e-4,
        "samples_per_s": 1234.4,
        "tokens_per_s": 56789.2,
        "data_wait_frac": 0.021,
    }
    # 280 steps left at 192/280 s each: 192 s
    assert format_progress(120, 400, row, 192 / 280) == (
        "step 120/400  loss 2.3412  lr 9.80e-04  1,234 samples/s  56,789 tok/s  data wait 2.1%"
        "  eta 0:03:12"
    )
    # the step is padded to the total's width, so successive lines align; no rate yet: '?'
    line = format_progress(5, 400, {"loss": 3.0, "samples_per_s": 12.0}, None)
    assert line == "step   5/400  loss 3.0000     12 samples/s  eta ?"
    # MFU where the device's peak is known, else the achieved model TFLOP/s
    assert "  mfu 41.2%  data wait" in format_progress(1, 2, {**row, "mfu": 0.4123}, None)
    assert "  0.050 TFLOP/s  data" in format_progress(1, 2, {**row, "flops_per_s": 5e10}, None)
    assert format_duration(30 * 3600 + 61.6) == "30:01:02"
    assert format_eval(400, {"i2t_r1": 0.758, "num_pairs": 512}) == (
        "eval step 400: i2t_r1 0.7580  num_pairs 512"
    )


def test_eta_is_recent_training_seconds_per_step_times_steps_left(tmp_path, capsys):
    """Rows every 10 steps: 1 s/step for steps 1-50, then 2 s/step. The ETA uses about the last
    50 steps only, and evaluation rows do not count."""
    logger = MetricsLogger(logger_config(tmp_path), True, 0, 200)
    for step in range(10, 111, 10):
        logger.log(step, {"loss": 1.0, "step_time_s": 1.0 if step <= 50 else 2.0})
        if step == 60:
            logger.log(step, {"eval/i2t_r1": 0.5})
    logger.close()
    assert logger.seconds_per_step() == 2.0
    lines = capsys.readouterr().err.splitlines()
    assert lines[-1] == "step 110/200  loss 1.0000  eta 0:03:00"  # 90 steps x 2 s
    assert lines[0] == "step  10/200  loss 1.0000  eta 0:03:10"  # 190 steps x 1 s
    assert "eval step 60: i2t_r1 0.5000" in lines


def test_metrics_rows_carry_time_and_elapsed(epoch_run):
    run, _ = epoch_run
    rows = metrics(run)
    assert rows and all(isinstance(r["time"], float) and "elapsed" in r for r in rows)
    times, elapsed = [r["time"] for r in rows], [r["elapsed"] for r in rows]
    assert times == sorted(times) and elapsed == sorted(elapsed) and 0 <= elapsed[0] < 600
    assert 0 < times[-1] - times[0] <= elapsed[-1] - elapsed[0] + 1
    start = [r for r in rows if r.get("event") == "start"]
    assert [(r["step"], r["total_steps"]) for r in start] == [(0, EPOCH_STEPS)]
    assert [r["step"] for r in rows if "loss" in r] == list(range(2, EPOCH_STEPS + 1, 2))
    assert all(r["step_time_s"] > 0 for r in rows if "loss" in r)


def test_stderr_log_has_plain_step_and_eval_lines(epoch_run):
    _, err = epoch_run
    assert "\x1b[" not in err and "\r" not in err  # no bar, no ANSI
    steps = re.findall(
        r"^step +(\d+)/12  loss \d+\.\d{4}  lr \d\.\d\de[-+]\d\d  +[\d,]+ samples/s  +[\d,]+ tok/s"
        r"  +\d+\.\d{3} TFLOP/s  data wait +\d+\.\d%  eta \d+:\d\d:\d\d$",  # CPU: no peak, no MFU
        err,
        re.M,
    )
    assert [int(s) for s in steps] == list(range(2, EPOCH_STEPS + 1, 2))
    assert re.findall(r"^eval step (\d+): i2t_r1 \d\.\d{4}  ", err, re.M) == ["4", "8", "12"]
    # the one val shard read by both workers: said once, not at each of the 3 evaluations
    assert err.count("every slot reads all shards") <= 1


def test_status_of_finished_epoch_based_run(epoch_run, capsys):
    run, _ = epoch_run
    info = status.collect(run)
    assert info["finished"] and info["total_steps"] == EPOCH_STEPS == info["step"]
    assert "eta_s" not in info
    assert status.main(argparse.Namespace(run_dir=str(run), json=False)) == 0
    out = capsys.readouterr().out
    assert f"step:       {EPOCH_STEPS} / {EPOCH_STEPS}  (finished)" in out
    assert "eta:" not in out and "start  total_steps=12" in out


def test_status_eta_of_a_running_run(tmp_path):
    rows = [
        {"step": 0, "event": "start", "total_steps": 100, "time": 990.0},
        *({"step": s, "loss": 1.0, "time": 1000.0 + s - 10} for s in (10, 20, 30)),
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    info = status.collect(tmp_path)
    assert info["total_steps"] == 100 and info["step"] == 30 and not info["finished"]
    # 1 s/step x 70 steps left, 5 s of them gone since the newest row
    got = status.eta(status.read_metrics(tmp_path), 100, now=1025.0)
    assert got == {"eta_s": 65.0, "seconds_per_step": 1.0, "last_row_age_s": 5.0, "stale": False}
    assert status.eta(status.read_metrics(tmp_path), 100, now=2000.0)["stale"]
    stopped = [*rows, {"step": 30, "event": "interrupted", "time": 1021.0}]
    assert status.eta(stopped, 100, now=1025.0) == {}


def test_tensorboard_scalars_match_metrics_jsonl(epoch_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, _ = epoch_run
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    rows = [r for r in metrics(run) if "loss" in r and "event" not in r]
    loss = acc.Scalars("loss")
    assert [e.step for e in loss] == [r["step"] for r in rows]
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in rows], rel=1e-6)
    assert [e.step for e in acc.Scalars("eval/i2t_r1")] == [4, 8, 12]
    assert {"lr", "grad_norm", "samples_per_s", "event/start/total_steps"} <= set(
        acc.Tags()["scalars"]
    )


def test_tensorboard_resumed_job_appends(tmp_path):
    """A job resumed from step 4 appends; the stopped job's steps 5-6 are replaced."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = logger_config(tmp_path, tensorboard=True, progress=False)
    first = MetricsLogger(cfg, True, 0, 8)
    for step in range(1, 7):
        first.log(step, {"loss": float(step)})
    first.close()
    second = MetricsLogger(cfg, True, 4, 8)
    for step in range(5, 9):
        second.log(step, {"loss": 10.0 * step})
    second.table(8, "generations", [{"question": "what | colour?", "answer": "red\nblue"}])
    second.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    got = [(e.step, e.value) for e in acc.Scalars("loss")]
    assert got == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 50.0), (6, 60.0), (7, 70.0),
                   (8, 80.0)]  # fmt: skip
    assert "generations/text_summary" in acc.Tags()["tensors"]


def test_split_shards_message_once_per_stream_layout(shapes_dir, tmp_path, caplog):
    """Evaluators build a new stream at every evaluation: the message comes once, at INFO for
    evaluation; a training stream over too few shards still gets its warning (once)."""
    shard = tmp_path / "val-000000.tar"
    shutil.copy(shapes_dir / "val-000000.tar", shard)
    caplog.set_level(logging.DEBUG, logger="core.data.stream")

    def stream(epochs):
        return ShardStream(str(shard), decode=dict, collate=list, batch_size=4, num_workers=2,
                           shuffle=False, epochs=epochs, drop_last=epochs is None)  # fmt: skip

    for _ in range(3):  # three evaluations
        stream(1)
    said = [r for r in caplog.records if "every slot reads all shards" in r.getMessage()]
    assert [r.levelno for r in said] == [logging.INFO]
    for _ in range(2):
        stream(None)
    said = [r for r in caplog.records if "every slot reads all shards" in r.getMessage()]
    assert [r.levelno for r in said] == [logging.INFO, logging.WARNING]
