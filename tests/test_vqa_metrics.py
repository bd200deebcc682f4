"""The answer metrics of VLM benchmarks (core/metrics.py): VQAv2 soft accuracy with the VQA API's
normalisation, ANLS, ChartQA's relaxed accuracy. Hand-computed cases, then the same cases against
lmms-eval's own copies of the benchmarks' scoring code, then the `vqa` evaluator's `metric`
option end to end on a tiny VLM (multi-answer samples included)."""

from __future__ import annotations

import copy
import json
import random
import typing
from pathlib import Path

import pytest
import torch

from core.config import ConfigError
from core.data.errors import BadSample
from core.data.shards import open_shard, write_sizes, write_tar
from core.distributed import DistInfo
from core.evaluators import EvalContext, build_evaluators, resolve_evaluators
from core.evaluators.vqa import VQAOptions, answer_records
from core.metrics import (
    ANSWER_METRICS,
    VQA_ARTICLES,
    VQA_CONTRACTIONS,
    VQA_NUMBERS,
    VQA_PUNCTUATION,
    anls,
    exact_match,
    levenshtein,
    relaxed_accuracy,
    vqa_accuracy,
    vqa_normalise,
    vqav2_accuracy,
)

# ------------------------------------------------------------------- VQAv2: normalisation


@pytest.mark.parametrize(
    "text,expected",
    [
        ("Two dogs.", "2 dogs"),  # number word -> digit; the final period goes
        ("the cat", "cat"),  # articles go
        ("An Apple", "apple"),
        ("dont", "don't"),  # a missing apostrophe restored
        ("isnt it?", "isn't it"),
        ("black/white", "black white"),  # a mark between words becomes a space
        ("yes, sir", "yes sir"),  # a mark next to a space is deleted
        ("1,000", "1000"),  # a digit-comma-digit: every mark is deleted, not spaced
        ("1,000-2", "10002"),
        ("one-two", "1 2"),
        ("1.5", "1.5"),  # a period before a digit stays
        ("5.", "5"),
        ("e.g. red", "eg red"),
        ("(a) blue", "blue"),  # "(a)" -> " a " -> an article
        ("  multiple   spaces\tand\nlines ", "multiple spaces and lines"),
        ("None", "0"),
        ("Im here", "im here"),  # the table's "Im" key never matches the lower-cased word
        ("somebody'd", "somebodyd"),  # the official table maps this one backwards
        ("", ""),
        ("x" + "." * 40, "x" + "." * 8),  # the official call strips at most 32 periods
    ],
)
def test_vqa_normalise_hand_cases(text, expected):
    assert vqa_normalise(text) == expected


TRICKY = [
    "Two dogs.", "the cat", "dont", "1,000", "black/white", "yes, sir", "e.g. red", "1.5", "5.",
    "A  Man's hat!", "(a) blue", "one-two", "Im here", "some- thing", "$1,000.00", "3 , 4", "None",
    "an apple", "isnt it?", "x" + "." * 40, "10:30", "50%", "red & white", "#1", "left-hand side",
    "Yes!", "NO", "ten", "TEN.", "\"quoted\"", "a.m.", "3.14.", "well...", "wouldnt've", "the the",
    "i dont know", "its", "it's", "2,", ",2", "tv's", "[blue]", "{x}", "a+b", "a = b", "<3",
    "snake_case", "back\\slash", "at@sign", "`tick`", "ßtraße", "café", "",
]  # fmt: skip


def _lmms_normalise(text: str) -> str:
    """lmms-eval's vqav2_process_results: newlines/tabs to spaces, strip, then its copy of the
    VQA API's processPunctuation and processDigitArticle."""
    from lmms_eval.tasks._task_utils.vqa_eval_metric import EvalAIAnswerProcessor

    processor = EvalAIAnswerProcessor()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return processor.process_digit_article(processor.process_punctuation(text))


@pytest.mark.parametrize("text", TRICKY)
def test_vqa_normalise_equals_lmms_eval(text):
    assert vqa_normalise(text) == _lmms_normalise(text)


def test_vqa_tables_equal_lmms_eval_copies():
    """Our tables, written from the VQA API's vqaEval.py, are lmms-eval's (mmf's) copy of them."""
    from lmms_eval.tasks._task_utils.vqa_eval_metric import EvalAIAnswerProcessor as P

    assert VQA_CONTRACTIONS == P.CONTRACTIONS
    # its NUMBER_MAP.setdefault(word, word) adds every word it has seen to the class's dict
    assert {k: v for k, v in P.NUMBER_MAP.items() if k != v} == VQA_NUMBERS
    assert set(P.ARTICLES) == VQA_ARTICLES
    assert list(VQA_PUNCTUATION) == P.PUNCTUATIONS


