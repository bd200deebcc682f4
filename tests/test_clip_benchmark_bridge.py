"""The clip_benchmark bridge: `zeroshot_classification` and `zeroshot_retrieval` on datasets in
clip_benchmark's WebDataset layout, checked against clip_benchmark's own code.

The tiny datasets are written by clip_benchmark's own converter (webdataset_builder.py) and read
back by its own reader (`build_wds_dataset`); its metric modules score the same model. Its
datasets/builder.py and webdataset_builder.py import torchvision at the top, which .venv
deliberately lacks (see constraints.txt), so the functions used here are compiled from their
installed source: clip_benchmark's code, verbatim.
"""

from __future__ import annotations

import ast
import io
import json
import os
import random
from pathlib import Path

import clip_benchmark
import numpy as np
import pytest
import torch
import webdataset
from clip_benchmark.metrics import zeroshot_classification as cb_classification
from clip_benchmark.metrics import zeroshot_retrieval as cb_retrieval
from PIL import Image
from sklearn.metrics import balanced_accuracy_score
from test_train import tiny_overrides
from torch.utils.data import DataLoader, default_collate
from tqdm import tqdm

from core.config import ConfigError
from core.data import synthetic
from core.data.wds_benchmark import BenchmarkData
from core.distributed import DistInfo
from core.evaluators import EVALUATORS, EvalContext, build_evaluators
from core.metrics import classification_metrics, multi_caption_retrieval
from core.recipe import load_config
from core.tasks import build_task
from launch.cli import main

CB = Path(clip_benchmark.__file__).parent
DIST = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
CLASSES = ["red", "orange", "yellow", "green", "blue", "purple"]
TEMPLATES = ["a photo of a {c} shape.", "a {c} thing on a plain background."]


def clip_benchmark_code(relative: str, *names: str, fix: tuple[str, str] | None = None,
                        **namespace) -> dict:  # fmt: skip
    """Top-level functions of clip_benchmark's module `relative`, compiled from its source (with
    one text replacement `fix`, when given) in a namespace of the modules they use."""
    path = CB / relative
    source = path.read_text()
    if fix:
        assert source.count(fix[0]) == 1
        source = source.replace(*fix)
    tree = ast.parse(source)
    nodes = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in names]
    assert sorted(n.name for n in nodes) == sorted(names)
    namespace |= {"os": os, "io": io, "torch": torch, "webdataset": webdataset, "tqdm": tqdm,
                  "default_collate": default_collate}  # fmt: skip
    exec(compile(ast.Module(nodes, type_ignores=[]), str(path), "exec"), namespace)
    return namespace


BUILDER = clip_benchmark_code(
    "datasets/builder.py", "build_wds_dataset", "image_captions_collate_fn"
)
WRITER = clip_benchmark_code(
    "webdataset_builder.py", "convert_dataset", "convert_retrieval_dataset", "PIL_to_bytes"
)
# clip_benchmark's zero-shot classification as installed fails under NumPy >= 2.4 (the pinned
# 2.4.6): `accuracy` calls float() on a 1-element array, which NumPy 2.4 refuses. Compiled with
# that sum taken without keepdim (a 0-d array: the same number); the rest is its code.
CLASSIFICATION = clip_benchmark_code(
    "metrics/zeroshot_classification.py", "accuracy", "evaluate",
    fix=(".sum(0, keepdim=True).cpu().numpy()", ".sum(0).cpu().numpy()"),
    zero_shot_classifier=cb_classification.zero_shot_classifier,
    run_classification=cb_classification.run_classification,
    balanced_accuracy_score=balanced_accuracy_score,
)  # fmt: skip


def shape_image(colour: str, rng: random.Random, size: int = 32) -> Image.Image:
    shape = {"colour": colour, "shape": rng.choice(synthetic.SHAPES), "size": "large",
             "position": rng.choice(synthetic.POSITIONS), "jitter": [0, 0]}  # fmt: skip
    attributes = {"shapes": [shape], "background": rng.choice(list(synthetic.BACKGROUNDS))}
    return synthetic.render(attributes, size)


