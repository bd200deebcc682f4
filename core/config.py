"""Typed run configuration: YAML recipes, `base:` inheritance, `key.sub=value` overrides.

Every experiment is a config (big_vision's rule). A recipe is a YAML file whose top-level keys are
the sections below; `base: other_recipe` inherits from another recipe and overrides on top.
Validation happens before any process starts: an unknown key names the valid ones and the closest
match; a value of the wrong type names the key, the expected type and the value given.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


class ConfigError(ValueError):
    """A recipe or override that cannot be turned into a valid Config."""


class UnknownKeyError(ConfigError):
    """A key no section of this config has; `section` is its dotted parent ("" at the top)."""

    def __init__(self, message: str, section: str, key: str):
        super().__init__(message)
        self.section, self.key = section, key


@dataclass
class ModelConfig:
    """The towers. Each is a Hugging Face checkpoint (hub id or local directory) loaded with its
    weights, or, when the path is empty, built with random weights from an HF-style config dict.
    What a task builds from them (heads, projectors) is configured in its `task:` section."""

    vision: str = ""
    vision_config: dict = field(default_factory=dict)
    text: str = ""
    text_config: dict = field(default_factory=dict)
    tokenizer: str = ""  # defaults to `text`
    image_size: int = 0  # 0 = the vision checkpoint's own size; else interpolate positions


@dataclass
class TaskConfig:
    """The `task:` section every task kind extends (core/tasks/base.py): `kind` selects the task
    and with it the classes of the `task:` and `data:` sections, so a key of another kind is an
    error. Which parameters train is one mechanism, parameter-name patterns (fnmatch globs on
    names such as `vision.blocks.0.attn.qkv.weight`): `trainable` replaces the task's default
    for its stage, then `freeze` is taken away from it."""

    kind: str = "siglip"
    trainable: list[str] = field(default_factory=list)  # empty: the task's default
    freeze: list[str] = field(default_factory=list)  # e.g. [vision.*]: no grads, no optim state


@dataclass
class DataConfig:
    """What every task reads. A task kind adds its own fields in a subclass (core/tasks/*.py)."""

    train: str = ""  # shard URLs: paths, brace patterns, pipe:/hf:// URLs
    val: str = ""
    batch_size: int = 32  # per rank, per micro-step
    num_workers: int = 2
    shuffle: bool = True
    max_bad_fraction: float = 0.01
    max_pixels: int = 50_000_000
    # `train`/`val` may contain {subset}; mixture {subset: weight} mixes subsets by samples.
    mixture: dict = field(default_factory=dict)
    # Shards each data worker reads at once, samples shuffled across them: > 1 mixes subsets
    # stored shard by shard within every batch (streamed shards: that many are held in memory).
    interleave: int = 1


@dataclass
class OptimConfig:
    lr: float = 3e-4
    lr_base_batch: int = 0  # >0: lr (and each lr_groups lr) is scaled by global_batch / this
    # {pattern: lr}, e.g. {projector: 1e-3, vision: 2e-6}: a pattern matches a parameter name or
    # what lies below it (projector = projector.*; fnmatch globs), the first one that matches
    # wins, in order written; trained parameters that none matches use `lr`.
    lr_groups: dict[str, float] = field(default_factory=dict)
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    warmup_steps: int = 100
    max_steps: int = 1000
    epochs: float = 0.0  # >0: max_steps derived from the train split size
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0  # 0 = off
    accum_steps: int = 1
    max_nonfinite_in_a_row: int = 5


@dataclass
class EngineConfig:
    """Parallelism and memory strategy; see core/engines/ and `vlscale plan`."""

    kind: str = "ddp"  # a name in core.engines.ENGINES
    precision: Literal["fp32", "bf16"] = "bf16"
    # DeepSpeed: optimizer (zero2/zero3) or optimizer+params (zero3) on CPU. FSDP2: only
    # optimizer+params (CPUOffloadPolicy moves parameters, gradients and optimizer state).
    offload: Literal["none", "optimizer", "optimizer+params"] = "none"
    reshard_after_forward: bool = True  # fsdp, zero3: free gathered block weights after forward
    activation_checkpointing: Literal["none", "full", "every_k"] = "none"
    ac_every_k: int = 2  # every_k: checkpoint blocks 0, k, 2k, ... of each tower
    compile: bool = False  # torch.compile each transformer block
    ds_config: str = ""  # a DeepSpeed JSON of your own, checked against this config


@dataclass
class CheckpointConfig:
    every: int = 1000  # steps; 0 = only at the end
    keep: int = 3
    # At the end of the run rank 0 writes RUN_DIR/export from the final checkpoint, as `vlscale
    # export` (streamed: one tensor in memory at a time); the other ranks are done by then.
    export: bool = False


@dataclass
class WandbConfig:
    mode: Literal["offline", "online", "disabled"] = "offline"
    project: str = "vlscale"
    entity: str = ""


@dataclass
class LoggingConfig:
    every: int = 10  # steps between metrics rows (metrics.jsonl, wandb, tensorboard)
    # Step 1 logged too, as transformers' `logging_first_step`: its loss checks the setup
    # (ln 2 for DPO with policy = reference, about ln(vocabulary) for a fresh LM).
    first_step: bool = False
    # Rank 0's progress on stderr: a tqdm bar when stderr is a terminal, otherwise (a SLURM log,
    # `> log 2>&1`) one plain line per metrics row; plus one line per evaluation. false: neither.
    progress: bool = True
    tensorboard: bool = False  # event files in RUN_DIR/tensorboard/ (rank 0)
    # RUN_DIR/report.png drawn by rank 0 when the run ends (about a second of matplotlib, the
    # other ranks waiting); `vlscale report RUN_DIR` draws it at any time.
    report: bool = True
    # Peak FLOP/s of one device for `mfu`; 0: the table in core/flops.py for known GPUs (none
    # for CPUs: then only flops_per_s, the achieved model FLOP/s per rank, is logged).
    peak_flops: float = 0.0
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class EvalConfig:
    """Evaluators are declared, big_vision style: `evaluators` is a list of names, or of
    `{name: {option: value}}`, from core/evaluators/ (each checks its own options). Every
    evaluator runs every `every` steps (its own `every` option overrides) and at the end."""

    every: int = 0  # steps; 0 = only at the end
    batch_size: int = 64
    evaluators: list = field(default_factory=list)
    # fsdp, zero3: evaluate through the sharded model, every rank running the same forwards in
    # lockstep (no rank holds the whole model; bf16 runs evaluate in their bf16 weights). false:
    # in a full copy of the fp32 (master) weights on every rank: the whole model per rank.
    sharded: bool = True


@dataclass
class LaunchConfig:
    backend: Literal["auto", "nccl", "gloo"] = "auto"  # auto: nccl on CUDA, gloo on CPU
    timeout_minutes: int = 30


@dataclass
class Config:
    name: str = ""
    run_dir: str = ""  # default runs/<name>
    resume: str = "auto"  # auto | none | path to a checkpoint directory
    # A resume whose config differs from the run's config.yaml in keys other than those that may
    # change between jobs (RESUME_MAY_CHANGE below) is refused; allow: the changes take effect
    # and are logged (config_changed in metrics.jsonl). For this job only.
    resume_changes: Literal["refuse", "allow"] = "refuse"
    seed: int = 0
    # Modules (`pkg.mod`) or files (`my_task.py`, relative to the recipe) to import before the
    # rest is read: where a task kind or evaluator of your own registers itself.
    imports: list[str] = field(default_factory=list)
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ---------------------------------------------------------------------------- building


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting only where no information is lost."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad
        return build_section(tp, value, key)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise bad
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise bad
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise bad
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is list:  # free-form (e.g. eval.evaluators, checked by its own registry)
        if not isinstance(value, (list, tuple)):
            raise bad
        return list(value)
    if tp is dict:
        if not isinstance(value, dict):
            raise bad
        return value
    if origin is dict:  # e.g. dict[str, float]: every key and value checked
        if not isinstance(value, dict):
            raise bad
        key_tp, value_tp = typing.get_args(tp)
        return {
            _coerce(k, key_tp, key): _coerce(v, value_tp, f"{key}.{k}") for k, v in value.items()
        }
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `3e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if tp is str:
        if isinstance(value, (dict, list)) or value is None:
            raise bad
        return str(value)  # `run_dir=123` or `resume=none` are strings too
    raise bad


def _unknown_key(cls: type, key: str, prefix: str) -> ConfigError:
    names = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, names, n=1)
    hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
    where = prefix.rstrip(".") or "the top level"
    return UnknownKeyError(
        f"unknown key '{prefix}{key}' in {where}; valid keys: {', '.join(names)}{hint}",
        prefix.rstrip("."),
        key,
    )


def build_section(cls: type, values: dict, prefix: str = "", sections: dict | None = None) -> Any:
    """`values` as a `cls`; `sections` replaces the classes of some fields (a task kind's)."""
    hints = {**typing.get_type_hints(cls), **(sections or {})}
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise _unknown_key(cls, key, f"{prefix}." if prefix else "")
        kwargs[key] = _coerce(value, hints[key], f"{prefix}.{key}" if prefix else key)
    for key, section_cls in (sections or {}).items():
        kwargs.setdefault(key, section_cls())  # an absent section: the kind's defaults
    return cls(**kwargs)


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and value:
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def set_path(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: {part!r} is not a section")
        node = child
    node[leaf] = value


def check_key(dotted: str, sections: dict | None = None) -> None:
    """A dotted key (an override's) names a field: else an error naming the valid keys."""
    cls: Any = Config
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        names = {f.name: f for f in dataclasses.fields(cls)}
        if part not in names:
            raise _unknown_key(cls, part, "".join(p + "." for p in parts[:i]))
        tp = (sections or {}).get(part) if i == 0 and sections else None
        tp = tp or typing.get_type_hints(cls)[part]
        if not dataclasses.is_dataclass(tp):
            return  # a leaf (or a free-form dict such as model.text_config)
        cls = tp


def resolve_recipe(recipe: str | Path) -> Path:
    """A recipe path, or a name in recipes/ (with or without .yaml)."""
    path = Path(recipe)
    if path.is_file():
        return path
    for cand in (RECIPES_DIR / f"{recipe}.yaml", RECIPES_DIR / str(recipe)):
        if cand.is_file():
            return cand
    known = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
    raise ConfigError(f"no recipe {str(recipe)!r}: not a file, and not one of {', '.join(known)}")


def load_tree(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in seen:
        raise ConfigError(
            f"recipe inheritance loops: {' -> '.join(str(p) for p in seen + (path,))}"
        )
    tree = yaml.safe_load(path.read_text()) or {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: a recipe is a mapping of sections, got {type(tree).__name__}")
    base = tree.pop("base", None)
    if base is None:
        return tree
    base_path = Path(base)
    if not base_path.is_absolute() and (path.parent / base_path).is_file():
        base_path = path.parent / base_path
    else:
        base_path = resolve_recipe(base)
    inherited = load_tree(base_path, seen + (path,))
    inherited.pop("name", None)  # a run is named after its own recipe, not its base
    return deep_merge(inherited, tree)


def parse_override(item: str) -> tuple[str, Any]:
    """`key.sub=value` -> (key, value); YAML gives the natural types: 3e-4 -> float, true ->
    bool, [1, 2] -> list, {a: 1} -> dict."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key.sub=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def build_config(tree: dict, sections: dict[str, type]) -> Config:
    """A recipe tree as a Config whose sections named in `sections` (the task kind's `task` and
    `data` classes) have those classes. core/recipe.py picks them by `task.kind`."""
    cfg = build_section(Config, tree, sections=sections)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Cross-field checks that types alone cannot express."""
    if not cfg.run_dir:
        cfg.run_dir = f"runs/{cfg.name or 'run'}"
    checks = [
        (cfg.data.batch_size > 0, "data.batch_size must be > 0"),
        (cfg.data.interleave >= 1, "data.interleave must be >= 1"),
        (cfg.optim.accum_steps >= 1, "optim.accum_steps must be >= 1"),
        (cfg.optim.max_steps > 0 or cfg.optim.epochs > 0, "set optim.max_steps or optim.epochs"),
        (0.0 <= cfg.data.max_bad_fraction <= 1.0, "data.max_bad_fraction must be in [0, 1]"),
        (cfg.checkpoint.keep >= 1, "checkpoint.keep must be >= 1"),
        (cfg.logging.every >= 1, "logging.every must be >= 1"),
        (len(cfg.optim.betas) == 2, "optim.betas must have two values"),
        (
            all(k and k != "default" for k in cfg.optim.lr_groups),
            "optim.lr_groups: patterns must be non-empty and not 'default' (optim.lr's groups)",
        ),
        (
            all(v >= 0 for v in cfg.optim.lr_groups.values()),
            f"optim.lr_groups: learning rates must be >= 0, got {cfg.optim.lr_groups}",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


# ---------------------------------------------------------------------------- resuming

# Keys that may differ between a run's saved config.yaml and the config of a job that resumes
# one of its checkpoints (the same command again, a requeue, `vlscale submit --resume`) without
# resume_changes=allow: none changes what the checkpoint holds or what a step computes from it.
RESUME_MAY_CHANGE = (
    "run_dir",  # where this job writes: resume=PATH may continue another run's checkpoint
    "resume",  # how this job finds its checkpoint (a requeue sets resume=auto)
    "resume_changes",  # this check's own switch, given per job
    "optim.max_steps",  # where the run ends: the schedule follows the new length from the resume
    "optim.epochs",  # the same, counted in epochs (it sets max_steps)
    "optim.max_nonfinite_in_a_row",  # when to give up on non-finite steps, not what a step does
    "data.num_workers",  # loader processes: the data restarts at the next epoch (logged)
    "data.val",  # read by evaluators only
    "data.max_bad_fraction",  # when to give up on bad samples, not which samples are used
    "engine.activation_checkpointing",  # memory for compute: the same gradients
    "engine.ac_every_k",  # likewise
    "engine.compile",  # speed: the same maths (compiled blocks match eager within 1e-4)
    "engine.reshard_after_forward",  # fsdp, zero3: memory for communication, the same maths
    "checkpoint.*",  # when checkpoints are written and how many are kept
    "logging.*",  # what is reported, not what is trained
    "eval.*",  # evaluation reads the model, never changes it
    "launch.*",  # process-group backend and timeout
)
# These may change too when the global batch (data.batch_size x optim.accum_steps x ranks) stays
# the same: what resuming on another number of GPUs takes (the world size is not in the config;
# the checkpoint records it). Engines reshard their checkpoints; the data continues exactly when
# ranks x data.batch_size is kept, else from the next epoch (logged).
RESUME_BATCH_KEYS = ("data.batch_size", "optim.accum_steps")
# Never, not even with resume_changes=allow: the checkpoint's format is the engine's own
# (another number of GPUs is fine, another engine is not), and the optimizer state in it is laid
# out by the lr_groups patterns (their learning rates may change with allow).
RESUME_CANNOT_CHANGE = ("engine.kind", "optim.lr_groups patterns")

_ABSENT = object()


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """A resolved config dict as {dotted key: value}: sections and dicts recurse (an empty dict
    adds nothing), lists are values."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def show_value(value: Any) -> str:
    """A config value as YAML writes it inline (`(absent)` for a key one config lacks)."""
    if value is _ABSENT:
        return "(absent)"
    text = yaml.safe_dump(value, default_flow_style=True, width=10**9).strip()
    return text[: -len("\n...")] if text.endswith("\n...") else text


def may_change_on_resume(key: str) -> bool:
    import fnmatch

    return any(key == p or fnmatch.fnmatchcase(key, p) for p in RESUME_MAY_CHANGE)


def check_resume(
    saved: dict, cfg: Config, saved_world: int | None, world: int, source: str = "config.yaml"
) -> dict[str, dict]:
    """Compare the config of a job resuming a checkpoint with the run's saved one (`saved`:
    Config.to_dict of the re-resolved config.yaml; `saved_world`: the ranks that wrote the
    checkpoint), key by dotted key. A change outside RESUME_MAY_CHANGE (and RESUME_BATCH_KEYS
    with the global batch kept) is a ConfigError naming each key with its old and new value,
    unless cfg.resume_changes is allow; a change of RESUME_CANNOT_CHANGE always is. Returns the
    changes that allow let through, {key: {"old": v, "new": v}} (None for an absent key)."""
    new = cfg.to_dict()
    old_flat, new_flat = flatten(saved), flatten(new)
    changed = {
        key: (old_flat.get(key, _ABSENT), new_flat.get(key, _ABSENT))
        for key in [*old_flat, *(k for k in new_flat if k not in old_flat)]
        if old_flat.get(key, _ABSENT) != new_flat.get(key, _ABSENT)
    }

    def pair(key: str) -> str:
        old, now = changed[key]
        return f"{key}: {show_value(old)} -> {show_value(now)}"

    old_groups = list((saved.get("optim") or {}).get("lr_groups") or {})
    if "engine.kind" in changed or old_groups != list(cfg.optim.lr_groups):
        what = (
            f"{pair('engine.kind')}: checkpoints do not convert between engines (another number "
            "of GPUs is fine)"
            if "engine.kind" in changed
            else f"optim.lr_groups patterns {old_groups} -> {list(cfg.optim.lr_groups)}: the "
            "checkpoint's optimizer state is laid out by them (their lrs may change)"
        )
        raise ConfigError(f"cannot resume a checkpoint of the run in {source} with {what}")

    def global_batch(tree: dict, ranks: int) -> int:
        return tree["data"]["batch_size"] * tree["optim"]["accum_steps"] * ranks

    same_global_batch = saved_world is not None and (
        global_batch(saved, saved_world) == global_batch(new, world)
    )
    needs_allow = [
        key for key in changed
        if not may_change_on_resume(key) and not (key in RESUME_BATCH_KEYS and same_global_batch)
    ]  # fmt: skip
    if needs_allow and cfg.resume_changes != "allow":
        raise ConfigError(
            f"resuming with a config that differs from the run's ({source}) in "
            f"{'; '.join(pair(k) for k in needs_allow)}. Only these may change between jobs: "
            f"{', '.join(RESUME_MAY_CHANGE)}, and {' and '.join(RESUME_BATCH_KEYS)} when the "
            "global batch is kept. Add resume_changes=allow to resume with the new values (the "
            "change is logged in metrics.jsonl), or resume=none to start over"
        )
    return {
        key: {k: (None if v is _ABSENT else v) for k, v in zip(("old", "new"), changed[key])}
        for key in needs_allow
    }


# ---------------------------------------------------------------------------- reference


def type_label(tp: Any) -> str:
    """An annotation as the reference shows it: int, list[str], dict[str, float], fp32|bf16."""
    if typing.get_origin(tp) is Literal:
        return "|".join(str(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is not None:
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", str(tp))


def field_comments(cls: type) -> dict[str, str]:
    """Each field's comment in the source of `cls` (and its bases): the one on its line, else
    the comment lines right above it."""
    import inspect
    import re

    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            lines = inspect.getsource(klass).splitlines()
        except (OSError, TypeError):
            continue
        block: list[str] = []
        for line in lines:
            stripped = line.strip()
            if stripped.startswith("#"):
                block.append(stripped.lstrip("#").strip())
                continue
            match = re.match(r"\s+(\w+)\s*:[^#]*?(?:#\s*(.*))?$", line)
            if match and match.group(1) in klass.__dataclass_fields__:
                own = (match.group(2) or "").strip()
                if own.startswith(("fmt:", "noqa", "type:")):
                    own = ""
                comments[match.group(1)] = own or " ".join(block)
            block = []
    return comments


def section_rows(cls: type, prefix: str = "", skip: tuple[str, ...] = ()) -> list[tuple]:
    """(dotted key, type, default, comment) of every field of the dataclass `cls`, nested
    sections flattened; `skip`: field names left out (the base class's, shown elsewhere)."""
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        tp = hints[f.name]
        if f.default is not dataclasses.MISSING:
            default = f.default
        else:
            default = f.default_factory()  # type: ignore[misc]
        if dataclasses.is_dataclass(tp):
            rows += section_rows(tp, f"{prefix}{f.name}.")
            continue
        comment = comments.get(f.name, "")
        rows.append((prefix + f.name, type_label(tp), show_value(default), comment))
    return rows
