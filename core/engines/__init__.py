"""Engines, one module each, chosen by `engine.kind`."""

from __future__ import annotations

from .ddp import DDPEngine

ENGINES = {"ddp": DDPEngine}


def build_engine(task, cfg, dist, lr: float, total_steps: int):
    return ENGINES[cfg.engine.kind](task, cfg, dist, lr, total_steps)
