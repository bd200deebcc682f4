"""`zeroshot`: CLIP-style classification of the validation images against text prompts of each
class, for the class sets the dataset defines (`classes`: a name in core.data.CLASS_PROBLEMS,
computed from each sample's JSON metadata). Reports `zeroshot_<problem>_acc` and their mean."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .. import distributed
from ..config import ConfigError
from ..data import CLASS_PROBLEMS
from ..metrics import zeroshot_accuracy
from .base import EmbeddingEvaluator, Options, embed_val_split

log = logging.getLogger(__name__)


@dataclass
class ZeroshotOptions(Options):
    classes: str = "shapes"

    def __post_init__(self):  # checked when the recipe loads
        if self.classes not in CLASS_PROBLEMS:
            raise ConfigError(
                f"zeroshot.classes={self.classes!r}; known: {', '.join(CLASS_PROBLEMS)}"
            )


class ZeroshotEvaluator(EmbeddingEvaluator):
    name = "zeroshot"
    Options = ZeroshotOptions

    def __call__(self, task, ctx) -> dict[str, float]:
        split = embed_val_split(task, ctx)
        # The class prompts come from rank 0's metadata; every rank encodes them (a sharded
        # model's forward is a collective), rank 0 scores.
        problems = None
        if split is not None:
            attributes = split[2]
            if any(not isinstance(a, dict) for a in attributes):
                log.warning("zeroshot: validation samples carry no %s metadata; skipped",
                            self.options.classes)  # fmt: skip
                problems = []
            else:
                problems = CLASS_PROBLEMS[self.options.classes](attributes)
        problems = distributed.broadcast_object(problems)
        if not problems:
            return {}
        device = ctx.dist.device
        classes = []
        for _, prompts, _ in problems:
            ids, mask = task.tokenize(prompts)
            classes.append(task.encode_text(ids.to(device), mask.to(device)).float().cpu())
        return {} if split is None else self.score(task, ctx, *split, classes=classes,
                                                   problems=problems)  # fmt: skip

    def score(self, task, ctx, image, text, attributes, classes=None, problems=None):
        out, accs = {}, []
        for (name, _, labels), class_features in zip(problems, classes, strict=True):
            acc = zeroshot_accuracy(image, class_features, torch.tensor(labels))
            if acc is not None:
                out[f"zeroshot_{name}_acc"] = acc
                accs.append(acc)
        if accs:
            out["zeroshot_acc"] = sum(accs) / len(accs)
        return out
