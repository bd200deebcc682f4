"""`cot`: generate a chain of thought and an answer for every validation question of a
chain-of-thought task (the VLM with `data.cot_format`) and score the outputs:

    cot_format_ok              outputs in the format: its tags closed, in order, each once, every
                               section non-empty, nothing outside them (core/data/cot.py,
                               parse_output), so that the answer can be extracted
    cot_acc, cot_acc/<source>  the extracted answer equals the reference after the vqa
                               evaluator's exact-match normalisation (core/metrics.py); an output
                               whose answer cannot be extracted scores 0

`max_new_tokens` must leave room for the reasoning (default 512): an output cut off before its
answer is not in the format. The first `samples` outputs go to cot_generations.txt and a table.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from .. import distributed
from ..config import ConfigError
from ..data.cot import parse_output
from ..metrics import exact_score
from ..tasks.base import Generative
from .base import EvalContext, Evaluator, Options
from .vqa import answer_records


@dataclass
class CoTOptions(Options):
    subsets: list[str] = field(default_factory=list)  # default: the training mixture's
    max_new_tokens: int = 512  # the reasoning's tokens too
    format: Literal["", "think", "llava_cot"] = ""  # "": the task's data.cot_format
    samples: int = 4  # outputs written to cot_generations.txt per run


def cot_scores(records: Iterable[tuple[str, str, str, str]], fmt: str) -> dict[str, float]:
    """cot_format_ok, cot_acc (overall and per source) and num_questions of (key, source,
    output, reference answer) records with unique keys."""
    ok, hits, by_source, seen = [], [], {}, set()
    for key, source, output, reference in records:
        if key in seen:
            raise ValueError(f"duplicate key {key!r}: de-duplicate records before scoring")
        seen.add(key)
        answer = parse_output(fmt, output)
        ok.append(answer is not None)
        hit = 0.0 if answer is None else exact_score(answer, [reference])
        hits.append(hit)
        by_source.setdefault(source, []).append(hit)
    n = len(hits)
    out = {
        "cot_format_ok": sum(ok) / n if n else 0.0,
        "cot_acc": sum(hits) / n if n else 0.0,
        "num_questions": n,
    }
    for source, scores in sorted(by_source.items()):
        out[f"cot_acc/{source}"] = sum(scores) / len(scores)
    return out


class CoTEvaluator(Evaluator):
    name = "cot"
    Options = CoTOptions
    requires = (Generative,)

    def __call__(self, task, ctx: EvalContext) -> dict[str, float]:
        o = self.options
        fmt = o.format or task.answer_format()
        if not fmt:
            raise ConfigError(
                "eval.evaluators.cot: the task renders no chain of thought; set data.cot_format "
                "(think | llava_cot) and point data.val at CoT shards"
            )
        local = answer_records(task, ctx, o.subsets, o.max_new_tokens)
        gathered = distributed.all_gather_object(local)
        if not ctx.dist.is_main:
            return {}
        by_key = {record[0]: record for records in gathered for record in records}
        records = [by_key[k] for k in sorted(by_key)]
        if o.samples and records:
            self._write_samples(ctx, records[: o.samples], fmt)
        return cot_scores(records, fmt)

    @staticmethod
    def _write_samples(ctx: EvalContext, records: list, fmt: str) -> None:
        rows = []
        for key, source, output, reference in records:
            answer = parse_output(fmt, output)
            rows.append({"key": key, "source": source, "output": output,
                         "answer": answer, "reference": reference})  # fmt: skip
        with open(ctx.run_dir / "cot_generations.txt", "a") as f:
            for row in rows:
                f.write(f"step {ctx.step}\t{row['key']}\t{row['output']!r}\t(answer "
                        f"{row['answer']!r}, reference {row['reference']!r})\n")  # fmt: skip
        ctx.tables["cot_generations"] = rows