class Listed(list):
    """A list dataset with the attributes clip_benchmark's converter writes out."""

    classes: list[str] | None = None
    templates: list[str] | None = None


@pytest.fixture(scope="module")
def imagenet_like(tmp_path_factory) -> Path:
    """6 colour classes x 4 images (webp), 10 a shard: test/0.tar..2.tar + the text files."""
    rng = random.Random(0)
    dataset = Listed((shape_image(CLASSES[i % 6], rng), i % 6) for i in range(24))
    dataset.classes, dataset.templates = CLASSES, TEMPLATES
    root = tmp_path_factory.mktemp("cls") / "wds_shapes_cls"
    WRITER["convert_dataset"](dataset, "test", str(root), transform=WRITER["PIL_to_bytes"]("webp"),
                              max_count=10, verbose=False)  # fmt: skip
    return root


@pytest.fixture(scope="module")
def coco_like(tmp_path_factory) -> Path:
    """12 images (jpg) with 5 captions each, 5 a shard, as COCO / Flickr30k are converted."""
    rng = random.Random(1)
    rows = []
    for i in range(12):
        colour = CLASSES[i % 6]
        image = shape_image(colour, rng)
        # Distinct captions: a caption two images share ties, and ties count against the model
        # where clip_benchmark's topk breaks them by position (test_hand_checked_cases).
        rows.append((image, [f"{colour} shape number {i}", f"a {colour} picture, {i}",
                             f"image {i}", f"something {colour} ({i})",
                             f"a drawing of a {colour} shape, the {i}th"]))  # fmt: skip
    root = tmp_path_factory.mktemp("captions") / "wds_shapes_captions"
    WRITER["convert_retrieval_dataset"](Listed(rows), "test", str(root), image_format="jpg",
                                        transform=WRITER["PIL_to_bytes"]("jpg"), max_count=5,
                                        verbose=False)  # fmt: skip
    return root


@pytest.fixture(scope="module")
def task(shapes_dir, tmp_path_factory):
    cfg = load_config("tiny_siglip", tiny_overrides(shapes_dir, tmp_path_factory.mktemp("r"), 1))
    torch.manual_seed(0)
    return build_task(cfg).eval()


def run(task, name: str, batch_size: int = 5, **options) -> dict:
    (evaluator,) = build_evaluators([{name: options}], task)
    cfg = load_config("tiny_siglip", [f"eval.batch_size={batch_size}"])
    with torch.no_grad():
        return evaluator(task, EvalContext(cfg=cfg, dist=DIST, step=0, run_dir=Path(".")))


class CLIPModel:
    """Our task behind the interface clip_benchmark's metric code calls."""

    def __init__(self, task):
        self.task = task

    def encode_image(self, pixels):
        return self.task.encode_image(pixels)

    def encode_text(self, tokens):  # [n, 2, L]: ids and mask, from `tokenizer` below
        return self.task.encode_text(tokens[:, 0], tokens[:, 1])

    def tokenizer(self, texts):
        return torch.stack(self.task.tokenize(list(texts)), dim=1)

    def transform(self, image: Image.Image) -> torch.Tensor:
        """clip_benchmark hands the transform a decoded PIL image; our preprocessing reads files:
        a lossless PNG of the same pixels."""
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return self.task.preprocess_image(buffer.getvalue())


def clip_benchmark_dataset(root: Path, transform=None):
    return BUILDER["build_wds_dataset"]("shapes", transform=transform, split="test",
                                        data_dir=str(root))  # fmt: skip


