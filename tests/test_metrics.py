"""core.metrics against brute-force references written with plain Python loops.

Retrieval and zero-shot data use small integer entries (times a power of two) so every score is
exact in float32: ties are real ties, and the loops over Python ints are an exact reference.
"""

import random

import pytest
import torch

from core.metrics import (
    exact_match,
    normalise_answer,
    retrieval_metrics,
    retrieval_ranks,
    vqa_accuracy,
    zeroshot_accuracy,
)

SCALE = 2.0**-3  # exact in float32; scaling cannot change an order or a tie


def int_rows(rng: random.Random, n: int, d: int) -> list[list[int]]:
    return [[rng.randint(-2, 2) for _ in range(d)] for _ in range(n)]


def as_tensor(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32) * SCALE


def dot(a: list[int], b: list[int]) -> int:
    return sum(x * y for x, y in zip(a, b))


def brute_ranks(query: list[list[int]], candidates: list[list[int]]) -> list[int]:
    ranks = []
    for i, q in enumerate(query):
        positive = dot(q, candidates[i])
        ranks.append(sum(1 for j, c in enumerate(candidates) if j != i and dot(q, c) >= positive))
    return ranks


def positive_ties(query: list[list[int]], candidates: list[list[int]]) -> int:
    """Rows whose true candidate ties with another one (the test data must have many)."""
    count = 0
    for i, q in enumerate(query):
        positive = dot(q, candidates[i])
        count += any(j != i and dot(q, c) == positive for j, c in enumerate(candidates))
    return count


@pytest.mark.parametrize("seed,n,d", [(0, 50, 4), (1, 120, 6), (2, 200, 8)])
def test_retrieval_ranks_match_brute_force_with_ties(seed, n, d):
    rng = random.Random(seed)
    image, text = int_rows(rng, n, d), int_rows(rng, n, d)
    assert positive_ties(image, text) >= n // 10  # ties are what this test is about
    for query, candidates in ((image, text), (text, image)):
        expected = brute_ranks(query, candidates)
        for chunk in (1024, 7, 1):
            got = retrieval_ranks(as_tensor(query), as_tensor(candidates), chunk=chunk)
            assert got.dtype == torch.long
            assert got.tolist() == expected


@pytest.mark.parametrize("seed,n,d", [(3, 60, 4), (4, 150, 6)])
def test_retrieval_metrics_match_brute_force(seed, n, d):
    rng = random.Random(seed)
    image, text = int_rows(rng, n, d), int_rows(rng, n, d)
    i2t, t2i = brute_ranks(image, text), brute_ranks(text, image)
    for chunk in (1024, 7):
        got = retrieval_metrics(as_tensor(image), as_tensor(text), chunk=chunk)
        assert set(got) == {f"{w}_r{k}" for w in ("i2t", "t2i") for k in (1, 5, 10)} | {"num_pairs"}
        assert got["num_pairs"] == n
        for k in (1, 5, 10):
            assert got[f"i2t_r{k}"] == pytest.approx(sum(r < k for r in i2t) / n, abs=1e-7)
            assert got[f"t2i_r{k}"] == pytest.approx(sum(r < k for r in t2i) / n, abs=1e-7)


def test_retrieval_hand_case_with_ties():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    # image->text scores: [1 0 1], [0 2 1], [1 2 2]; text->image: [1 0 1], [0 2 2], [1 1 2]
    assert retrieval_ranks(image, text).tolist() == [1, 0, 1]
    assert retrieval_ranks(text, image).tolist() == [1, 1, 0]
    got = retrieval_metrics(image, text, ks=(1, 2))
    assert got == pytest.approx(
        {"i2t_r1": 1 / 3, "t2i_r1": 1 / 3, "i2t_r2": 1.0, "t2i_r2": 1.0, "num_pairs": 3}
    )


@pytest.mark.parametrize("n", [2, 5, 30])
def test_retrieval_all_candidates_tied_scores_zero(n):
    image = torch.ones(n, 4)
    text = torch.full((n, 4), 0.5)
    assert retrieval_ranks(image, text, chunk=3).tolist() == [n - 1] * n
    got = retrieval_metrics(image, text, ks=(1, n - 1, n))
    assert got["i2t_r1"] == 0.0 and got["t2i_r1"] == 0.0
    assert got[f"i2t_r{n - 1}"] == 0.0 and got[f"t2i_r{n - 1}"] == 0.0
    assert got[f"i2t_r{n}"] == 1.0 and got[f"t2i_r{n}"] == 1.0


