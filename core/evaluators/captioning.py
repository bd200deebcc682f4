"""`captioning`: greedy captions of the validation images (`Captioner.caption`), scored against
each sample's reference caption:

    caption_exact         the generated caption equals the reference, whitespace collapsed
    caption_bleu4         corpus BLEU-4 (pycocoevalcap's Bleu: closest reference length)
    caption_cider         CIDEr as COCO reports it (pycocoevalcap's Cider, i.e. CIDEr-D: clipped
                          n-gram counts, a Gaussian length penalty, x 10; idf over the split)

and, where the samples carry synthetic shapes metadata (`attributes`), the caption parsed back
into shapes (core.data.synthetic.parse_caption; a caption that does not parse is wrong in every
attribute):

    caption_shapes_acc    every shape (size, colour, shape, position, in order) and the
                          background right
    caption_colour_acc, caption_shape_acc, caption_position_acc
                          the one shape's attribute right, over one-shape images

BLEU and CIDEr see captions tokenised here, not by COCO's PTBTokenizer (Stanford CoreNLP, Java):
lower-cased, split into words and punctuation marks, and the marks PTBTokenizer's wrapper drops
(. , ; : ! ? ' " ` - and brackets) dropped. Captions without contractions or hyphens tokenise
as PTBTokenizer does ("don't" gives "don t" here, "do n't" there).

`samples` > 0 captions at most that many: each rank its first ceil(samples / ranks), then the
first `samples` keys of those (which ones depends on the number of ranks). The first captions
by key are logged as the `captions` table.
"""

from __future__ import annotations

import importlib.util
import logging
import re
from dataclasses import dataclass

from .. import distributed
from ..config import ConfigError
from ..data.synthetic import parse_caption
from ..tasks.base import Captioner
from .base import EvalContext, Evaluator, Options

log = logging.getLogger(__name__)

TABLE_ROWS = 8  # captions logged as the `captions` table
_TOKENS = re.compile(r"\w+|[^\w\s]")
# What pycocoevalcap's PTBTokenizer wrapper removes after tokenising: . , ; : ! ? -- ... and
# quotes (`` '' ` '), and -LRB- -RRB- -LCB- -RCB- (the brackets ( ) { }).
_DROPPED = frozenset(".,;:!?-'\"`(){}")
PER_ATTRIBUTE = ("colour", "shape", "position")


@dataclass
class CaptioningOptions(Options):
    max_new_tokens: int = 32
    samples: int = 0  # 0: the whole validation split

    def __post_init__(self):  # checked when the recipe loads
        if self.max_new_tokens < 1:
            raise ConfigError(f"captioning.max_new_tokens={self.max_new_tokens}: at least 1")
        if self.samples < 0:
            raise ConfigError(f"captioning.samples={self.samples}: 0 (all) or a positive number")
        if importlib.util.find_spec("pycocoevalcap") is None:
            raise ConfigError("captioning: BLEU and CIDEr need pycocoevalcap (the `eval` extra: "
                              "pip install -e '.[eval]')")  # fmt: skip


def caption_tokens(text: str) -> str:
    """The caption as BLEU and CIDEr see it: lower-cased tokens joined by spaces (module
    docstring)."""
    return " ".join(t for t in _TOKENS.findall(text.lower()) if t not in _DROPPED)


def bleu_cider(predictions: list[str], references: list[str]) -> tuple[float, float]:
    """(corpus BLEU-4, CIDEr-D) of predictions against one reference each, by pycocoevalcap."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    res = {i: [caption_tokens(p)] for i, p in enumerate(predictions)}
    gts = {i: [caption_tokens(r)] for i, r in enumerate(references)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    return float(bleu[3]), float(cider)


def _truth(attributes: dict) -> dict:
    """What a caption says of a scene: parse_caption's form of its attributes."""
    fields = ("size", "colour", "shape", "position")
    return {
        "shapes": [{k: s[k] for k in fields} for s in attributes["shapes"]],
        "background": attributes["background"],
        "count": len(attributes["shapes"]),
    }


def attribute_accuracy(predictions: list[str], attributes: list) -> dict[str, float]:
    """caption_shapes_acc over the samples with shapes attributes, caption_<attribute>_acc over
    their one-shape images; {} when no sample has them."""
    scenes = [(p, a) for p, a in zip(predictions, attributes, strict=True)
              if isinstance(a, dict) and "shapes" in a]  # fmt: skip
    if not scenes:
        return {}
    whole, per = [], {name: [] for name in PER_ATTRIBUTE}
    for prediction, scene in scenes:
        parsed, truth = parse_caption(prediction), _truth(scene)
        whole.append(parsed == truth)
        if truth["count"] != 1:
            continue
        one = parsed["shapes"][0] if parsed is not None and parsed["count"] == 1 else {}
        for name in PER_ATTRIBUTE:
            per[name].append(one.get(name) == truth["shapes"][0][name])
    out = {"caption_shapes_acc": sum(whole) / len(whole)}
    for name, hits in per.items():
        if hits:
            out[f"caption_{name}_acc"] = sum(hits) / len(hits)
    return out


def caption_metrics(predictions: list[str], references: list[str], attributes: list) -> dict:
    """Every metric of the module docstring, of samples in matching order."""
    exact = [" ".join(p.split()) == " ".join(r.split()) for p, r in zip(predictions, references,
                                                                        strict=True)]  # fmt: skip
    bleu4, cider = bleu_cider(predictions, references)
    out = {"caption_exact": sum(exact) / len(exact), "caption_bleu4": bleu4,
           "caption_cider": cider}  # fmt: skip
    return out | attribute_accuracy(predictions, attributes)


class CaptioningEvaluator(Evaluator):
    name = "captioning"
    Options = CaptioningOptions
    requires = (Captioner,)

    def __call__(self, task, ctx: EvalContext) -> dict[str, float]:
        o = self.options
        limit = -(-o.samples // ctx.dist.world_size) if o.samples else 0
        batch_size = min(ctx.batch_size, limit) if limit else ctx.batch_size
        records = []  # (key, generated, reference, attributes)
        steps = ctx.steps(task.val_stream(ctx.dist, batch_size))
        for batch, real in steps:
            generated = task.caption(batch["pixel_values"], o.max_new_tokens)
            if not real:
                continue
            keys = batch["key"]
            attributes = batch.get("attributes") or [None] * len(keys)
            records += zip(keys, generated, batch["caption"], attributes, strict=True)
            if limit and len(records) >= limit:
                records = records[:limit]
                steps.stop()
        gathered = distributed.all_gather_object(records)
        if not ctx.dist.is_main:
            return {}
        # a sample two ranks read (uneven shards) counts once
        by_key = {record[0]: record for rank_records in gathered for record in rank_records}
        records = [by_key[key] for key in sorted(by_key)[: o.samples or None]]
        if not records:
            log.warning("captioning: the validation split is empty; skipped")
            return {}
        keys, generated, references, attributes = map(list, zip(*records))
        ctx.tables["captions"] = [
            {"key": k, "caption": g, "reference": r}
            for k, g, r in zip(keys[:TABLE_ROWS], generated, references)
        ]
        return caption_metrics(generated, references, attributes)
