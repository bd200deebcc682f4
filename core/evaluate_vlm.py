"""VLM evaluation: VQA exact-match accuracy by generation, and teacher-forced loss, both over the
whole validation split (every rank answers its share; results gathered and de-duplicated by key).
"""

from __future__ import annotations

import re

import torch

from . import distributed
from .config import Config


def normalise_answer(text: str) -> str:
    """Lower case, whitespace collapsed, surrounding punctuation dropped: "Red." == "red"."""
    return re.sub(r"\s+", " ", text.strip().lower()).strip(" .,!?;:'\"")


def decode_answers(tokenizer, tokens: torch.Tensor, stop_id: int) -> list[str]:
    answers = []
    for row in tokens.tolist():
        if stop_id in row:
            row = row[: row.index(stop_id)]
        answers.append(tokenizer.decode(row, skip_special_tokens=True))
    return answers


def val_mixture(cfg: Config) -> dict | None:
    """Each validation subset once (eval.subsets, default the training mixture's)."""
    if "{subset}" not in cfg.data.val:
        return None
    return dict.fromkeys(cfg.eval.subsets or cfg.data.mixture)


def answer_stream(task, cfg: Config, dist, *, limit_per_rank: int = 0):
    """(key, source, prediction, reference) for the val split (this rank's share)."""
    from .loop import to_device
    from .tasks.common import make_stream

    batch_size = min(cfg.eval.batch_size, limit_per_rank) if limit_per_rank else 0
    stream = make_stream(
        cfg, dist, cfg.data.val, task.eval_decoder, train=False, collate=task.prompt_collate(),
        mixture=val_mixture(cfg), batch_size=batch_size,
    )  # fmt: skip
    done = 0
    for batch in stream:
        device_batch = to_device(batch, dist.device)
        tokens = task.answer(
            device_batch["input_ids"], device_batch["attention_mask"],
            device_batch["pixel_values"], cfg.eval.max_new_tokens,
        )  # fmt: skip
        predictions = decode_answers(task.tokenizer, tokens.cpu(), task.end_of_turn_id)
        for key, source, prediction, reference in zip(
            batch["key"], batch["source"], predictions, batch["answer"], strict=True
        ):
            yield key, source, prediction, reference
            done += 1
            if limit_per_rank and done >= limit_per_rank:
                return


def vqa_metrics(records: list[tuple[str, str, str, str]]) -> dict:
    by_source: dict[str, list[bool]] = {}
    for _, source, prediction, reference in records:
        correct = normalise_answer(prediction) == normalise_answer(reference)
        by_source.setdefault(source, []).append(correct)
    hits = [c for cs in by_source.values() for c in cs]
    out = {"vqa_acc": sum(hits) / max(len(hits), 1), "num_questions": len(hits)}
    for source, cs in sorted(by_source.items()):
        out[f"vqa_acc/{source}"] = sum(cs) / len(cs)
    return out


def val_loss(task, cfg: Config, dist) -> float:
    """Mean next-token loss over every supervised token of the val split (teacher forcing)."""
    from .loop import to_device
    from .tasks.common import make_stream

    stream = make_stream(
        cfg, dist, cfg.data.val, task.train_decoder, train=False,
        collate=task.packed_collate(), mixture=val_mixture(cfg),
    )  # fmt: skip
    total = torch.zeros(2, dtype=torch.float64)
    for batch in stream:
        batch = to_device(batch, dist.device)
        batch["loss_denominator"] = 1.0  # the loss comes back as a sum over tokens
        total += torch.tensor([float(task(batch)["loss"]), float(batch["loss_tokens"])])
    loss_sum, tokens = distributed.all_reduce_sum(list(total.to(dist.device)))
    return loss_sum / max(tokens, 1.0)


def evaluate_vlm(task, cfg: Config, dist) -> dict:
    if not cfg.data.val:
        return {}
    local = list(answer_stream(task, cfg, dist))
    loss = val_loss(task, cfg, dist)
    gathered = distributed.all_gather_object(local)
    if not dist.is_main:
        return {}
    by_key = {record[0]: record for records in gathered for record in records}
    return {**vqa_metrics([by_key[k] for k in sorted(by_key)]), "loss": loss}


def generation_samples(task, cfg: Config, dist) -> list[dict]:
    """Answers to the first `eval.gen_samples` validation questions (rank 0's share), for the
    training log: the same questions every time."""
    if not cfg.data.val:
        return []
    rows = answer_stream(task, cfg, dist, limit_per_rank=cfg.eval.gen_samples)
    return [
        {"key": key, "source": source, "prediction": prediction, "reference": reference}
        for key, source, prediction, reference in rows
    ]