# ---------------------------------------------------------------------------- the layout
def test_reader_reads_what_clip_benchmark_reads(imagenet_like, coco_like):
    assert sorted(p.name for p in (imagenet_like / "test").iterdir()) == [
        "0.tar", "1.tar", "2.tar", "nshards.txt"]  # fmt: skip
    ours = BenchmarkData(str(imagenet_like))
    theirs = clip_benchmark_dataset(imagenet_like)
    assert (ours.kind, ours.classnames(), ours.templates()) == (
        "classification", theirs.classes, theirs.templates)  # fmt: skip
    read = ours.read(list(range(len(ours))))
    expected = list(theirs)
    assert [label for _, label in read] == [label for _, label in expected] == [
        i % 6 for i in range(24)]  # fmt: skip
    for (data, _), (image, _) in zip(read, expected, strict=True):
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")),
                              np.asarray(image))  # fmt: skip
    captions = BenchmarkData(str(coco_like))
    assert captions.kind == "retrieval" and len(captions) == 12
    assert [c for _, c in captions.read(list(range(12)))] == [
        c for _, c in clip_benchmark_dataset(coco_like)]  # fmt: skip
    assert len(BenchmarkData(str(coco_like), max_samples=7)) == 7


def test_bad_datasets_and_options_are_clear_errors(imagenet_like, coco_like, task, tmp_path):
    with pytest.raises(ConfigError, match="no train/nshards.txt.*splits here: test"):
        BenchmarkData(str(imagenet_like), split="train")
    with pytest.raises(ConfigError, match="a retrieval dataset: use the zeroshot_retrieval"):
        run(task, "zeroshot_classification", root=str(coco_like))
    with pytest.raises(ConfigError, match="not a captions one"):
        run(task, "zeroshot_retrieval", root=str(imagenet_like))
    with pytest.raises(ConfigError, match="root: set the dataset"):
        run(task, "zeroshot_retrieval")
    with pytest.raises(ConfigError, match=r"ks=\[0\]"):
        run(task, "zeroshot_retrieval", root=str(coco_like), ks=[0])
    with pytest.raises(ConfigError, match=r"use \{c\} for the class name"):
        run(task, "zeroshot_classification", root=str(imagenet_like), templates=["a {} photo"])
    with pytest.raises(ConfigError, match="no such file"):
        run(task, "zeroshot_classification", root=str(imagenet_like), classnames="nope.txt")
    with pytest.raises(FileNotFoundError, match="not a hub id"):
        run(task, "zeroshot_retrieval", root=str(tmp_path / "missing"))


def test_a_hub_id_downloads_the_split_and_the_text_files(imagenet_like, monkeypatch):
    import huggingface_hub

    calls = []

    def snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(imagenet_like)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    data = BenchmarkData("clip-benchmark/wds_imagenet1k", max_samples=3)
    assert calls == [("clip-benchmark/wds_imagenet1k",
                      {"allow_patterns": ["test/*", "*.txt"], "repo_type": "dataset"})]  # fmt: skip
    assert data.root == imagenet_like and len(data) == 3


# ---------------------------------------------------------------------------- the metrics
def test_classification_metrics_equal_clip_benchmarks():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(300, 12, generator=gen)
    labels = torch.randint(0, 11, (300,), generator=gen)  # class 11 never occurs
    labels[:100] = 3  # imbalanced: balanced accuracy differs from accuracy
    logits[:60, 3] += 2.0
    ours = classification_metrics(logits, labels)
    acc1, acc5 = CLASSIFICATION["accuracy"](logits, labels, topk=(1, 5))
    balanced = balanced_accuracy_score(labels, logits.argmax(axis=1))
    assert ours["acc1"] == pytest.approx(acc1, abs=1e-9)
    assert ours["acc5"] == pytest.approx(acc5, abs=1e-9)
    assert ours["mean_per_class_recall"] == pytest.approx(balanced, abs=1e-9)
    assert abs(balanced - acc1) > 0.01  # the two differ here: the test can tell them apart


