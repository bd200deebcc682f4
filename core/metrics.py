"""Evaluation metrics as pure functions: retrieval recall, zero-shot accuracy, VQA exact match.

No I/O, no distributed code: callers gather, de-duplicate and order the features (or answers)
first. Ties always count against the model, so a degenerate model (every score equal) scores 0.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch


def _rank_of(sim: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """For each row of sim, how many OTHER entries score >= the entry at cols (0 = best).

    The positive is read out of sim itself: scoring it with a different formula (e.g.
    (a * b).sum(-1) against a @ b.T) rounds differently, can put the row's own entry below its
    "positive" and makes the rank one too good. A NaN positive ranks last.
    """
    positive = sim[torch.arange(sim.shape[0], device=sim.device), cols]
    rank = (sim >= positive[:, None]).sum(dim=1) - 1
    return torch.where(positive.isnan(), sim.shape[1] - 1, rank)


def retrieval_ranks(
    query: torch.Tensor, candidates: torch.Tensor, chunk: int = 1024
) -> torch.Tensor:
    """0-based rank of candidates[i] among all candidates for query[i] (dot-product score).

    Rows are scored in [chunk, n] blocks so memory stays flat for large splits; exact ties count
    against the model (rank = number of other candidates scoring >= the true one).
    """
    n = query.shape[0]
    if candidates.shape[0] != n:
        raise ValueError(f"{n} queries but {candidates.shape[0]} candidates: they must pair up")
    ranks = torch.empty(n, dtype=torch.long, device=query.device)
    for start in range(0, n, chunk):
        rows = torch.arange(start, min(start + chunk, n), device=query.device)
        ranks[rows] = _rank_of(query[rows] @ candidates.T, rows)
    return ranks


def retrieval_metrics(
    image: torch.Tensor, text: torch.Tensor, ks=(1, 5, 10), chunk: int = 1024
) -> dict:
    """Recall@k both ways over the whole split; image[i] and text[i] are a pair.

    i2t: each image queries all texts; t2i: each text queries all images. Features are usually
    L2-normalised (cosine similarity) but any dot-product score works.
    """
    i2t = retrieval_ranks(image, text, chunk)
    t2i = retrieval_ranks(text, image, chunk)
    out = {}
    for k in ks:
        out[f"i2t_r{k}"] = (i2t < k).float().mean().item()
        out[f"t2i_r{k}"] = (t2i < k).float().mean().item()
    out["num_pairs"] = image.shape[0]
    return out


def zeroshot_accuracy(
    features: torch.Tensor, class_features: torch.Tensor, labels: torch.Tensor
) -> float | None:
    """CLIP-style zero-shot accuracy: the predicted class is the most similar class prompt.

    labels < 0 mark samples without an unambiguous label and are skipped. A tie between the true
    class and any other counts as wrong (argmax would pick by index, i.e. by luck). None when no
    sample has a label.
    """
    keep = labels >= 0
    if not keep.any():
        return None
    sim = features[keep] @ class_features.T
    correct = _rank_of(sim, labels[keep].to(sim.device)) == 0
    return correct.float().mean().item()


def normalise_answer(text: str) -> str:
    """Lower case, whitespace collapsed, surrounding punctuation dropped: "Red." == "red"."""
    return re.sub(r"\s+", " ", text.strip().lower()).strip(" .,!?;:'\"")


def exact_match(prediction: str, reference: str) -> bool:
    return normalise_answer(prediction) == normalise_answer(reference)


def vqa_accuracy(records: Iterable[tuple[str, str, str, str]]) -> dict:
    """Exact-match accuracy overall and per source from (key, source, prediction, reference).

    Keys must be unique: gathering from several ranks can repeat samples, and counting one twice
    silently skews the score, so callers de-duplicate and a repeat here is an error.
    """
    seen: set[str] = set()
    by_source: dict[str, list[bool]] = {}
    for key, source, prediction, reference in records:
        if key in seen:
            raise ValueError(f"duplicate key {key!r}: de-duplicate records before scoring")
        seen.add(key)
        by_source.setdefault(source, []).append(exact_match(prediction, reference))
    hits = [c for cs in by_source.values() for c in cs]
    out = {"vqa_acc": sum(hits) / len(hits) if hits else 0.0, "num_questions": len(hits)}
    for source, cs in sorted(by_source.items()):
        out[f"vqa_acc/{source}"] = sum(cs) / len(cs)
    return out
