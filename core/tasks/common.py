"""Pieces every task uses: towers from checkpoints or configs, the tokenizer, pooling, streams."""

from __future__ import annotations

import torch

from .. import models
from ..config import Config, ConfigError
from ..data.mixture import mixture_urls
from ..data.preprocess import collate as default_collate
from ..data.stream import ShardStream
from ..flops import TowerCost
from ..models import hub


def load_tower(path: str, config: dict, image_size: int = 0, part: str = "") -> torch.nn.Module:
    """A pretrained tower (hub id or local dir), or a random one from an HF-style config dict.
    For vision towers `image_size` (when set) overrides the checkpoint's size; positions are
    interpolated. part="text": the text tower of a two-tower checkpoint (core.models)."""
    if not path and "model_type" not in config:
        raise ConfigError(
            "a tower needs a checkpoint (model.vision / model.text) or a config with a "
            "model_type (model.vision_config / model.text_config)"
        )
    if path:
        model = models.from_pretrained(hub.resolve(path), part=part)
        if image_size and hasattr(model, "set_image_size"):
            model.set_image_size(image_size)
        return model.train()
    if image_size and "image_size" not in config:
        config = {**config, "image_size": image_size}
    return models.from_config(config).train()


def build_tokenizer(cfg: Config):
    from transformers import AutoTokenizer

    source = cfg.model.tokenizer or cfg.model.text
    tok = AutoTokenizer.from_pretrained(str(hub.resolve(source)))
    if tok.pad_token is None:  # Qwen-style tokenizers have no pad token: pad with EOS
        tok.pad_token = tok.eos_token
    return tok


def pool_tokens(hidden: torch.Tensor, mask: torch.Tensor | None, how: str) -> torch.Tensor:
    """[B, T, D] -> [B, D]. `mask` [B, T] marks real tokens (right padding)."""
    if how == "mean":
        if mask is None:
            return hidden.mean(dim=1)
        m = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)
    if how == "last":
        if mask is None:
            return hidden[:, -1]
        last = mask.long().sum(dim=1).clamp(min=1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise ValueError(f"unknown pooling {how!r}")


def tower_features(vision, pixel_values: torch.Tensor) -> torch.Tensor:
    """[n, d]: a vision tower's output tokens mean-pooled, its CLS token (if any) left out: what
    every kind's `ImageEncoder.image_features` reports, so linear probes compare towers alike."""
    hidden = vision(pixel_values)
    return (hidden[:, 1:] if vision.has_cls_token else hidden).mean(dim=1)


def make_stream(
    cfg: Config, dist, urls: str, decode, *, train: bool, collate=None, mixture=None,
    batch_size: int = 0,
):  # fmt: skip

    if not urls:
        raise ValueError(f"data.{'train' if train else 'val'} is empty: point it at shards")
    return ShardStream(
        mixture_urls(urls, mixture) if mixture else urls,
        decode=decode,
        collate=collate or default_collate,
        batch_size=batch_size or (cfg.data.batch_size if train else cfg.eval.batch_size),
        rank=dist.rank,
        world_size=dist.world_size,
        num_workers=cfg.data.num_workers,
        seed=cfg.seed,
        shuffle=cfg.data.shuffle and train,
        epochs=None if train else 1,
        drop_last=train,
        max_bad_fraction=cfg.data.max_bad_fraction,
        pin_memory=dist.device.type == "cuda",
        interleave=cfg.data.interleave if train else 1,
    )


def val_mixture(cfg: Config, subsets: list[str] | None = None, pattern: str = "") -> dict | None:
    """Each validation subset once: `subsets`, default the training mixture's. None where
    the shard pattern (`pattern`, default data.val) has no `{subset}`; an error where it has one
    and no subset is named."""
    pattern = pattern or cfg.data.val
    if "{subset}" not in pattern:
        return None
    chosen = list(subsets or cfg.data.mixture)
    if not chosen:
        raise ConfigError(
            f"{pattern!r} has a {{subset}} pattern but no subsets: set "
            "data.mixture or the evaluator's subsets option"
        )
    return dict.fromkeys(chosen)


def vision_lm_costs(vision, projector, lm) -> dict[str, TowerCost]:
    """The FLOP costs of a vision tower -> projector -> decoder LM (the VLM and PaliGemma kinds):
    its LM head counted on its own, as the tasks apply it only where a target is supervised."""
    v = TowerCost.of(vision, len(vision.blocks), vision.hidden_size)
    p = TowerCost.of(projector, 0, 0, grad_upstream=v.grad_flows)
    c = lm.config
    return {
        "vision": v,
        "projector": p,
        "lm": TowerCost.of(lm, c.num_layers, c.num_heads * c.head_dim,
                           grad_upstream=p.grad_flows, exclude=(lm.lm_head,)),
        "lm_head": TowerCost.of(lm.lm_head, 0, 0, grad_upstream=True),
    }  # fmt: skip