# ------------------------------------------------------------------- VQAv2: accuracy


def _shorthand(k: int) -> float:
    return min(k / 3, 1.0)


@pytest.mark.parametrize("k", range(11))
def test_vqav2_leave_one_out_against_the_shorthand(k):
    """10 answers, k of them the prediction: the mean over the 10 leave-one-out subsets of
    min(1, matches among the other 9 / 3) (hand: k of the subsets see k - 1 matches, 10 - k see
    k). It equals min(k / 3, 1) at k = 0 and k >= 4 and is lower at k = 1, 2, 3."""
    answers = ["red"] * k + ["blue"] * (10 - k)
    hand = (k * min(1, (k - 1) / 3) + (10 - k) * min(1, k / 3)) / 10
    got = vqav2_accuracy("Red.", answers)
    assert got == pytest.approx(hand)
    if k == 0 or k >= 4:
        assert got == pytest.approx(_shorthand(k))
    else:
        assert got == pytest.approx({1: 0.3, 2: 0.6, 3: 0.9}[k])
        assert got < _shorthand(k)


def test_vqav2_hand_cases():
    ten = ["2", "2", "two", "Two.", "3", "3", "3", "the 3", "4", "many"]
    # "2": 4 matches ("two", "Two." normalise to "2") -> 1; "3": 4 -> 1; "4": 1 -> 0.3
    assert vqav2_accuracy("two", ten) == 1.0
    assert vqav2_accuracy("3", ten) == 1.0
    assert vqav2_accuracy("four", ten) == pytest.approx(0.3)
    assert vqav2_accuracy("five", ten) == 0.0
    assert vqav2_accuracy("Many!", ten) == pytest.approx(0.3)
    # one answer (no annotators to leave out): exact match after the VQA normalisation
    assert vqav2_accuracy("The Cat.", ["cat"]) == 1.0
    assert vqav2_accuracy("cats", ["cat"]) == 0.0
    with pytest.raises(ValueError, match="at least one answer"):
        vqav2_accuracy("cat", [])


def _lmms_vqav2(prediction: str, answers: list[str]) -> float:
    from lmms_eval.tasks.vqav2.utils import vqav2_process_results

    # VQAv2's answers carry answer_id, which keeps the 10 dicts distinct in its leave-one-out
    doc = {"question_id": 1, "answers": [{"answer": a, "answer_id": i + 1}
                                         for i, a in enumerate(answers)]}  # fmt: skip
    return vqav2_process_results(copy.deepcopy(doc), [prediction])["exact_match"]


def test_vqav2_equals_lmms_eval():
    rng = random.Random(0)
    pool = TRICKY + ["2", "two", "1000", "cat", "red", "yes", "no", "don't"]
    cases = [("two", ["2", "2", "two", "Two.", "3", "3", "3", "the 3", "4", "many"])]
    for _ in range(300):
        answers = [rng.choice(pool[:12] + pool[-8:]) for _ in range(10)]
        prediction = rng.choice(answers) if rng.random() < 0.7 else rng.choice(pool)
        cases.append((prediction, answers))
    for text in TRICKY:  # every tricky surface against answers written otherwise
        cases.append((text, [_lmms_normalise(text).upper()] * 3 + ["zzz"] * 7))
    scores = set()
    for prediction, answers in cases:
        ours = vqav2_accuracy(prediction, answers)
        assert ours == pytest.approx(_lmms_vqav2(prediction, answers)), (prediction, answers)
        scores.add(round(ours, 6))
    assert {0.0, 0.3, 0.6, 0.9, 1.0} <= scores  # every step of the soft accuracy was hit


# ------------------------------------------------------------------- ANLS


def test_levenshtein_hand_and_lmms_eval():
    from lmms_eval.api.metrics import levenshtein_distance

    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == levenshtein("abc", "") == 3
    assert levenshtein("", "") == 0
    assert levenshtein("flaw", "lawn") == 2
    rng = random.Random(0)
    for _ in range(200):
        a = "".join(rng.choice("abc ") for _ in range(rng.randrange(8)))
        b = "".join(rng.choice("abc ") for _ in range(rng.randrange(8)))
        assert levenshtein(a, b) == levenshtein_distance(a, b)


