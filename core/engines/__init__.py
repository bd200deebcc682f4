"""Engines, one module each, chosen by `engine.kind`.

ddp    full replicas, gradients all-reduced (core/engines/ddp.py)
zero2  DeepSpeed ZeRO-2: optimizer state and gradients sharded (core/engines/zero.py)
zero3  DeepSpeed ZeRO-3: parameters too (core/engines/zero.py)
fsdp   torch FSDP2 fully_shard per block: parameters, gradients, optimizer state sharded
"""

from __future__ import annotations

import importlib

# kind -> (module, class); imported on use, so a DDP run never imports DeepSpeed.
ENGINES = {
    "ddp": ("core.engines.ddp", "DDPEngine"),
    "zero2": ("core.engines.zero", "DeepSpeedEngine"),
    "zero3": ("core.engines.zero", "DeepSpeedEngine"),
    "fsdp": ("core.engines.fsdp", "FSDPEngine"),
}


def engine_class(kind: str):
    module, name = ENGINES[kind]
    return getattr(importlib.import_module(module), name)


def build_engine(task, cfg, dist, lr: float, total_steps: int):
    return engine_class(cfg.engine.kind)(task, cfg, dist, lr, total_steps)
