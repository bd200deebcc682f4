"""Tasks: a model plus its objective, its data and its capabilities, behind one contract
(core/tasks/base.py). Each kind is one module that registers itself; importing this package
registers the built-in kinds."""

from __future__ import annotations

from . import cappa, cells, paligemma, siglip, vlm, vlm_dpo  # noqa: F401 - registers the built-in kinds
from .base import (
    TASKS,
    Captioner,
    Generative,
    ImageEncoder,
    ImageTextEmbedder,
    PreferenceScorer,
    Task,
    TaskOutput,
    build_task,
    register_task,
    set_trainable,
    task_class,
)

__all__ = [
    "TASKS",
    "Captioner",
    "Generative",
    "ImageEncoder",
    "ImageTextEmbedder",
    "PreferenceScorer",
    "Task",
    "TaskOutput",
    "build_task",
    "register_task",
    "set_trainable",
    "task_class",
]
