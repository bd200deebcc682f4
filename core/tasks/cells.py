"""A vision tower taught what is in each cell of the synthetic shapes' 3x3 grid.

    task.kind: cells     image tower -> all output tokens, flattened -> one linear head ->
                         each cell's shape (or empty) and colour (or empty)

The labels come from the shapes shards' JSON metadata (`vlscale shards synthetic`): the synthetic
analogue of a tower pre-trained on labelled images (an ImageNet-style classifier), for the VLM
demos: their questions ask for a given cell's colour or shape, so a tower that knows both per
cell is what real VLMs start from and what the demos' contrastive and captioning towers do not
give at this scale (BENCHMARKS.md, "A tower that knows shape, kept frozen"). The head reads every
token in place (no pooling): where a shape is must survive to the head.

Loss per image: the mean over the 9 cells of the shape cross-entropy plus that of the colour;
`forward` sums it over the micro-batch and `loss_weight` is the number of images, so every image
of the global batch counts equally. Metrics: `shape_acc` and `colour_acc` over the micro-batch's
occupied cells (an empty cell is easy, and nine of them would hide a tower that sees no shape).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import models
from ..config import Config, ConfigError, DataConfig, TaskConfig
from ..data.errors import BadSample
from ..data.preprocess import ImageLoader, first_member, member_keys
from ..data.synthetic import COLOURS, POSITIONS, SHAPES
from ..export import save_image_processor
from ..flops import TowerCost
from .base import ImageEncoder, Task, TaskOutput, register_task
from .common import load_tower, make_stream, tower_features

SHAPE_CLASSES = ("empty", *SHAPES)
COLOUR_CLASSES = ("empty", *COLOURS)


@dataclass
class CellsDataConfig(DataConfig):
    """Synthetic shapes shards: KEY.jpg (or png, webp) + KEY.json with the shapes' attributes."""

    image_keys: str = "jpg;png;webp"  # members that may hold the image: the first one present


def cell_labels(attributes) -> tuple[list[int], list[int]]:
    """A scene's (shape, colour) class of each cell in POSITIONS order, 0 = empty; BadSample
    when it is not synthetic shapes metadata."""
    shapes = attributes.get("shapes") if isinstance(attributes, dict) else None
    if not isinstance(shapes, list):
        raise BadSample("no_shapes_metadata")
    kinds, colours = [0] * len(POSITIONS), [0] * len(POSITIONS)
    for shape in shapes:
        try:
            cell = POSITIONS.index(shape["position"])
            kinds[cell] = SHAPE_CLASSES.index(shape["shape"])
            colours[cell] = COLOUR_CLASSES.index(shape["colour"])
        except (TypeError, KeyError, ValueError):
            raise BadSample("bad_shapes_metadata") from None
    return kinds, colours


class CellSampleDecoder:
    """A shapes sample -> pixel_values [3, S, S], shape_labels [9], colour_labels [9]."""

    def __init__(self, load_image: ImageLoader, image_keys: tuple[str, ...]):
        self.load_image = load_image
        self.image_keys = image_keys

    def __call__(self, sample: dict) -> dict:
        data = first_member(sample, self.image_keys)
        if data is None:
            raise BadSample("missing_image")
        try:
            attributes = json.loads(sample["json"])
        except KeyError:
            raise BadSample("no_shapes_metadata") from None
        except ValueError:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise BadSample("bad_shapes_metadata") from None
        kinds, colours = cell_labels(attributes)
        return {
            "pixel_values": self.load_image(data),
            "shape_labels": torch.tensor(kinds),
            "colour_labels": torch.tensor(colours),
        }


