"""`vlscale status RUN_DIR`: where a run is: step of its total, whether it finished, the ETA of
a running run, newest checkpoint, events, its SLURM jobs and states.

The total is the `total_steps` of the run's last `start` event in metrics.jsonl (the loop logs
one per job: with optim.epochs it depends on the split size), else optim.max_steps of its
config.yaml for runs logged before that event existed. A run is finished when its newest
checkpoint is at the total (the loop writes that one last, after the final evaluation). The ETA
is the seconds per step of the last ETA_ROWS training rows of the current job (their `time`
values: evaluation and checkpoint time included) times the steps left, minus the time since the
newest row.

Job states come from `scontrol show job` (slurmctld remembers jobs for MinJobAge after they end),
then from `sacct` when accounting is configured; otherwise they are reported as unknown.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import time
from pathlib import Path

from core.logger import format_duration
from core.report import read_metrics

from .submit import JOBS_FILE

ETA_ROWS = 20  # training rows the ETA's seconds per step are measured over


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a run directory (runs/<name>)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def job_state(job_id: str) -> dict:
    """{'state': ..., 'restarts': ...} from slurmctld, else sacct, else unknown."""
    if shutil.which("scontrol"):
        proc = subprocess.run(
            ["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30
        )
        if proc.returncode == 0 and "JobState=" in proc.stdout:
            fields = dict(
                item.split("=", 1) for item in proc.stdout.split() if "=" in item
            )  # fmt: skip
            return {
                "state": fields.get("JobState", "UNKNOWN"),
                "restarts": int(fields.get("Restarts", 0) or 0),
                "reason": fields.get("Reason", ""),
                "nodes": fields.get("NodeList", ""),
            }
    if shutil.which("sacct"):
        proc = subprocess.run(
            ["sacct", "-n", "-X", "-P", "-o", "State", "-j", job_id],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if proc.returncode == 0 and proc.stdout.strip():
            return {"state": proc.stdout.split()[-1], "restarts": None}
    return {"state": "UNKNOWN (not known to slurmctld, no accounting)", "restarts": None}


def collect(run_dir: Path) -> dict:
    from core.checkpoint import list_checkpoints

    records = read_metrics(run_dir)
    steps = [r["step"] for r in records if "loss" in r and "event" not in r]
    ckpts = list_checkpoints(run_dir / "checkpoints")
    total = total_steps(run_dir, records)
    checkpoint_step = ckpts[-1][0] if ckpts else None
    finished = total is not None and checkpoint_step is not None and checkpoint_step >= total
    step = steps[-1] if steps else 0
    jobs = []
    jobs_file = run_dir / "slurm" / JOBS_FILE
    if jobs_file.is_file():
        for line in jobs_file.read_text().splitlines():
            job = json.loads(line)
            jobs.append({**job, **job_state(str(job["job_id"]))})
    return {
        "run_dir": str(run_dir),
        "step": step,
        "total_steps": total,
        "max_steps": total,  # the name before total_steps (kept for scripts)
        "checkpoint": str(ckpts[-1][1]) if ckpts else None,
        "checkpoint_step": checkpoint_step,
        "finished": finished,
        **({} if finished else eta(records, total)),
        "events": [r for r in records if "event" in r and r["event"] != "skipped_step"],
        "jobs": jobs,
    }


def total_steps(run_dir: Path, records: list[dict]) -> int | None:
    """The run's length: its last `start` event's total_steps, else the config's max_steps
    (None for an epoch-based run that logged no `start` event)."""
    starts = [r for r in records if r.get("event") == "start" and "total_steps" in r]
    if starts:
        return int(starts[-1]["total_steps"])
    config = run_dir / "config.yaml"
    if not config.is_file():
        return None
    import yaml

    optim = (yaml.safe_load(config.read_text()) or {}).get("optim", {})
    return None if optim.get("epochs") else optim.get("max_steps")


def eta(records: list[dict], total: int | None, now: float | None = None) -> dict:
    """{'eta_s', 'seconds_per_step', 'last_row_age_s', 'stale'} from the `time` of the current
    job's last ETA_ROWS training rows; {} when fewer than two, no total, or the job stopped
    (an `interrupted` event). `stale`: no row for 5 minutes and 10 times the usual interval."""
    job_start = max(
        (i for i, r in enumerate(records) if r.get("event") == "start"), default=-1
    )  # fmt: skip
    job = records[job_start + 1 :]
    rows = [
        r for r in job
        if "loss" in r and "event" not in r and isinstance(r.get("time"), (int, float))
    ][-ETA_ROWS:]  # fmt: skip
    stopped = any(r.get("event") == "interrupted" for r in job)
    if total is None or stopped or len(rows) < 2 or rows[-1]["step"] <= rows[0]["step"]:
        return {}
    span = rows[-1]["time"] - rows[0]["time"]
    per_step = span / (rows[-1]["step"] - rows[0]["step"])
    age = (time.time() if now is None else now) - rows[-1]["time"]
    return {
        "eta_s": max(0.0, per_step * (total - rows[-1]["step"]) - age),
        "seconds_per_step": per_step,
        "last_row_age_s": age,
        "stale": age > max(300.0, 10 * span / (len(rows) - 1)),
    }


def main(args) -> int:
    from core.config import ConfigError

    run_dir = Path(args.run_dir).resolve()
    if not run_dir.is_dir():
        raise ConfigError(f"{args.run_dir}: no such run directory")
    info = collect(run_dir)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    total = f" / {info['total_steps']}" if info["total_steps"] else ""
    print(f"run:        {info['run_dir']}")
    print(f"step:       {info['step']}{total}" + ("  (finished)" if info["finished"] else ""))
    if "eta_s" in info:
        age = format_duration(info["last_row_age_s"])
        note = f"no row for {age}: still running?" if info["stale"] else f"newest row {age} ago"
        eta_text = format_duration(info["eta_s"])
        print(f"eta:        {eta_text}  ({info['seconds_per_step']:.3g} s/step, {note})")
    print(f"checkpoint: {info['checkpoint'] or 'none yet'}")
    for event in info["events"]:
        skip = ("step", "event", "time", "elapsed")
        details = ", ".join(f"{k}={v}" for k, v in event.items() if k not in skip)
        when = ""
        if isinstance(event.get("time"), (int, float)):
            when = time.strftime("%Y-%m-%d %H:%M:%S  ", time.localtime(event["time"]))
        print(f"event:      {when}step {event['step']}: {event['event']}  {details}")
    if not info["jobs"]:
        print("jobs:       none submitted with `vlscale submit`")
    for job in info["jobs"]:
        restarts = "" if job.get("restarts") is None else f"  restarts={job['restarts']}"
        print(f"job {job['job_id']:>8}: {job['state']}{restarts}  log {job['stdout']}")
    return 0
