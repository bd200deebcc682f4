"""Pieces of the loop: schedule, weight-decay groups, gradient sync, public override keys."""

from __future__ import annotations

import json
import math
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from core.optim import lr_factor, param_groups
from core.recipe import load_config

PUBLIC_OVERRIDES = {
    "run_dir": "/tmp/somewhere",
    "resume": "none",
    "optim.lr": "1e-4",
    "optim.max_steps": "7",
    "data.train": "a-{0000..0003}.tar",
    "data.val": "b-0000.tar",
    "data.batch_size": "8",
    "checkpoint.every": "3",
    "checkpoint.keep": "2",
    "engine.kind": "ddp",
    "logging.wandb.mode": "online",
    "data.max_bad_fraction": "0.05",
}


def test_public_override_keys_exist_with_their_names():
    cfg = load_config("tiny_siglip", [f"{k}={v}" for k, v in PUBLIC_OVERRIDES.items()])
    flat = {
        "run_dir": cfg.run_dir, "resume": cfg.resume, "optim.lr": cfg.optim.lr,
        "optim.max_steps": cfg.optim.max_steps, "data.train": cfg.data.train,
        "data.val": cfg.data.val, "data.batch_size": cfg.data.batch_size,
        "checkpoint.every": cfg.checkpoint.every, "checkpoint.keep": cfg.checkpoint.keep,
        "engine.kind": cfg.engine.kind, "logging.wandb.mode": cfg.logging.wandb.mode,
        "data.max_bad_fraction": cfg.data.max_bad_fraction,
    }  # fmt: skip
    assert flat == {
        **PUBLIC_OVERRIDES, "optim.lr": 1e-4, "optim.max_steps": 7, "data.batch_size": 8,
        "checkpoint.every": 3, "checkpoint.keep": 2, "data.max_bad_fraction": 0.05,
    }  # fmt: skip


def test_default_run_dir_is_runs_recipe_name():
    assert load_config("tiny_siglip").run_dir == "runs/tiny_siglip"
    assert load_config("siglip_cc3m").run_dir == "runs/siglip_cc3m"


def test_warmup_then_cosine():
    factors = [lr_factor(s, warmup=10, total=110, min_ratio=0.1) for s in range(110)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0)
    assert factors[60] == pytest.approx(0.1 + 0.9 * 0.5)  # half-way down the cosine
    assert lr_factor(110, 10, 110, 0.1) == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))


def test_no_weight_decay_on_norms_biases_temperature_and_frozen():
    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)
            self.norm = torch.nn.LayerNorm(4)
            self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(10)))
            self.logit_bias = torch.nn.Parameter(torch.tensor(-10.0))
            self.frozen = torch.nn.Linear(4, 4)
            self.frozen.requires_grad_(False)

    toy = Toy()
    decay, no_decay = param_groups(toy, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(toy.proj.weight)}
    assert {id(p) for p in no_decay["params"]} == {
        id(toy.proj.bias), id(toy.norm.weight), id(toy.norm.bias),
        id(toy.logit_scale), id(toy.logit_bias),
    }  # fmt: skip


class _Linear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3, 1)

    def blocks(self):
        return {}

    def forward(self, batch):
        from core.tasks import TaskOutput

        return TaskOutput(loss=self.proj(batch["x"]).pow(2).mean())


def _grad_sync_worker(rank: int, port: int, out_dir: str):
    import faulthandler
    import traceback

    # A rank still running after 240 s prints where it is (it hung three times in 100+ runs)
    # before the test gives up at 300 s. Results go to files, not a multiprocessing queue: a
    # queue's feeder thread was once seen blocked with the rank's error unsent.
    faulthandler.dump_traceback_later(240, exit=True)
    result = Path(out_dir) / f"rank{rank}.json"
    try:
        inner_equal, synced_equal = _grad_sync(rank, port)
        result.write_text(json.dumps([rank, inner_equal, synced_equal]))
    except BaseException:  # the test reports it rather than waiting for a result
        result.write_text(json.dumps([rank, "error", traceback.format_exc()]))
        raise
    # Exit without tearing down: rank 0 (the TCPStore's host) was seen to hang for good in the
    # teardown of the process group and the DDP reducer after the other rank had exited (after
    # the result was final). Nothing is left to do here.
    os._exit(0)


