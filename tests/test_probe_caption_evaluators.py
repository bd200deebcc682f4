"""The `linear_probe`, `captioning` and `scoring_classifier` evaluators, on tiny synthetic shapes
shards and fake tasks whose features, captions and scores are known: each number against an
independent reference (scikit-learn's LogisticRegression, hand-computed BLEU and CIDEr, brute
force), on 1 rank and on 2 (the gather answered with both ranks' objects); parse_caption's round
trip; the image features of tiny VLM and PaliGemma tasks."""

from __future__ import annotations

import hashlib
import json
import math
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from core import distributed
from core.config import ConfigError
from core.data import synthetic
from core.data.preprocess import collate, with_attributes
from core.data.shards import write_tar
from core.data.stream import ShardStream
from core.distributed import DistInfo
from core.evaluators import (
    EVALUATORS,
    EvalContext,
    build_evaluators,
    check_capabilities,
    resolve_evaluators,
)
from core.evaluators.captioning import bleu_cider, caption_tokens
from core.evaluators.linear_probe import fit_logistic, fit_ridge, probe_accuracy
from core.recipe import load_config
from core.tasks import Captioner, ImageEncoder

CPU = torch.device("cpu")
ONE_RANK = DistInfo(rank=0, world_size=1, local_rank=0, device=CPU)
PROBE_CLASSES = {"colour": list(synthetic.COLOURS), "shape": list(synthetic.SHAPES),
                 "position": list(synthetic.POSITIONS)}  # fmt: skip


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """train-000000..000003.tar (100 samples each, ~80 one-shape in all), val-000000.tar (100)
    and val-000001.tar (50); 16 px images."""
    out = tmp_path_factory.mktemp("probe_shapes")
    synthetic.write_synthetic_shards(out, n_train=400, n_val=150, seed=1, shard_size=100,
                                     image_size=16)  # fmt: skip
    return out


def read_samples(paths: list[Path]) -> list[dict]:
    """Every sample of the tars in order, read with tarfile (not the repo's readers)."""
    samples = []
    for path in paths:
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                key, _, ext = member.name.partition(".")
                if not samples or samples[-1]["key"] != key:
                    samples.append({"key": key})
                samples[-1][ext] = tar.extractfile(member).read()
    return samples


def labels_of(sample: dict) -> dict | None:
    shapes = json.loads(sample["json"])["shapes"]
    if len(shapes) != 1:
        return None
    return {name: classes.index(shapes[0][name]) for name, classes in PROBE_CLASSES.items()}


def ctx_for(dist: DistInfo, batch_size: int, tmp_path: Path, **data) -> EvalContext:
    cfg = load_config("tiny_siglip", [f"eval.batch_size={batch_size}"]
                      + [f"data.{k}={v}" for k, v in data.items()])  # fmt: skip
    return EvalContext(cfg=cfg, dist=dist, step=0, run_dir=tmp_path)


def two_ranks(monkeypatch, run) -> dict:
    """`run(dist)` as rank 1 then rank 0 of 2 ranks, each all_gather_object answered with both
    ranks' objects; rank 0's result (rank 1 returns {})."""
    sent = []

    def gather_on_rank1(obj):
        sent.append(obj)
        return [None, obj]  # rank 1 does not look at rank 0's part

    with monkeypatch.context() as patch:
        patch.setattr(distributed, "all_gather_object", gather_on_rank1)
        assert run(DistInfo(rank=1, world_size=2, local_rank=1, device=CPU)) == {}
        answers = iter(sent)
        patch.setattr(distributed, "all_gather_object", lambda obj: [obj, next(answers)])
        out = run(DistInfo(rank=0, world_size=2, local_rank=0, device=CPU))
    assert next(answers, None) is None  # both ranks made the same gathers
    return out


