"""Weighted mixing of dataset subsets, as a shard list.

`data.mixture: {subset: weight}` with `data.train: dir/{subset}/train-*.tar` asks for samples of
each subset in proportion to its weight. Each subset's shard list is repeated k times per pass,
with k proportional to weight / subset size (the least-wanted subset appears once), and the
stream shuffles the combined list as usual. Mixing is therefore at shard granularity, exact in
expectation over a pass, and the stream's exact resume holds unchanged (the list is fixed).
"""

from __future__ import annotations

import logging

from .shards import listed_samples
from .stream import expand_urls

log = logging.getLogger(__name__)

MAX_REPEAT = 1000  # beyond this the weights are approximated by capping the repeats


def subset_samples(urls: list[str]) -> int:
    """Samples in these shards from sizes.json beside them; the shard count when unknown."""
    listed = listed_samples(urls)
    return len(urls) if listed is None else listed


def mixture_urls(pattern: str, mixture: dict[str, float | None]) -> list[str]:
    """The shard list for `pattern` (with {subset}) mixed by weight. Weight None means "each
    subset once" (evaluation); weight 0 leaves a subset out."""
    if "{subset}" not in pattern:
        raise ValueError(f"data.mixture is set but {pattern!r} has no {{subset}} to fill in")
    subsets = {name: expand_urls(pattern.replace("{subset}", name)) for name in mixture}
    weights = {name: w for name, w in mixture.items() if w is None or w > 0}
    if not weights:
        raise ValueError(f"data.mixture {mixture} has no subset with a positive weight")
    if any(w is None for w in weights.values()):
        return [url for name in weights for url in subsets[name]]
    sizes = {name: subset_samples(subsets[name]) for name in weights}
    want = {name: weights[name] / sizes[name] for name in weights}  # passes per unit
    least = min(want.values())
    repeats = {name: min(MAX_REPEAT, max(1, round(want[name] / least))) for name in weights}
    total_weight = sum(weights.values())
    total = sum(repeats[n] * sizes[n] for n in weights)
    for name in weights:
        log.info(
            "mixture: %s x%d (%.1f%% of samples; asked %.1f%%)", name, repeats[name],
            100 * repeats[name] * sizes[name] / total, 100 * weights[name] / total_weight,
        )  # fmt: skip
    return [url for name in weights for url in subsets[name] * repeats[name]]
