"""`retrieval`: image->text and text->image recall@k over the whole validation split (never
in-batch): every image ranked against every caption of the split and vice versa."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..metrics import retrieval_metrics
from ..tasks.base import ImageTextEmbedder
from .base import EvalContext, Evaluator, Options, embed_val_split


@dataclass
class RetrievalOptions(Options):
    ks: list[int] = field(default_factory=lambda: [1, 5, 10])


class RetrievalEvaluator(Evaluator):
    name = "retrieval"
    Options = RetrievalOptions
    requires = (ImageTextEmbedder,)

    def __call__(self, task, ctx: EvalContext) -> dict[str, float]:
        split = embed_val_split(task, ctx)
        if split is None:
            return {}
        image, text, _ = split
        return retrieval_metrics(image, text, ks=tuple(self.options.ks))
