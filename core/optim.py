"""AdamW with the usual no-decay groups and per-module learning rates (`optim.lr_groups`), and
warmup + cosine. Shared by every engine: ddp and fsdp through `build_optimizer`, DeepSpeed through
`optimizer_groups` (its own AdamW subclass, same groups less the empty ones)."""

from __future__ import annotations

import fnmatch
import math

import torch

from .config import ConfigError, OptimConfig

DEFAULT_GROUP = "default"  # the name of optim.lr's param groups


def matches(name: str, pattern: str) -> bool:
    """An lr_groups pattern matches a parameter's name or what lies below it: `projector` is
    `projector` and `projector.*`; fnmatch globs allowed."""
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, pattern + ".*")


def param_groups(
    model: torch.nn.Module,
    weight_decay: float,
    lr_groups: dict[str, float] | None = None,
    lr_scale: float = 1.0,
) -> list[dict]:
    """AdamW param groups of the trained parameters (frozen ones get no optimizer state at all).

    Decay matrices only: norms, biases, temperature and bias (all < 2-D) are not decayed. First
    optim.lr's two groups, decay and no-decay (`"name": "default"`, both always present, the
    optimizer's own lr); then, for each `lr_groups` pattern in order written, its decay and
    no-decay groups where not empty (`"name"`: the pattern, `"lr"`: its lr x `lr_scale`). Each
    parameter goes to the first pattern that matches it (`matches`), else to the default groups.
    A pattern that gets no trained parameter is a ConfigError naming the top-level modules."""
    patterns = list((lr_groups or {}).items())
    buckets: list[tuple[list, list]] = [([], []) for _ in range(len(patterns) + 1)]
    names = []
    for name, param in model.named_parameters():
        names.append(name)
        if not param.requires_grad:
            continue
        index = next((i for i, (p, _) in enumerate(patterns, 1) if matches(name, p)), 0)
        buckets[index][0 if param.ndim >= 2 else 1].append(param)
    for i, (pattern, _) in enumerate(patterns, 1):
        if not any(buckets[i]):
            trained = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
            tops = [n for n, _ in model.named_children()]  # modules first, then own parameters
            tops += [t for t in dict.fromkeys(n.split(".")[0] for n in names) if t not in tops]
            listed = ", ".join(t if t in trained else f"{t} (frozen)" for t in tops)
            why = "matches no trained parameter"
            if any(matches(n, pattern) for n in names):
                why = "matches only frozen parameters or ones an earlier pattern took"
            raise ConfigError(
                f"optim.lr_groups: {pattern!r} {why}; the top-level modules are {listed} "
                f"(a bare name means that module: {tops[0]!r} = {tops[0]}.*)"
            )
    (decay, no_decay), *named = buckets
    groups = [
        {"params": decay, "weight_decay": weight_decay, "name": DEFAULT_GROUP},
        {"params": no_decay, "weight_decay": 0.0, "name": DEFAULT_GROUP},
    ]
    for (pattern, lr), pair in zip(patterns, named):
        for params, decay_of in zip(pair, (weight_decay, 0.0)):
            if params:
                groups.append(
                    {"params": params, "weight_decay": decay_of, "name": pattern,
                     "lr": lr * lr_scale}
                )  # fmt: skip
    return groups


def optimizer_groups(model: torch.nn.Module, cfg: OptimConfig, lr: float) -> list[dict]:
    """`param_groups` of a run: `lr` is optim.lr as the run scaled it (optim.lr_base_batch), and
    every lr_groups lr is scaled by the same factor."""
    scale = lr / cfg.lr if cfg.lr else 1.0
    return param_groups(model, cfg.weight_decay, cfg.lr_groups, scale)


def group_hyperparameters(optimizer: torch.optim.Optimizer) -> list[dict]:
    """Each param group's settings (everything but its params), as the run config made them."""
    return [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]


def restore_hyperparameters(optimizer: torch.optim.Optimizer, hyper: list[dict]) -> None:
    """After loading a checkpoint's optimizer state (which brings the saved groups' settings):
    every group's settings are this run's again (`hyper`: `group_hyperparameters` from before the
    load). The same config gives the same values; a changed one (resume_changes=allow) takes
    effect. The lr is then the schedule's (`Engine.load_scheduler`)."""
    for group, own in zip(optimizer.param_groups, hyper, strict=True):
        group.update(own)


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        optimizer_groups(model, cfg, lr),
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
