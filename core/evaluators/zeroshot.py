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
from ..tasks.base import ImageTextEmbedder
from .base import EvalContext, Evaluator, Options, embed_val_split

log = logging.getLogger(__name__)


@dataclass
class ZeroshotOptions(Options):
    classes: str = "shapes"


class ZeroshotEvaluator(Evaluator):
    name = "zeroshot"
    Options = ZeroshotOptions
    requires = (ImageTextEmbedder,)

    def __init__(self, options: ZeroshotOptions):
        super().__init__(options)
        if options.classes not in CLASS_PROBLEMS:
            raise ConfigError(
                f"zeroshot.classes={options.classes!r}; known: {', '.join(CLASS_PROBLEMS)}"
            )

    def __call__(self, task, ctx: EvalContext) -> dict[str, float]:
        split = embed_val_split(task, ctx)
        if split is None:
            return {}
        image, _, attributes = split
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