@pytest.mark.parametrize(
    "prediction,answers,expected",
    [
        ("Invoice", ["invoice"], 1.0),  # case is ignored
        ("  total   due ", ["Total due"], 1.0),  # so is surrounding and repeated whitespace
        ("abcd", ["abce"], 0.75),  # 1 edit / 4
        ("ab", ["ac"], 0.5),  # exactly the threshold: kept
        ("abc", ["axy"], 0.0),  # 1 - 2/3 = 0.33 < 0.5: 0
        ("abcdef", ["abcxyz", "abcdeg"], pytest.approx(5 / 6)),  # the best answer counts
        ("12/05/2021", ["12-05-2021", "12.05.2021"], 0.8),
        ("$1,000", ["1000"], pytest.approx(4 / 6)),  # 2 deletions / 6
        ("", [""], 1.0),  # two empty strings are equal
        ("", ["abc"], 0.0),
        ("abc", [""], 0.0),
    ],
)
def test_anls_hand_cases(prediction, answers, expected):
    assert anls(prediction, answers) == expected


def test_anls_threshold_and_errors():
    assert anls("abc", ["axy"], threshold=0.3) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="at least one answer"):
        anls("a", [])


def _lmms_anls(prediction: str, answers: list[str]) -> float:
    from lmms_eval.api.metrics import anls as lmms_anls

    return lmms_anls(answers, [prediction])["anls"]


def test_anls_equals_lmms_eval_and_where_not():
    rng = random.Random(1)
    words = ["invoice", "Total", "due", "12/05", "$1,000", "ACME", "ltd.", "", "no."]
    cases = [("Invoice", ["invoice"]), ("abcd", ["abce"]), ("ab", ["ac"]), ("", [""]),
             ("", ["abc"]), ("abcdef", ["abcxyz", "abcdeg"])]  # fmt: skip
    for _ in range(300):  # single spaces, nothing to strip: both divide by the same lengths
        answers = [" ".join(rng.sample(words, rng.randrange(1, 3))).strip() for _ in range(3)]
        answers = [" ".join(a.split()) for a in answers]
        prediction = " ".join(rng.choice(answers).split()[::-1] or [""])
        cases.append((prediction, answers))
    for prediction, answers in cases:
        assert anls(prediction, answers) == pytest.approx(_lmms_anls(prediction, answers))
    # Stray whitespace: the RRC scripts divide by the raw lengths (7, not 3) and score higher
    assert anls("  abc  ", ["abd"]) == pytest.approx(2 / 3)
    assert _lmms_anls("  abc  ", ["abd"]) == pytest.approx(6 / 7)


# ------------------------------------------------------------------- relaxed accuracy


@pytest.mark.parametrize(
    "prediction,answer,expected",
    [
        ("105", "100", 1.0),  # exactly 5% off: right
        ("95", "100", 1.0),
        ("105.1", "100", 0.0),
        ("94.9", "100", 0.0),
        ("-10.4", "-10", 1.0),  # relative to |answer|
        ("12.0", "12", 1.0),
        ("0.41", "40%", 1.0),  # "40%" reads as 0.4
        ("40%", "0.4", 1.0),
        ("40%", "40", 0.0),  # 0.4 against 40: a percentage is not its number
        ("1,000", "1000", 0.0),  # a comma is not a separator there: compared as text
        ("1,000", "1,000", 1.0),
        ("0", "0", 1.0),  # a zero answer: exact match only
        ("0.0", "0", 0.0),
        ("1e2", "100", 1.0),
        ("Yes", "yes", 1.0),  # text: exact, case-insensitive
        (" Yes\n", "yes", 1.0),  # surrounding whitespace dropped
        ("yes.", "yes", 0.0),
        ("", "", 1.0),
        ("", "0", 0.0),
    ],
)
def test_relaxed_hand_cases(prediction, answer, expected):
    assert relaxed_accuracy(prediction, [answer]) == expected


def test_relaxed_multiple_answers_and_errors():
    assert relaxed_accuracy("21", ["blue", "20.5"]) == 1.0  # the best answer counts
    assert relaxed_accuracy("blue", ["Blue", "20"]) == 1.0
    assert relaxed_accuracy("22", ["blue", "20"]) == 0.0
    assert relaxed_accuracy("11", ["10"], tolerance=0.1) == 1.0
    with pytest.raises(ValueError, match="at least one answer"):
        relaxed_accuracy("1", [])