# ---------------------------------------------------------------------------- the probe's fit
def sklearn_probe(train_x, train_y, val_x, l2: float, method: str):
    """scikit-learn's classifier for `method`, fitted on standardised features, and the
    standardised validation features."""
    from sklearn.linear_model import LogisticRegression, RidgeClassifier
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_x)
    n = len(train_x)
    if method == "ridge":  # sklearn's ridge sums the squared errors: ours is their mean
        model = RidgeClassifier(alpha=l2 * n)
    else:  # sklearn minimises C * sum(cross-entropy) + |W|^2 / 2: ours times C * n
        model = LogisticRegression(C=1 / (l2 * n), tol=1e-12, max_iter=100_000)
    model.fit(scaler.transform(train_x), train_y)
    return model, scaler.transform(val_x)


@pytest.mark.parametrize("method", ["ridge", "logistic"])
def test_probe_fits_are_sklearns(method):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 12)) * rng.uniform(0.1, 5, size=12) + rng.normal(size=12)
    y = (x[:, :3] @ rng.normal(size=(3, 5)) + rng.normal(size=(300, 5)) * 2).argmax(1)
    for l2 in (1e-1, 1e-3):
        model, val = sklearn_probe(x[:200], y[:200], x[200:], l2, method)
        mean, std = x[:200].mean(0), x[:200].std(0)
        z, t = torch.tensor((x[:200] - mean) / std), torch.tensor(y[:200])
        if method == "ridge":
            weight, bias = fit_ridge(z, t, 5, l2)
            # sklearn regresses on +-1 targets, twice our 0/1 one-hots minus 1: twice the weights
            np.testing.assert_allclose(2 * weight.T.numpy(), model.coef_, atol=1e-10)
            np.testing.assert_allclose((2 * bias - 1).numpy(), model.intercept_, atol=1e-10)
        else:
            weight, bias = fit_logistic(z, t, 5, l2, 1000)
            # The weights are unique; the unpenalised biases only up to a common constant. Both
            # solvers stop at a gradient near 1e-9: weights of about 1 agree to ~1e-6 at 1e-3.
            np.testing.assert_allclose(weight.T.numpy(), model.coef_, atol=1e-5)
            np.testing.assert_allclose(
                (bias - bias.mean()).numpy(), model.intercept_ - model.intercept_.mean(), atol=1e-5
            )
        expected = (model.predict(val) == y[200:]).mean()
        assert 0.4 < expected < 1  # a problem where the fit matters
        got = probe_accuracy(torch.tensor(x[:200]), t, torch.tensor(x[200:]),
                             torch.tensor(y[200:]), l2, method)  # fmt: skip
        assert got == expected


@pytest.mark.parametrize("method", ["ridge", "logistic"])
def test_probe_hand_cases(method):
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 6, (400,), generator=g)
    separable = torch.eye(6)[labels] * 3 + 0.3 * torch.randn(400, 6, generator=g)
    features = torch.cat([separable, torch.randn(400, 10, generator=g)], dim=1)
    assert probe_accuracy(features[:300], labels[:300], features[300:], labels[300:], 1e-3,
                          method) == 1.0  # fmt: skip
    random_labels = torch.randint(0, 8, (4000,), generator=g)  # unrelated to the features
    noise = torch.randn(4000, 16, generator=g)
    chance = probe_accuracy(noise[:2000], random_labels[:2000], noise[2000:],
                            random_labels[2000:], 1e-3, method)  # fmt: skip
    assert abs(chance - 1 / 8) < 0.03  # 2000 held-out: one standard error is 0.007


# ---------------------------------------------------------------------------- linear_probe
class FakeEncoder(ImageEncoder):
    """Features that encode the image's labels exactly (scaled one-hots of colour, shape and
    position, read from a table of the test's) plus seeded noise, 48 wide; multi-shape images
    get noise only. The pixel values are the features (3 x 4 x 4)."""

    kind = "fake_encoder"
    SCALES = {"colour": 3.0, "shape": 2.0, "position": 2.5}  # accuracies between chance and 1

    def __init__(self, samples: list[dict]):
        self.labels = {hashlib.sha256(s["jpg"]).digest(): labels_of(s) for s in samples}
        self.embedded = 0  # images through image_features

    def preprocess_image(self, data: bytes) -> torch.Tensor:
        digest = hashlib.sha256(data).digest()
        g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
        features = torch.randn(48, generator=g)
        labels, start = self.labels[digest], 0
        for name, classes in PROBE_CLASSES.items():
            if labels is not None:
                features[start + labels[name]] += self.SCALES[name]
            start += len(classes)
        return features.view(3, 4, 4)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        self.embedded += len(pixel_values)
        return pixel_values.flatten(1)


