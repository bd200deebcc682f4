"""The cells kind (core/tasks/cells.py): labels read from the shapes' JSON against a scene written
out by hand, the loss and accuracies against per-cell loops, bad metadata skipped, engines that
agree with ddp, a SIGKILL resume that is bitwise exact, and the export loading in transformers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from test_engines import assert_resumed_exactly, kill_after, losses
from test_export import ATOL, processor_pixels
from test_paligemma_task import shard_samples
from test_train import run_cli

from core.data.errors import BadSample
from core.data.synthetic import COLOURS, POSITIONS, SHAPES
from core.recipe import load_config
from core.tasks.cells import cell_labels

STEPS = 6
TINY_VISION = {
    "model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64,
    "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 32, "patch_size": 8,
    "vision_use_head": False,
}  # fmt: skip


def overrides(shapes: Path, run_dir: Path, **extra) -> list[str]:
    over = {
        "run_dir": str(run_dir),
        "model.vision_config": json.dumps(TINY_VISION),
        "data.train": str(shapes / "train-{000000..000002}.tar"),
        "data.val": str(shapes / "val-000000.tar"),
        "data.batch_size": 8,
        "data.num_workers": 0,
        "optim.max_steps": STEPS,
        "optim.warmup_steps": 2,
        "optim.lr": 3e-3,
        "logging.every": 1,
        "logging.progress": "false",
        "logging.wandb.mode": "disabled",
        "logging.report": "false",
        "checkpoint.every": 2,
        "eval.every": 0,
        "eval.batch_size": 16,
        "eval.evaluators": json.dumps(["loss"]),
    }
    over.update(extra)
    return [f"{k}={v}" for k, v in over.items()]


def build(shapes, tmp_path):
    from core.tasks import build_task

    torch.manual_seed(0)
    return build_task(load_config("tiny_cells", overrides(shapes, tmp_path / "run")))


def batch_of(task, shapes: Path, n: int = 6) -> dict:
    from core.data.preprocess import collate

    return collate([task.sample_decoder(s) for s in shard_samples(shapes / "train-000000.tar", n)])


# ------------------------------------------------------------------ labels and the objective


def test_labels_are_each_cells_shape_and_colour():
    scene = {"shapes": [
        {"position": "top left", "shape": SHAPES[2], "colour": list(COLOURS)[5], "size": "small"},
        {"position": "bottom right", "shape": SHAPES[0], "colour": list(COLOURS)[0],
         "size": "large"},
    ]}  # fmt: skip
    kinds, colours = cell_labels(scene)
    assert POSITIONS[0] == "top left" and POSITIONS[8] == "bottom right"
    assert kinds == [3, 0, 0, 0, 0, 0, 0, 0, 1]  # 0 = empty, then SHAPES in order from 1
    assert colours == [6, 0, 0, 0, 0, 0, 0, 0, 1]
    for bad in ({}, {"shapes": "x"}, {"shapes": [{"position": "middle-ish"}]}, ["shapes"]):
        with pytest.raises(BadSample):
            cell_labels(bad)


def test_samples_decode_to_the_jsons_labels_and_bad_ones_are_skipped(shapes_dir, tmp_path):
    task = build(shapes_dir, tmp_path)
    samples = shard_samples(shapes_dir / "train-000000.tar", 4)
    for sample in samples:
        out = task.sample_decoder(sample)
        attributes = json.loads(sample["json"])
        assert out["pixel_values"].shape == (3, 32, 32)
        assert torch.equal(out["pixel_values"], task.preprocess_image(sample["jpg"]))
        for shape in attributes["shapes"]:
            cell = POSITIONS.index(shape["position"])
            assert out["shape_labels"][cell] == 1 + SHAPES.index(shape["shape"])
            assert out["colour_labels"][cell] == 1 + list(COLOURS).index(shape["colour"])
        assert int((out["shape_labels"] > 0).sum()) == len(attributes["shapes"])
    for broken in ({k: v for k, v in samples[0].items() if k != "json"},
                   {**samples[0], "json": b"{not json"},
                   {k: v for k, v in samples[0].items() if k != "jpg"}):  # fmt: skip
        with pytest.raises(BadSample):
            task.sample_decoder(broken)


def test_loss_and_accuracies_equal_per_cell_loops(shapes_dir, tmp_path):
    task = build(shapes_dir, tmp_path).eval()
    batch = batch_of(task, shapes_dir)
    with torch.no_grad():
        out = task(batch)
        shape_logits, colour_logits = task.cell_logits(batch["pixel_values"])
    total, right_shape, right_colour, occupied = 0.0, 0, 0, 0
    for i in range(len(batch["shape_labels"])):
        image = 0.0
        for cell in range(len(POSITIONS)):
            for logits, label in (
                (shape_logits[i, cell], batch["shape_labels"][i, cell]),
                (colour_logits[i, cell], batch["colour_labels"][i, cell]),
            ):
                z = [float(v) for v in logits]
                image += math.log(sum(math.exp(v) for v in z)) - z[int(label)]
            if batch["shape_labels"][i, cell] > 0:
                occupied += 1
                right_shape += int(shape_logits[i, cell].argmax() == batch["shape_labels"][i, cell])
                right_colour += int(
                    colour_logits[i, cell].argmax() == batch["colour_labels"][i, cell]
                )
        total += image / len(POSITIONS)
    assert shape_logits.shape[-1] == 1 + len(SHAPES) and colour_logits.shape[-1] == 1 + len(COLOURS)
    assert float(out.loss) == pytest.approx(total, rel=1e-5)
    assert task.loss_weight(batch) == len(batch["shape_labels"])
    assert float(out.metrics["shape_acc"]) == pytest.approx(right_shape / occupied)
    assert float(out.metrics["colour_acc"]) == pytest.approx(right_colour / occupied)


def test_image_features_are_the_towers_tokens_mean_pooled(shapes_dir, tmp_path):
    task = build(shapes_dir, tmp_path).eval()
    pixels = batch_of(task, shapes_dir, 2)["pixel_values"]
    with torch.no_grad():
        tokens = task.vision(pixels)
        assert tokens.shape[1] == 16  # 32 px, patch 8, no CLS token
        assert torch.allclose(task.image_features(pixels), tokens.mean(dim=1))


def test_built_deferred_is_the_eager_build(shapes_dir, tmp_path):
    from test_deferred_init import assert_deferred_build_is_eager

    assert_deferred_build_is_eager(load_config("tiny_cells", overrides(shapes_dir, tmp_path)))


# ------------------------------------------------------------------ engines, resume, export


def train(shapes, run_dir, kind, **extra):
    args = overrides(shapes, run_dir, **{"engine.kind": kind, "engine.precision": "fp32", **extra})
    return run_cli(["train", "tiny_cells", *args], nproc=2)


# ddp and one engine that shards the parameters: the kind adds a plain linear head outside its
# tower's blocks and nothing an engine treats differently; every engine's parity on such a model
# is tests/test_engines.py's (a 20 s zero3 run here would only repeat it).
ENGINE_KINDS = ("ddp", "fsdp")


@pytest.fixture(scope="module")
def straight(shapes_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cells_engines")
    for kind in ENGINE_KINDS:
        assert train(shapes_dir, root / kind, kind).wait(timeout=600) == 0, f"{kind} failed"
    return root


@pytest.mark.slow
def test_sharded_engines_agree_with_ddp_and_the_loss_goes_down(straight):
    ref = losses(straight / "ddp")
    assert len(ref) == STEPS and ref[-1] < ref[0]
    for kind in ENGINE_KINDS[1:]:
        theirs = losses(straight / kind)
        assert len(theirs) == STEPS
        assert max(abs(a - b) / abs(b) for a, b in zip(theirs, ref)) <= 1e-4, kind


@pytest.mark.slow
def test_sigkill_and_restart_is_bitwise_exact(shapes_dir, tmp_path, straight):
    run = tmp_path / "killed"
    kill_after(train(shapes_dir, run, "fsdp"), run, 3)
    assert train(shapes_dir, run, "fsdp").wait(timeout=600) == 0
    assert_resumed_exactly(run, straight / "fsdp", STEPS)


@pytest.mark.slow
def test_export_vision_loads_in_transformers(shapes_dir, straight, tmp_path):
    from transformers import SiglipVisionModel

    from launch.export import consolidated, export

    run = straight / "ddp"
    export(run, tmp_path / "out")
    task = consolidated(run)[0].eval()
    data = shard_samples(shapes_dir / "val-000000.tar", 1)[0]["jpg"]
    pixels = task.preprocess_image(data)
    # the image processor exported beside it preprocesses as training did
    theirs = processor_pixels(tmp_path / "out" / "vision", data)
    torch.testing.assert_close(theirs, pixels, rtol=0, atol=ATOL)
    hf = SiglipVisionModel.from_pretrained(tmp_path / "out" / "vision").eval()
    with torch.no_grad():
        ours = task.vision(pixels[None])
        theirs = hf(pixel_values=pixels[None]).last_hidden_state
    assert torch.allclose(ours, theirs, atol=1e-5)
