"""Checkpoints survive a crash at any point of a save: `Checkpointer.save` is cut short at every
rename, delete, fsync and engine/torch write in turn (and the clean-up of the next job too); each
time the newest checkpoint `list_checkpoints` returns is complete (its files as meta.json lists
them, it loads) and a run resumes from it. And every file and directory is fsynced in time."""

from __future__ import annotations

import itertools
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import metrics, tiny_overrides

from core.checkpoint import Checkpointer, checkpoint_problems, list_checkpoints
from core.distributed import DistInfo
from core.engines import build_engine
from core.recipe import load_config
from core.tasks import build_task

DIST = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
LEFTOVERS = (".tmp-", ".old-", ".del-")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    from core.data.synthetic import write_synthetic_shards

    out = tmp_path_factory.mktemp("shapes")
    write_synthetic_shards(out, n_train=256, n_val=64, seed=0, shard_size=64, image_size=32)
    return out


def overrides(shapes: Path, run: Path, steps: int) -> list[str]:
    extra = {"checkpoint.every": 2, "checkpoint.keep": 3, "data.num_workers": 0}
    return tiny_overrides(shapes, run, steps, **extra)


@pytest.fixture(scope="module")
def base(shapes, tmp_path_factory) -> Path:
    """A run of 6 steps with checkpoints step_2, step_4, step_6."""
    from core.loop import train

    run = tmp_path_factory.mktemp("base") / "run"
    train(load_config("tiny_siglip", overrides(shapes, run, 6)))
    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [2, 4, 6]
    return run


def make_engine(shapes: Path, run: Path):
    cfg = load_config("tiny_siglip", overrides(shapes, run, 8))
    return build_engine(build_task(cfg), cfg, DIST, cfg.optim.lr, 8)


class Crash(Exception):
    pass


def half_deleted(path, *args, **kwargs) -> None:
    """What a crash in the middle of shutil.rmtree(path) may leave at worst: all but meta.json."""
    for file in Path(path).rglob("*"):
        if file.is_file() and file.name != "meta.json":
            file.unlink()


