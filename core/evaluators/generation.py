"""`generation`: answers to the same first `samples` validation questions (rank 0's share) at
every run, appended to generations.txt and logged as a table: watching them change is the
quickest check that a VLM is learning to look and to stop."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..tasks.base import Generative
from .base import EvalContext, Evaluator, Options
from .vqa import answer_records


@dataclass
class GenerationOptions(Options):
    samples: int = 8
    max_new_tokens: int = 16
    subsets: list[str] = field(default_factory=list)


class GenerationEvaluator(Evaluator):
    name = "generation"
    Options = GenerationOptions
    requires = (Generative,)

    def __call__(self, task, ctx: EvalContext) -> dict[str, float]:
        o = self.options
        records = answer_records(task, ctx, o.subsets, o.max_new_tokens, limit=o.samples)
        if not ctx.dist.is_main or not records:
            return {}
        rows = [{"key": k, "source": s, "prediction": p, "reference": r}
                for k, s, p, r in records]  # fmt: skip
        with open(ctx.run_dir / "generations.txt", "a") as f:
            for row in rows:
                f.write(f"step {ctx.step}\t{row['key']}\t{row['prediction']!r}\t"
                        f"(reference {row['reference']!r})\n")  # fmt: skip
        ctx.tables["generations"] = rows
        return {}
