"""`vlscale status RUN_DIR`: where a run is: step, newest checkpoint, its SLURM jobs and states.

Job states come from `scontrol show job` (slurmctld remembers jobs for MinJobAge after they end),
then from `sacct` when accounting is configured; otherwise they are reported as unknown.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
from pathlib import Path

from core.report import read_metrics

from .submit import JOBS_FILE


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
    steps = [r["step"] for r in records if "loss" in r]
    ckpts = list_checkpoints(run_dir / "checkpoints")
    max_steps = None
    config = run_dir / "config.yaml"
    if config.is_file():
        import yaml

        max_steps = (yaml.safe_load(config.read_text()) or {}).get("optim", {}).get("max_steps")
    eval_file = run_dir / "eval.json"
    jobs = []
    jobs_file = run_dir / "slurm" / JOBS_FILE
    if jobs_file.is_file():
        for line in jobs_file.read_text().splitlines():
            job = json.loads(line)
            jobs.append({**job, **job_state(str(job["job_id"]))})
    return {
        "run_dir": str(run_dir),
        "step": steps[-1] if steps else 0,
        "max_steps": max_steps,
        "checkpoint": str(ckpts[-1][1]) if ckpts else None,
        "checkpoint_step": ckpts[-1][0] if ckpts else None,
        "finished": eval_file.is_file() and bool(ckpts) and ckpts[-1][0] == max_steps,
        "events": [r for r in records if "event" in r and r["event"] != "skipped_step"],
        "jobs": jobs,
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
    total = f" / {info['max_steps']}" if info["max_steps"] else ""
    print(f"run:        {info['run_dir']}")
    print(f"step:       {info['step']}{total}" + ("  (finished)" if info["finished"] else ""))
    print(f"checkpoint: {info['checkpoint'] or 'none yet'}")
    for event in info["events"]:
        details = ", ".join(f"{k}={v}" for k, v in event.items() if k not in ("step", "event"))
        print(f"event:      step {event['step']}: {event['event']}  {details}")
    if not info["jobs"]:
        print("jobs:       none submitted with `vlscale submit`")
    for job in info["jobs"]:
        restarts = "" if job.get("restarts") is None else f"  restarts={job['restarts']}"
        print(f"job {job['job_id']:>8}: {job['state']}{restarts}  log {job['stdout']}")
    return 0
