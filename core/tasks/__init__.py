"""Tasks: a model plus its objective (batch -> {loss, metrics}), its data decoding and its
evaluation. The loop calls `task(batch)` and never branches on the recipe."""

from __future__ import annotations

from ..config import Config


def build_task(cfg: Config):
    if cfg.task.kind == "siglip":
        from .siglip import SigLIPTask

        return SigLIPTask(cfg)
    if cfg.task.kind == "vlm":
        from .vlm import VLMTask

        return VLMTask(cfg)
    raise ValueError(f"unknown task.kind {cfg.task.kind!r}")