def probe_reference(encoder: FakeEncoder, train: list[dict], val: list[dict], l2: float,
                    method: str = "ridge") -> dict:  # fmt: skip
    """The probe metrics of these samples by scikit-learn."""
    out = {}
    xs = [torch.stack([encoder.image_features(encoder.preprocess_image(s["jpg"])[None])[0]
                       for s in split]).double().numpy() for split in (train, val)]  # fmt: skip
    for name in PROBE_CLASSES:
        ys = [np.array([labels_of(s)[name] for s in split]) for split in (train, val)]
        model, val_x = sklearn_probe(xs[0], ys[0], xs[1], l2, method)
        out[f"probe_{name}_acc"] = float((model.predict(val_x) == ys[1]).mean())
    out["probe_acc"] = sum(out.values()) / 3
    return out


def one_shape(samples: list[dict], n: int) -> list[dict]:
    return [s for s in samples if labels_of(s) is not None][:n]


def run_probe(encoder, options: dict, dist: DistInfo, tmp_path: Path, batch_size: int = 7,
              **data) -> dict:  # fmt: skip
    (evaluator,) = build_evaluators([{"linear_probe": options}], encoder)
    with torch.no_grad():
        return evaluator(encoder, ctx_for(dist, batch_size, tmp_path, **data))


def test_linear_probe_equals_sklearn_on_one_and_two_ranks(shards, tmp_path, monkeypatch):
    train_paths = sorted(shards.glob("train-*.tar"))
    val_paths = sorted(shards.glob("val-*.tar"))
    train, val = read_samples(train_paths), read_samples(val_paths)
    encoder = FakeEncoder(train + val)
    options = {"train": str(shards / "train-{000000..000003}.tar"),
               "val": str(shards / "val-*.tar"), "train_samples": 60, "val_samples": 25,
               "l2": 1e-2}  # fmt: skip
    # 25 of the ~30 one-shape validation images: both shards read
    assert len(one_shape(read_samples(val_paths[:1]), 99)) < 25 < len(one_shape(val, 99))
    for method in ("ridge", "logistic"):
        expected = probe_reference(encoder, one_shape(train, 60), one_shape(val, 25), 1e-2,
                                   method)  # fmt: skip
        for name, classes in PROBE_CLASSES.items():  # the fit matters: not chance, not perfect
            assert 1.5 / len(classes) < expected[f"probe_{name}_acc"] < 0.9, (method, name)
        one = run_probe(encoder, options | {"method": method}, ONE_RANK, tmp_path)
        assert one == pytest.approx(expected, abs=1e-12)
    assert one != pytest.approx(probe_reference(encoder, one_shape(train, 60),
                                                one_shape(val, 25), 1e-2))  # fmt: skip
    encoder.embedded = 0
    two = two_ranks(monkeypatch, lambda dist: run_probe(encoder, options | {"method": "logistic"},
                                                        dist, tmp_path))  # fmt: skip
    assert two == pytest.approx(one, abs=1e-12)
    assert encoder.embedded == 60 + 25  # each image by one rank

    # The recipe's data.train / data.val by default; one set of shards for both: validated on
    # the labelled images after the training ones.
    same = {"train_samples": 40, "val_samples": 20, "l2": 1e-2}
    pattern = str(shards / "train-*.tar")
    got = run_probe(encoder, same, ONE_RANK, tmp_path, batch_size=64, train=pattern, val=pattern)
    labelled = one_shape(train, 60)
    assert got == pytest.approx(probe_reference(encoder, labelled[:40], labelled[40:], 1e-2),
                                abs=1e-12)  # fmt: skip


