"""`preference`: how a preference-optimised model ranks held-out pairs (data.val), by the same
implicit reward its loss uses, beta x (policy log-prob - reference log-prob) of each response:

    preference_acc   share of pairs whose chosen response's reward is above the rejected one's
                     (strictly: TRL's rewards/accuracies; at policy = reference every pair ties
                     and it is 0)
    reward_margin    mean of chosen - rejected reward
    num_pairs        pairs scored (each once, whichever ranks read it)

Unlike the training log's rewards/accuracies (one micro-batch's pairs), every held-out pair
counts once."""

from __future__ import annotations

from .. import distributed
from ..tasks.base import PreferenceScorer
from .base import EvalContext, Evaluator


class PreferenceEvaluator(Evaluator):
    name = "preference"
    requires = (PreferenceScorer,)

    def __call__(self, task, ctx: EvalContext) -> dict[str, float]:
        local = []
        for batch, real in ctx.steps(task.val_stream(ctx.dist, ctx.batch_size)):
            chosen, rejected = task.pair_rewards(batch)
            if real:
                local += zip(batch["pair_keys"], chosen.tolist(), rejected.tolist(), strict=True)
        gathered = distributed.all_gather_object(local)
        if not ctx.dist.is_main:
            return {}
        by_key = {key: (c, r) for records in gathered for key, c, r in records}
        return preference_scores(by_key.values())


def preference_scores(rewards) -> dict[str, float]:
    """preference_acc, reward_margin and num_pairs of (chosen, rejected) reward pairs."""
    rewards = list(rewards)
    n = len(rewards)
    return {
        "preference_acc": sum(c > r for c, r in rewards) / n if n else 0.0,
        "reward_margin": sum(c - r for c, r in rewards) / n if n else 0.0,
        "num_pairs": n,
    }
