"""`zeroshot_classification`: clip_benchmark's zero-shot classification (its
metrics/zeroshot_classification.py) on a dataset in its WebDataset layout, e.g. ImageNet-1k:

    - zeroshot_classification: {root: clip-benchmark/wds_imagenet1k}

Each class's embedding is the re-normalised mean of its prompts' normalised embeddings (every
template with `{c}` replaced by the class name); logits are 100 * image . class. Reports
`<tag>/acc1`, `<tag>/acc5` (for each k in `ks` up to the number of classes) and
`<tag>/mean_per_class_recall`, clip_benchmark's names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import ConfigError
from ..data.wds_benchmark import BenchmarkData
from ..metrics import classification_metrics
from ..tasks.base import ImageTextEmbedder
from .base import Evaluator
from .benchmark import BenchmarkOptions, check_ks, encode_in_shares, image_encoder, text_encoder


@dataclass
class ClassificationOptions(BenchmarkOptions):
    ks: list[int] = field(default_factory=lambda: [1, 5])
    # Overrides of the dataset's classnames.txt / zeroshot_classification_templates.txt: the
    # lines themselves, or a text file of them (one a line).
    classnames: list[str] | str = field(default_factory=list)
    templates: list[str] | str = field(default_factory=list)

    def __post_init__(self):
        super().__post_init__()
        check_ks(self.ks)


def _override(value: list[str] | str) -> list[str] | None:
    if isinstance(value, list):
        return value or None
    path = Path(value).expanduser()
    if not path.is_file():
        raise ConfigError(f"{value}: no such file (classnames/templates: a list or a text file)")
    return [line.strip() for line in path.read_text().splitlines()]


def class_embeddings(prompt_features, n_classes: int):
    """[classes * templates, d] prompt embeddings (class-major) -> [classes, d] classifier, as
    clip_benchmark's zero_shot_classifier computes it."""
    per_class = F.normalize(prompt_features, dim=-1).view(n_classes, -1, prompt_features.shape[-1])
    return F.normalize(per_class.mean(dim=1), dim=-1)


class ZeroshotClassificationEvaluator(Evaluator):
    name = "zeroshot_classification"
    Options = ClassificationOptions
    requires = (ImageTextEmbedder,)

    def __call__(self, task, ctx) -> dict[str, float]:
        o = self.options
        with BenchmarkData(o.root, o.split, o.max_samples) as data:
            if data.kind != "classification":
                raise ConfigError(
                    f"{o.root} is a {data.kind} dataset"
                    + (": use the zeroshot_retrieval evaluator" if data.kind == "retrieval" else
                       " (mean average precision is not implemented)")
                )  # fmt: skip
            classnames = _override(o.classnames) or data.classnames()
            templates = _override(o.templates) or data.templates()
            for what, found in (("classnames", classnames), ("templates", templates)):
                if not found:
                    raise ConfigError(f"{o.root} has no {what} file: set the `{what}` option")
            try:
                prompts = [t.format(c=c) for c in classnames for t in templates]
            except (KeyError, IndexError, ValueError) as err:
                raise ConfigError(f"templates: use {{c}} for the class name ({err!r})") from None
            texts = encode_in_shares(prompts, text_encoder(task, ctx), ctx)
            images = encode_in_shares(list(range(len(data))), image_encoder(task, data, ctx), ctx)
        if images is None:  # not rank 0
            return {}
        (image, labels), (prompt_features, _) = images, texts
        if max(labels) >= len(classnames):
            raise ValueError(f"{o.root}: label {max(labels)} but {len(classnames)} class names")
        logits = (
            100.0
            * F.normalize(image, dim=-1)
            @ class_embeddings(prompt_features, len(classnames)).T
        )
        metrics = classification_metrics(logits, torch.tensor(labels), ks=o.ks)
        return {f"{o.tag}/{k}": v for k, v in metrics.items()} | {
            f"{o.tag}/num_samples": len(labels)
        }