def _grad_sync(rank: int, port: int) -> tuple[bool, bool]:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank))
    os.environ.update(WORLD_SIZE="2", LOCAL_RANK=str(rank))
    from core.distributed import init_distributed
    from core.engines.ddp import DDPEngine

    info = init_distributed("gloo")
    torch.manual_seed(0)
    cfg = load_config("tiny_siglip", ["engine.precision=fp32"])
    engine = DDPEngine(_Linear(), cfg, info, lr=0.1, total=10)
    x = torch.full((2, 3), float(rank + 1))  # ranks see different data
    engine.forward_backward({"x": x}, 0.5, sync=False)
    inner = engine.task.proj.weight.grad.clone()
    engine.forward_backward({"x": x}, 0.5, sync=True)
    synced = engine.task.proj.weight.grad.clone()
    gathered = [torch.zeros_like(inner) for _ in range(2)]
    dist.all_gather(gathered, inner)
    inner_equal = torch.equal(gathered[0], gathered[1])
    dist.all_gather(gathered, synced)
    return inner_equal, torch.equal(gathered[0], gathered[1])


def free_port() -> int:
    """A free port below Linux's ephemeral range (32768-60999). A port the OS hands out for
    bind(0) is an ephemeral one, and a rank's client socket may then be given that same port as
    its own local port before rank 0 listens on it: the connect reaches itself (TCP
    self-connect) and the rendezvous waits forever (seen: both ranks alive, no result in 300 s)."""
    for offset in range(200):
        port = 28000 + (os.getpid() + offset) % 1000
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port in 28000-28999")


def test_inner_micro_steps_do_not_sync_gradients(tmp_path):
    port = free_port()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_grad_sync_worker, args=(r, port, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)  # spawn imports torch: slow
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
    files = [tmp_path / f"rank{r}.json" for r in range(2)]
    results = [json.loads(f.read_text()) if f.exists() else None for f in files]
    assert all(r is not None and r[1] != "error" for r in results), (codes, results)
    # After the inner micro-step each rank holds only its own gradient; after the last one
    # DDP has averaged the accumulated gradients, so every rank holds the same.
    assert results == [[0, False, True], [1, False, True]]


def test_two_evaluators_reporting_one_name_keep_both(tmp_path):
    """vqa and cot both report num_questions: the later one is qualified by its evaluator's
    name in the log and eval.json, never overwrites the first."""
    import contextlib

    from core.distributed import DistInfo
    from core.logger import MetricsLogger
    from core.loop import run_evaluators

    class Reports:
        def __init__(self, name, metrics):
            self.name, self.metrics = name, metrics

        def __call__(self, model, ctx):
            return dict(self.metrics)

    from core.engines.base import Engine

    class Replica(Engine):  # an engine whose model is the task itself
        def evaluates_sharded(self, sharded):
            return False

        def eval_model(self, sharded):
            return contextlib.nullcontext(torch.nn.Linear(1, 1))

    cfg = load_config("tiny_siglip", [f"run_dir={tmp_path}", "logging.wandb.mode=disabled"])
    logger = MetricsLogger(cfg, True, 0, 5)
    evaluators = [Reports("vqa", {"vqa_acc": 0.5, "num_questions": 600}),
                  Reports("cot", {"cot_acc": 0.25, "num_questions": 300})]  # fmt: skip
    dist_info = DistInfo(0, 1, 0, torch.device("cpu"))
    metrics, stopped = run_evaluators(evaluators, cfg, dist_info, Replica(), logger, 5)
    expected = {"vqa_acc": 0.5, "num_questions": 600, "cot_acc": 0.25, "cot/num_questions": 300}
    assert not stopped and metrics == expected
    assert json.loads((tmp_path / "eval.json").read_text()) == {"step": 5, **expected}