def test_retrieval_single_pair_is_a_hit():
    got = retrieval_metrics(torch.tensor([[0.6, 0.8]]), torch.tensor([[1.0, 0.0]]))
    assert got["i2t_r1"] == 1.0 and got["t2i_r1"] == 1.0 and got["num_pairs"] == 1


def test_retrieval_nan_positive_ranks_last():
    image = torch.tensor([[float("nan"), 1.0], [0.0, 1.0], [1.0, 0.0]])
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    assert retrieval_ranks(image, text).tolist() == [2, 0, 1]


def test_retrieval_rejects_unpaired_inputs():
    with pytest.raises(ValueError, match="pair up"):
        retrieval_ranks(torch.zeros(4, 3), torch.zeros(5, 3))


def normalised_pairs(seed=0, n=512, d=16, noise=0.2):
    g = torch.Generator().manual_seed(seed)
    image = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)
    text = torch.nn.functional.normalize(image + noise * torch.randn(n, d, generator=g), dim=-1)
    return image, text


def test_retrieval_on_normalised_features_ranks_from_one_similarity_matrix():
    """Regression: the positive must be scored by the same computation as the candidates."""
    image, text = normalised_pairs()
    n = image.shape[0]
    got = retrieval_metrics(image, text)
    for query, candidates, name in ((image, text, "i2t"), (text, image, "t2i")):
        sim = query @ candidates.T  # computed once; the positive is its diagonal
        same_matrix = [(sim[i] >= sim[i, i]).sum().item() - 1 for i in range(n)]
        sim64 = query.double() @ candidates.double().T  # same float32 inputs, exact-ish scores
        in_float64 = [(sim64[i] >= sim64[i, i]).sum().item() - 1 for i in range(n)]
        ranks = retrieval_ranks(query, candidates).tolist()
        assert ranks == same_matrix
        assert ranks == in_float64
        assert min(ranks) == 0  # never "better than first"
        for k in (1, 5, 10):
            assert got[f"{name}_r{k}"] == pytest.approx(sum(r < k for r in same_matrix) / n)
    assert 0.5 < got["i2t_r1"] < 0.95  # a meaningful regime: neither trivial nor hopeless


def test_old_positive_formula_inflated_recall():
    """Documents the bug this module fixes: (image * text).sum(-1) as the positive, compared
    against image @ text.T, drops the row's own entry whenever it rounds higher: R@1 too good."""
    image, text = normalised_pairs()
    sim = image @ text.T
    old_positive = (image * text).sum(dim=-1)
    if torch.equal(old_positive, sim.diagonal()):
        pytest.skip("this BLAS rounds the elementwise sum and the matmul identically")
    old_ranks = (sim >= old_positive[:, None]).sum(dim=1) - 1
    old_r1 = (old_ranks < 1).float().mean().item()
    assert (old_ranks < 0).any()  # impossible ranks: the row's own entry fell below its positive
    assert old_r1 > retrieval_metrics(image, text)["i2t_r1"]


def brute_zeroshot(features, classes, labels):
    hits = total = 0
    for f, label in zip(features, labels):
        if label < 0:
            continue
        scores = [dot(f, c) for c in classes]
        total += 1
        hits += all(s < scores[label] for j, s in enumerate(scores) if j != label)
    return hits / total if total else None


@pytest.mark.parametrize("seed,n,c,d", [(0, 100, 5, 4), (1, 200, 8, 6), (2, 40, 3, 2)])
def test_zeroshot_matches_brute_force_with_ties(seed, n, c, d):
    rng = random.Random(seed)
    features, classes = int_rows(rng, n, d), int_rows(rng, c, d)
    labels = [rng.randint(-1, c - 1) for _ in range(n)]
    tied = sum(
        1
        for f, y in zip(features, labels)
        if y >= 0 and sum(dot(f, cl) == dot(f, classes[y]) for cl in classes) > 1
    )
    assert tied >= n // 20  # ties with the true class occur in this data
    assert -1 in labels
    got = zeroshot_accuracy(as_tensor(features), as_tensor(classes), torch.tensor(labels))
    assert got == pytest.approx(brute_zeroshot(features, classes, labels), abs=1e-7)


