"""Engines, one module each, chosen by `engine.kind` through the registry `ENGINES`.

An engine class owns everything that differs between parallelism strategies: wrapping, backward,
the optimizer step, its checkpoint format, and, without an instance (for tools, in one process):
  read_checkpoint(step_dir)   the full fp32 model state of one of its checkpoint directories,
                              each tensor read when asked for (core/lazy_tensors.py LazyTensors:
                              `vlscale export` streams it, a staged recipe's task.init_from)
  memory_per_rank(offload, precision, n, t, w)   bytes of params / grads / optimizer state per
                              rank, its formulas in its docstring (`vlscale plan`)
  offloads                    the engine.offload values it supports
Everything that lists engines (plan, export, benchmarks, tests) reads the registry: adding an
engine is its module plus one `register_engine` line below. Importing this package does not
import DeepSpeed (core/engines/zero.py imports it inside functions).
"""

from __future__ import annotations

from ..config import ConfigError
from .base import Engine
from .ddp import DDPEngine
from .fsdp import FSDPEngine
from .zero import Zero2Engine, Zero3Engine

ENGINES: dict[str, type[Engine]] = {}  # kind -> engine class, in registration order

FORMATS = ("read_checkpoint", "memory_per_rank", "offloads")  # what every engine class has


def register_engine(kind: str, cls: type[Engine]) -> type[Engine]:
    """Make `cls` the engine of `engine.kind=kind` (replacing any before) for training, export,
    `vlscale plan`, the benchmarks and the tests. Returns `cls`."""
    missing = [name for name in FORMATS if not hasattr(cls, name)]
    if missing:
        raise TypeError(f"engine {kind!r}: {cls.__name__} lacks {', '.join(missing)}")
    ENGINES[kind] = cls
    return cls


register_engine("ddp", DDPEngine)  # full replicas, gradients all-reduced (ddp.py)
register_engine("zero2", Zero2Engine)  # DeepSpeed ZeRO-2: optimizer state, gradients (zero.py)
register_engine("zero3", Zero3Engine)  # DeepSpeed ZeRO-3: parameters sharded too (zero.py)
register_engine("fsdp", FSDPEngine)  # FSDP2 fully_shard per block: all three sharded (fsdp.py)


def engine_class(kind: str) -> type[Engine]:
    """The engine class registered for `engine.kind=kind`; ConfigError naming the valid kinds."""
    try:
        return ENGINES[kind]
    except KeyError:
        valid = ", ".join(ENGINES)
        raise ConfigError(f"engine.kind={kind!r} is not an engine; valid: {valid}") from None


def build_engine(task, cfg, dist, lr: float, total_steps: int):
    return engine_class(cfg.engine.kind)(task, cfg, dist, lr, total_steps)
