"""Stop cleanly on a scheduler's warning signal: finish the step, checkpoint once, exit.

SLURM warns a job before its time limit (`--signal=USR2@90`, what `vlscale submit` uses through
submitit) or when it is preempted (`scancel --signal=USR2`). The handler only records the signal;
the training loop folds "has any rank been signalled?" into the all-reduce it already does every
step, so all ranks stop after the same step, write one checkpoint and raise `Interrupted`. Whoever
launched the loop decides what comes next (`vlscale submit` jobs requeue themselves; the sbatch
templates requeue from the batch script).

USR1 and USR2 are handled. SIGTERM is not: SLURM sends it only seconds before SIGKILL and
torchrun uses it to stop its workers, so it is no time to start a collective checkpoint.
With `--signal=B:USR2@90` only the batch shell is signalled and must forward the signal to the
job steps (`scancel --signal=USR2 $SLURM_JOB_ID`); without `B:` every task gets it directly.
SLURM signals every process of a job step, helpers included: processes forked from here on
(data-loader workers) ignore the signals, and so do the commands they start (`pipe:` shards),
which would otherwise die mid-shard and change the data of the steps before the checkpoint.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)
# `vlscale train` exit code: stopped early, checkpoint written, rerun the command to resume
EXIT_INTERRUPTED = 3

_state = {"signal": None, "time": None, "fork_hook": False}


class Interrupted(Exception):  # noqa: N818 - not an error: a requested, clean stop
    """The loop stopped early after a warning signal; a checkpoint of `step` was written."""

    def __init__(self, step: int, signal_name: str, checkpoint: str):
        super().__init__(f"stopped at step {step} on {signal_name}; checkpoint {checkpoint}")
        self.step = step
        self.signal_name = signal_name
        self.checkpoint = checkpoint


def _handler(signum, frame) -> None:
    if _state["signal"] is None:
        _state["signal"] = signum
        _state["time"] = time.time()


def install(signals=SIGNALS) -> bool:
    """Record the warning signals from now on. Only possible in the main thread; returns whether
    the handlers were installed (a loop run from another thread just never sees a request)."""
    if threading.current_thread() is not threading.main_thread():
        log.warning("not in the main thread: preemption signals are not handled")
        return False
    for sig in signals:
        signal.signal(sig, _handler)
    if not _state["fork_hook"]:  # SIG_IGN, unlike a handler, survives exec in their children
        os.register_at_fork(after_in_child=_ignore_in_child)
        _state["fork_hook"] = True
    return True


def _ignore_in_child() -> None:
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def requested() -> bool:
    return _state["signal"] is not None


def signal_name() -> str:
    return signal.Signals(_state["signal"]).name if _state["signal"] is not None else ""


def request(signum: int = signal.SIGUSR2) -> None:
    """Ask the loop to stop as if `signum` had arrived (also what the handler does)."""
    _handler(signum, None)


def reset() -> None:
    _state["signal"] = _state["time"] = None
