"""The staged VLM under every engine on 2 gloo ranks, with one rank's batches text-only and the
other's with images: no engine hangs (every rank runs every module), LoRA stage 2 losses agree
with DDP, and a killed LoRA run resumes exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from test_engines import kill_after
from test_train import ROOT, assert_bitwise_equal, free_port, metrics, run_cli
from test_vlm_task import evaluators, vlm_overrides

from core.checkpoint import list_checkpoints
from core.engines import ENGINES

STEPS = 6


def mixed_overrides(vqa: Path, run_dir: Path, kind: str, **extra) -> list[str]:
    """Rank 0 reads only text-only samples, rank 1 only samples with images: two shards, no
    shuffling, one slot per rank (shard i goes to rank i)."""
    train = f"{vqa}/shapes_text/train-000000.tar::{vqa}/shapes_colour/train-000000.tar"
    over = {
        "data.train": train, "data.mixture": "{}", "data.shuffle": "false",
        "task.stage": "sft", "task.lm_tuning": "lora", "task.lora.r": 4, "task.lora.dropout": 0.0,
        "task.init_from": "",
        "engine.kind": kind, "engine.precision": "fp32", "optim.lr": 3e-3,
        "checkpoint.every": 2, "eval.every": 0,
        # at the end: vqa, loss and the answers to rank 0's first 8 questions (generations.txt)
        "eval.evaluators": json.dumps([*json.loads(evaluators()), {"generation": {
            "samples": 8, "max_new_tokens": 4, "subsets": ["shapes_colour", "shapes_shape"]}}]),
        **extra,
    }  # fmt: skip
    return vlm_overrides(vqa, run_dir, STEPS, **over)


def train_mixed(vqa: Path, run_dir: Path, kind: str, **extra) -> subprocess.Popen:
    return run_cli(["train", "tiny_vlm_stage2", *mixed_overrides(vqa, run_dir, kind, **extra)],
                   nproc=2)  # fmt: skip


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in metrics(run_dir) if "loss" in r]


@pytest.fixture(scope="module")
def straight(vqa, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vlm_engines")
    for kind in ENGINES:
        assert train_mixed(vqa, root / kind, kind).wait(timeout=600) == 0, f"{kind} failed"
    return root


@pytest.mark.slow
def test_lora_stage_two_agrees_across_engines_with_text_only_ranks(straight):
    ref = losses(straight / "ddp")
    assert len(ref) == STEPS and ref[-1] < ref[0]
    worst = {}
    for kind in [k for k in ENGINES if k != "ddp"]:
        curve = losses(straight / kind)
        assert len(curve) == STEPS, kind
        worst[kind] = max(abs(a - b) / abs(b) for a, b in zip(curve, ref))
    print("max relative loss difference to ddp:", worst)
    assert all(v <= 1e-4 for v in worst.values()), worst


@pytest.mark.slow
def test_sharded_evaluation_generates_in_lockstep_as_ddp_does(straight):
    """fsdp and zero3 evaluate through the sharded model (eval.sharded): each rank generates the
    answers to its share of the held-out questions, decoding as many steps as the rank that
    decodes longest (a rank that is done runs dropped forwards), and every rank the same number
    of batches. The answers, so the accuracies, and the held-out loss are ddp's."""
    ref = json.loads((straight / "ddp" / "eval.json").read_text())
    assert ref["step"] == STEPS and {"vqa_acc", "loss"} <= set(ref)
    for kind in ENGINES:
        (start,) = [r for r in metrics(straight / kind) if r.get("event") == "start"]
        assert start["sharded_eval"] == (kind in ("fsdp", "zero3")), kind
        got = json.loads((straight / kind / "eval.json").read_text())
        assert set(got) == set(ref), kind
        assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5), kind  # the training's parity
        assert {k: v for k, v in got.items() if k != "loss"} == \
            {k: v for k, v in ref.items() if k != "loss"}, kind  # fmt: skip
        # the generation evaluator's answers (rank 0's first questions), word for word
        generated = (straight / kind / "generations.txt").read_text()
        assert generated == (straight / "ddp" / "generations.txt").read_text(), kind
        assert generated.count("\n") >= 8