def test_relaxed_equals_lmms_eval():
    from lmms_eval.tasks.chartqa.utils import relaxed_correctness

    values = ["100", "105", "95", "105.1", "94.9", "0", "0.0", "-10", "-10.4", "40%", "0.4",
              "0.41", "1,000", "1000", "1e2", "Yes", "yes", "no", "", "12", "12.6", "12.61",
              "nan", "inf", "2%", "3.5%", "abc"]  # fmt: skip
    for prediction in values:
        for answer in values:
            ours = relaxed_accuracy(prediction, [answer])
            assert ours == float(relaxed_correctness(prediction, answer)), (prediction, answer)


# ------------------------------------------------------------------- scoring a split


def test_vqa_accuracy_names_each_metric():
    records = [
        ("a", "docs", "Invoice", ["invoice", "bill"]),
        ("b", "docs", "abcd", "abce"),
        ("c", "charts", "105", "100"),
    ]
    assert vqa_accuracy(records) == pytest.approx(
        {"vqa_acc": 1 / 3, "num_questions": 3, "vqa_acc/charts": 0.0, "vqa_acc/docs": 0.5}
    )
    assert vqa_accuracy(records, "anls") == pytest.approx(
        {"anls": (1 + 0.75 + 2 / 3) / 3, "num_questions": 3, "anls/charts": 2 / 3,
         "anls/docs": 0.875}
    )  # fmt: skip
    assert vqa_accuracy(records, "relaxed") == pytest.approx(
        {"relaxed_acc": 2 / 3, "num_questions": 3, "relaxed_acc/charts": 1.0,
         "relaxed_acc/docs": 0.5}
    )  # fmt: skip
    ten = [("q", "vqav2", "two", ["2"] * 2 + ["3"] * 8)]
    assert vqa_accuracy(ten, "vqav2") == pytest.approx(
        {"vqav2_acc": 0.6, "num_questions": 1, "vqav2_acc/vqav2": 0.6}
    )
    with pytest.raises(ValueError, match="no answer metric 'bleu'; valid: exact, vqav2, anls"):
        vqa_accuracy(records, "bleu")
    with pytest.raises(ValueError, match="'q' has no reference answer"):
        vqa_accuracy([("q", "s", "x", [])], "anls")


def test_vqa_metric_option_is_checked_when_the_recipe_loads():
    assert typing.get_args(typing.get_type_hints(VQAOptions)["metric"]) == tuple(ANSWER_METRICS)
    assert resolve_evaluators([{"vqa": {"metric": "anls"}}])[0]["vqa"]["metric"] == "anls"
    assert resolve_evaluators(["vqa"])[0]["vqa"]["metric"] == "exact"
    with pytest.raises(ConfigError, match="metric: expected 'exact' | 'vqav2' | 'anls' | 'rel"):
        resolve_evaluators([{"vqa": {"metric": "bleu"}}])


# ------------------------------------------------------------------- the evaluator, end to end


def _with_answers(src: Path, dst: Path, subsets: list[str], answers_of) -> None:
    """dst/<subset>/val-000000.tar: src's val samples with json["answers"] = answers_of(key)."""
    for subset_dir in (src / subset for subset in subsets):
        shard = open_shard(str(subset_dir / "val-000000.tar"))
        samples = []
        for i in range(len(shard)):
            sample = shard.read(i)
            key = sample.pop("__key__")
            record = json.loads(sample["json"])
            record["answers"] = answers_of(key, record)
            sample["json"] = json.dumps(record).encode()
            samples.append((key, {k: v for k, v in sample.items() if not k.startswith("__")}))
        (dst / subset_dir.name).mkdir(parents=True)
        write_tar(dst / subset_dir.name / "val-000000.tar", samples)
        write_sizes(dst / subset_dir.name, {"val-000000.tar": len(samples)})


