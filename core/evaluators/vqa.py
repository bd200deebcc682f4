"""`vqa`: generate the answer to every validation question and score it with the declared
`metric` (core.metrics.ANSWER_METRICS), overall and per subset:

    exact    vqa_acc, vqa_acc/<subset>          exact match after normalising case and punctuation
    vqav2    vqav2_acc, vqav2_acc/<subset>      VQAv2 soft accuracy over the human answers
    anls     anls, anls/<subset>                DocVQA / ST-VQA / InfographicVQA
    relaxed  relaxed_acc, relaxed_acc/<subset>  ChartQA: numbers within 5%, else exact

A question's accepted answers are the sample's `answers` where the task gives them (a
FineVision-format sample whose json has an "answers" list), else its one `answer`.

`data` asks the questions of other shards than data.val (in the layout of the kind's SFT data):
stage 2's VQA questions after stage 3 or 4, whose own data are chains of thought or preference
pairs. A model that reasons first (`answer_format` think or llava_cot; default the task's
data.cot_format) is scored on the answer extracted from its output (core/data/cot.py,
parse_output), on the whole output when it is not in the format (which then rarely matches);
`answer_extracted` is the share of outputs in the format."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .. import distributed
from ..data.cot import parse_output
from ..metrics import vqa_accuracy
from ..tasks.base import Generative
from .base import EvalContext, Evaluator, Options


@dataclass
class VQAOptions(Options):
    subsets: list[str] = field(default_factory=list)  # default: the training mixture's
    max_new_tokens: int = 16
    metric: Literal["exact", "vqav2", "anls", "relaxed"] = "exact"
    data: str = ""  # shards to ask instead of data.val ({subset} patterns take `subsets`)
    answer_format: Literal["", "think", "llava_cot", "plain"] = ""  # "": data.cot_format's


def answer_records(task, ctx: EvalContext, subsets, max_new_tokens: int, limit: int = 0,
                   all_answers: bool = False, data: str = ""):  # fmt: skip
    """(key, subset, prediction, reference) of this rank's share of the questions (the first
    `limit` when set; of the shards `data` when set, else data.val). The reference is the
    sample's `answer`; with `all_answers`, the list of its `answers` where the batch has them
    (else [answer])."""
    batch_size = min(ctx.batch_size, limit) if limit else ctx.batch_size
    records = []
    steps = ctx.steps(task.prompt_stream(ctx.dist, batch_size, subsets, data))
    for batch, real in steps:
        predictions = task.generate(batch, max_new_tokens)
        if not real:
            continue
        references = batch["answer"]
        if all_answers:
            references = batch.get("answers") or [[answer] for answer in references]
        rows = zip(batch["key"], batch["source"], predictions, references, strict=True)
        records += list(rows)
        if limit and len(records) >= limit:
            steps.stop()  # the other ranks may still be generating: keep pace with them
    return records[:limit] if limit else records


class VQAEvaluator(Evaluator):
    name = "vqa"
    Options = VQAOptions
    requires = (Generative,)

    def __call__(self, task, ctx: EvalContext) -> dict[str, float]:
        o = self.options
        local = answer_records(task, ctx, o.subsets, o.max_new_tokens, all_answers=True,
                               data=o.data)  # fmt: skip
        gathered = distributed.all_gather_object(local)
        if not ctx.dist.is_main:
            return {}
        by_key = {record[0]: record for records in gathered for record in records}
        records = [by_key[k] for k in sorted(by_key)]
        fmt = o.answer_format or task.answer_format() or "plain"
        if fmt == "plain":
            return vqa_accuracy(records, o.metric)
        answers = [parse_output(fmt, output) for _, _, output, _ in records]
        extracted = [(key, source, output if answer is None else answer, refs)
                     for (key, source, output, refs), answer in zip(records, answers)]  # fmt: skip
        metrics = vqa_accuracy(extracted, o.metric)
        metrics["answer_extracted"] = sum(a is not None for a in answers) / max(len(answers), 1)
        return metrics
