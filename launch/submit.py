"""`vlscale submit RECIPE [key=value ...] --nodes N --gpus-per-node G ...`: a submitit SLURM job.

One task per GPU (submitit's model: every task runs the same pickled callable): ranks, world size
and local rank come from SLURM (SLURM_PROCID/NTASKS/LOCALID), each task uses `cuda:LOCAL_RANK`,
and no per-node agent sits between SLURM and the training processes, so the warning signal reaches
every rank directly. (torchrun per node is what `slurm/train_torchrun.sbatch` does instead.)
MASTER_ADDR is the job's first host; MASTER_PORT is derived from the job id, so jobs that share
a node get different ports and every task computes the same one without talking to the others.

Preemption and time limits: the job is submitted with `--signal=USR2@<delay>`; every rank stops
after the same step, one checkpoint is written, rank 0 decides timeout vs. preemption from the
elapsed time, rewrites submitit's job pickle with `resume=auto` and runs `scontrol requeue`. The
requeued job runs the same command and resumes from that checkpoint. Timeouts count against
`--max-requeues`; preemptions do not. `train` released the run directory's lock (core/runlock.py)
before `Interrupted` reached `_requeue`, so the requeued job never finds it held by this one.

`vlscale submit --resume RUN_DIR` starts a new job from the run's saved config and its newest
checkpoint, with the run's previous SLURM options unless given again.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from pathlib import Path

SUBMIT_FILE = "submit.json"  # in the run dir: recipe, overrides and SLURM options of the run
JOBS_FILE = "jobs.jsonl"  # in RUN_DIR/slurm/: one line per submitted job
SLURM_OPTIONS = (
    "nodes",
    "gpus_per_node",
    "tasks_per_node",
    "cpus_per_task",
    "partition",
    "time",
    "account",
    "qos",
    "constraint",
    "mem",
    "exclusive",
    "max_requeues",
    "signal_delay",
    "job_name",
)
DEFAULTS = {"nodes": 1, "gpus_per_node": 0, "time": "01:00:00", "max_requeues": 3}
DEFAULTS |= {"signal_delay": 90, "exclusive": False}
PORT_BASE, PORT_SPAN = 20000, 20000
SIGNAL_EARLY_S = 60  # SLURM may send the --signal warning up to a minute early


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "args", nargs="*", metavar="RECIPE [key=value ...]", help="a recipe and overrides"
    )
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue this run in a new job")
    parser.add_argument("--nodes", type=int, help="nodes (default 1)")
    parser.add_argument("--gpus-per-node", type=int, help="GPUs per node (default 0: CPU)")
    parser.add_argument(
        "--tasks-per-node", type=int, help="ranks per node (default: one per GPU, 1 without GPUs)"
    )
    parser.add_argument("--partition")
    parser.add_argument("--time", help="time limit, [D-]HH:MM:SS or minutes (default 01:00:00)")
    parser.add_argument("--account")
    parser.add_argument("--qos")
    parser.add_argument("--constraint")
    parser.add_argument("--mem", help="memory per node, e.g. 64G")
    parser.add_argument("--cpus-per-task", type=int)
    parser.add_argument("--exclusive", action="store_true", default=None)
    parser.add_argument(
        "--max-requeues", type=int, help="requeues after a timeout (default 3; preemption is free)"
    )
    parser.add_argument(
        "--signal-delay", type=int, help="seconds before the time limit to checkpoint (default 90)"
    )
    parser.add_argument("--job-name", help="default: the recipe name")
    parser.add_argument("--dry-run", action="store_true", help="print the sbatch script only")


def parse_time_minutes(text: str) -> int:
    """SLURM time formats (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) -> whole minutes."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", str(text).strip())
    if not match:
        raise ValueError(f"--time {text!r}: expected [D-]HH:MM:SS, HH:MM:SS or minutes")
    days, a, b, c = (int(x) if x is not None else None for x in match.groups())
    if days is not None:  # D-HH[:MM[:SS]]
        seconds = days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    elif c is not None:  # HH:MM:SS
        seconds = a * 3600 + b * 60 + c
    elif b is not None:  # MM:SS
        seconds = a * 60 + b
    else:  # MM
        seconds = a * 60
    if seconds <= 0:
        raise ValueError(f"--time {text!r}: must be positive")
    return math.ceil(seconds / 60)


def job_port(job_id: str) -> int:
    """Same on every task of a job, different for jobs whose ids differ by less than PORT_SPAN."""
    digits = re.sub(r"\D", "", job_id) or "0"
    return PORT_BASE + int(digits) % PORT_SPAN