@register_task
class CellsTask(Task, ImageEncoder):
    kind = "cells"
    Config = TaskConfig  # nothing to set beyond trainable / freeze
    DataConfig = CellsDataConfig

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        keys = member_keys(cfg.data.image_keys)
        if not keys:
            raise ConfigError("data.image_keys: names no member extension (e.g. jpg;png)")
        self.vision = load_tower(cfg.model.vision, cfg.model.vision_config, cfg.model.image_size)
        v = self.vision
        classes = len(SHAPE_CLASSES) + len(COLOUR_CLASSES)
        self.head = nn.Linear(v.num_tokens * v.hidden_size, len(POSITIONS) * classes)
        # Resized without cropping, as the VLM kinds read images: the labels are per cell.
        loader = ImageLoader(v.image_size, v.image_mean, v.image_std, cfg.data.max_pixels,
                             crop=False)  # fmt: skip
        self.sample_decoder = CellSampleDecoder(loader, keys)

    def blocks(self) -> dict[str, nn.ModuleList]:
        return {"vision": self.vision.blocks}

    def tokens_per_sample(self) -> dict[str, int]:
        return {"vision": self.vision.num_tokens}

    def cell_logits(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(shape logits [n, 9, 5], colour logits [n, 9, 9])."""
        out = self.head(self.vision(pixel_values).flatten(1))
        out = out.view(len(pixel_values), len(POSITIONS), -1)
        return out[..., : len(SHAPE_CLASSES)], out[..., len(SHAPE_CLASSES) :]

    def forward(self, batch: dict) -> TaskOutput:
        shapes, colours = batch["shape_labels"], batch["colour_labels"]
        shape_logits, colour_logits = self.cell_logits(batch["pixel_values"])
        per_image = (
            F.cross_entropy(shape_logits.float().transpose(1, 2), shapes, reduction="none")
            + F.cross_entropy(colour_logits.float().transpose(1, 2), colours, reduction="none")
        ).mean(dim=1)
        occupied = shapes > 0
        n = occupied.sum().clamp(min=1)
        metrics = {
            "shape_acc": ((shape_logits.argmax(-1) == shapes) & occupied).sum() / n,
            "colour_acc": ((colour_logits.argmax(-1) == colours) & occupied).sum() / n,
        }
        return TaskOutput(loss=per_image.sum(), samples=len(shapes),
                          tokens=len(shapes) * self.vision.num_tokens, metrics=metrics)  # fmt: skip

    def loss_weight(self, batch: dict) -> float:
        return float(len(batch["pixel_values"]))  # forward sums per-image losses

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return tower_features(self.vision, pixel_values)

    def preprocess_image(self, data: bytes) -> torch.Tensor:
        return self.sample_decoder.load_image(data)

    def tower_costs(self) -> dict[str, TowerCost]:
        vision = TowerCost.of(self.vision, len(self.vision.blocks), self.vision.hidden_size)
        return {"vision": vision,
                "head": TowerCost.of(self.head, 0, 0, grad_upstream=vision.grad_flows)}  # fmt: skip

    def flops(self, batch: dict) -> float:
        n, p = len(batch["pixel_values"]), self.vision.num_tokens
        # the head reads one flattened row per image
        return self.costs["vision"].flops(n * p, n * p * p) + self.costs["head"].flops(n, 0)

    def streams(self, dist, train: bool, batch_size: int = 0):
        urls = self.cfg.data.train if train else self.cfg.data.val
        return make_stream(self.cfg, dist, urls, self.sample_decoder, train=train,
                           batch_size=batch_size)  # fmt: skip

    def train_stream(self, dist):
        return self.streams(dist, train=True)

    def val_stream(self, dist, batch_size: int, subsets: list[str] | None = None):
        return self.streams(dist, train=False, batch_size=batch_size)

    def export_hf(self, out, state: dict) -> None:
        """vision/: the image tower in HF layout (SiglipVisionModel for a SigLIP tower) and the
        image processor of its training preprocessing; a VLM recipe uses it as `model.vision`.
        The cell head stays in the full state dict only (nothing outside vlscale reads it)."""
        models.save_pretrained(self.vision, out / "vision")
        save_image_processor(self.vision, out / "vision", crop=False)

    def model_card(self) -> dict:
        return {
            "tags": ["vision-encoder", "image-classification"],
            "notes": "- vision/ is an image tower trained with a linear head to name each cell "
            "of the synthetic shapes' 3x3 grid (its shape and colour); a VLM recipe uses it as "
            "`model.vision`.",
        }
