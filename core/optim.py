"""AdamW with the usual no-decay groups, and warmup + cosine. Shared by every engine."""

from __future__ import annotations

import math

import torch

from .config import OptimConfig


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: norms, biases, temperature and bias (all < 2-D) are not decayed."""
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if not param.requires_grad:
            continue  # frozen parameters get no optimizer state at all
        (decay if param.ndim >= 2 else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay),
        lr=lr,
        betas=tuple(cfg.betas),
        eps=cfg.eps,
        # foreach is fast on GPU and CPU; fused exists only for some devices.
        foreach=True,
    )


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine to min_ratio at `total`. `step` counts from 0."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer, cfg: OptimConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.warmup_steps, total_steps, cfg.min_lr_ratio)
    )


def scaled_lr(cfg: OptimConfig, global_batch: int) -> float:
    """The linear scaling rule, when the recipe asks for it (lr_base_batch > 0)."""
    return cfg.lr * global_batch / cfg.lr_base_batch if cfg.lr_base_batch > 0 else cfg.lr