class TrainJob:
    """The callable submitit pickles and runs once per task (and again after each requeue)."""

    def __init__(
        self,
        recipe: str,
        overrides: list[str],
        time_min: int,
        signal_delay: int,
        timeouts_left: int,
    ):
        self.recipe = recipe
        self.overrides = list(overrides)
        self.time_min = time_min
        self.signal_delay = signal_delay
        self.timeouts_left = timeouts_left
        self.started = time.time()

    def __call__(self):
        from core import preemption

        # Before anything slow: from here on the warning signal only sets a flag (replacing
        # submitit's handler, which would checkpoint from inside the signal handler).
        preemption.install()
        self.started = time.time()
        import submitit

        env = submitit.JobEnvironment()
        os.environ.update(
            MASTER_ADDR=env.hostnames[0],
            MASTER_PORT=str(job_port(env.job_id)),
            RANK=str(env.global_rank),
            WORLD_SIZE=str(env.num_tasks),
            LOCAL_RANK=str(env.local_rank),
        )
        from core.loop import train
        from core.recipe import load_config

        job = self
        if int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0:
            # Requeued by SLURM itself (e.g. PreemptMode=REQUEUE): continue from the run's saved
            # config, as our own requeues do, even if the first start asked for resume=none or a
            # given checkpoint (and even if the recipe file was edited since).
            job = self.next_job(self.timeouts_left, self.run_dir())
        cfg = load_config(job.recipe, job.overrides)
        try:
            return train(cfg)
        except preemption.Interrupted as stop:
            self._requeue(env, cfg, stop, preemption.EXIT_INTERRUPTED)

    def timed_out(self) -> bool:
        """A signal this close to the time limit is the timeout warning, not a preemption."""
        elapsed = time.time() - self.started
        return elapsed >= self.time_min * 60 - self.signal_delay - SIGNAL_EARLY_S

    def next_job(self, timeouts_left: int, run_dir: str | None = None) -> TrainJob:
        """The requeued job: the run's own resolved config.yaml once it exists (an edited recipe
        cannot change a run halfway), and resume=auto."""
        saved = Path(run_dir or "", "config.yaml")
        if run_dir and saved.is_file():
            recipe, overrides = str(saved), ["resume=auto"]
        else:
            recipe, overrides = self.recipe, [*self.overrides, "resume=auto"]
        return TrainJob(recipe, overrides, self.time_min, self.signal_delay, timeouts_left)

    def run_dir(self) -> str | None:
        """The run directory `vlscale submit` fixed in the overrides (the last run_dir=)."""
        given = [o.split("=", 1)[1] for o in self.overrides if o.startswith("run_dir=")]
        return given[-1] if given else None

    def checkpoint(self, *args, **kwargs):
        """submitit's hook, used only if the signal lands before `__call__` installs ours: the
        requeued job is the same command with resume=auto (no step was trained yet)."""
        import submitit

        return submitit.helpers.DelayedSubmission(self.next_job(self.timeouts_left))

    def _requeue(self, env, cfg, stop, exit_code: int) -> None:
        from core import distributed

        timed_out = self.timed_out()
        left = self.timeouts_left - int(timed_out)
        left = distributed.broadcast_object(left)  # rank 0 decides for everyone
        reason = "timeout" if timed_out else "preemption"
        if env.global_rank == 0:
            record = {"step": stop.step, "event": "requeue" if left >= 0 else "not_requeued"}
            record |= {"reason": reason, "job_id": env.job_id, "timeouts_left": max(left, 0)}
            with open(Path(cfg.run_dir) / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        if left < 0:
            raise RuntimeError(
                f"job {env.job_id} timed out with no requeues left (--max-requeues); "
                f"checkpoint step_{stop.step} is complete: continue with "
                f"`vlscale submit --resume {cfg.run_dir}`"
            )
        if env.global_rank == 0:
            import subprocess

            import submitit
            from submitit.core.utils import temporary_save_path

            delayed = submitit.helpers.DelayedSubmission(self.next_job(left, cfg.run_dir))
            delayed.set_timeout(self.time_min, left)
            with temporary_save_path(env.paths.submitted_pickle) as tmp:
                delayed.dump(tmp)
            print(f"requeueing job {env.job_id} ({reason}) at step {stop.step}", flush=True)
            subprocess.check_call(["scontrol", "requeue", env.job_id], timeout=60)
        # SLURM now ends every task of this job; nobody leaves before rank 0 has requeued.
        distributed.barrier()
        sys.exit(exit_code)


# ---------------------------------------------------------------------------- submission


def _resolve_options(args, saved: dict) -> dict:
    opts = dict(DEFAULTS)
    opts.update({k: v for k, v in saved.items() if k in SLURM_OPTIONS})
    opts.update({k: getattr(args, k) for k in SLURM_OPTIONS if getattr(args, k) is not None})
    if args.gpus_per_node is not None and args.tasks_per_node is None:
        opts["tasks_per_node"] = None  # new GPU count on --resume: one task per GPU again
    if opts.get("tasks_per_node") is None:
        opts["tasks_per_node"] = max(1, opts["gpus_per_node"])
    if opts["gpus_per_node"] and opts["tasks_per_node"] != opts["gpus_per_node"]:
        print(
            f"vlscale submit: warning: {opts['tasks_per_node']} tasks per node for "
            f"{opts['gpus_per_node']} GPUs; ranks use cuda:LOCAL_RANK",
            file=sys.stderr,
        )
    return opts


def executor_parameters(opts: dict, job_name: str) -> dict:
    """submitit's SlurmExecutor parameters (also the keywords of its sbatch-script writer)."""
    params = {
        "job_name": job_name,
        "nodes": opts["nodes"],
        "ntasks_per_node": opts["tasks_per_node"],
        "time": parse_time_minutes(opts["time"]),
        "signal_delay_s": opts["signal_delay"],
        "stderr_to_stdout": False,
    }
    if opts["gpus_per_node"]:
        params["gpus_per_node"] = opts["gpus_per_node"]
    for key in ("cpus_per_task", "partition", "account", "qos", "constraint"):
        if opts.get(key) is not None:
            params[key] = opts[key]
    extra = {"requeue": True}  # scontrol requeue needs a requeueable job on every cluster
    if opts.get("mem"):
        extra["mem"] = opts["mem"]  # as given (submitit's own `mem` wants a float of GB)
    if opts.get("exclusive"):
        params["exclusive"] = True
    params["additional_parameters"] = extra
    return params


def main(args) -> int:
    from core.config import ConfigError
    from core.recipe import load_config

    saved: dict = {}
    if args.resume:
        run_dir = Path(args.resume).resolve()
        submit_file = run_dir / SUBMIT_FILE
        if not submit_file.is_file() and not (run_dir / "config.yaml").is_file():
            raise ConfigError(f"--resume {args.resume}: no {SUBMIT_FILE} or config.yaml there")
        saved = json.loads(submit_file.read_text()) if submit_file.is_file() else {}
        if (run_dir / "config.yaml").is_file():
            recipe, overrides = str(run_dir / "config.yaml"), []  # the fully resolved config
        else:  # submitted, never started: the original command
            recipe, overrides = saved["recipe"], list(saved["overrides"])
        overrides += [*args.args, f"run_dir={run_dir}", "resume=auto"]
    else:
        if not args.args:
            raise ConfigError("give a RECIPE (or --resume RUN_DIR)")
        recipe, overrides = args.args[0], list(args.args[1:])
    try:
        opts = _resolve_options(args, saved)
        parse_time_minutes(opts["time"])
    except ValueError as err:
        raise ConfigError(str(err)) from None
    cfg = load_config(recipe, overrides)  # validate now, not in the job
    run_dir = Path(cfg.run_dir).resolve()
    if args.resume:  # a changed config would be refused in the job: say so now
        from core.checkpoint import list_checkpoints
        from core.recipe import config_changes

        found = list_checkpoints(run_dir / "checkpoints")
        if found and cfg.resume == "auto":
            config_changes(found[-1][1], run_dir, cfg, opts["nodes"] * opts["tasks_per_node"])
    overrides.append(f"run_dir={run_dir}")  # the job's working directory may differ
    if not args.resume:
        recipe = str(Path(recipe).resolve()) if Path(recipe).is_file() else recipe
    job_name = opts.get("job_name") or cfg.name or "vlscale"
    params = executor_parameters(opts, job_name)
    folder = run_dir / "slurm"
    job = TrainJob(recipe, overrides, params["time"], opts["signal_delay"], opts["max_requeues"])

    if args.dry_run:
        from submitit.slurm.slurm import _make_sbatch_string

        command = f"{sys.executable} -u -m submitit.core._submit {folder}"
        print(_make_sbatch_string(command=command, folder=folder, **params))
        return 0

    import shutil

    import submitit

    if not (shutil.which("sbatch") and shutil.which("srun")):
        raise ConfigError("sbatch/srun not found: submit from a SLURM login node (or --dry-run)")
    folder.mkdir(parents=True, exist_ok=True)
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=opts["max_requeues"])
    executor.update_parameters(**params)
    submitted = executor.submit(job)
    job_id = submitted.job_id
    stdout, stderr = submitted.paths.stdout, submitted.paths.stderr
    (run_dir / SUBMIT_FILE).write_text(
        json.dumps({"recipe": recipe, "overrides": overrides, **opts}, indent=2)
    )
    with open(folder / JOBS_FILE, "a") as f:
        record = {"job_id": job_id, "time": time.time(), "resume": bool(args.resume)}
        f.write(json.dumps({**record, "stdout": str(stdout), "stderr": str(stderr)}) + "\n")
    print(f"job id:  {job_id}")
    print(f"logs:    {stdout}")
    print(f"         {stderr}  (rank 0; other ranks: {folder}/{job_id}_<rank>_log.*)")
    print(f"run dir: {run_dir}")
    return 0