def test_zeroshot_hand_case():
    classes = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    features = torch.tensor([[2.0, 0.0], [1.0, 3.0], [-1.0, 1.0], [3.0, 1.0], [5.0, 5.0]])
    labels = torch.tensor([0, 2, 1, 1, -1])
    # scores: [2 0 2] tie -> wrong; [1 3 4] right; [-1 1 0] right; [3 1 4] wrong; label -1 skipped
    # (read as an index, -1 would be class 2, which wins for [5 5]: 3/5 instead of 2/4)
    assert zeroshot_accuracy(features, classes, labels) == 0.5


def test_zeroshot_tie_with_true_class_is_wrong():
    classes = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    features = torch.tensor([[1.0, 1.0]])
    assert zeroshot_accuracy(features, classes, torch.tensor([0])) == 0.0  # argmax would say 0
    assert zeroshot_accuracy(features, classes, torch.tensor([1])) == 0.0


def test_zeroshot_without_labels_is_none():
    features = torch.ones(3, 2)
    assert zeroshot_accuracy(features, torch.eye(2), torch.tensor([-1, -1, -1])) is None


@pytest.mark.parametrize(
    "text,expected",
    [
        ("Red.", "red"),
        ("  Two   shapes ", "two shapes"),
        ("blue!", "blue"),
        ('"Top-left?"', "top-left"),
        ("yes,\n no", "yes, no"),
        ("...", ""),
    ],
)
def test_normalise_answer(text, expected):
    assert normalise_answer(text) == expected


@pytest.mark.parametrize(
    "prediction,reference,expected",
    [
        ("Red.", "red", True),
        ("  Two   shapes ", "two shapes", True),
        ("blue!", "Blue", True),
        ("'Top-left'", "top-left", True),
        ("red", "reddish", False),
        ("top-left", "top left", False),
        ("two shapes", "twoshapes", False),
        ("3", "three", False),
    ],
)
def test_exact_match(prediction, reference, expected):
    assert exact_match(prediction, reference) is expected


SURFACES = ["{}", "{}.", "  {}  ", "{}!", '"{}"', "{}?"]


def render(rng: random.Random, answer: str) -> str:
    words = answer.split(" ")
    text = "   ".join(words) if rng.random() < 0.3 else answer
    text = text.upper() if rng.random() < 0.3 else text.capitalize()
    return rng.choice(SURFACES).format(text)


def test_vqa_accuracy_matches_brute_force():
    rng = random.Random(0)
    answers = ["red", "blue", "two shapes", "top-left", "3"]
    sources = ["count", "colour", "where"]
    records, truth = [], []
    for i in range(300):
        source = rng.choice(sources)
        reference = rng.choice(answers)
        predicted = reference if rng.random() < 0.6 else rng.choice(answers)
        records.append((f"k{i}", source, render(rng, predicted), render(rng, reference)))
        truth.append((source, predicted == reference))
    rng.shuffle(records)  # order must not matter (truth is only counted, never indexed)
    got = vqa_accuracy(records)
    assert set(got) == {"vqa_acc", "num_questions"} | {f"vqa_acc/{s}" for s in sources}
    assert list(got)[2:] == [f"vqa_acc/{s}" for s in sorted(sources)]
    assert got["num_questions"] == 300
    assert got["vqa_acc"] == pytest.approx(sum(ok for _, ok in truth) / 300)
    for s in sources:
        oks = [ok for src, ok in truth if src == s]
        assert got[f"vqa_acc/{s}"] == pytest.approx(sum(oks) / len(oks))


def test_vqa_accuracy_hand_case():
    records = [
        ("a", "count", "Two.", "two"),
        ("b", "count", "three", "two"),
        ("c", "colour", "Red", "red"),
        ("d", "count", "1", "1"),
    ]
    got = vqa_accuracy(iter(records))  # any iterable, e.g. a stream
    assert got == pytest.approx(
        {"vqa_acc": 0.75, "num_questions": 4, "vqa_acc/colour": 1.0, "vqa_acc/count": 2 / 3}
    )


def test_vqa_accuracy_empty():
    assert vqa_accuracy([]) == {"vqa_acc": 0.0, "num_questions": 0}


def test_vqa_accuracy_rejects_duplicate_keys():
    records = [("a", "count", "two", "two"), ("b", "count", "1", "2"), ("a", "colour", "x", "x")]
    with pytest.raises(ValueError, match="duplicate key 'a'"):
        vqa_accuracy(records)