def test_retrieval_metrics_equal_clip_benchmarks():
    gen = torch.Generator().manual_seed(1)
    image = torch.nn.functional.normalize(torch.randn(40, 16, generator=gen), dim=-1)
    per_image = [5] * 30 + [4] * 6 + [1] * 4  # COCO has a few images with more or fewer
    text_image = torch.tensor([i for i, n in enumerate(per_image) for _ in range(n)])
    text = torch.nn.functional.normalize(
        image[text_image] + 0.9 * torch.randn(len(text_image), 16, generator=gen), dim=-1
    )
    ks = [1, 2, 5, 10]
    ours = multi_caption_retrieval(image, text, text_image, ks=ks, chunk=17)
    scores = text @ image.T
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(scores)), text_image] = True
    for k in ks:
        t2i = cb_retrieval.batchify(cb_retrieval.recall_at_k, scores, positive, 8, "cpu", k=k)
        i2t = cb_retrieval.batchify(cb_retrieval.recall_at_k, scores.T, positive.T, 8, "cpu", k=k)
        # clip_benchmark: an image (text) is a hit when its recall@k is above 0
        t2i, i2t = (t2i > 0).float().mean().item(), (i2t > 0).float().mean().item()
        assert ours[f"image_retrieval_recall@{k}"] == pytest.approx(t2i, abs=1e-6)
        assert ours[f"text_retrieval_recall@{k}"] == pytest.approx(i2t, abs=1e-6)
    assert 0.1 < ours["image_retrieval_recall@1"] < 0.9  # neither trivial nor hopeless


def test_hand_checked_cases():
    eye = torch.eye(6)
    identity = multi_caption_retrieval(eye, eye, torch.arange(6), ks=[1])
    assert identity == {"image_retrieval_recall@1": 1.0, "text_retrieval_recall@1": 1.0}
    # 4 images e_i, 2 captions each: e_i (its own) and e_{i+1} (its neighbour's image).
    # text -> image: the first caption finds its image first, the second ranks it behind 3
    # (all others score 0 = its own image's score: ties count against): R@1 = 1/2.
    # image -> text: e_i is scored 1 by its own first caption AND by image i-1's second one:
    # a tie at the top, counted against, so no image has a caption alone at rank 1; R@2 = 1.
    image = torch.eye(4)
    text = torch.cat([torch.eye(4), torch.eye(4).roll(1, dims=0)])
    text_image = torch.cat([torch.arange(4), torch.arange(4)])
    got = multi_caption_retrieval(image, text, text_image, ks=[1, 2, 4])
    assert got == {"image_retrieval_recall@1": 0.5, "text_retrieval_recall@1": 0.0,
                   "image_retrieval_recall@2": 0.5, "text_retrieval_recall@2": 1.0,
                   "image_retrieval_recall@4": 1.0, "text_retrieval_recall@4": 1.0}  # fmt: skip
    # Classification: labels 0,0,0,1; the first three right, the last wrong (class 2 wins).
    logits = torch.tensor([[3.0, 1, 0], [2, 1, 0], [5, 0, 1], [0, 1, 2]])
    got = classification_metrics(logits, torch.tensor([0, 0, 0, 1]), ks=[1, 2, 5])
    assert got == {"acc1": 0.75, "acc2": 1.0, "mean_per_class_recall": 0.5}  # no acc5: 3 classes


