"""`retrieval`: image->text and text->image recall@k over the whole validation split (never
in-batch): every image ranked against every caption of the split and vice versa."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..metrics import retrieval_metrics
from .base import EmbeddingEvaluator, Options


@dataclass
class RetrievalOptions(Options):
    ks: list[int] = field(default_factory=lambda: [1, 5, 10])


class RetrievalEvaluator(EmbeddingEvaluator):
    name = "retrieval"
    Options = RetrievalOptions

    def score(self, task, ctx, image, text, attributes) -> dict[str, float]:
        return retrieval_metrics(image, text, ks=tuple(self.options.ks))