def test_vqa_evaluator_metrics_on_a_tiny_vlm(vqa, tmp_path):
    """The `vqa` evaluator of a tiny random VLM: its metric option picks the metric and names
    it; with a validation split whose samples carry 10 answers, k of them the model's own
    (greedy, so repeatable) answer to that question, vqav2_acc is the hand-known mean; without
    "answers" every metric equals lmms-eval's scoring of the same generated answers."""
    from test_vlm_task import vlm_overrides

    from core.recipe import load_config
    from core.tasks import build_task

    subsets = ["shapes_colour", "shapes_shape"]
    torch.manual_seed(0)
    cfg = load_config("tiny_vlm_stage1", vlm_overrides(vqa, tmp_path / "run"))
    task = build_task(cfg).eval()
    with torch.no_grad():  # at its small init the LM answers "\n\n\n" to everything
        for param in task.lm.parameters():
            param.normal_(0, 1)  # now the answers differ ("7 largesyste", " purple�7", ...)
    dist = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    ctx = EvalContext(cfg=cfg, dist=dist, step=0, run_dir=tmp_path)

    def evaluate(metric: str, context=ctx) -> dict:
        (evaluator,) = build_evaluators([{"vqa": {"subsets": subsets, "max_new_tokens": 3,
                                                  "metric": metric}}], task)  # fmt: skip
        return evaluator(task, context)

    records = answer_records(task, ctx, subsets, 3)  # (key, subset, prediction, answer)
    assert len(records) == 32 and len({r[2] for r in records}) > 10  # varied answers
    by_subset = {s: [r for r in records if r[1] == s] for s in subsets}

    # one answer per sample (FineVision format): each metric is lmms-eval's on the same answers
    from lmms_eval.api.metrics import anls as lmms_anls
    from lmms_eval.tasks.chartqa.utils import relaxed_correctness

    collapse = " ".join  # lmms-eval's ANLS divides by lengths before whitespace is collapsed
    lmms = {
        "exact": lambda p, a: float(exact_match(p, a)),  # vlscale's own (tests/test_metrics.py)
        "vqav2": lambda p, a: float(_lmms_normalise(p) == _lmms_normalise(a)),
        "anls": lambda p, a: lmms_anls([collapse(a.split())], [collapse(p.split())])["anls"],
        "relaxed": lambda p, a: float(relaxed_correctness(p.strip(), a.strip())),
    }
    for metric, (name, _) in ANSWER_METRICS.items():
        got = evaluate(metric)
        assert set(got) == {name, "num_questions"} | {f"{name}/{s}" for s in subsets}
        assert got["num_questions"] == 32
        for s in subsets:
            want = sum(lmms[metric](p, a) for _, _, p, a in by_subset[s]) / len(by_subset[s])
            assert got[f"{name}/{s}"] == pytest.approx(want), metric
    assert evaluate("exact") == vqa_accuracy(records)  # the default: vqa_acc, as before

    # 10 answers per sample: k = (row index % 5) of them the model's answer, written otherwise
    predictions = {key: p for key, _, p, _ in records}
    index = {key: i for i, key in enumerate(sorted(predictions))}

    def ten(key, record):
        k = index.get(key, 0) % 5
        return [f" {predictions.get(key, '')}.\n"] * k + [f"zz{j} filler" for j in range(10 - k)]

    multi = tmp_path / "multi"
    _with_answers(vqa, multi, subsets, ten)
    cfg.data.val = str(multi / "{subset}" / "val-*.tar")
    task.cfg.data.val = cfg.data.val
    got = evaluate("vqav2")
    step = [0.0, 0.3, 0.6, 0.9, 1.0]  # k = 0..4 of 10
    for s in subsets:
        keys = [r[0] for r in by_subset[s]]
        want = sum(step[index[k] % 5] for k in keys) / len(keys)
        assert got[f"vqav2_acc/{s}"] == pytest.approx(want)
    assert got["vqav2_acc"] == pytest.approx(sum(step[i % 5] for i in range(32)) / 32)
    assert evaluate("exact")["vqa_acc"] == pytest.approx(sum(i % 5 > 0 for i in range(32)) / 32)


def test_eval_decoder_reads_the_answers_list(vqa, tmp_path):
    from test_vlm_task import vlm_task

    task = vlm_task(vqa, tmp_path)
    shard = open_shard(str(vqa / "shapes_colour" / "val-000000.tar"))
    sample = shard.read(0)
    record = json.loads(sample["json"])
    assert task.eval_decoder(sample)["answers"] == [record["texts"][-1]["assistant"]]
    for answers, ok in ((["red", "Red", "crimson"], True), ([], False), ("red", False),
                        (["red", 3], False)):  # fmt: skip
        changed = dict(sample, json=json.dumps({**record, "answers": answers}).encode())
        if ok:
            assert task.eval_decoder(changed)["answers"] == answers
        else:
            with pytest.raises(BadSample, match="bad_answers"):
                task.eval_decoder(changed)