def test_linear_probe_errors(shards, tmp_path):
    encoder = FakeEncoder(read_samples(sorted(shards.glob("*.tar"))))
    plain = tmp_path / "plain-000000.tar"  # image-caption pairs without shapes metadata
    write_tar(plain, [(f"{i:03d}", {"jpg": read_samples([shards / "val-000000.tar"])[i]["jpg"],
                                    "txt": b"a caption"}) for i in range(3)])  # fmt: skip
    with pytest.raises(ConfigError, match="carry no shapes JSON.*set the evaluator's train"):
        run_probe(encoder, {"train": str(plain)}, ONE_RANK, tmp_path, val=str(plain))
    with pytest.raises(ConfigError, match=r"data.train is '.*\{subset\}.*'; set the evaluator's"):
        run_probe(encoder, {}, ONE_RANK, tmp_path, train="/x/{subset}/train-*.tar")
    with pytest.raises(ConfigError, match="none left after the 500 training ones"):
        run_probe(encoder, {"train_samples": 500, "train": str(shards / "val-*.tar"),
                            "val": str(shards / "val-*.tar")}, ONE_RANK, tmp_path)  # fmt: skip


# ---------------------------------------------------------------------------- declarations
class NoCapability:
    kind = "plain"


@pytest.mark.parametrize(
    "declared, expected",
    [
        ({"linear_probe": {"train_samples": 0}}, r"linear_probe.train_samples=0: at least 1"),
        ({"linear_probe": {"l2": 0}}, r"linear_probe.l2=0.0: a positive"),
        ({"linear_probe": {"method": "svm"}}, r"linear_probe.method.*'ridge'.*'logistic'"),
        ({"linear_probe": {"val": "d/{subset}/val.tar"}}, r"not a \{subset\} pattern"),
        ({"captioning": {"samples": -1}}, r"captioning.samples=-1"),
        ({"captioning": {"max_new_tokens": 0}}, r"captioning.max_new_tokens=0"),
        ({"scoring_classifier": {"classes": "imagenet"}}, r"classes='imagenet'; known: shapes"),
    ],
)
def test_bad_options_are_clear_errors(declared, expected):
    with pytest.raises(ConfigError, match=expected):
        resolve_evaluators([declared])


def test_declared_in_recipes_with_their_capabilities():
    cfg = load_config("tiny_siglip")
    (probe,) = [e["linear_probe"] for e in cfg.eval.evaluators if "linear_probe" in e]
    assert probe == {"every": 0, "train": "", "val": "", "train_samples": 512, "val_samples": 100,
                     "method": "ridge", "l2": 1e-4, "max_iter": 1000,
                     "image_keys": "jpg;png;webp"}  # fmt: skip
    declared = [{"captioning": {"max_new_tokens": 8, "samples": 4}}, "scoring_classifier"]
    assert resolve_evaluators(declared) == [
        {"captioning": {"every": 0, "max_new_tokens": 8, "samples": 4}},
        {"scoring_classifier": {"every": 0, "classes": "shapes"}},
    ]
    assert EVALUATORS["linear_probe"].requires == (ImageEncoder,)
    for name in ("linear_probe", "captioning", "scoring_classifier"):
        with pytest.raises(ConfigError, match=f"'{name}' needs a task that is"):
            check_capabilities([name], NoCapability)
    with pytest.raises(ConfigError, match="'captioning' needs a task that is Captioner"):
        load_config("tiny_siglip", ["eval.evaluators=[captioning]"])  # SigLIP has no decoder
    from core.tasks.paligemma import PaliGemmaTask
    from core.tasks.siglip import SigLIPTask
    from core.tasks.vlm import VLMTask

    for kind in (SigLIPTask, VLMTask, PaliGemmaTask):
        check_capabilities(["linear_probe"], kind)