# ---------------------------------------------------------------------------- end to end
def test_zeroshot_classification_equals_clip_benchmark_on_our_model(imagenet_like, task):
    model = CLIPModel(task)
    ours = run(task, "zeroshot_classification", root=str(imagenet_like))
    dataset = clip_benchmark_dataset(imagenet_like, transform=model.transform)
    with torch.no_grad():
        theirs = CLASSIFICATION["evaluate"](
            model, DataLoader(dataset, batch_size=7), model.tokenizer, dataset.classes,
            dataset.templates, device="cpu", amp=False,
        )  # fmt: skip
    assert set(ours) == {"shapes_cls/acc1", "shapes_cls/acc5", "shapes_cls/mean_per_class_recall",
                         "shapes_cls/num_samples"}  # fmt: skip
    for name in ("acc1", "acc5", "mean_per_class_recall"):
        assert ours[f"shapes_cls/{name}"] == pytest.approx(theirs[name], abs=1e-6), name
    assert ours["shapes_cls/num_samples"] == 24
    # Overrides: two classes' names swapped in a file, one template inline, and a tag.
    names = Path(imagenet_like) / "swapped.txt"
    names.write_text("\n".join([CLASSES[1], CLASSES[0], *CLASSES[2:]]) + "\n")
    swapped = run(task, "zeroshot_classification", root=str(imagenet_like), tag="x",
                  classnames=str(names), templates=["{c}"], max_samples=12)  # fmt: skip
    dataset = list(clip_benchmark_dataset(imagenet_like, transform=model.transform))[:12]
    classes = [CLASSES[1], CLASSES[0], *CLASSES[2:]]
    dataset_classes = type("D", (list,), {"classes": classes})(dataset)
    with torch.no_grad():
        theirs = CLASSIFICATION["evaluate"](
            model, DataLoader(dataset_classes, batch_size=5), model.tokenizer, classes, ["{c}"],
            device="cpu", amp=False,
        )  # fmt: skip
    assert swapped["x/num_samples"] == 12
    for name in ("acc1", "acc5", "mean_per_class_recall"):
        assert swapped[f"x/{name}"] == pytest.approx(theirs[name], abs=1e-6), name


def test_zeroshot_retrieval_equals_clip_benchmark_on_our_model(coco_like, task):
    model = CLIPModel(task)
    ours = run(task, "zeroshot_retrieval", root=str(coco_like), ks=[1, 2, 5, 10])
    dataset = clip_benchmark_dataset(coco_like, transform=model.transform)
    loader = DataLoader(dataset, batch_size=4, collate_fn=BUILDER["image_captions_collate_fn"])
    with torch.no_grad():
        theirs = cb_retrieval.evaluate(model, loader, model.tokenizer, "cpu", amp=False,
                                       recall_k_list=[1, 2, 5, 10])  # fmt: skip
    assert ours.pop("shapes_captions/num_images") == 12
    assert ours.pop("shapes_captions/num_texts") == 60
    assert ours.keys() == {f"shapes_captions/{k}" for k in theirs}
    for name, value in theirs.items():
        assert ours[f"shapes_captions/{name}"] == pytest.approx(value, abs=1e-6), name