def crash_at(monkeypatch, k: int, engine) -> dict:
    """Raise Crash at the k-th call of any of the operations a save is made of (a delete cut
    short in the middle)."""
    calls = {"n": 0, "what": None}

    def hooked(name, real):
        def call(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == k:
                calls["what"] = name
                if name == "shutil.rmtree":
                    half_deleted(*args)
                raise Crash(f"{name}, call {k}")
            return real(*args, **kwargs)

        return call

    monkeypatch.setattr(os, "replace", hooked("os.replace", os.replace))
    monkeypatch.setattr(os, "fsync", hooked("os.fsync", os.fsync))
    monkeypatch.setattr(shutil, "rmtree", hooked("shutil.rmtree", shutil.rmtree))
    monkeypatch.setattr(torch, "save", hooked("torch.save", torch.save))
    monkeypatch.setattr(engine, "save", hooked("engine.save", engine.save))
    return calls


def assert_newest_complete(run: Path, allowed: dict[int, list[dict]], probe) -> int:
    """The newest checkpoint is one of `allowed` (step -> the model states it may hold), complete
    and loadable, and every other one listed is complete. Returns its step."""
    found = list_checkpoints(run / "checkpoints")
    assert found, "no checkpoint left"
    step, path = found[-1]
    assert step in allowed, (step, [p.name for _, p in found])
    for _, listed in found:  # the newest, and nothing half deleted either
        assert checkpoint_problems(listed) == [], listed.name
    model = load_file(path / "model.safetensors")
    assert any(
        model.keys() == state.keys() and all(torch.equal(model[k], state[k]) for k in model)
        for state in allowed[step]
    ), f"{path.name} holds neither the old nor the new model"
    assert Checkpointer(run, DIST, keep=3).load(path, probe)[0] == step
    return step


def leftovers(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(LEFTOVERS))


def crash_every_point(monkeypatch, tmp_path, shapes, base, scenario, prepare, save, allowed):
    """For k = 1, 2, ...: a copy of `base` (`prepare`d), `save` cut short at its k-th operation;
    the newest checkpoint is complete; the next job's clean-up, itself cut short at each of its
    operations, keeps it so; then a run resumes from it (once per distinct state the crash
    left), until a save runs to its end. Returns the number of crash points."""
    from core.loop import train

    probe = make_engine(shapes, base)
    resumed = set()
    for k in itertools.count(1):
        run = tmp_path / f"{scenario}_k{k}"
        shutil.copytree(base, run)
        prepare(run)
        crash_at(monkeypatch, k, save.engine)
        try:
            save(Checkpointer(run, DIST, keep=save.keep))
            finished = True
        except Crash:
            finished = False
        finally:
            monkeypatch.undo()
        newest = assert_newest_complete(run, allowed, probe)

        # The next job's rank 0 cleans up (`latest()`), and may crash doing it, too.
        for j in itertools.count(1):
            again = tmp_path / f"{scenario}_k{k}_j{j}"
            shutil.copytree(run, again)
            crash_at(monkeypatch, j, save.engine)
            try:
                latest = Checkpointer(again, DIST, keep=save.keep).latest()
                cleaned = True
            except Crash:
                cleaned = False
            finally:
                monkeypatch.undo()
            assert assert_newest_complete(again, allowed, probe) == newest
            shutil.rmtree(again)
            if cleaned:
                break
        assert latest.name == f"step_{newest}"

        names = sorted(
            re.sub(r"^(\.del-.*)\.\d+$", r"\1", p) for p in os.listdir(run / "checkpoints")
        )
        if (tuple(names), newest) not in resumed:
            resumed.add((tuple(names), newest))
            train(load_config("tiny_siglip", overrides(shapes, run, 8)))  # resumes: newest
            (resume,) = [r for r in metrics(run) if r.get("event") == "resume"]
            assert resume["step"] == newest
            assert leftovers(run) == []
            assert list_checkpoints(run / "checkpoints")[-1][0] == 8
        shutil.rmtree(run)
        if finished:
            return k
    return None


def saved_state(run: Path, step: int) -> tuple[dict, dict]:
    path = run / "checkpoints" / f"step_{step}"
    extra = torch.load(path / "rank_00000.pt", weights_only=True)
    return load_file(path / "model.safetensors"), {"data": extra["data"]}


def test_crash_at_every_point_of_replacing_a_checkpoint(monkeypatch, tmp_path, shapes, base):
    """A rerun reaching an existing step_6 (replaced, with other weights; keep=2 prunes step_2):
    the newest is always step_6, old or new, never half deleted."""
    engine = make_engine(shapes, base)
    Checkpointer(base, DIST, keep=3).load(base / "checkpoints" / "step_6", engine)
    with torch.no_grad():
        for tensor in engine.consolidated_state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(1e-3)
    old, extra = saved_state(base, 6)
    new = {k: v.detach().clone() for k, v in engine.consolidated_state_dict().items()}

    def save(ckpt):
        ckpt.save(6, engine, extra)

    save.engine, save.keep = engine, 2
    points = crash_every_point(
        monkeypatch, tmp_path, shapes, base, "replace", lambda run: None, save, {6: [old, new]}
    )
    assert points > 15, points  # every rename, delete, fsync and write was a crash point


def test_crash_at_every_point_of_a_new_checkpoint_and_pruning(monkeypatch, tmp_path, shapes, base):
    """step_6 saved anew over step_2 and step_4 with keep=1 (both pruned): the newest is step_4
    until step_6 is complete, then step_6."""
    engine = make_engine(shapes, base)
    Checkpointer(base, DIST, keep=3).load(base / "checkpoints" / "step_6", engine)
    state6, extra = saved_state(base, 6)
    state4, _ = saved_state(base, 4)

    def save(ckpt):
        ckpt.save(6, engine, extra)

    def prepare(run):
        shutil.rmtree(run / "checkpoints" / "step_6")

    save.engine, save.keep = engine, 1
    points = crash_every_point(
        monkeypatch, tmp_path, shapes, base, "new", prepare, save, {4: [state4], 6: [state6]}
    )
    assert points > 15, points


def test_every_file_and_directory_is_fsynced_before_meta_and_the_rename(
    monkeypatch, tmp_path, shapes, base
):
    run = tmp_path / "run"
    shutil.copytree(base, run)
    engine = make_engine(shapes, base)
    _, extra = saved_state(base, 6)
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", f"{src} -> {dst}"))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    Checkpointer(run, DIST, keep=3).save(8, engine, extra)
    monkeypatch.undo()

    root = (run / "checkpoints").resolve()
    final, tmp = root / "step_8", root / ".tmp-step_8"
    written = [p for p in final.rglob("*") if p.name != "meta.json"]
    assert len([p for p in written if p.is_file()]) >= 3  # model, optimizer, rank file
    synced = [path for what, path in events if what == "fsync"]
    for path in [final, *written]:
        assert str(tmp / path.relative_to(final)) in synced, f"{path} not fsynced"
    assert str(tmp / "meta.tmp") in synced  # meta.json's content, before its rename

    def index(event):
        return events.index(event)

    meta = index(("replace", f"{tmp / 'meta.tmp'} -> {tmp / 'meta.json'}"))
    rename = index(("replace", f"{tmp} -> {final}"))
    assert all(index(("fsync", str(tmp / p.relative_to(final)))) < meta for p in written)
    assert ("fsync", str(tmp)) in events[meta:rename]  # meta.json's entry, then the rename
    assert ("fsync", str(root)) in events[rename:]  # the rename itself is durable
    assert checkpoint_problems(final) == []
    assert leftovers(run) == []
    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [4, 6, 8]


def test_checkpoint_problems_names_a_missing_or_truncated_file(tmp_path, base):
    path = tmp_path / "step_6"
    shutil.copytree(base / "checkpoints" / "step_6", path)
    assert checkpoint_problems(path) == []
    with open(path / "optimizer.pt", "r+b") as f:
        f.truncate(10)
    (path / "model.safetensors").unlink()
    problems = checkpoint_problems(path)
    assert any(p.startswith("model.safetensors: missing") for p in problems), problems
    assert any(p.startswith("optimizer.pt: 10 bytes") for p in problems), problems
