"""Recipes -> validated Configs. The one place that knows every registry: `task.kind` picks the
classes of the `task:` and `data:` sections (core/tasks/), `eval.evaluators` are checked and
filled in from core/evaluators/, `engine.kind` against core/engines/.

A key that belongs to another task kind, or that moved in the recipe-architecture change, gets
an error saying where it lives now.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import sys
from pathlib import Path
from typing import Any

import yaml

from .config import (
    RECIPES_DIR,
    Config,
    ConfigError,
    UnknownKeyError,
    build_config,
    check_key,
    check_resume,
    load_tree,
    parse_override,
    resolve_recipe,
    set_path,
)
from .engines import engine_class
from .evaluators import check_capabilities, resolve_evaluators
from .tasks import TASKS, task_class

log = logging.getLogger(__name__)

# Keys of earlier versions -> where they live now.
MOVED = {
    "engine.freeze": "task.freeze (parameter-name patterns, e.g. [vision.*])",
    "task.train_vision": "task.trainable (e.g. [vision.*, projector.*, lm.*])",
    "model.projector": "task.projector (task.kind=vlm)",
    "eval.zeroshot": "eval.evaluators (- zeroshot)",
    "eval.subsets": "eval.evaluators (- vqa: {subsets: [...]})",
    "eval.max_new_tokens": "eval.evaluators (- vqa: {max_new_tokens: N})",
    "eval.gen_steps": "eval.evaluators (- generation: {every: N})",
    "eval.gen_samples": "eval.evaluators (- generation: {samples: N})",
}


def sections_of(kind: str) -> dict[str, type]:
    cls = task_class(kind)
    return {"task": cls.Config, "data": cls.DataConfig}


def _explain(err: UnknownKeyError, kind: str) -> ConfigError:
    """Add where an unknown key lives: another task kind's section, or its new place."""
    dotted = f"{err.section}.{err.key}" if err.section else err.key
    if dotted in MOVED:
        return ConfigError(f"{err}. '{dotted}' moved to {MOVED[dotted]}")
    if err.section in ("task", "data"):
        owners = [
            other for other, cls in TASKS.items()
            if other != kind and err.key in getattr(cls, "Config" if err.section == "task"
                                                    else "DataConfig").__dataclass_fields__
        ]  # fmt: skip
        if owners:
            return ConfigError(
                f"{err} (task.kind={kind}); '{dotted}' belongs to task.kind {' / '.join(owners)}"
            )
    return err


def import_plugins(imports, base_dir: Path | None = None) -> None:
    """Import the recipe's `imports`: modules by name, or .py files (relative to the recipe's
    directory, else the working directory), each once per process."""
    if not isinstance(imports, list) or not all(isinstance(i, str) for i in imports):
        raise ConfigError(f"imports: expected a list of module names or .py files, got {imports!r}")
    for item in imports:
        if not item.endswith(".py"):
            try:
                importlib.import_module(item)
            except ImportError as err:
                raise ConfigError(f"imports: cannot import {item!r}: {err}") from None
            continue
        path = Path(item)
        if not path.is_absolute() and base_dir is not None and (base_dir / path).is_file():
            path = base_dir / path
        path = path.resolve()
        name = f"vlscale_plugin_{path.stem}"
        loaded = (getattr(m, "__file__", None) for m in list(sys.modules.values()))
        if name in sys.modules or str(path) in loaded:  # imported already (e.g. by pytest)
            continue
        if not path.is_file():
            raise ConfigError(f"imports: no file {item!r}")
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)


def config_from_tree(tree: dict, base_dir: Path | None = None) -> Config:
    """A recipe tree (after `base:` inheritance and overrides) -> a validated Config."""
    import_plugins(tree.get("imports", []), base_dir)
    kind = (tree.get("task") or {}).get("kind", "siglip")
    if not isinstance(kind, str):
        raise ConfigError(f"task.kind must be a name, got {kind!r}")
    try:
        cfg = build_config(tree, sections_of(kind))
    except UnknownKeyError as err:
        raise _explain(err, kind) from None
    engine_class(cfg.engine.kind)  # an unknown kind names the registered ones
    cfg.eval.evaluators = resolve_evaluators(cfg.eval.evaluators)
    check_capabilities(cfg.eval.evaluators, task_class(kind))
    return cfg


