"""`vlscale eval RUN_DIR [--evaluator NAME [key=value ...]]...`: evaluate a run's checkpoint.

Loads the run's newest checkpoint (any engine; `--step N` another) and runs each evaluator NAME
(any in core/evaluators/, e.g. zeroshot_classification) with its options given as key=value
(YAML values, as recipe overrides: `ks=[1,5]`), or without --evaluator the run's declared
eval.evaluators. Each evaluator's metrics are printed (JSON) and written with the step and the
options to RUN_DIR/eval_<NAME>.json; training's eval.json is left as it is. It evaluates in
bf16 autocast when the run trained in bf16 (as training's evaluation does), unless --fp32.

Under torchrun (`torchrun --nproc_per_node N -m launch.cli eval RUN_DIR ...`) it evaluates as
training does: every rank builds the run's engine, loads the checkpoint into it (its own shards
under fsdp, resharded from any world size; under zero3 DeepSpeed's partitions) and runs the
evaluators on its share of the data, through the sharded model in lockstep where the engine
evaluates sharded (`eval.sharded`: fsdp, zero3) — no rank then holds the whole model; `--fp32`
on a bf16 run evaluates the fp32 masters in a full copy on every rank. In one process the whole
model is loaded.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from pathlib import Path

import torch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a training run directory (holds config.yaml)")
    parser.add_argument(
        "--evaluator", nargs="+", action="append", metavar=("NAME", "KEY=VALUE"),
        help="an evaluator and its options (repeatable); default: the run's eval.evaluators",
    )  # fmt: skip
    parser.add_argument("--step", type=int, default=None, help="default: the newest checkpoint")
    parser.add_argument("--batch-size", type=int, default=None, help="default: eval.batch_size")
    parser.add_argument("--fp32", action="store_true", help="no bf16 autocast for bf16 runs")


def load_run(run_dir: str | Path, step: int | None = None, device: torch.device | None = None):
    """(task with the checkpoint's weights in eval mode on `device`, its Config, the checkpoint's
    step) of a run: the newest checkpoint, or `step`'s, written by any engine. `device`: CUDA
    when there is one, else the CPU."""
    from core.consolidate import checkpoint_dir
    from launch.export import consolidated

    step = int(checkpoint_dir(run_dir, step).name.rsplit("_", 1)[1])  # step_<N>
    task, cfg, _ = consolidated(run_dir, step)
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return task.to(device).eval(), cfg, step


def evaluate(run_dir: str | Path, declared: list | None = None, step: int | None = None,
             batch_size: int | None = None, fp32: bool = False) -> dict[str, dict]:  # fmt: skip
    """{evaluator name: its metrics} of a run's checkpoint for `declared` (eval.evaluators
    entries; None: the run's), each also written to RUN_DIR/eval_<name>.json with the step and
    its options. Under torchrun (WORLD_SIZE > 1) every rank takes part (see the module doc);
    the metrics are returned on rank 0 ({} on the others)."""
    from core.evaluators import resolve_evaluators

    if declared is not None:  # bad names and options fail before the checkpoint is read
        declared = resolve_evaluators(declared)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return _evaluate_distributed(run_dir, declared, step, batch_size, fp32)
    from core.config import ConfigError
    from core.distributed import DistInfo
    from core.evaluators import EvalContext, build_evaluators

    task, cfg, step = load_run(run_dir, step)
    declared = cfg.eval.evaluators if declared is None else declared
    if not declared:
        raise ConfigError(f"{run_dir} declares no eval.evaluators: give --evaluator NAME")
    evaluators = build_evaluators(declared, task)
    if batch_size:
        cfg.eval.batch_size = batch_size
    device = next(task.parameters()).device
    dist = DistInfo(rank=0, world_size=1, local_rank=0, device=device)
    bf16 = cfg.engine.precision == "bf16" and not fp32
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    )
    ctx = EvalContext(cfg=cfg, dist=dist, step=step, run_dir=Path(run_dir))  # one round
    results = {}
    for entry, evaluator in zip(declared, evaluators, strict=True):
        with torch.no_grad(), autocast:
            metrics = evaluator(task, ctx)
        results[_write(run_dir, entry, step, metrics, sharded=False)] = metrics
    return results


def _write(run_dir: str | Path, entry: dict, step: int, metrics: dict, sharded: bool) -> str:
    """RUN_DIR/eval_<name>.json of one evaluator's metrics (replaced whole); returns the name."""
    ((name, options),) = entry.items()
    out = Path(run_dir) / f"eval_{name}.json"
    tmp = out.with_name(out.name + ".tmp")
    record = {"step": step, "evaluator": name, "options": options, "sharded": sharded,
              "metrics": metrics}  # fmt: skip
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, out)
    return name


def load_run_sharded(run_dir: str | Path, step: int | None = None):
    """Under torchrun, on every rank: (engine with the checkpoint loaded, its Config, the
    checkpoint's step, DistInfo). The run's task and engine are built as training builds them
    (the weights of Hugging Face checkpoints left unread under fsdp, whose ranks read their
    shards); the checkpoint loads into the engine from any world size."""
    import yaml

    from core import distributed
    from core.checkpoint import Checkpointer
    from core.consolidate import checkpoint_dir
    from core.engines import build_engine
    from core.loop import building_for, seed_everything
    from core.recipe import config_from_dict
    from core.tasks import build_task

    cfg = config_from_dict(yaml.safe_load((Path(run_dir) / "config.yaml").read_text()))
    dist = distributed.init_distributed(cfg.launch.backend, cfg.launch.timeout_minutes)
    path = Path(distributed.broadcast_object(str(checkpoint_dir(run_dir, step))))
    seed_everything(cfg.seed)  # as training built the task (weights it rebuilds, not loads)
    with building_for(cfg.engine.kind):
        engine = build_engine(build_task(cfg), cfg, dist, cfg.optim.lr, 1)
    step, _ = Checkpointer(Path(run_dir), dist, cfg.checkpoint.keep).load(path, engine)
    return engine, cfg, step, dist


def _evaluate_distributed(run_dir, declared, step, batch_size, fp32) -> dict[str, dict]:
    """Every rank: the run's engine with its checkpoint (`load_run_sharded`), the evaluators
    run as training's evaluation runs them."""
    from core import distributed
    from core.config import ConfigError
    from core.evaluators import EvalContext, build_evaluators

    engine, cfg, step, dist = load_run_sharded(run_dir, step)
    declared = cfg.eval.evaluators if declared is None else declared
    if not declared:
        raise ConfigError(f"{run_dir} declares no eval.evaluators: give --evaluator NAME")
    if batch_size:
        cfg.eval.batch_size = batch_size
    evaluators = build_evaluators(declared, engine.task)
    ctx = EvalContext(cfg=cfg, dist=dist, step=step, run_dir=Path(run_dir))
    results = {}
    with engine.evaluation(cfg.eval.sharded, fp32_masters=fp32) as (model, sharded):
        for entry, evaluator in zip(declared, evaluators, strict=True):
            metrics = evaluator(model, ctx)
            if dist.is_main:
                results[_write(run_dir, entry, step, metrics, sharded)] = metrics
    distributed.barrier()
    distributed.cleanup()
    return results


def main(args) -> int:
    from core.config import parse_override

    declared = None  # the run's own
    if args.evaluator:
        declared = [{name: dict(parse_override(o) for o in options)}
                    for name, *options in args.evaluator]  # fmt: skip
    results = evaluate(args.run_dir, declared, args.step, args.batch_size, args.fp32)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, rank 0 has the metrics
        print(json.dumps(results, indent=2))
    return 0
