"""model_type -> our class for it. Family modules register themselves; core/models/__init__.py
imports them all."""

from __future__ import annotations

FAMILIES: dict[str, type] = {}
# Two-tower model_type (a full `siglip` checkpoint) -> the class of its text tower; FAMILIES maps
# such a type to its vision tower.
TEXT_TOWERS: dict[str, type] = {}


def register(cls: type) -> type:
    for model_type in cls.MODEL_TYPES:
        FAMILIES[model_type] = cls
    for model_type in getattr(cls, "TEXT_TOWER_OF", ()):
        TEXT_TOWERS[model_type] = cls
    return cls
