"""`zeroshot`: CLIP-style classification of the validation images against text prompts of each
class, for the class sets the dataset defines (`classes`: a name in core.data.CLASS_PROBLEMS,
computed from each sample's JSON metadata). Reports `zeroshot_<problem>_acc` and their mean."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..config import ConfigError
from ..data import CLASS_PROBLEMS
from ..metrics import zeroshot_accuracy
from .base import EmbeddingEvaluator, Options

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

    def score(self, task, ctx, image, text, attributes) -> dict[str, float]:
        if any(not isinstance(a, dict) for a in attributes):
            log.warning("zeroshot: validation samples carry no %s metadata; skipped",
                        self.options.classes)  # fmt: skip
            return {}
        out, accs = {}, []
        for name, prompts, labels in CLASS_PROBLEMS[self.options.classes](attributes):
            ids, mask = task.tokenize(prompts)
            device = ctx.dist.device
            classes = task.encode_text(ids.to(device), mask.to(device)).float().cpu()
            acc = zeroshot_accuracy(image, classes, torch.tensor(labels))
            if acc is not None:
                out[f"zeroshot_{name}_acc"] = acc
                accs.append(acc)
        if accs:
            out["zeroshot_acc"] = sum(accs) / len(accs)
        return out