# ---------------------------------------------------------------------------- captions
def test_parse_caption_round_trip():
    rng = random.Random(0)
    counts = set()
    for _ in range(3000):
        attributes = synthetic.sample_attributes(rng)
        counts.add(attributes["count"])
        parsed = synthetic.parse_caption(synthetic.caption(attributes))
        assert parsed["background"] == attributes["background"]
        assert parsed["count"] == attributes["count"] == len(parsed["shapes"])
        for got, shape in zip(parsed["shapes"], attributes["shapes"], strict=True):
            assert got == {k: shape[k] for k in ("size", "colour", "shape", "position")}
    assert counts == {1, 2, 3}
    one = "a large red circle at the top left on a gray background"
    assert synthetic.parse_caption("  A Large red  circle at the TOP left on a gray background ")
    for broken in ("a large red circle at the top lef on a gray background",  # cut short
                   "a large red circle at the top left",  # no background
                   "a huge red circle at the top left on a gray background",  # no such size
                   "a large red circle at the top left and on a gray background",
                   "a large red circle at the top, a small blue cross at the left on a white "
                   "background",  # a list without "and"
                   one.replace(" on ", " and a small red cross at the left and a small red "
                                       "cross at the right on "), ""):  # fmt: skip
        assert synthetic.parse_caption(broken) is None, broken


def test_bleu_and_cider_hand_cases():
    assert caption_tokens("A red circle, on a (gray) background.") == \
        "a red circle on a gray background"  # fmt: skip
    bleu, _ = bleu_cider(
        ["a red circle on a gray background"] * 2,
        ["a red circle on a gray background", "a red circle on a gray background"],
    )
    assert bleu == pytest.approx(1.0)
    # 7 hypothesis words against 8: 1- to 4-gram precisions 7/7, 5/6, 4/5, 3/4; brevity
    # penalty exp(1 - 8/7). BLEU-4 = exp(-1/7) * (1/2)^(1/4).
    bleu, _ = bleu_cider(
        ["a red circle on a gray background"], ["A large red circle on a gray background."]
    )
    assert bleu == pytest.approx(math.exp(-1 / 7) * 0.5**0.25, rel=1e-6)
    # CIDEr-D over 2 images, idf = log(2 / df): image 2 is its reference (1- and 2-grams: cosine
    # 1; no 3- or 4-grams) -> 10 * (1 + 1 + 0 + 0) / 4 = 5; image 1 shares "red" of 2 unigrams
    # (cosine 1/2) and no bigram, same length -> 10 * (1/2) / 4 = 1.25. Mean 3.125.
    _, cider = bleu_cider(["red square", "blue square"], ["red circle", "blue square"])
    assert cider == pytest.approx(3.125)


class FakeCaptioner(Captioner):
    """A validation stream over real shards whose pixel values carry the sample's number, and
    captions and scores looked up by it."""

    kind = "fake_captioner"

    def __init__(self, val: str, captions: dict[int, str], scores=None):
        self.val, self.captions, self.scores = val, captions, scores
        self.calls = []

    def val_stream(self, dist, batch_size, subsets=None):
        def decode(sample):
            number = float(int(sample["__key__"]))
            return {"pixel_values": torch.full((3, 2, 2), number), "key": sample["__key__"],
                    "caption": sample["txt"].decode()}  # fmt: skip

        return ShardStream(self.val, decode=with_attributes(decode), collate=collate,
                           batch_size=batch_size, rank=dist.rank, world_size=dist.world_size,
                           num_workers=0, shuffle=False, epochs=1, drop_last=False)  # fmt: skip

    def caption(self, pixel_values, max_new_tokens):
        self.calls.append(max_new_tokens)
        return [self.captions[int(n)] for n in pixel_values[:, 0, 0, 0]]

    def score_texts(self, pixel_values, texts):
        return torch.stack([self.scores(int(n), texts) for n in pixel_values[:, 0, 0, 0]])


def wrong_colour(attributes: dict) -> str:
    return synthetic.preference_pair(attributes)["rejected"]  # the first shape's colour changed


def generated_captions(samples: list[dict]) -> dict[int, str]:
    """Per sample: its caption (exact), the first colour wrong, case and spacing changed (not
    exact, parses right), or cut short (parses to nothing)."""
    out = {}
    for i, sample in enumerate(samples):
        attributes, reference = json.loads(sample["json"]), sample["txt"].decode()
        out[int(sample["key"])] = [reference, wrong_colour(attributes),
                                   "  " + reference.upper().replace(" ", "  "),
                                   " ".join(reference.split()[:-3])][i % 4]  # fmt: skip
    return out