@pytest.mark.slow
@pytest.mark.parametrize("kind,requests", [("fsdp", 3), ("zero3", 1)])
def test_generate_under_torchrun_answers_as_one_process_does(straight, tmp_path, kind, requests):
    """`torchrun ... vlscale generate RUN` on 2 ranks: each rank loads its shards of the run's
    checkpoint and answers every other request through the sharded model in lockstep (of 3,
    rank 0 two and rank 1 one; of 1, rank 1 decodes a copy of rank 0's and drops it: each case
    under one engine, to keep the suite short); rank 0
    prints them all, in order, token for token what one process with the whole model answers
    (greedy, fp32; this 6-step run answers each question with 4 tokens, all alike)."""
    import random

    from core.data.synthetic import render, sample_attributes

    image = tmp_path / "scene.png"
    render(sample_attributes(random.Random(7)), 64).save(image)
    asked = ["What colour is the shape at the top right?", "How many shapes are there?",
             "What shape is at the center?"][:requests]  # fmt: skip
    args = ["generate", str(straight / kind), "--image", str(image), "--max-new-tokens", "4"]
    args += [a for prompt in asked for a in ("--prompt", prompt)]

    def answers(nproc: int) -> list[str]:
        proc = run_cli(args, nproc=nproc, stdout=subprocess.PIPE, text=True)
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0
        return [line for line in out.splitlines() if line.startswith((f"[{image}]", "->"))]

    alone = answers(1)
    assert len(alone) == 2 * len(asked) and all(q in alone[2 * i] for i, q in enumerate(asked))
    assert answers(2) == alone


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["fsdp"])  # sharded adapters: the hardest case
def test_killed_lora_run_resumes_exactly(vqa, tmp_path, straight, kind):
    from launch.export import consolidated

    run = tmp_path / "killed"
    kill_after(train_mixed(vqa, run, kind), run, 3)
    assert list_checkpoints(run / "checkpoints")[-1][0] < STEPS
    assert train_mixed(vqa, run, kind).wait(timeout=600) == 0
    resumed = {r["step"]: r["loss"] for r in metrics(run) if "loss" in r}
    start = next(r["step"] for r in metrics(run) if r.get("event") == "resume")
    assert [resumed[s] for s in range(start + 1, STEPS + 1)] == losses(straight / kind)[start:]
    state = consolidated(run)[2]
    assert any("lora_A" in k for k in state) and any(k.startswith("projector.") for k in state)
    assert_bitwise_equal(consolidated(straight / kind)[2], state)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["zero2", "zero3"])
def test_zero_checkpoints_read_as_deepspeeds_zero_to_fp32_reads_them(straight, kind):
    """vlscale reads ZeRO checkpoints itself, one tensor at a time (DeepSpeed's reader
    concatenates every ZeRO-2 partition and loads whole files); it gives bitwise what
    zero_to_fp32 gives, trained LoRA adapters and projector, frozen vision tower and LM."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    (_, step_dir), *_ = reversed(list_checkpoints(straight / kind / "checkpoints"))
    ours = ENGINES[kind].read_checkpoint(step_dir)
    theirs = get_fp32_state_dict_from_zero_checkpoint(str(step_dir), tag="ds")
    assert any("lora_A" in k for k in theirs) and any(k.startswith("vision.") for k in theirs)
    assert_bitwise_equal(dict(ours), {k: v.float() for k, v in theirs.items()})


# `vlscale train` recording which parameters fsdp read into its shards (read_into_shards' names).
RECORD_READ = """
import json, os, sys
sys.path.insert(0, {root!r})
import core.engines.fsdp as fsdp

def recorded(task, unread, *rest, _real=fsdp.read_into_shards):
    if os.environ.get("RANK", "0") == "0":
        open({out!r}, "w").write(json.dumps(sorted(unread)))
    return _real(task, unread, *rest)

fsdp.read_into_shards = recorded
from launch.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_sharded_engines_read_a_previous_run_as_ddp_loads_it(vqa, straight, tmp_path):
    """task.init_from under fsdp: the previous run's weights (fsdp's own LoRA run: a DCP
    checkpoint, its adapters merged into the LM) become stand-ins and each rank reads only its
    rows of them; training goes on exactly as from ddp's whole read (losses within the engines'
    1e-5 parity). zero3 too, each tensor read alone and partitioned (partition_while_reading)."""
    previous = straight / "fsdp"
    over = {"task.init_from": str(previous), "task.lm_tuning": "full", "optim.max_steps": 3}
    losses = {}
    for kind in ("ddp", "fsdp", "zero3"):
        run = tmp_path / kind
        args = ["train", "tiny_vlm_stage2",
                *mixed_overrides(vqa, run, kind, **over)]  # fmt: skip
        if kind != "fsdp":
            assert run_cli(args, nproc=2).wait(timeout=600) == 0
        else:
            script = tmp_path / "record.py"
            names = tmp_path / "read_into_shards.json"
            script.write_text(textwrap.dedent(RECORD_READ.format(root=str(ROOT), out=str(names))))
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                   f"--master_port={free_port()}", str(script), *args]  # fmt: skip
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                                  timeout=600)  # fmt: skip
            assert done.returncode == 0, done.stderr[-3000:]
        losses[kind] = losses_of = [r["loss"] for r in metrics(run) if "loss" in r]
        assert len(losses_of) == 3
    read = json.loads(names.read_text())
    # every weight of the previous run: the vision tower, the projector, the LM (merged)
    assert any(n.startswith("projector.") for n in read)
    assert any(n.startswith("lm.") and "q_proj" in n for n in read)
    assert any(n.startswith("vision.") for n in read)
    assert losses["fsdp"] == pytest.approx(losses["ddp"], rel=1e-5)
    assert losses["zero3"] == pytest.approx(losses["ddp"], rel=1e-5)
