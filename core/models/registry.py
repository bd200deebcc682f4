"""model_type -> our class for it. Family modules register themselves; core/models/__init__.py
imports them all."""

from __future__ import annotations

FAMILIES: dict[str, type] = {}


def register(cls: type) -> type:
    for model_type in cls.MODEL_TYPES:
        FAMILIES[model_type] = cls
    return cls