def load_config(recipe: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Recipe (path or name in recipes/) + `key.sub=value` overrides -> a validated Config."""
    tree: dict = {}
    base_dir = None
    if recipe is not None:
        path = resolve_recipe(recipe)
        tree = load_tree(path)
        tree.setdefault("name", path.stem)
        base_dir = path.resolve().parent
    parsed: list[tuple[str, Any]] = [parse_override(item) for item in overrides]
    for key, value in parsed:  # kind and imports first: they decide which keys are valid
        if key in ("task.kind", "imports"):
            set_path(tree, key, value)
    import_plugins(tree.get("imports", []), base_dir)
    kind = (tree.get("task") or {}).get("kind", "siglip")
    sections = sections_of(kind) if isinstance(kind, str) else None
    for key, value in parsed:
        try:
            check_key(key, sections)
        except UnknownKeyError as err:
            raise _explain(err, kind) from None
        set_path(tree, key, value)
    cfg = config_from_tree(tree, base_dir)
    # Recorded as absolute paths: a resumed job or `vlscale export` may run from elsewhere.
    cfg.imports = [
        str((base_dir / i).resolve()) if i.endswith(".py") and base_dir and (base_dir / i).is_file()
        else i for i in cfg.imports
    ]  # fmt: skip
    return cfg


def config_from_dict(tree: dict) -> Config:
    """A resolved config (a run's config.yaml, as a dict) -> a Config."""
    return config_from_tree(tree)


# ---------------------------------------------------------------------------- reference


def recipe_summaries() -> list[tuple[str, str]]:
    """(name, first sentence of its leading comment, + its base) of every recipe in recipes/."""
    out = []
    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        lines = path.read_text().splitlines()
        head = []
        for line in lines:
            if not line.startswith("#"):
                break
            head.append(line.lstrip("#").strip())
        text = " ".join(head)
        first = text.split(". ", 1)[0].rstrip(".")
        base = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("base:")), "")
        out.append((path.stem, first + (f" (base: {base})" if base else "")))
    return out


def _table(rows: list[tuple], width: int = 100) -> list[str]:
    """Rows of (key, type, default, comment) as aligned lines of at most ~`width` columns."""
    import textwrap

    cols = [min(max(len(r[i]) for r in rows), cap) for i, cap in ((0, 34), (1, 22), (2, 16))]
    lines = []
    for key, tp, default, comment in rows:
        cells = [key, tp, default]
        left = "  "
        for cell, col in zip(cells, cols):
            left += (cell.ljust(col) if len(cell) <= col else cell) + "  "
        if not comment:
            lines.append(left.rstrip())
        elif len(left) <= width - 30:
            wrapped = textwrap.wrap(comment, width - len(left)) or [""]
            lines.append(left + wrapped[0])
            lines += [" " * len(left) + more for more in wrapped[1:]]
        else:  # no room left: the comment goes below
            lines.append(left.rstrip())
            lines += textwrap.wrap(
                comment, width, initial_indent=" " * 6, subsequent_indent=" " * 6
            )
    return lines


def config_reference() -> str:
    """What `vlscale train --help` lists after its usage: the recipes and every config key with
    its type, default and comment, read from the dataclasses (core/config.py and each registered
    task kind's), so it cannot go stale."""
    import dataclasses
    import textwrap
    import typing

    from .config import DataConfig, TaskConfig, section_rows

    out = ["recipes (RECIPE: one of these names, or a path to a YAML file):"]
    recipes = recipe_summaries()
    width = max(len(name) for name, _ in recipes)
    for name, about in recipes:
        indent = " " * (width + 4)
        out += textwrap.wrap(
            about, 100, initial_indent=f"  {name:<{width}}  ", subsequent_indent=indent
        )
    out += [
        "",
        "config keys (key.sub=value overrides; `vlscale config RECIPE` prints one resolved):",
    ]
    hints = typing.get_type_hints(Config)
    sections = {"top level": section_rows(Config, skip=tuple(
        f.name for f in dataclasses.fields(Config) if dataclasses.is_dataclass(hints[f.name])
    ))}  # fmt: skip
    for f in dataclasses.fields(Config):
        cls = hints[f.name]
        if dataclasses.is_dataclass(cls):
            title = f"{f.name} (every task.kind)" if f.name in ("task", "data") else f.name
            sections[title] = section_rows(cls, f"{f.name}.")
    for kind, cls in sorted(TASKS.items()):
        rows = section_rows(cls.Config, "task.", skip=tuple(TaskConfig.__dataclass_fields__))
        rows += section_rows(cls.DataConfig, "data.", skip=tuple(DataConfig.__dataclass_fields__))
        sections[f"task.kind={kind}: its own task: and data: keys"] = rows
    for title, rows in sections.items():
        out += ["", title, *(_table(rows) if rows else ["  (none)"])]
    return "\n".join(out) + "\n"


def config_changes(path: Path, run_dir: Path, cfg, world_size: int) -> dict:
    """`core.config.check_resume` of `cfg` resuming checkpoint `path` on `world_size` ranks
    (into `run_dir`), against the saved config of the run that wrote it (what
    `Checkpointer.check_config` runs on rank 0, and `vlscale submit --resume` before it submits)."""
    owner = path.parent.parent if path.parent.name == "checkpoints" else run_dir
    saved_file = owner / "config.yaml"
    if not saved_file.is_file():
        saved_file = run_dir / "config.yaml"
    if not saved_file.is_file():
        log.warning("%s: no config.yaml of the run that wrote it to compare with", path)
        return {}
    tree = yaml.safe_load(saved_file.read_text()) or {}
    try:  # re-resolved: keys added to the schema since then get their defaults on both sides
        saved = config_from_dict(tree).to_dict()
    except ConfigError:  # a key since removed or renamed: compare what was written
        saved = tree
    saved_world = json.loads((path / "meta.json").read_text()).get("world_size")
    return check_resume(saved, cfg, saved_world, world_size, str(saved_file))


__all__ = [
    "MOVED",
    "config_changes",
    "config_from_dict",
    "config_from_tree",
    "config_reference",
    "load_config",
    "sections_of",
]