def caption_reference(samples: list[dict], captions: dict[int, str]) -> dict:
    """The captioning metrics by brute force (BLEU and CIDEr from pycocoevalcap directly, on
    captions split at spaces and commas)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    generated = [captions[int(s["key"])] for s in samples]
    references = [s["txt"].decode() for s in samples]
    scenes = [json.loads(s["json"]) for s in samples]
    exact = [g.split() == r.split() for g, r in zip(generated, references)]
    whole, per = [], {"colour": [], "shape": [], "position": []}
    for g, r, scene in zip(generated, references, scenes):
        # the caption right up to case and spacing (only the four kinds above are generated)
        right = g.lower().split() == r.split()
        whole.append(right)
        if scene["count"] == 1:
            for name in per:  # the wrong-colour caption has the shape and position right
                per[name].append(right or (g == wrong_colour(scene) and name != "colour"))
    tokens = [{i: [t.lower().replace(",", " ")] for i, t in enumerate(texts)}
              for texts in (references, generated)]  # fmt: skip
    bleu, _ = Bleu(4).compute_score(tokens[0], tokens[1], verbose=0)
    cider, _ = Cider().compute_score(tokens[0], tokens[1])
    out = {"caption_exact": np.mean(exact), "caption_bleu4": bleu[3], "caption_cider": cider,
           "caption_shapes_acc": np.mean(whole)}  # fmt: skip
    return out | {f"caption_{name}_acc": np.mean(hits) for name, hits in per.items()}


def run_evaluator(task, declared: dict, dist: DistInfo, tmp_path: Path, batch_size: int = 16):
    (evaluator,) = build_evaluators([declared], task)
    ctx = ctx_for(dist, batch_size, tmp_path)
    with torch.no_grad():
        return evaluator(task, ctx), ctx


def test_captioning_metrics_on_one_and_two_ranks(shards, tmp_path, monkeypatch):
    samples = read_samples(sorted(shards.glob("val-*.tar")))
    captions = generated_captions(samples)
    task = FakeCaptioner(str(shards / "val-*.tar"), captions)
    declared = {"captioning": {"max_new_tokens": 7}}
    one, ctx = run_evaluator(task, declared, ONE_RANK, tmp_path)
    assert set(task.calls) == {7}
    expected = caption_reference(samples, captions)
    assert 0.2 < expected["caption_colour_acc"] < expected["caption_shape_acc"] < 1
    assert one == pytest.approx(expected, abs=1e-12)
    first = sorted(samples, key=lambda s: s["key"])[:8]
    assert ctx.tables["captions"] == [
        {"key": s["key"], "caption": captions[int(s["key"])], "reference": s["txt"].decode()}
        for s in first
    ]
    two = two_ranks(monkeypatch, lambda dist: run_evaluator(task, declared, dist, tmp_path)[0])
    assert two == pytest.approx(one, abs=1e-12)

    # `samples`: the first keys of what the ranks captioned (here one rank: the first read)
    limited, _ = run_evaluator(task, {"captioning": {"samples": 10}}, ONE_RANK, tmp_path, 4)
    read = read_samples([shards / "val-000000.tar"])[:10]  # one rank reads in shard order
    assert limited == pytest.approx(caption_reference(read, captions), abs=1e-12)


def test_without_shapes_metadata(tmp_path):
    val = tmp_path / "val-000000.tar"
    rows = ["a cat on a mat", "two dogs", "a red square"]
    write_tar(val, [(f"{i:03d}", {"jpg": b"", "txt": r.encode()}) for i, r in enumerate(rows)])
    task = FakeCaptioner(str(val), {0: "a cat on a mat", 1: "two cats", 2: "a red square"})
    got, _ = run_evaluator(task, {"captioning": {}}, ONE_RANK, tmp_path)
    assert set(got) == {"caption_exact", "caption_bleu4", "caption_cider"}
    assert got["caption_exact"] == pytest.approx(2 / 3)
    # no classes without the metadata: the scoring classifier says so and reports nothing
    task.scores = lambda number, texts: torch.zeros(len(texts))
    assert run_evaluator(task, {"scoring_classifier": {}}, ONE_RANK, tmp_path)[0] == {}


def scoring_reference(samples: list[dict], scores) -> dict:
    """Brute force: an image is right when its class's score beats every other class's."""
    attributes = [json.loads(s["json"]) for s in samples]
    out, column = {}, 0
    problems = synthetic.class_problems(attributes)
    prompts = [p for _, class_prompts, _ in problems for p in class_prompts]
    for name, class_prompts, labels in problems:
        hits = []
        for sample, label in zip(samples, labels):
            if label < 0:
                continue
            row = scores(int(sample["key"]), prompts)[column : column + len(class_prompts)]
            hits.append(all(row[label] > row[j] for j in range(len(row)) if j != label))
        out[f"scoring_{name}_acc"] = sum(hits) / len(hits)
        column += len(class_prompts)
    return out | {"scoring_acc": sum(out.values()) / len(out)}


def test_scoring_classifier_on_one_and_two_ranks(shards, tmp_path, monkeypatch):
    samples = read_samples(sorted(shards.glob("val-*.tar")))
    by_number = {int(s["key"]): json.loads(s["json"]) for s in samples}

    def scores(number: int, prompts: list[str]) -> torch.Tensor:
        """log p(prompt | image): the true classes' prompts best for 2 images in 3, a wrong one
        best for the third; every 5th image ties everything (a tie counts wrong)."""
        true = set()
        for _, class_prompts, (label,) in synthetic.class_problems([by_number[number]]):
            if label >= 0:
                true.add(class_prompts[label if number % 3 else (label + 1) % len(class_prompts)])
        g = torch.Generator().manual_seed(number)
        noise = -5 - torch.rand(len(prompts), generator=g)
        if number % 5 == 0:
            return torch.full((len(prompts),), -3.0)
        return torch.where(torch.tensor([p in true for p in prompts]), -1.0, noise)

    task = FakeCaptioner(str(shards / "val-*.tar"), {}, scores)
    expected = scoring_reference(samples, scores)
    assert 0.3 < expected["scoring_colour_acc"] < 0.8
    one, _ = run_evaluator(task, {"scoring_classifier": {}}, ONE_RANK, tmp_path)
    assert one == pytest.approx(expected, abs=1e-12)
    two = two_ranks(
        monkeypatch, lambda dist: run_evaluator(task, {"scoring_classifier": {}}, dist, tmp_path)[0]
    )
    assert two == pytest.approx(one, abs=1e-12)


# ---------------------------------------------------------------------------- real towers
def test_vlm_and_paligemma_image_features(vqa, tmp_path):
    from test_paligemma_task import build as paligemma_task
    from test_vlm_task import vlm_task

    from core.data.prefix_lm import paligemma_tokenizer

    paligemma_tokenizer(vqa / "tokenizer", tmp_path / "pg_tok")
    (sample,) = read_samples([vqa / "shapes_colour" / "val-000000.tar"])[:1]
    image = next(v for k, v in sample.items() if k.endswith(("jpg", "png")))
    raw = {("__key__" if k == "key" else k): v for k, v in sample.items()}
    for task, tower in ((vlm_task(vqa, tmp_path / "vlm"), "vision"),
                        (paligemma_task(vqa, tmp_path / "pg_tok", tmp_path / "pg"),
                         "model.vision")):  # fmt: skip
        assert isinstance(task, ImageEncoder)
        task.eval()
        pixels = task.preprocess_image(image)
        # exactly as the validation stream decodes the sample's image
        torch.testing.assert_close(pixels, task.train_decoder(raw)["pixel_values"][0],
                                   rtol=0, atol=0)  # fmt: skip
        batch = torch.stack([pixels, -pixels])
        with torch.no_grad():
            features = task.image_features(batch)
            hidden = task.get_submodule(tower)(batch)
        assert features.shape == (2, task.get_submodule(tower).hidden_size)
        torch.testing.assert_close(features, hidden.mean(dim=1))  # no CLS in a SigLIP tower
