"""What the clip_benchmark-layout evaluators share (`zeroshot_classification`,
`zeroshot_retrieval`): a dataset's options and encoding a list of items over the ranks.

The dataset is read from ROOT (a local directory or a Hub dataset id) in clip_benchmark's
WebDataset layout (core/data/wds_benchmark.py), outside the recipe's data; the images are
preprocessed exactly as the task's validation images (`ImageTextEmbedder.preprocess_image`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath

import torch

from .. import distributed
from ..config import ConfigError
from .base import EvalContext, Options


@dataclass
class BenchmarkOptions(Options):
    root: str = ""  # a dataset directory or Hub dataset id, e.g. clip-benchmark/wds_imagenet1k
    split: str = "test"
    tag: str = ""  # metric names' prefix; default: root's last part without "wds_"
    max_samples: int = 0  # the first N samples of the split; 0: all

    def __post_init__(self):  # checked when the recipe loads
        if not self.root:
            raise ConfigError(
                "root: set the dataset (a directory in clip_benchmark's WebDataset layout or a "
                "Hub dataset id such as clip-benchmark/wds_imagenet1k)"
            )
        if self.max_samples < 0:
            raise ConfigError(f"max_samples={self.max_samples}: 0 (all) or a positive number")
        if not self.tag:
            self.tag = PurePosixPath(self.root.rstrip("/")).name.removeprefix("wds_")


def check_ks(ks: list[int]) -> None:
    if not ks or any(k < 1 for k in ks):
        raise ConfigError(f"ks={ks}: a list of positive k, e.g. [1, 5, 10]")


def encode_in_shares(items: list, encode, ctx: EvalContext) -> tuple[torch.Tensor, list] | None:
    """`encode(some items) -> (features [n, d], a value per item)` over all `items`: each rank
    encodes its contiguous share in batches of eval.batch_size; rank 0 gets every feature (float32,
    on the CPU) and value in item order, the other ranks None."""
    share = -(-len(items) // ctx.dist.world_size)
    mine = items[ctx.dist.rank * share : (ctx.dist.rank + 1) * share]
    features, values = [], []
    chunks = (mine[start : start + ctx.batch_size] for start in range(0, len(mine), ctx.batch_size))
    for chunk, real in ctx.steps(chunks, on_device=False):
        batch_features, batch_values = encode(chunk)
        if real:
            features.append(batch_features.float().cpu())
            values += batch_values
    gathered = distributed.all_gather_object((features, values))
    if not ctx.dist.is_main:
        return None
    features = [f for rank_features, _ in gathered for f in rank_features]
    if not features:
        raise ValueError("nothing to encode: the dataset has no samples")
    return torch.cat(features), [v for _, rank_values in gathered for v in rank_values]


def image_encoder(task, data, ctx: EvalContext):
    """The `encode` of `encode_in_shares` for sample positions of `data` (a BenchmarkData):
    the images' embeddings and each sample's target (its label, or its captions)."""

    def encode(items: list[int]):
        samples = data.read(items)
        pixels = torch.stack([task.preprocess_image(image) for image, _ in samples])
        return task.encode_image(pixels.to(ctx.dist.device)), [t for _, t in samples]

    return encode


def text_encoder(task, ctx: EvalContext):
    """The `encode` of `encode_in_shares` for texts: their embeddings."""

    def encode(texts: list[str]):
        ids, mask = task.tokenize(texts)
        device = ctx.dist.device
        return task.encode_text(ids.to(device), mask.to(device)), [None] * len(texts)

    return encode
