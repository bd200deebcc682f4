"""A real two-node SLURM cluster for the `slurm` tests, started and stopped by the test session.

`slurm/local_cluster.sh up` installs what is missing (Debian packages), starts munge, slurmctld
and one slurmd per network namespace; `down` removes all of it. Without root the tests skip, or
fail under CI (CI=true), where they must run.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "slurm" / "local_cluster.sh"
STATE_DIR = Path(os.environ.get("VLSCALE_SLURM_DIR", "/tmp/vlscale-slurm"))
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}


def _unavailable(reason: str):
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"SLURM tests must run under CI but cannot: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def slurm_cluster():
    """SLURM_CONF of a running two-node cluster (vln1, vln2); torn down after the session."""
    if os.geteuid() != 0:
        _unavailable("the local SLURM cluster needs root (namespaces, bridge, daemons)")
    conf = STATE_DIR / "slurm.conf"
    env = {**os.environ, "SLURM_CONF": str(conf)}
    was_up = (
        conf.is_file()
        and _has("sinfo")
        and subprocess.run(["sinfo", "-h"], env=env, capture_output=True).returncode == 0
    )
    proc = subprocess.run(
        ["bash", str(SCRIPT), "up"], capture_output=True, text=True, timeout=900
    )  # fmt: skip
    if proc.returncode != 0:
        _unavailable(f"slurm/local_cluster.sh up failed:\n{proc.stdout}\n{proc.stderr}")
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(conf)
    try:
        yield str(conf)
    finally:
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous
        if not was_up:  # a cluster someone left running for their own use stays up
            subprocess.run(["bash", str(SCRIPT), "down"], timeout=300, check=False)


def _has(binary: str) -> bool:
    return any((Path(p) / binary).exists() for p in os.environ.get("PATH", "").split(":"))


def job_info(job_id: str) -> dict:
    out = subprocess.run(
        ["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30
    ).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_job(job_id: str, timeout: float, log_dir: Path | None = None) -> dict:
    """Poll until the job reaches a final state; returns its `scontrol show job` fields."""
    deadline = time.time() + timeout
    info: dict = {}
    while time.time() < deadline:
        info = job_info(job_id)
        if info.get("JobState") in FINAL_STATES:
            return info
        time.sleep(1)
    subprocess.run(["scancel", job_id], check=False)
    pytest.fail(f"job {job_id} not finished after {timeout:.0f}s: {info}\n{logs(log_dir)}")


def logs(log_dir: Path | None, tail: int = 40) -> str:
    if log_dir is None or not log_dir.is_dir():
        return ""
    parts = []
    for path in sorted(log_dir.glob("*.out")) + sorted(log_dir.glob("*.err")):
        lines = path.read_text(errors="replace").splitlines()
        parts.append(f"--- {path.name}\n" + "\n".join(lines[-tail:]))
    return "\n".join(parts)
