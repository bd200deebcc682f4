"""The evaluator contract. An evaluator is declared in the recipe (`eval.evaluators`), built
once per run, and called with the task (eval mode, no grad; sharded under fsdp and zero3, see
below) at every evaluation it is due. It uses only the task contract (core/tasks/base.py):
`val_stream`, and the capability mixins it `requires`.

Every rank calls every due evaluator (each rank computes on its share of the split: a collective
inside an evaluator is matched on every rank); the metrics rank 0 returns are logged as `eval/<k>`
and written to eval.json.

Under fsdp and zero3 the task stays sharded (eval.sharded): every forward is a collective, so
every model call runs on every rank, as often and in the same order. Evaluators iterate their
share through `ctx.steps(...)`, which pads the ranks whose share ran out with a repeated batch
whose results they drop (`real` False), and call the model on rank 0 alone nowhere.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from .. import distributed
from ..config import Config
from ..distributed import DistInfo
from ..tasks.base import ImageTextEmbedder

log = logging.getLogger(__name__)


@dataclass
class Options:
    """Options every evaluator has; each extends this with its own."""

    every: int = 0  # steps between runs; 0 = eval.every


@dataclass
class EvalContext:
    cfg: Config
    dist: DistInfo
    step: int
    run_dir: Path
    tables: dict[str, list[dict]] = field(default_factory=dict)  # name -> rows, logged as tables
    cache: dict[str, Any] = field(default_factory=dict)  # shared by the evaluators of one round

    @property
    def batch_size(self) -> int:
        return self.cfg.eval.batch_size

    def batches(self, stream) -> Iterator[dict]:
        """The stream's batches on the device, each once: for evaluators that do not run in
        lockstep (with sharded evaluation, use `steps`, whose padding steps keep ranks in pace)."""
        if distributed.in_lockstep():
            raise RuntimeError(
                "ctx.batches: this evaluation runs sharded (fsdp or zero3, eval.sharded), where "
                "every rank must run as many forwards as the others; iterate ctx.steps(stream) "
                "(core/evaluators/base.py), or set eval.sharded=false"
            )
        for batch in stream:
            yield distributed.to_device(batch, self.dist.device)

    def steps(self, items, on_device: bool = True) -> distributed.Lockstep:
        """(item, real) for this rank's share `items` (a stream's batches, moved to the device,
        or chunks of a list with on_device=False): in lockstep (sharded evaluation), as many
        pairs on every rank, the padding ones not real (their results are to be dropped);
        otherwise every item once, real. `stop()` on the result ends this rank's share early."""
        prepare = (lambda batch: distributed.to_device(batch, self.dist.device)) if on_device \
            else None  # fmt: skip
        return distributed.Lockstep(items, prepare)


class Evaluator(ABC):
    name: ClassVar[str]
    Options: ClassVar[type[Options]] = Options
    requires: ClassVar[tuple[type, ...]] = ()  # capability mixins the task must have

    def __init__(self, options: Options):
        self.options = options

    @abstractmethod
    def __call__(self, task, ctx: EvalContext) -> dict[str, float]:
        """Metrics (rank 0's are the ones logged; other ranks may return {})."""


class EmbeddingEvaluator(Evaluator):
    """An evaluator of the validation split's image and text embeddings (computed once per
    round for all of them, see `embed_val_split`); rank 0 scores them."""

    requires = (ImageTextEmbedder,)

    def __call__(self, task, ctx: EvalContext) -> dict[str, float]:
        split = embed_val_split(task, ctx)
        return {} if split is None else self.score(task, ctx, *split)

    @abstractmethod
    def score(self, task, ctx: EvalContext, image, text, attributes: list) -> dict[str, float]:
        """Metrics of image [n, d] and text [n, d] features (pairs by row) and their metadata."""


def embed_val_split(task, ctx: EvalContext):
    """(image features, text features, attributes) of the whole validation split on rank 0, in
    key order, each sample once (None on other ranks). Every rank embeds its share; computed
    once per evaluation round for the evaluators that share it (retrieval, zeroshot)."""
    if "embeddings" in ctx.cache:
        return ctx.cache["embeddings"]
    keys, images, texts, attrs = [], [], [], []
    for batch, real in ctx.steps(task.val_stream(ctx.dist, ctx.batch_size)):
        image = task.encode_image(batch["pixel_values"]).float().cpu()
        text = task.encode_text(batch["input_ids"], batch["attention_mask"]).float().cpu()
        if not real:
            continue
        images.append(image)
        texts.append(text)
        keys += batch["key"]
        attrs += batch.get("attributes", [None] * len(batch["key"]))
    local = (keys, torch.cat(images) if images else None, torch.cat(texts) if texts else None,
             attrs)  # fmt: skip
    gathered = distributed.all_gather_object(local)
    result = None
    if ctx.dist.is_main:
        by_key: dict[str, tuple] = {}  # a sample read by two ranks (uneven shards) counts once
        for k_list, img, txt, att in gathered:
            for i, key in enumerate(k_list):
                by_key[key] = (img[i], txt[i], att[i])
        order = sorted(by_key)
        if order:
            result = (
                torch.stack([by_key[k][0] for k in order]),
                torch.stack([by_key[k][1] for k in order]),
                [by_key[k][2] for k in order],
            )
    ctx.cache["embeddings"] = result
    return result
