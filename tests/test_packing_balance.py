"""balanced_rows (core/data/packing.py): first-fit-decreasing's rows, balanced so the longest row,
which sets a packed batch's width, is as short as possible. Checked against first-fit-decreasing
and an exhaustive optimum; a balanced batch computes the same per-sample losses."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
import torch.nn.functional as F
import transformers as hf

import core.models
from core.data import packing
from core.data.packing import (
    ROW_MULTIPLE,
    PackedCollate,
    balanced_rows,
    first_fit_decreasing,
    supervised_targets,
)


def loads(lengths: list[int], rows: list[list[int]]) -> list[int]:
    return [sum(lengths[i] for i in row) for row in rows]


def rounded(load: int, multiple: int, capacity: int) -> int:
    return min(capacity, -(-load // multiple) * multiple)


def check_contract(lengths: list[int], capacity: int, rows: list[list[int]]):
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))  # each once
    assert all(row for row in rows)
    assert max(loads(lengths, rows)) <= capacity
    for row in rows:  # longest first inside a row, ties by index (PackedCollate's layout)
        assert row == sorted(row, key=lambda i: (-lengths[i], i))


def optimum(lengths: list[int], num_rows: int) -> int:
    """The smallest longest row over every assignment of the samples to `num_rows` rows."""
    best = sum(lengths)
    for assignment in itertools.product(range(num_rows), repeat=len(lengths) - 1):
        load = [0] * num_rows
        load[0] = lengths[0]  # rows are interchangeable: sample 0 in row 0
        for n, r in zip(lengths[1:], assignment):
            load[r] += n
        best = min(best, max(load))
    return best


@pytest.mark.parametrize("multiple", [1, 16])
def test_small_batches_reach_the_exhaustive_optimum(multiple):
    rng = random.Random(multiple)
    beat_ffd = 0
    for _ in range(300):
        capacity = rng.choice([24, 40, 64, 100])
        lengths = [rng.randint(1, capacity) for _ in range(rng.randint(1, 8))]
        rows = balanced_rows(lengths, capacity, multiple=multiple)
        check_contract(lengths, capacity, rows)
        ffd = first_fit_decreasing(lengths, capacity)
        assert len(rows) <= len(ffd)
        widest, ffd_widest = max(loads(lengths, rows)), max(loads(lengths, ffd))
        best = optimum(lengths, len(ffd))
        # exact: with <= 8 samples the search always finishes within its budget
        assert rounded(widest, multiple, capacity) == rounded(best, multiple, capacity)
        if multiple == 1:
            assert widest == best
        beat_ffd += widest < ffd_widest
    assert beat_ffd > 30  # the cases are not ones first-fit-decreasing already balances


def test_large_batches_keep_the_contract_and_never_widen():
    rng = random.Random(0)
    for _ in range(60):
        n = rng.choice([16, 32, 64])
        lengths = [int(min(1000, max(40, rng.lognormvariate(5.0, 0.9)))) for _ in range(n)]
        rows = balanced_rows(lengths, 1024, multiple=ROW_MULTIPLE)
        check_contract(lengths, 1024, rows)
        ffd = first_fit_decreasing(lengths, 1024)
        assert len(rows) <= len(ffd)
        widest = max(loads(lengths, rows))
        assert widest <= max(loads(lengths, ffd))
        lower = max(max(lengths), -(-sum(lengths) // len(rows)))
        assert widest >= lower  # the bound holds: a sanity check of the test's arithmetic
    # budget 0: the heuristic alone, still within the contract
    rows = balanced_rows(lengths, 1024, budget=0)
    check_contract(lengths, 1024, rows)


def test_deterministic_and_clear_errors():
    lengths = [71, 70, 69, 26, 25, 20]
    assert balanced_rows(lengths, 128) == balanced_rows(list(lengths), 128)
    # first-fit-decreasing: 71+26+25 = 122, 70+20, 69; balanced: 71+20, 70+25, 69+26 (94 cannot:
    # 71 takes only the 20, then 70 and 69 each one of 26 and 25)
    assert max(loads(lengths, first_fit_decreasing(lengths, 128))) == 122
    assert sorted(loads(lengths, balanced_rows(lengths, 128))) == [91, 95, 95]
    assert balanced_rows([5], 8) == [[0]]
    assert balanced_rows([], 8) == []
    with pytest.raises(ValueError, match="does not fit"):
        balanced_rows([3, 9], 8)


# ------------------------------------------------------------------- the same per-sample losses


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen2")
    config = hf.Qwen2Config(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    torch.manual_seed(0)
    hf.Qwen2ForCausalLM(config).save_pretrained(path)
    return core.models.from_pretrained(path).eval()


def per_sample_losses(decoder, batch) -> dict[int, float]:
    """{sample length: summed next-token loss} from a packed batch (the lengths are distinct)."""
    logits = decoder(batch["input_ids"], mask_kind="packed", segment_ids=batch["segment_ids"])
    where = supervised_targets(batch["labels"], batch["segment_ids"])
    token_loss = F.cross_entropy(
        logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:].clamp(min=0), reduction="none"
    )
    losses = {}
    for r, row in enumerate(batch["segment_ids"]):
        for seg in row.unique().tolist():
            if seg >= 0:
                inside = row == seg
                losses[int(inside.sum())] = float((token_loss[r] * where[r] * inside[:-1]).sum())
    return losses


@torch.no_grad()
def test_balanced_batch_computes_each_samples_loss(decoder, monkeypatch):
    gen = torch.Generator().manual_seed(0)
    samples = []
    for n in [71, 70, 69, 26, 25, 20]:
        ids = torch.randint(1, 63, (n,), generator=gen)  # 0 pads, 63 images
        labels = ids.clone()
        labels[: n // 3] = packing.IGNORE  # the prompt
        samples.append({"input_ids": ids, "labels": labels, "pixel_values": torch.empty(0)})
    collate = PackedCollate(max_seq_len=128, pad_id=0, image_token_id=63, tokens_per_image=1)
    balanced = collate(samples)
    monkeypatch.setattr(packing, "balanced_rows", lambda lengths, cap, **_: (
        first_fit_decreasing(lengths, cap)))  # fmt: skip
    before = collate(samples)  # the layout before balanced_rows
    assert balanced["input_ids"].shape == (3, 96) and before["input_ids"].shape == (3, 128)
    assert balanced["supervised_tokens"] == before["supervised_tokens"]
    alone = {}
    for s in samples:
        logits = decoder(s["input_ids"][None])[0, :-1]
        targets = s["labels"][1:]
        keep = targets != packing.IGNORE
        loss = F.cross_entropy(logits[keep], targets[keep], reduction="sum")
        alone[len(s["input_ids"])] = float(loss)
    for layout in (balanced, before):
        got = per_sample_losses(decoder, layout)
        assert got.keys() == alone.keys()
        for n in alone:
            assert got[n] == pytest.approx(alone[n], abs=1e-4), n
