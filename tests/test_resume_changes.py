"""Resuming with a changed config: refused naming each changed key with its old and new value,
unless `resume_changes=allow` (then logged as a `config_changed` event); the keys that may change
between jobs resume silently; SLURM requeues rerun the saved config and are never refused."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from test_train import metrics, tiny_overrides

from core.config import RESUME_MAY_CHANGE, ConfigError, check_resume
from core.optim import lr_factor
from core.recipe import load_config


def _overrides(shapes_dir: Path, run: Path, steps: int, **extra) -> list[str]:
    extra = {
        "data.train": str(shapes_dir / "train-{000000..000002}.tar"),
        "data.val": str(shapes_dir / "val-000000.tar"),
        "data.num_workers": 0,
        "eval.evaluators": "[]",
        **extra,
    }
    return tiny_overrides(shapes_dir, run, steps, **extra)


@pytest.fixture(scope="module")
def five_steps(shapes_dir, tmp_path_factory) -> Path:
    """A tiny run of 5 steps at optim.lr 0.002: its checkpoint step_5 and config.yaml."""
    from core.loop import train

    run = tmp_path_factory.mktemp("five") / "run"
    train(load_config("tiny_siglip", _overrides(shapes_dir, run, 5)))
    return run


@pytest.fixture
def run(five_steps, tmp_path) -> Path:
    """A copy of the five-step run to resume (run_dir may change between jobs)."""
    shutil.copytree(five_steps, tmp_path / "run")
    return tmp_path / "run"


def _saved(run: Path) -> dict:
    return yaml.safe_load((run / "config.yaml").read_text())


def test_a_changed_lr_is_refused_naming_the_key_old_and_new(shapes_dir, run, capsys):
    from core.loop import train
    from launch.cli import main

    before = (run / "config.yaml").read_text(), len(metrics(run))
    changed = _overrides(shapes_dir, run, 8, **{"optim.lr": 1e-3})
    with pytest.raises(ConfigError, match=r"optim\.lr: 0\.002 -> 0\.001\. Only these may") as err:
        train(load_config("tiny_siglip", changed))
    assert "resume_changes=allow" in str(err.value) and "max_steps: 5" not in str(err.value)
    assert main(["train", "tiny_siglip", *changed]) == 2  # the CLI: one line, exit code 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "optim.lr: 0.002 -> 0.001" in lines[0], lines
    assert ((run / "config.yaml").read_text(), len(metrics(run))) == before  # nothing written


def test_resume_changes_allow_resumes_with_the_new_values_and_logs_them(shapes_dir, run):
    from core.loop import train

    extra = {"optim.lr": 1e-3, "resume_changes": "allow"}
    train(load_config("tiny_siglip", _overrides(shapes_dir, run, 8, **extra)))
    rows = metrics(run)
    assert [r["step"] for r in rows if r.get("event") == "resume"] == [5]
    (event,) = [r for r in rows if r.get("event") == "config_changed"]
    assert event["step"] == 5
    assert event["changes"] == {"optim.lr": {"old": 0.002, "new": 0.001}}
    lrs = {r["step"]: r["lr"] for r in rows if "loss" in r}
    assert sorted(lrs) == list(range(1, 9))
    for step in range(6, 9):  # the new lr, on the new (longer) schedule
        assert lrs[step] == pytest.approx(1e-3 * lr_factor(step, 5, 8, 0.0), abs=1e-12)
    saved = _saved(run)  # the new config, without this job's permission
    assert saved["optim"]["lr"] == 0.001 and saved["optim"]["max_steps"] == 8
    assert saved["resume_changes"] == "refuse"


def test_a_change_in_keys_that_may_change_resumes_silently(shapes_dir, run):
    from core.loop import train

    extra = {"checkpoint.keep": 1, "logging.every": 2, "data.num_workers": 1}
    train(load_config("tiny_siglip", _overrides(shapes_dir, run, 8, **extra)))  # max_steps 5 -> 8
    rows = metrics(run)
    assert [r["step"] for r in rows if r.get("event") == "resume"] == [5]
    assert not [r for r in rows if r.get("event") == "config_changed"]
    assert [r["step"] for r in rows if "loss" in r][-2:] == [6, 8]
    saved = _saved(run)
    assert saved["optim"]["max_steps"] == 8 and saved["checkpoint"]["keep"] == 1


def test_the_resume_rules_key_by_key():
    base = ["optim.lr=2e-3", "data.batch_size=128", "model.vision_config.hidden_size=128", "seed=0"]
    plain = load_config("tiny_siglip", base).to_dict()
    grouped = load_config("tiny_siglip", [*base, "optim.lr_groups={text_proj: 1e-2}"]).to_dict()

    def check(*overrides, saved=plain, saved_world=2, world=2):
        cfg = load_config("tiny_siglip", [*base, *overrides])
        return check_resume(saved, cfg, saved_world, world)

    may_change = [
        "run_dir=elsewhere", "resume=none", "optim.max_steps=9", "optim.epochs=2",
        "data.num_workers=7", "eval.every=3", "logging.wandb.mode=online", "checkpoint.every=1",
        "launch.timeout_minutes=5", "engine.compile=true", "resume_changes=allow",
    ]  # fmt: skip
    for key in may_change:
        assert check(key) == {}, key
    assert {"optim.max_steps", "checkpoint.*", "logging.*", "eval.*", "launch.*"} <= set(
        RESUME_MAY_CHANGE
    )
    # Another number of GPUs with the global batch kept (2 x 128 = 4 x 64 = 1 x 128 x 2 steps).
    assert check("data.batch_size=64", world=4) == {}
    assert check("optim.accum_steps=2", world=1) == {}
    with pytest.raises(ConfigError, match=r"data\.batch_size: 128 -> 64\. Only"):
        check("data.batch_size=64")  # the same ranks: the global batch halves
    # Every changed key is named, dicts key by key; a key one side lacks is "(absent)".
    with pytest.raises(ConfigError) as err:
        check("model.vision_config.hidden_size=64", "model.vision_config.extra=1", "seed=3")
    assert (
        "in seed: 0 -> 3; model.vision_config.hidden_size: 128 -> 64; "
        "model.vision_config.extra: (absent) -> 1. Only" in str(err.value)
    )
    assert check("seed=3", "resume_changes=allow") == {"seed": {"old": 0, "new": 3}}
    # An lr_groups lr may change with allow; its patterns, and the engine, never.
    changed = check("optim.lr_groups={text_proj: 1e-3}", "resume_changes=allow", saved=grouped)
    assert changed == {"optim.lr_groups.text_proj": {"old": 0.01, "new": 0.001}}
    with pytest.raises(ConfigError, match=r"optim.lr_groups patterns \[\] -> \['text_proj'\]"):
        check("optim.lr_groups={text_proj: 1e-2}", "resume_changes=allow")
    with pytest.raises(ConfigError, match="engine.kind: ddp -> fsdp: checkpoints do not convert"):
        check("engine.kind=fsdp", "resume_changes=allow")


def test_slurm_requeues_rerun_the_saved_config_unrefused(five_steps, tmp_path):
    """Our own requeue (`TrainJob.next_job`) and SLURM's (PreemptMode=REQUEUE, which reruns the
    first job's callable) both load the run's config.yaml with resume=auto: never a change."""
    from launch.submit import TrainJob

    recipe = tmp_path / "edited.yaml"  # the recipe was edited after the job started
    recipe.write_text("base: tiny_siglip\noptim: {lr: 0.5}\n")
    first = TrainJob(str(recipe), [f"run_dir={five_steps}", "resume=none"], 60, 90, 3)
    assert first.run_dir() == str(five_steps)
    saved = load_config(five_steps / "config.yaml").to_dict()
    for job in (first.next_job(2, str(five_steps)), first.next_job(3, first.run_dir())):
        assert job.recipe == str(five_steps / "config.yaml") and job.overrides == ["resume=auto"]
        cfg = load_config(job.recipe, job.overrides)
        assert check_resume(saved, cfg, 1, 1) == {}
        assert cfg.to_dict() == {**saved, "resume": "auto"}


def test_submit_resume_refuses_a_changed_config_before_submitting(run, capsys):
    from launch.cli import main

    assert main(["submit", "--resume", str(run), "optim.lr=1e-3", "--dry-run"]) == 2
    assert "optim.lr: 0.002 -> 0.001" in capsys.readouterr().err
    assert main(["submit", "--resume", str(run), "optim.max_steps=9", "--dry-run"]) == 0
    assert "#SBATCH" in capsys.readouterr().out
