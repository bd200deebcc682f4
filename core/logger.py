"""Where results go: `metrics.jsonl`, progress on stderr, TensorBoard, wandb (offline by default).

Only rank 0 writes. Every metrics.jsonl row (metrics, events, table counts) carries `time`, the
wall clock (Unix seconds, float), and `elapsed`, the seconds since this job began: since
`train()` started in this process, so a resumed or requeued job starts `elapsed` again from 0
(`time` orders rows across jobs).

Progress (`logging.progress`): a tqdm bar when stderr is a terminal; otherwise (a SLURM log,
`make demo > log 2>&1`) one plain line per metrics row (`format_progress`), whose ETA is the
measured seconds per step of about the last RECENT_STEPS steps (training steps only: evaluation
and checkpoint time excluded) times the steps left. Each evaluation gets one line
(`format_eval`) in both cases.

TensorBoard (`logging.tensorboard`): RUN_DIR/tensorboard/ gets every numeric value of every
metrics row as a scalar (an event's as `event/<name>/<field>`, the event itself as text under
`events`) and tables as markdown text. A resumed job appends a new event file; what the stopped
job logged after the checkpoint the new one resumes from is purged (SummaryWriter's purge_step).

The wandb run id is kept in the run directory so a resumed (or requeued) job continues the same
wandb run. API keys are never read or written here: wandb finds its own login.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
import uuid
from collections import deque
from pathlib import Path

from tqdm import tqdm

from .config import Config

log = logging.getLogger(__name__)

RECENT_STEPS = 50  # the ETA's seconds per step: measured over about this many recent steps


class MetricsLogger:
    def __init__(
        self,
        cfg: Config,
        is_main: bool,
        start_step: int,
        total_steps: int,
        started: float | None = None,  # time.monotonic() when this job began (default: now)
    ):
        self.enabled = is_main
        self.run_dir = Path(cfg.run_dir)
        self.total_steps = total_steps
        self.started = time.monotonic() if started is None else started
        self.wandb = self.tensorboard = self.bar = None
        self.plain = False  # plain progress lines (stderr is not a terminal)
        self._recent: deque[tuple[int, float]] = deque()  # (steps, seconds) of recent windows
        self._last_step = start_step
        if not self.enabled:
            return
        self.file = open(self.run_dir / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115
        if cfg.logging.progress and sys.stderr.isatty():
            self.bar = tqdm(
                total=total_steps,
                initial=start_step,
                desc=cfg.name,
                dynamic_ncols=True,
                file=sys.stderr,
            )
        elif cfg.logging.progress:
            self.plain = True
        if cfg.logging.tensorboard:
            self.tensorboard = _init_tensorboard(self.run_dir, start_step)
        if cfg.logging.wandb.mode != "disabled":
            self.wandb = _init_wandb(cfg, self.run_dir)

    def _stamped(self, record: dict) -> dict:
        return {**record, "time": time.time(), "elapsed": round(time.monotonic() - self.started, 3)}

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        values = {k: _value(v) for k, v in metrics.items()}
        record = self._stamped({"step": step, **{k: _plain(v) for k, v in values.items()}})
        self.file.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log({"step": step, **values}, step=step)
        if self.tensorboard is not None:
            _tensorboard_row(self.tensorboard, step, values, record["time"])
        if "loss" in metrics and "event" not in metrics:  # a training metrics row
            self._progress(step, values)
        evals = {k[len("eval/") :]: v for k, v in values.items() if k.startswith("eval/")}
        if evals and (self.plain or self.bar is not None):
            self._print(format_eval(step, evals))

    def seconds_per_step(self) -> float | None:
        """Mean training seconds per step over about the last RECENT_STEPS steps."""
        steps = sum(n for n, _ in self._recent)
        return sum(t for _, t in self._recent) / steps if steps else None

    def _progress(self, step: int, values: dict) -> None:
        if "step_time_s" in values and step > self._last_step:
            n = step - self._last_step
            self._recent.append((n, values["step_time_s"] * n))
            steps = sum(k for k, _ in self._recent)
            while steps - self._recent[0][0] >= RECENT_STEPS:  # the rest still cover enough
                steps -= self._recent.popleft()[0]
        self._last_step = step
        if self.bar is not None:
            self.bar.set_postfix(
                loss=f"{values['loss']:.4f}", sps=f"{values.get('samples_per_s', 0):.0f}"
            )
        if self.plain:
            self._print(format_progress(step, self.total_steps, values, self.seconds_per_step()))

    def _print(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def table(self, step: int, name: str, rows: list[dict]) -> None:
        """Rows of text (e.g. generated answers): a wandb table and TensorBoard text;
        metrics.jsonl gets the count."""
        if not self.enabled or not rows:
            return
        if self.wandb is not None:
            import wandb

            columns = list(rows[0])
            data = [[row[c] for c in columns] for row in rows]
            self.wandb.log({name: wandb.Table(columns=columns, data=data)}, step=step)
        if self.tensorboard is not None:
            self.tensorboard.add_text(name, _markdown_table(rows), step)
        record = self._stamped({"step": step, "event": name, "rows": len(rows)})
        self.file.write(json.dumps(record) + "\n")

    def advance(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def event(self, step: int, name: str, **fields) -> None:
        """Non-metric happenings (resume, skipped step, preemption) go to metrics.jsonl too."""
        self.log(step, {"event": name, **fields})
        if self.enabled:
            log.info("step %d: %s %s", step, name, fields or "")

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def format_duration(seconds: float) -> str:
    """H:MM:SS (hours may exceed 24), e.g. 192.4 -> '0:03:12'."""
    total = max(0, round(seconds))
    return f"{total // 3600}:{total // 60 % 60:02d}:{total % 60:02d}"


def format_progress(
    step: int, total: int, metrics: dict, seconds_per_step: float | None
) -> str:  # fmt: skip
    """One plain progress line: 'step 120/400  loss 2.3412  lr 9.80e-04  1,234 samples/s  56,789
    tok/s  mfu 41.2%  data wait 2.1%  eta 0:03:12' (model TFLOP/s per rank where the device's
    peak is unknown). Fields are padded (the step to the width of the total)
    so that successive lines align; a field whose metric is absent is left out. The ETA is
    seconds_per_step x (total - step); '?' before any step was timed."""
    parts = [f"step {step:>{len(str(total))}}/{total}"]
    if "loss" in metrics:
        parts.append(f"loss {float(metrics['loss']):6.4f}")
    if "lr" in metrics:
        parts.append(f"lr {float(metrics['lr']):.2e}")
    if "samples_per_s" in metrics:
        parts.append(f"{metrics['samples_per_s']:>5,.0f} samples/s")
    if "tokens_per_s" in metrics:
        parts.append(f"{metrics['tokens_per_s']:>6,.0f} tok/s")
    if "mfu" in metrics:
        parts.append(f"mfu {100 * metrics['mfu']:4.1f}%")
    elif "flops_per_s" in metrics:
        parts.append(f"{metrics['flops_per_s'] / 1e12:6.3f} TFLOP/s")
    if "data_wait_frac" in metrics:
        parts.append(f"data wait {100 * metrics['data_wait_frac']:3.1f}%")
    eta = "?" if seconds_per_step is None else format_duration(seconds_per_step * (total - step))
    parts.append(f"eta {eta}")
    return "  ".join(parts)


def format_eval(step: int, metrics: dict) -> str:
    """'eval step 400: i2t_r1 0.7580  t2i_r1 0.7420' (floats to 4 decimals, counts as ints)."""
    fields = [
        f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
        for k, v in metrics.items()
    ]  # fmt: skip
    return f"eval step {step}: " + "  ".join(fields)


def _value(value):
    """A tensor or numpy scalar as a Python number; anything else unchanged."""
    return value.item() if hasattr(value, "item") else value


def _plain(value):
    value = _value(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible
    return value


def _init_tensorboard(run_dir: Path, start_step: int):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise RuntimeError(
            "logging.tensorboard=true needs the tensorboard package: pip install tensorboard"
        ) from exc
    # A resumed job writes a new event file beside the old ones; TensorBoard then hides the old
    # files' values from the step after the resumed checkpoint on, which this job logs again
    # (a run started over in the same directory, resume=none: all of them from step 1).
    return SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1)


def _tensorboard_row(writer, step: int, values: dict, walltime: float) -> None:
    """Every number of a metrics row as a scalar; an event also as a line of text."""
    event = values.get("event")
    prefix = f"event/{event}/" if event else ""
    for key, value in values.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            writer.add_scalar(prefix + key, value, step, walltime=walltime)
    if event:
        fields = ", ".join(f"{k}={v}" for k, v in values.items() if k != "event")
        writer.add_text("events", f"{event}: {fields}" if fields else event, step, walltime)


def _markdown_table(rows: list[dict]) -> str:
    """Rows of text as a markdown table (TensorBoard's text tab renders it)."""
    columns = list(rows[0])

    def cell(value) -> str:
        return str(value).replace("|", "\\|").replace("\n", "<br>")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def _init_wandb(cfg: Config, run_dir: Path):
    try:
        import wandb
    except ImportError:
        log.warning("wandb is not installed; logging to metrics.jsonl only")
        return None
    id_file = run_dir / "wandb_id"
    if not id_file.exists():
        id_file.write_text(uuid.uuid4().hex[:16])
    os.environ.setdefault("WANDB_SILENT", "true")
    return wandb.init(
        project=cfg.logging.wandb.project,
        entity=cfg.logging.wandb.entity or None,
        name=cfg.name,
        id=id_file.read_text().strip(),
        resume="allow",
        mode=cfg.logging.wandb.mode,
        dir=str(run_dir),
        config=cfg.to_dict(),
    )
