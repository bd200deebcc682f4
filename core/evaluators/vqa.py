"""`vqa`: generate the answer to every validation question and score it by exact match after
normalisation (core.metrics.vqa_accuracy), overall and per subset (`vqa_acc/<subset>`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .. import distributed
from ..metrics import vqa_accuracy
from ..tasks.base import Generative
from .base import EvalContext, Evaluator, Options


@dataclass
class VQAOptions(Options):
    subsets: list[str] = field(default_factory=list)  # default: the training mixture's
    max_new_tokens: int = 16


def answer_records(task, ctx: EvalContext, subsets, max_new_tokens: int, limit: int = 0):
    """(key, subset, prediction, reference) of this rank's share of the questions (the first
    `limit` when set)."""
    batch_size = min(ctx.batch_size, limit) if limit else ctx.batch_size
    records = []
    for batch in ctx.batches(task.prompt_stream(ctx.dist, batch_size, subsets)):
        predictions = task.generate(batch, max_new_tokens)
        rows = zip(batch["key"], batch["source"], predictions, batch["answer"], strict=True)
        records += list(rows)
        if limit and len(records) >= limit:
            return records[:limit]
    return records


class VQAEvaluator(Evaluator):
    name = "vqa"
    Options = VQAOptions
    requires = (Generative,)

    def __call__(self, task, ctx: EvalContext) -> dict[str, float]:
        o = self.options
        local = answer_records(task, ctx, o.subsets, o.max_new_tokens)
        gathered = distributed.all_gather_object(local)
        if not ctx.dist.is_main:
            return {}
        by_key = {record[0]: record for records in gathered for record in records}
        return vqa_accuracy(by_key[k] for k in sorted(by_key))