# ---------------------------------------------------------------------------- `vlscale eval`
def test_declared_in_training_and_vlscale_eval_agree(shapes_dir, imagenet_like, coco_like,
                                                     tmp_path, capsys):  # fmt: skip
    """Declared in the recipe, the evaluators run at the end of training (eval.json); `vlscale
    eval` on the run's final checkpoint gives the same numbers, in eval_<name>.json."""
    from core.loop import train

    run_dir = tmp_path / "run"
    declared = (f"[{{zeroshot_classification: {{root: {imagenet_like}, tag: cls}}}}, "
                f"{{zeroshot_retrieval: {{root: {coco_like}, tag: ret, ks: [1, 5]}}}}]"
                )  # fmt: skip
    over = tiny_overrides(shapes_dir, run_dir, 2, **{
        "data.train": str(shapes_dir / "train-{000000..000002}.tar"), "data.num_workers": 0,
        "eval.evaluators": declared, "engine.precision": "fp32"})  # fmt: skip
    train(load_config("tiny_siglip", over))
    trained = json.loads((run_dir / "eval.json").read_text())
    assert (
        trained["step"] == 2 and "cls/acc1" in trained and "ret/text_retrieval_recall@5" in trained
    )
    capsys.readouterr()

    assert main(["eval", str(run_dir), "--evaluator", "zeroshot_classification",
                 f"root={imagenet_like}", "tag=cls", "--batch-size", "7"]) == 0  # fmt: skip
    printed = json.loads(capsys.readouterr().out)
    written = json.loads((run_dir / "eval_zeroshot_classification.json").read_text())
    assert written["step"] == 2 and written["options"]["tag"] == "cls"
    assert printed == {"zeroshot_classification": written["metrics"]}
    for key, value in written["metrics"].items():
        assert value == pytest.approx(trained[key], abs=1e-6), key
    assert json.loads((run_dir / "eval.json").read_text()) == trained  # not clobbered

    assert main(["eval", str(run_dir)]) == 0  # the run's declared evaluators
    both = json.loads(capsys.readouterr().out)
    assert set(both) == {"zeroshot_classification", "zeroshot_retrieval"}
    for key, value in both["zeroshot_retrieval"].items():
        assert value == pytest.approx(trained[key], abs=1e-6), key

    assert main(["eval", str(run_dir), "--evaluator", "zeroshot_clasification"]) == 2
    assert "valid: " in capsys.readouterr().err
    assert main(["eval", str(run_dir), "--evaluator", "zeroshot_retrieval", "rot=x"]) == 2
    assert "did you mean 'eval.evaluators.zeroshot_retrieval.root'" in capsys.readouterr().err
    assert {"zeroshot_classification", "zeroshot_retrieval"} <= set(EVALUATORS)


# ---------------------------------------------------------------------------- on 2 ranks
def _two_ranks(rank: int, port: int, shapes: str, roots: tuple[str, str], out) -> None:
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                          WORLD_SIZE="2", LOCAL_RANK=str(rank))  # fmt: skip
        from core.distributed import cleanup, init_distributed

        dist = init_distributed("gloo")
        cfg = load_config("tiny_siglip", tiny_overrides(Path(shapes), Path(shapes) / "r", 1))
        torch.manual_seed(0)
        task = build_task(cfg).eval()
        cfg.eval.batch_size = 5
        ctx = EvalContext(cfg=cfg, dist=dist, step=0, run_dir=Path("."))
        declared = [{"zeroshot_classification": {"root": roots[0], "max_samples": 23}},
                    {"zeroshot_retrieval": {"root": roots[1], "ks": [1, 5]}}]  # fmt: skip
        metrics = {}
        with torch.no_grad():
            for evaluator in build_evaluators(declared, task):
                metrics |= evaluator(task, ctx)
        out.put((rank, metrics))
        torch.distributed.barrier()
        cleanup()
    except BaseException as err:  # the test reports it rather than waiting for a result
        out.put((rank, repr(err)))
        raise


@pytest.mark.slow
def test_two_ranks_share_the_work_and_get_one_ranks_numbers(shapes_dir, imagenet_like,
                                                            coco_like, task):  # fmt: skip
    import multiprocessing as mp
    import queue
    import socket

    expected = run(task, "zeroshot_classification", root=str(imagenet_like), max_samples=23)
    expected |= run(task, "zeroshot_retrieval", root=str(coco_like), ks=[1, 5])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    args = (port, str(shapes_dir), (str(imagenet_like), str(coco_like)), out)
    procs = [ctx.Process(target=_two_ranks, args=(r, *args)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        results = dict(out.get(timeout=300) for _ in procs)  # spawn imports torch: slow
    except queue.Empty:
        codes = [p.exitcode for p in procs]
        raise AssertionError(f"no result within 300 s; exit codes {codes}") from None
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():  # a rank stuck in a collective its failed peer never reached
                p.kill()
    assert results[1] == {}  # rank 0 reports
    assert results[0].keys() == expected.keys()
    for key, value in expected.items():  # 23 images: rank 0 encodes 12, rank 1 11
        assert results[0][key] == pytest.approx(value, abs=1e-6), key
