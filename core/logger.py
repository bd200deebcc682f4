"""Where results go: `metrics.jsonl`, a rank-0 progress bar, and wandb (offline by default).

Only rank 0 writes. The wandb run id is kept in the run directory so a resumed (or requeued) job
continues the same wandb run. API keys are never read or written here: wandb finds its own login.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import uuid
from pathlib import Path

from tqdm import tqdm

from .config import Config

log = logging.getLogger(__name__)


class MetricsLogger:
    def __init__(self, cfg: Config, is_main: bool, start_step: int, total_steps: int):
        self.enabled = is_main
        self.run_dir = Path(cfg.run_dir)
        self.wandb = None
        self.bar = None
        if not self.enabled:
            return
        self.file = open(self.run_dir / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115
        if cfg.logging.progress:
            self.bar = tqdm(
                total=total_steps,
                initial=start_step,
                desc=cfg.name,
                dynamic_ncols=True,
                file=sys.stderr,
                disable=None,  # off when stderr is not a terminal (log files stay clean)
            )
        if cfg.logging.wandb.mode != "disabled":
            self.wandb = _init_wandb(cfg, self.run_dir)

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self.file.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log(record, step=step)
        if self.bar is not None and "loss" in metrics:
            self.bar.set_postfix(
                loss=f"{metrics['loss']:.4f}", sps=f"{metrics.get('samples_per_s', 0):.0f}"
            )

    def table(self, step: int, name: str, rows: list[dict]) -> None:
        """Rows of text (e.g. generated answers): a wandb table; metrics.jsonl gets the count."""
        if not self.enabled or not rows:
            return
        if self.wandb is not None:
            import wandb

            columns = list(rows[0])
            data = [[row[c] for c in columns] for row in rows]
            self.wandb.log({name: wandb.Table(columns=columns, data=data)}, step=step)
        self.file.write(json.dumps({"step": step, "event": name, "rows": len(rows)}) + "\n")

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
        if self.wandb is not None:
            self.wandb.finish()


def _plain(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible
    return value


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
