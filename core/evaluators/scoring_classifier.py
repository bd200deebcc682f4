"""`scoring_classifier`: big_vision's scoring classifier, zero-shot classification with a
captioner. Each validation image's class is the class prompt the decoder gives the highest
log-likelihood as its caption (`Captioner.score_texts`: summed over the prompt's tokens, EOS
included), for the class sets the dataset defines (`classes`: a name in core.data.CLASS_PROBLEMS,
computed from each sample's JSON metadata, as `zeroshot`'s). Reports `scoring_<problem>_acc`
and their mean `scoring_acc`; a tie between the true class and another counts as wrong.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .. import distributed
from ..config import ConfigError
from ..data import CLASS_PROBLEMS
from ..metrics import classification_metrics
from ..tasks.base import Captioner
from .base import EvalContext, Evaluator, Options

log = logging.getLogger(__name__)


@dataclass
class ScoringOptions(Options):
    classes: str = "shapes"

    def __post_init__(self):  # checked when the recipe loads
        if self.classes not in CLASS_PROBLEMS:
            raise ConfigError(
                f"scoring_classifier.classes={self.classes!r}; known: {', '.join(CLASS_PROBLEMS)}"
            )


class ScoringClassifierEvaluator(Evaluator):
    name = "scoring_classifier"
    Options = ScoringOptions
    requires = (Captioner,)

    def __call__(self, task, ctx: EvalContext) -> dict[str, float]:
        problems_of = CLASS_PROBLEMS[self.options.classes]
        records, unlabelled = [], False  # (key, attributes, scores of every class prompt)
        steps = ctx.steps(task.val_stream(ctx.dist, ctx.batch_size))
        for batch, real in steps:
            keys = batch["key"]
            attributes = batch.get("attributes") or [None] * len(keys)
            if any(not isinstance(a, dict) for a in attributes):
                # Said by rank 0 after the gather every rank must reach. (The split is labelled
                # throughout or not at all: in lockstep every rank skips the same calls.)
                unlabelled = True
                steps.stop()
                continue
            # every problem's prompts scored in one call; the prompts do not depend on the batch
            prompts = [p for _, class_prompts, _ in problems_of(attributes) for p in class_prompts]
            scores = task.score_texts(batch["pixel_values"], prompts).float().cpu()
            if real:
                records += zip(keys, attributes, scores, strict=True)
        gathered = distributed.all_gather_object((unlabelled, records))
        if not ctx.dist.is_main:
            return {}
        if any(flag for flag, _ in gathered):
            log.warning("scoring_classifier: validation samples carry no %s metadata; skipped",
                        self.options.classes)  # fmt: skip
            return {}
        # a sample two ranks read (uneven shards) counts once
        by_key = {record[0]: record for _, rank_records in gathered for record in rank_records}
        if not by_key:
            return {}
        order = sorted(by_key)
        attributes = [by_key[k][1] for k in order]
        scores = torch.stack([by_key[k][2] for k in order])
        out, accs, column = {}, [], 0
        for name, prompts, labels in problems_of(attributes):
            block = scores[:, column : column + len(prompts)]
            column += len(prompts)
            labels = torch.tensor(labels)
            keep = labels >= 0  # only images with an unambiguous class
            if keep.any():
                acc = classification_metrics(block[keep], labels[keep], ks=(1,))["acc1"]
                out[f"scoring_{name}_acc"] = acc
                accs.append(acc)
        if accs:
            out["scoring_acc"] = sum(accs) / len(accs)
        return out
