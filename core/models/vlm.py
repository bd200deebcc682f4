"""A LLaVA-family VLM from our towers: vision tower -> pixel-shuffle projector -> decoder LM.

The image embeddings replace the LM's input embeddings at the image-pad token positions, in order
(SiQ-VL / Qwen2-VL prompt layout: `<|vision_start|><|image_pad|> x N<|vision_end|>` per image).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def pixel_shuffle(x: torch.Tensor, factor: int) -> torch.Tensor:
    """[n, g*g, D] patch tokens -> [n, (g/r)^2, r*r*D]: each r x r block of neighbouring patches
    becomes one token (its channels in row-major order of the block)."""
    n, tokens, dim = x.shape
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise ValueError(f"pixel shuffle needs a square patch grid, got {tokens} tokens")
    if grid % factor:
        raise ValueError(
            f"pixel shuffle factor {factor} does not divide the {grid}x{grid} patch grid"
        )
    g = grid // factor
    x = x.reshape(n, g, factor, g, factor, dim).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(n, g * g, factor * factor * dim)


def choose_shuffle(grid: int, image_tokens: int) -> int:
    """The pixel-shuffle factor giving `image_tokens` tokens per image of a grid x grid tower."""
    if image_tokens <= 0:
        return 1
    factor = math.isqrt(grid * grid // image_tokens)
    if factor < 1 or (grid // factor) ** 2 != image_tokens or grid % factor:
        options = [(grid // r) ** 2 for r in range(1, grid + 1) if grid % r == 0]
        raise ValueError(
            f"{image_tokens} image tokens is not reachable by pixel shuffle of a "
            f"{grid}x{grid} patch grid; possible: {options}"
        )
    return factor


class Projector(nn.Module):
    """Pixel shuffle + linear (optionally LayerNorm first, or a 2-layer GELU MLP)."""

    def __init__(self, vision_dim: int, text_dim: int, factor: int, kind: str = "linear"):
        super().__init__()
        self.factor = factor
        d_in = vision_dim * factor * factor
        self.norm = nn.LayerNorm(d_in) if kind == "layernorm" else None
        if kind == "mlp":
            self.proj = nn.Sequential(
                nn.Linear(d_in, text_dim), nn.GELU(), nn.Linear(text_dim, text_dim)
            )
        elif kind in ("linear", "layernorm"):
            self.proj = nn.Linear(d_in, text_dim)
        else:
            raise ValueError(f"unknown projector kind {kind!r}; valid: linear, layernorm, mlp")

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = pixel_shuffle(features, self.factor) if self.factor > 1 else features
        if self.norm is not None:
            x = self.norm(x)
        return self.proj(x)


def splice_images(
    embeds: torch.Tensor, input_ids: torch.Tensor, image_embeds: torch.Tensor, image_token_id: int
) -> torch.Tensor:
    """Put image_embeds [n, N, H] (in order) at the image-pad positions of embeds [B, T, H].
    The count is checked on the host, where the ids are built (core/data/packing.py), so the
    training step needs no device-to-host sync for it."""
    where = (input_ids == image_token_id).unsqueeze(-1)
    return embeds.masked_scatter(where, image_embeds.to(embeds.dtype))
