"""Per-module learning rates (`optim.lr_groups`): which parameters land in which group with which
lr and weight decay, the schedule on each group's own lr, restoring the schedule from a
checkpoint, exact resume under ddp, and the same groups and losses under fsdp, zero2 and zero3."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from test_train import ROOT, assert_bitwise_equal, final_params, metrics, tiny_overrides

from core import preemption
from core.config import ConfigError, OptimConfig
from core.engines.base import Engine
from core.optim import (
    build_optimizer,
    build_scheduler,
    lr_factor,
    optimizer_groups,
    param_groups,
    scaled_lr,
)
from core.recipe import load_config


class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.vision = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
        self.projector = torch.nn.Linear(4, 4)
        self.lm = torch.nn.Linear(4, 4)
        self.lm.bias.requires_grad_(False)
        self.logit_scale = torch.nn.Parameter(torch.tensor(1.0))


def _layout(groups: list[dict], model: torch.nn.Module) -> list[tuple]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [
        (g["name"], g.get("lr"), g["weight_decay"], sorted(names[id(p)] for p in g["params"]))
        for g in groups
    ]


def test_groups_by_pattern_first_match_wins_decay_split_kept():
    toy = Toy()
    lr_groups = {"vision.1": 1e-4, "vision": 2e-6, "proj*": 1e-3, "logit_scale": 5e-2}
    groups = param_groups(toy, 0.1, lr_groups, lr_scale=2.0)
    assert _layout(groups, toy) == [
        ("default", None, 0.1, ["lm.weight"]),  # optim.lr's: the optimizer's own lr
        ("default", None, 0.0, []),  # lm.bias is frozen: no optimizer state at all
        ("vision.1", 2e-4, 0.0, ["vision.1.bias", "vision.1.weight"]),  # norm: no decay group
        ("vision", 4e-6, 0.1, ["vision.0.weight"]),  # a bare name is the module's subtree
        ("vision", 4e-6, 0.0, ["vision.0.bias"]),
        ("proj*", 2e-3, 0.1, ["projector.weight"]),  # globs; lr scaled like optim.lr
        ("proj*", 2e-3, 0.0, ["projector.bias"]),
        ("logit_scale", 0.1, 0.0, ["logit_scale"]),  # a parameter's own name
    ]
    # Without lr_groups: the two groups as before.
    assert [(g["name"], len(g["params"])) for g in param_groups(toy, 0.1)] == [
        ("default", 3),
        ("default", 5),
    ]


@pytest.mark.parametrize(
    "lr_groups, expected",
    [
        ({"text": 1e-3}, r"'text' matches no trained parameter; the top-level modules are "
                         r"vision, projector, lm, logit_scale"),
        ({"lm.bias": 1e-3}, r"'lm.bias' matches only frozen parameters"),
        ({"vision": 1e-3, "vision.0": 1e-4}, r"'vision.0' matches only .* an earlier pattern"),
    ],
)  # fmt: skip
def test_a_pattern_without_trained_parameters_is_an_error(lr_groups, expected):
    with pytest.raises(ConfigError, match=expected):
        param_groups(Toy(), 0.1, lr_groups)


def test_schedule_warms_up_and_decays_each_groups_own_lr():
    toy = Toy()
    cfg = OptimConfig(lr=1e-3, lr_groups={"projector": 1e-2, "vision": 1e-5}, lr_base_batch=32)
    cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio = 4, 12, 0.1
    lr = scaled_lr(cfg, 64)  # the linear scaling rule at a global batch of 64: every lr x 2
    optimizer = build_optimizer(toy, cfg, lr)
    scheduler = build_scheduler(optimizer, cfg, cfg.max_steps)
    bases = {"default": 2e-3, "projector": 2e-2, "vision": 2e-5}
    assert {g["name"]: g["initial_lr"] for g in optimizer.param_groups} == bases
    for step in range(cfg.max_steps):
        factor = lr_factor(step, 4, 12, 0.1)
        for group in optimizer.param_groups:
            assert group["lr"] == pytest.approx(bases[group["name"]] * factor, rel=1e-12)
        optimizer.step()
        scheduler.step()
    # What the DeepSpeed engine builds its optimizer from (less the empty groups): the same.
    plain = [(n, wd, ps) for n, _, wd, ps in _layout(optimizer.param_groups, toy)]
    assert [(n, wd, ps) for n, _, wd, ps in _layout(optimizer_groups(toy, cfg, lr), toy)] == plain


class _Engine(Engine):
    def __init__(self, cfg: OptimConfig, total: int):
        self.model = Toy()
        self.optimizer = build_optimizer(self.model, cfg, cfg.lr)
        self.scheduler = build_scheduler(self.optimizer, cfg, total)


def test_load_scheduler_keeps_this_runs_base_lrs_and_sets_the_schedules_lr():
    cfg = OptimConfig(lr=1e-3, lr_groups={"projector": 1e-2}, warmup_steps=2, max_steps=6)
    saved = _Engine(cfg, 6)
    for _ in range(4):
        saved.optimizer.step()
        saved.scheduler.step()
    state = saved.scheduler.state_dict()
    factor = lr_factor(4, 2, 6, 0)
    assert saved.lrs == {"default": 1e-3 * factor, "projector": 1e-2 * factor}

    same = _Engine(cfg, 6)  # the same config: the very values the run had
    same.load_scheduler(state)
    assert [g["lr"] for g in same.optimizer.param_groups] == [
        g["lr"] for g in saved.optimizer.param_groups
    ]
    # A longer run and a new lr (resume_changes=allow): both apply from the first step.
    changed = OptimConfig(lr=5e-4, lr_groups={"projector": 2e-2}, warmup_steps=2, max_steps=10)
    longer = _Engine(changed, 10)
    longer.load_scheduler(state)
    assert longer.scheduler.last_epoch == 4
    assert longer.lrs == {
        "default": 5e-4 * lr_factor(4, 2, 10, 0),
        "projector": 2e-2 * lr_factor(4, 2, 10, 0),
    }
    assert longer.lr == longer.lrs["default"]


def test_deepspeed_universal_load_repair_keeps_each_groups_own_lr():
    """DeepSpeed's ZeRO-3 universal load gives every group the saved group 0's settings; the
    repair and the schedule give each group back its own name, weight decay and lr."""
    from core.engines.zero import group_hyperparameters, repair_universal_load

    cfg = OptimConfig(lr=1e-3, lr_groups={"projector": 1e-2}, warmup_steps=2, max_steps=6)
    saved = _Engine(cfg, 6)
    for _ in range(3):
        saved.optimizer.step()
        saved.scheduler.step()
    engine = _Engine(cfg, 6)
    hyper = group_hyperparameters(engine.optimizer)
    for group in engine.optimizer.param_groups[1:]:  # the slip
        group.update({k: v for k, v in saved.optimizer.param_groups[0].items() if k != "params"})
    repair_universal_load(engine.optimizer, hyper)
    engine.load_scheduler(saved.scheduler.state_dict())
    got = [(g["name"], g["weight_decay"], g["lr"]) for g in engine.optimizer.param_groups]
    want = [(g["name"], g["weight_decay"], g["lr"]) for g in saved.optimizer.param_groups]
    assert got == want and engine.lrs == saved.lrs
    assert engine.lrs["projector"] == 1e-2 * lr_factor(3, 2, 6, 0)


# ---------------------------------------------------------------- training runs


def _overrides(shapes_dir: Path, run: Path, steps: int, **extra) -> list[str]:
    extra = {
        "data.train": str(shapes_dir / "train-{000000..000002}.tar"),
        "data.val": str(shapes_dir / "val-000000.tar"),
        "data.num_workers": 0,
        "eval.evaluators": "[]",
        "optim.lr_groups": "{text_proj: 1.0e-2}",
        **extra,
    }
    return tiny_overrides(shapes_dir, run, steps, **extra)


def test_two_lr_groups_resume_bitwise_after_an_interruption(shapes_dir, tmp_path, monkeypatch):
    import core.loop
    from core.loop import train

    straight = tmp_path / "straight"
    train(load_config("tiny_siglip", _overrides(shapes_dir, straight, 8)))

    real_step, calls = core.loop.train_step, {"n": 0}

    def train_step(*args, **kwargs):  # a preemption signal during step 3
        calls["n"] += 1
        if calls["n"] == 3:
            preemption.request()
        return real_step(*args, **kwargs)

    run = tmp_path / "run"
    monkeypatch.setattr(core.loop, "train_step", train_step)
    try:
        with pytest.raises(preemption.Interrupted, match="stopped at step 3"):
            train(load_config("tiny_siglip", _overrides(shapes_dir, run, 8)))
    finally:
        preemption.reset()
    monkeypatch.undo()
    train(load_config("tiny_siglip", _overrides(shapes_dir, run, 8)))

    assert [r["step"] for r in metrics(run) if r.get("event") == "resume"] == [3]
    assert_bitwise_equal(final_params(straight), final_params(run))
    ref = {r["step"]: r for r in metrics(straight) if "loss" in r}
    rows = {r["step"]: r for r in metrics(run) if "loss" in r}
    for step in range(1, 9):
        assert rows[step]["loss"] == ref[step]["loss"]
        factor = lr_factor(step, 5, 8, 0.0)
        assert rows[step]["lr"] == ref[step]["lr"] == pytest.approx(2e-3 * factor)
        assert rows[step]["lr/text_proj"] == ref[step]["lr/text_proj"]
        assert rows[step]["lr/text_proj"] == pytest.approx(1e-2 * factor)


ENGINES_SCRIPT = """
import json, sys
from pathlib import Path
sys.path.insert(0, {root!r})
from core.recipe import load_config
from core.distributed import barrier, init_distributed
from core.engines import build_engine
from core.tasks import build_task
from core.loop import seed_everything, train_step
dist = init_distributed("gloo")
out = {{}}
for kind in ("ddp", "fsdp", "zero2", "zero3"):
    cfg = load_config("tiny_siglip", {overrides!r} + [f"engine.kind={{kind}}"])

    def fresh():
        seed_everything(0)
        task = build_task(cfg)
        return task, build_engine(task, cfg, dist, cfg.optim.lr, cfg.optim.max_steps)

    task, engine = fresh()
    seed_everything(1000 * dist.rank)
    stream = iter(task.train_stream(dist))
    batches = [next(stream) for _ in range(3)]
    opt = getattr(engine, "base_optimizer", engine.optimizer)
    names = {{id(p): n for n, p in task.named_parameters()}}
    groups = [
        (g["name"], g["weight_decay"], sorted(names.get(id(p), "?") for p in g["params"]))
        for g in opt.param_groups if g["params"]
    ]
    rows, ckpt = [], Path(sys.argv[1]).parent / f"ckpt-{{kind}}"
    for i in range(3):
        if i == 2:  # a checkpoint after two steps
            if dist.rank == 0:
                ckpt.mkdir()
            barrier()
            engine.save(ckpt)
            barrier()
        result = train_step(task, engine, iter(batches[i : i + 1]), 1, dist)
        rows.append({{"loss": result.loss, **engine.lrs}})
    task, engine = fresh()  # a new job: loads it, takes the third step again
    engine.load(ckpt)
    opt = getattr(engine, "base_optimizer", engine.optimizer)
    hyper = [(g["name"], g["weight_decay"]) for g in opt.param_groups if g["params"]]
    result = train_step(task, engine, iter(batches[2:]), 1, dist)
    resumed = {{"loss": result.loss, **engine.lrs}}
    out[kind] = {{"groups": groups, "rows": rows, "resumed": resumed, "hyper": hyper}}
