"""Proof that the task contract (core/tasks/base.py) is enough: a new task kind and a new evaluator
defined entirely in this file, registered, trained from a YAML recipe under ddp and fsdp on 2
ranks, evaluated by the declared evaluators, resumed exactly after SIGKILL — with no change to
core/ or launch/. The recipe names this file in `imports:`, which is how each rank (and
`vlscale export`) finds the kind.

The task: classify the synthetic shapes' background colour with a linear head on a ViT.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from core import distributed
from core.config import DataConfig, TaskConfig
from core.data.preprocess import ImageLoader
from core.data.synthetic import BACKGROUNDS
from core.evaluators import EvalContext, Evaluator, register_evaluator
from core.tasks import Task, TaskOutput, register_task
from core.tasks.common import load_tower, make_stream

HERE = Path(__file__).resolve()


@dataclass
class BackgroundConfig(TaskConfig):
    dropout: float = 0.0


@dataclass
class BackgroundDataConfig(DataConfig):
    image_size: int = 32


class DecodeBackground:
    """A shapes sample -> pixels and the index of its background colour."""

    def __init__(self, image_size: int, mean, std):
        self.load = ImageLoader(image_size, mean, std)

    def __call__(self, sample: dict) -> dict:
        attributes = json.loads(sample["json"])
        return {
            "pixel_values": self.load(sample["jpg"]),
            "label": torch.tensor(list(BACKGROUNDS).index(attributes["background"])),
            "key": sample["__key__"],
        }


@register_task
class BackgroundTask(Task):
    kind = "test_background"
    Config = BackgroundConfig
    DataConfig = BackgroundDataConfig

    def __init__(self, cfg):
        super().__init__(cfg)
        self.vision = load_tower("", cfg.model.vision_config, cfg.data.image_size)
        self.dropout = nn.Dropout(cfg.task.dropout)
        self.head = nn.Linear(self.vision.hidden_size, len(BACKGROUNDS))
        self.decode = DecodeBackground(
            self.vision.image_size, self.vision.image_mean, self.vision.image_std
        )

    def blocks(self):
        return {"vision": self.vision.blocks}

    def tokens_per_sample(self):
        return {"vision": self.vision.num_tokens}

    def train_stream(self, dist):
        return make_stream(self.cfg, dist, self.cfg.data.train, self.decode, train=True)

    def val_stream(self, dist, batch_size: int, subsets=None):
        return make_stream(
            self.cfg, dist, self.cfg.data.val, self.decode, train=False, batch_size=batch_size
        )

    def logits(self, pixel_values):
        return self.head(self.dropout(self.vision(pixel_values).mean(dim=1)))

    def loss_weight(self, batch) -> float:
        return float(len(batch["label"]))  # every sample of the global batch weighs the same

    def forward(self, batch) -> TaskOutput:
        logits = self.logits(batch["pixel_values"])
        loss = F.cross_entropy(logits.float(), batch["label"], reduction="sum")
        return TaskOutput(loss=loss, samples=len(batch["label"]))


@register_evaluator
class BackgroundAccuracy(Evaluator):
    name = "test_background_acc"

    def __call__(self, task, ctx: EvalContext) -> dict[str, float]:
        correct = total = 0
        for batch, real in ctx.steps(task.val_stream(ctx.dist, ctx.batch_size)):
            predicted = task.logits(batch["pixel_values"]).argmax(dim=1)
            if not real:  # a padding step (fsdp evaluates sharded: the ranks keep pace)
                continue
            correct += int((predicted == batch["label"]).sum())
            total += len(batch["label"])
        c, t = distributed.all_reduce_sum([torch.tensor(correct), torch.tensor(total)])
        return {"background_acc": c / t, "num_images": t}


def write_recipe(shapes: Path, path: Path, steps: int) -> Path:
    recipe = {
        "imports": [str(HERE)],
        "model": {
            "vision_config": {
                "model_type": "vit",
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "image_size": 32,
                "patch_size": 8,
            }
        },  # fmt: skip
        # ViTModel has a pooler this task does not use: frozen (DDP wants every trained
        # parameter to get a gradient)
        "task": {"kind": "test_background", "freeze": ["vision.pooler.*"]},
        "data": {
            "train": str(shapes / "train-{000000..000003}.tar"),
            "val": str(shapes / "val-000000.tar"),
            "batch_size": 16,
            "num_workers": 1,
        },
        "optim": {"lr": 3e-3, "max_steps": steps, "warmup_steps": 3, "weight_decay": 0.0},
        "engine": {"precision": "fp32"},
        "checkpoint": {"every": 10, "keep": 2},
        "logging": {"every": 1, "progress": False, "wandb": {"mode": "disabled"}},
        "eval": {"batch_size": 64, "evaluators": ["test_background_acc", "loss"]},
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    from core.data.synthetic import write_synthetic_shards

    out = tmp_path_factory.mktemp("shapes")
    write_synthetic_shards(out, n_train=1024, n_val=128, seed=0, shard_size=256, image_size=32)
    return out


def test_a_kind_defined_outside_core_loads_with_its_own_keys(shapes, tmp_path):
    from core.config import ConfigError
    from core.recipe import load_config

    recipe = write_recipe(shapes, tmp_path / "background.yaml", 5)
    cfg = load_config(recipe)
    assert isinstance(cfg.task, BackgroundConfig) and isinstance(cfg.data, BackgroundDataConfig)
    assert cfg.eval.evaluators == [
        {"test_background_acc": {"every": 0}},
        {"loss": {"every": 0, "subsets": []}},
    ]
    with pytest.raises(ConfigError, match="'task.embed_dim' belongs to task.kind siglip"):
        load_config(recipe, ["task.embed_dim=3"])
    with pytest.raises(ConfigError, match="'retrieval' needs a task that is ImageTextEmbedder"):
        load_config(recipe, ["eval.evaluators=[retrieval]"])


@pytest.mark.slow
def test_new_kind_trains_evaluates_and_resumes_under_ddp_and_fsdp(shapes, tmp_path):
    from test_engines import kill_after
    from test_train import assert_bitwise_equal, metrics, run_cli

    from launch.export import consolidated

    steps = 30
    recipe = write_recipe(shapes, tmp_path / "background.yaml", steps)

    def train(run: Path, kind: str):
        return run_cli(["train", str(recipe), f"run_dir={run}", f"engine.kind={kind}"], nproc=2)

    results = {}
    for kind in ("ddp", "fsdp"):
        run = tmp_path / kind
        assert train(run, kind).wait(timeout=600) == 0, kind
        rows = [r for r in metrics(run) if "loss" in r]
        assert len(rows) == steps
        first, last = (sum(r["loss"] for r in rs) / 5 for rs in (rows[:5], rows[-5:]))
        assert last < 0.5 * first, (kind, first, last)
        results[kind] = json.loads((run / "eval.json").read_text())
        assert results[kind]["num_images"] == 128  # the whole split, each image once
        assert results[kind]["background_acc"] > 0.6, results[kind]  # chance: 0.25
    # the same model, data and seed under either engine
    assert abs(results["ddp"]["loss"] - results["fsdp"]["loss"]) < 1e-4

    killed = tmp_path / "killed"
    kill_after(train(killed, "fsdp"), killed, 13)  # after the step-10 checkpoint
    assert train(killed, "fsdp").wait(timeout=600) == 0
    straight = {r["step"]: r["loss"] for r in metrics(tmp_path / "fsdp") if "loss" in r}
    resumed = {r["step"]: r["loss"] for r in metrics(killed) if "loss" in r}
    assert all(resumed[s] == straight[s] for s in range(11, steps + 1))  # bitwise
    assert json.loads((killed / "eval.json").read_text()) == results["fsdp"]
    assert_bitwise_equal(consolidated(killed)[2], consolidated(tmp_path / "fsdp")[2])
