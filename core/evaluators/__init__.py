"""Evaluators, declared in the recipe (big_vision's `config.evals`):

    eval:
      every: 100
      evaluators:
        - retrieval                       # a name: default options
        - zeroshot: {classes: shapes}     # a name with options
        - vqa: {max_new_tokens: 6, every: 400}
        - linear_probe                    # what the image tower's features know (shapes)
        - cot: {max_new_tokens: 512}      # chain-of-thought format compliance and accuracy
        - preference                      # held-out preference pairs ranked (stage 4)

Each is one module with an `Evaluator` subclass (core/evaluators/base.py), registered here by
name. Options are checked when the recipe loads: an unknown name or option names the valid ones.
"""

from __future__ import annotations

import dataclasses

from ..config import ConfigError, build_section
from .base import EmbeddingEvaluator, EvalContext, Evaluator, Options, embed_val_split
from .captioning import CaptioningEvaluator
from .cot import CoTEvaluator
from .generation import GenerationEvaluator
from .linear_probe import LinearProbeEvaluator
from .loss import LossEvaluator
from .preference import PreferenceEvaluator
from .retrieval import RetrievalEvaluator
from .scoring_classifier import ScoringClassifierEvaluator
from .vqa import VQAEvaluator
from .zeroshot import ZeroshotEvaluator
from .zeroshot_classification import ZeroshotClassificationEvaluator
from .zeroshot_retrieval import ZeroshotRetrievalEvaluator

EVALUATORS: dict[str, type[Evaluator]] = {}


def register_evaluator(cls: type[Evaluator]) -> type[Evaluator]:
    EVALUATORS[cls.name] = cls
    return cls


for _cls in (LossEvaluator, RetrievalEvaluator, ZeroshotEvaluator, VQAEvaluator,
             GenerationEvaluator):  # fmt: skip
    register_evaluator(_cls)
for _cls in (ZeroshotClassificationEvaluator, ZeroshotRetrievalEvaluator):  # clip_benchmark's
    register_evaluator(_cls)
for _cls in (LinearProbeEvaluator, CaptioningEvaluator, ScoringClassifierEvaluator):
    register_evaluator(_cls)
register_evaluator(CoTEvaluator)  # chain-of-thought format and answers (data.cot_format)
register_evaluator(PreferenceEvaluator)  # held-out pairs ranked by the implicit reward


def _entries(declared: list) -> list[tuple[str, dict]]:
    out = []
    for i, entry in enumerate(declared):
        if isinstance(entry, str):
            out.append((entry, {}))
        elif isinstance(entry, dict) and len(entry) == 1:
            ((name, options),) = entry.items()
            if not isinstance(options, dict):
                options = {} if options is None else options
            if not isinstance(options, dict):
                raise ConfigError(f"eval.evaluators[{i}]: options of {name!r} must be a mapping")
            out.append((name, options))
        else:
            raise ConfigError(
                f"eval.evaluators[{i}]: expected a name or {{name: {{options}}}}, got {entry!r}"
            )
    return out


def resolve_evaluators(declared: list) -> list[dict]:
    """The declared list with names checked and every option filled in: [{name: {options}}]
    (what config.yaml records)."""
    resolved, seen = [], set()
    for name, options in _entries(declared):
        if name not in EVALUATORS:
            raise ConfigError(
                f"eval.evaluators: no evaluator {name!r}; valid: {', '.join(EVALUATORS)}"
            )
        if name in seen:
            raise ConfigError(f"eval.evaluators: {name!r} is declared twice")
        seen.add(name)
        opts = build_section(EVALUATORS[name].Options, options, f"eval.evaluators.{name}")
        resolved.append({name: dataclasses.asdict(opts)})
    return resolved


def check_capabilities(declared: list, task_cls: type) -> None:
    """Each declared evaluator's required capabilities are the task kind's (else ConfigError)."""
    for name, _ in _entries(declared):
        cls = EVALUATORS[name]
        missing = [cap.__name__ for cap in cls.requires if not issubclass(task_cls, cap)]
        if missing:
            raise ConfigError(
                f"eval.evaluators: {name!r} needs a task that is {' and '.join(missing)} "
                f"(core/tasks/base.py); task.kind={task_cls.kind} is not"
            )


def build_evaluators(declared: list, task) -> list[Evaluator]:
    """Evaluator instances for a task; one whose capability the task lacks is a ConfigError."""
    check_capabilities(declared, type(task))
    evaluators = []
    for name, options in _entries(resolve_evaluators(declared)):
        cls = EVALUATORS[name]
        evaluators.append(cls(build_section(cls.Options, options, f"eval.evaluators.{name}")))
    return evaluators


__all__ = [
    "EVALUATORS",
    "EmbeddingEvaluator",
    "EvalContext",
    "Evaluator",
    "Options",
    "build_evaluators",
    "check_capabilities",
    "embed_val_split",
    "register_evaluator",
    "resolve_evaluators",
]