if dist.rank == 0:
    open(sys.argv[1], "w").write(json.dumps(out))
"""


@pytest.mark.slow
def test_lr_groups_under_every_engine_agree(shapes_dir, tmp_path):
    """Two ranks, three steps each: the same groups (DeepSpeed's less the empty ones, ZeRO-2's
    parameters being flat partitions by then, so only the names are compared there), the same
    per-group learning rates, and the losses of ddp; and each engine's checkpoint after two
    steps gives a new engine the very same third step, with its groups' names and weight decay."""
    over = _overrides(shapes_dir, tmp_path / "run", 3)
    script = tmp_path / "engines.py"
    script.write_text(textwrap.dedent(ENGINES_SCRIPT.format(root=str(ROOT), overrides=over)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--master_port=29890", str(script), str(tmp_path / "out.json")]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads((tmp_path / "out.json").read_text())
    ddp = out["ddp"]
    assert [(name, wd) for name, wd, _ in ddp["groups"]] == [
        ("default", 0.1), ("default", 0.0), ("text_proj", 0.1)
    ]  # fmt: skip
    assert ddp["groups"][2][2] == ["text_proj.weight"]
    for kind in ("fsdp", "zero2", "zero3"):
        if kind != "zero3":  # ZeRO-3's optimizer holds its flat partitions in groups of its own
            assert [g[:2] for g in out[kind]["groups"]] == [g[:2] for g in ddp["groups"]], kind
        for row, ref in zip(out[kind]["rows"], ddp["rows"]):
            assert row.keys() == ref.keys() == {"loss", "default", "text_proj"}
            assert row["default"] == ref["default"] and row["text_proj"] == ref["text_proj"]
            assert row["loss"] == pytest.approx(ref["loss"], rel=1e-4), kind
    assert [r["text_proj"] / r["default"] for r in ddp["rows"]] == pytest.approx([5.0] * 3)
    for kind, run in out.items():
        assert run["resumed"] == run["rows"][2], kind  # loss and every group's lr, bitwise
        if kind != "zero3":
            assert [tuple(h) for h in run["hyper"]] == [tuple(g[:2]) for g in run["groups"]], kind
