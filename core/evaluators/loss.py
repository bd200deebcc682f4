"""`loss`: the training objective over the whole validation split (teacher-forced for LMs),
weighted exactly as in training: sum of losses / sum of `loss_weight` over every rank's batches."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import distributed
from .base import EvalContext, Evaluator, Options


@dataclass
class LossOptions(Options):
    subsets: list[str] = field(default_factory=list)  # {subset} data: default the mixture's


class LossEvaluator(Evaluator):
    name = "loss"
    Options = LossOptions

    def __call__(self, task, ctx: EvalContext) -> dict[str, float]:
        total = torch.zeros(2, dtype=torch.float64)
        stream = task.val_stream(ctx.dist, ctx.batch_size, self.options.subsets or None)
        for batch, real in ctx.steps(stream):
            loss = float(task(batch).loss)
            if real:
                total += torch.tensor([loss, float(task.loss_weight(batch))], dtype=torch.float64)
        loss_sum, weight = distributed.all_reduce_sum(list(total.to(ctx.dist.device)))
        return {"loss": loss_sum / weight} if weight > 0 else {}
