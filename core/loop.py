"""The training loop every recipe shares: step -> log -> evaluate -> checkpoint.

It knows nothing about contrastive vs VLM training: it uses only the task contract
(core/tasks/base.py), the engines' (core/engines/base.py) and the evaluators'
(core/evaluators/base.py). The task turns a batch into a loss, the engine owns backward/step/
state, the stream owns the data position, the declared evaluators measure. Restarting the same
command resumes from the newest complete checkpoint (`resume=auto`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import deferred_init, distributed, preemption, runlock
from .checkpoint import Checkpointer
from .config import Config, ConfigError
from .distributed import to_device
from .engines import build_engine, engine_class
from .evaluators import EvalContext, build_evaluators
from .flops import peak_flops
from .lazy_tensors import StandIns
from .logger import MetricsLogger
from .optim import scaled_lr
from .recipe import config_changes
from .report import write_report
from .tasks import build_task

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    pass


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextlib.contextmanager
def building_for(kind: str):
    """Context manager to build a task in for engine `kind`: under an engine that loads into
    shards, the weights of Hugging Face checkpoints and the randomly initialised ones
    (core/deferred_init.py) are stand-ins until the engine reads each rank's shards of them (no
    rank holds them whole)."""
    if not engine_class(kind).loads_into_shards:
        yield
        return
    with StandIns().active(), deferred_init.deferring():
        yield


def total_steps(cfg: Config, global_batch: int, train_samples: int | None) -> int:
    if cfg.optim.epochs > 0:
        if not train_samples:
            raise ValueError("optim.epochs needs the train split size (a sizes.json beside shards)")
        return max(1, int(cfg.optim.epochs * train_samples / global_batch))
    return cfg.optim.max_steps


def train(cfg: Config, final_checkpoint: bool = True) -> dict:
    """Run (or resume) training to the end; returns the last evaluation's metrics (rank 0).
    `final_checkpoint=False` (`vlscale doctor`'s throwaway run) skips the checkpoint at the end:
    for a large model that is the slowest part of a short check and a full copy on disk."""
    started = time.monotonic()  # metrics rows' `elapsed` counts from here (this job)
    dist = distributed.init_distributed(cfg.launch.backend, cfg.launch.timeout_minutes)
    preemption.install()  # SLURM's warning signal: finish the step, checkpoint, stop
    logging.basicConfig(
        level=logging.INFO if dist.is_main else logging.WARNING,
        format=f"[%(asctime)s rank{dist.rank}] %(message)s",
    )
    # One live job per run directory (core/runlock.py): taken before anything is written to it,
    # released however this returns (a crash releases it too: the OS drops the flock).
    with runlock.hold(cfg.run_dir, dist):
        return _train(cfg, dist, started, final_checkpoint)


def _train(
    cfg: Config, dist: distributed.DistInfo, started: float, final_checkpoint: bool = True
) -> dict:
    run_dir = Path(cfg.run_dir)
    ckpt = Checkpointer(run_dir, dist, cfg.checkpoint.keep)
    resume_from = ckpt.resolve_resume(cfg.resume)
    # Before config.yaml is replaced: a changed config must not resume silently.
    changed = {} if resume_from is None else ckpt.check_config(resume_from, cfg, config_changes)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        # resume_changes=allow is this job's permission, not the run's: later jobs ask again.
        saved = dataclasses.replace(cfg, resume_changes="refuse")
        (run_dir / "config.yaml").write_text(saved.to_yaml())
    distributed.barrier()
    seed_everything(cfg.seed)  # same init on every rank

    with building_for(cfg.engine.kind):
        task = build_task(cfg)
        evaluators = build_evaluators(cfg.eval.evaluators, task)
        seed_everything(cfg.seed + 1000 * dist.rank)  # per-rank randomness from here on
        train_stream = task.train_stream(dist)
        global_batch = cfg.data.batch_size * cfg.optim.accum_steps * dist.world_size
        steps = total_steps(cfg, global_batch, train_stream.num_samples())
        engine = build_engine(task, cfg, dist, scaled_lr(cfg.optim, global_batch), steps)

    start_step = 0
    if resume_from is not None:
        start_step, extra = ckpt.load(resume_from, engine)
        check_rebuilt(extra, task, resume_from)
        train_stream.load_state_dict(extra["data"])
    logger = MetricsLogger(cfg, dist.is_main, start_step, steps, started=started)
    # The run's length in steps where `vlscale status` finds it (with optim.epochs it depends on
    # the split size and the global batch, which the config alone does not give).
    logger.event(
        start_step, "start", total_steps=steps, global_batch=global_batch,
        world_size=dist.world_size, sharded_eval=cfg.eval.sharded and engine.shards_parameters,
    )  # fmt: skip
    if resume_from is not None:
        logger.event(start_step, "resume", checkpoint=str(resume_from))
        if changed:  # let through by resume_changes=allow
            logger.event(start_step, "config_changed", changes=changed)

    nonfinite_in_a_row = skipped_total = 0
    batches = iter(train_stream)
    window = _Window(cfg.logging.peak_flops or peak_flops(dist.device, cfg.engine.precision))
    eval_metrics: dict = {}
    step = start_step
    try:
        while step < steps:
            t0 = time.perf_counter()
            result = train_step(task, engine, batches, cfg.optim.accum_steps, dist)
            step += 1
            if not result.stepped:
                nonfinite_in_a_row += 1
                skipped_total += 1
                logger.event(step, "skipped_step", loss=result.loss, grad_norm=result.grad_norm)
                if nonfinite_in_a_row >= cfg.optim.max_nonfinite_in_a_row:
                    raise NonFiniteLossError(
                        f"{nonfinite_in_a_row} optimizer steps in a row had a non-finite loss or "
                        f"gradient norm (last: loss={result.loss}, grad_norm={result.grad_norm}) "
                        f"at step {step}; stopping. The last checkpoint predates them."
                    )
            else:
                nonfinite_in_a_row = 0
            window.add(time.perf_counter() - t0, result)

            first = step == 1 and cfg.logging.first_step
            if first or step % cfg.logging.every == 0 or step == steps:
                metrics = {
                    "loss": result.loss,
                    **{"lr" if k == "default" else f"lr/{k}": v for k, v in engine.lrs.items()},
                    "grad_norm": result.grad_norm,
                    "skipped_steps": skipped_total,
                    **window.flush(),
                    **{k: float(v) for k, v in result.task_metrics.items()},
                    **{f"data/{k}": v for k, v in train_stream.stats().items()},
                    **memory_metrics(dist.device),
                }
                logger.log(step, metrics)
            logger.advance(step)

            stop = result.stop  # every rank agrees: the flag was all-reduced
            if step != steps:
                due = [e for e in evaluators if every(e, cfg) and step % every(e, cfg) == 0]
                metrics, stopped = run_evaluators(due, cfg, dist, engine, logger, step)
                eval_metrics, stop = metrics or eval_metrics, stop or stopped
            periodic = cfg.checkpoint.every and step % cfg.checkpoint.every == 0
            if (periodic or stop) and step != steps:
                save_checkpoint(ckpt, step, engine, train_stream)
            if stop and step != steps:
                interrupt(step, logger, ckpt)
        # The last checkpoint before the final evaluation: a time limit that falls during a long
        # evaluation then costs the evaluation, never the last steps; the resumed run (at the
        # last step) only evaluates.
        if final_checkpoint and (resume_from is None or start_step < steps):
            save_checkpoint(ckpt, step, engine, train_stream)
        if start_step < steps or not final_eval_written(run_dir, steps):
            metrics, stopped = run_evaluators(evaluators, cfg, dist, engine, logger, step)
            if stopped:
                interrupt(step, logger, ckpt)
            eval_metrics = metrics
    finally:
        logger.close()
    if dist.is_main and cfg.logging.report:
        write_report(run_dir)
    distributed.barrier()
    if cfg.checkpoint.export and dist.is_main:  # after the barrier: nobody waits on a collective
        from .streamed_export import export_run

        log.info("exported to %s", export_run(run_dir, run_dir / "export"))
    return eval_metrics


@dataclass
class StepResult:
    loss: float  # global mean: sum of losses / sum of loss weights (nan if any was not finite)
    grad_norm: float
    stepped: bool
    samples: int  # global
    tokens: int  # global
    data_wait: float  # seconds this rank waited for batches
    task_metrics: dict
    flops: float = 0.0  # model FLOPs of this rank's micro-batches (0: the task counts none)
    stop: bool = False  # some rank got a preemption/timeout signal: all stop after this step


def train_step(task, engine, batches, accum_steps: int, dist) -> StepResult:
    """One optimizer step: `accum_steps` micro-batches, gradients synced on the last one only.

    The task's weighting rule (core/tasks/base.py): each micro-batch's loss is a sum over
    `task.loss_weight(batch)` units. The weights of this step's micro-batches are summed over
    ranks first (one all-reduce), and each loss is backpropagated times world_size / that total,
    so that after the engines' mean over ranks the gradient is that of
    sum(every loss) / total: the mean over every unit (token) of the global batch.
    """
    t_data = time.perf_counter()
    host_batches = [next(batches) for _ in range(accum_steps)]
    data_wait = time.perf_counter() - t_data
    flops = sum(task.flops(b) for b in host_batches)  # from host tensors: no device sync
    micro_batches = [to_device(b, dist.device) for b in host_batches]
    local_weight = sum(float(task.loss_weight(b)) for b in micro_batches)
    (total_weight,) = distributed.all_reduce_sum([torch.tensor(local_weight, device=dist.device)])
    loss_scale = dist.world_size / max(total_weight, 1e-12)
    # Sums stay on the device until the one collective below: no host sync per micro-step.
    loss_sum = torch.zeros((), dtype=torch.float64, device=dist.device)
    samples = torch.zeros((), dtype=torch.float64, device=dist.device)
    tokens = torch.zeros((), dtype=torch.float64, device=dist.device)
    task_metrics: dict = {}
    for micro, batch in enumerate(micro_batches):
        last = micro == accum_steps - 1
        out = engine.forward_backward(batch, loss_scale, sync=last)
        loss_sum += out.loss.detach().double()
        samples += out.samples
        tokens += out.tokens
        task_metrics.update(out.metrics)
    finite = torch.isfinite(loss_sum)
    stop_vote = torch.tensor(float(preemption.requested()), device=dist.device)
    # One collective (and one host sync) for everything the ranks must agree on or report.
    n_bad, loss_total, samples, tokens, n_stop = distributed.all_reduce_sum(
        [(~finite).double(), torch.where(finite, loss_sum, 0.0), samples, tokens, stop_vote]
    )
    grad_norm, stepped = engine.step(loss_is_finite=n_bad == 0)
    return StepResult(
        loss=loss_total / max(total_weight, 1e-12) if n_bad == 0 else math.nan,
        grad_norm=grad_norm,
        stepped=stepped,
        samples=int(samples),
        tokens=int(tokens),
        data_wait=data_wait,
        flops=flops,
        task_metrics=task_metrics,  # tensors: read (a host sync) only on logging steps
        stop=n_stop > 0,
    )


def save_checkpoint(ckpt: Checkpointer, step: int, engine, stream) -> None:
    # A poisoned model is never written: every skipped step left the parameters untouched, and
    # this check catches anything else (e.g. a NaN that came in through a finite gradient).
    if not engine.parameters_finite():
        raise NonFiniteLossError(f"parameters are not finite at step {step}; no checkpoint written")
    ckpt.save(step, engine, {"data": stream.state_dict(),
                             "rebuilt_digest": engine.task.rebuilt_digest})  # fmt: skip


def check_rebuilt(extra: dict, task, checkpoint: Path) -> None:
    """The weights a checkpoint leaves out to be rebuilt (Task.rebuilt_prefixes: stage 4's
    frozen reference, from task.init_from) must be rebuilt as they were: a resume from a changed
    init_from would continue against another reference, silently."""
    if "rebuilt_digest" not in extra:  # written before checkpoints recorded it
        return
    saved = extra["rebuilt_digest"][0]  # every rank saved the same
    if saved != task.rebuilt_digest:
        raise ConfigError(
            f"{checkpoint} was written with other rebuilt weights ({task.rebuilt_prefixes()}) "
            f"than this job builds: task.init_from={task.cfg.task.init_from!r} changed since. "
            "Restore it, or start a new run"
        )


def every(evaluator, cfg: Config) -> int:
    """Steps between an evaluator's runs (its own `every`, else eval.every; 0 = at the end)."""
    return evaluator.options.every or cfg.eval.every


def interrupt(step: int, logger: MetricsLogger, ckpt: Checkpointer) -> None:
    """Stop for a preemption/timeout signal (every rank agreed), step_{step} being saved: the
    launcher requeues and the same command resumes."""
    signame = preemption.signal_name() or "a signal on another rank"
    logger.event(step, "interrupted", signal=signame, checkpoint=f"step_{step}")
    distributed.barrier()  # no rank exits (and gets the others killed) before this
    raise preemption.Interrupted(step, signame, str(ckpt.root / f"step_{step}"))


def stop_voted(dist) -> bool:
    """Whether any rank got a preemption/timeout signal (collective: every rank calls it)."""
    (n_stop,) = distributed.all_reduce_sum(
        [torch.tensor(float(preemption.requested()), device=dist.device)]
    )
    return n_stop > 0


def final_eval_written(run_dir: Path, steps: int) -> bool:
    """eval.json holds the evaluation of the last step (an earlier evaluation's does not count)."""
    try:
        return json.loads((run_dir / "eval.json").read_text()).get("step") == steps
    except (OSError, ValueError):
        return False


def run_evaluators(
    evaluators, cfg: Config, dist, engine, logger: MetricsLogger, step: int
) -> tuple[dict, bool]:
    """Run `evaluators` on the task (sharded under fsdp and zero3: eval.sharded); log their
    metrics and tables, and write eval.json (rank 0). Returns the metrics (rank 0; {} elsewhere
    or when none ran) and whether a preemption/timeout signal stopped the round: the ranks vote
    before each evaluator, so a signal during a long evaluation leaves time to checkpoint and
    requeue (then nothing is logged or written for the round)."""
    if not evaluators:
        return {}, False
    ctx = EvalContext(cfg=cfg, dist=dist, step=step, run_dir=Path(cfg.run_dir))
    metrics: dict = {}
    # fsdp and zero3 evaluate sharded (every forward a collective: the ranks keep pace) unless
    # eval.sharded is false; then, and with ddp and zero2, every rank holds the full weights.
    with engine.evaluation(cfg.eval.sharded) as (model, _):
        for evaluator in evaluators:
            if stop_voted(dist):
                return {}, True
            for key, value in evaluator(model, ctx).items():
                # A name two evaluators report (vqa's and cot's num_questions): the later one
                # is qualified by its evaluator's name rather than overwrite the first.
                metrics[f"{evaluator.name}/{key}" if key in metrics else key] = value
    if dist.is_main:
        for name, rows in ctx.tables.items():
            logger.table(step, name, rows)
    if dist.is_main and metrics:
        logger.log(step, {f"eval/{k}": v for k, v in metrics.items()})
        tmp = Path(cfg.run_dir) / "eval.json.tmp"
        tmp.write_text(json.dumps({"step": step, **metrics}, indent=2))
        os.replace(tmp, Path(cfg.run_dir) / "eval.json")
    return metrics, False


def memory_metrics(device: torch.device) -> dict:
    if device.type == "cuda":
        return {
            "mem/allocated_gib": torch.cuda.memory_allocated(device) / 2**30,
            "mem/peak_gib": torch.cuda.max_memory_allocated(device) / 2**30,
        }
    try:  # CPU: resident set size of this process
        with open("/proc/self/statm") as f:
            rss_pages = int(f.read().split()[1])
        return {"mem/rss_gib": rss_pages * os.sysconf("SC_PAGE_SIZE") / 2**30}
    except OSError:
        return {}


class _Window:
    """Throughput over the steps since the last log line. `peak`: this device's peak FLOP/s
    (MFU is logged where it is known)."""

    def __init__(self, peak: float | None = None):
        self.peak = peak
        self.reset()

    def reset(self):
        self.time = self.wait = self.flops = 0.0
        self.samples = self.tokens = 0.0
        self.steps = 0

    def add(self, dt: float, result: StepResult):
        self.time += dt
        self.steps += 1
        self.wait += result.data_wait
        self.samples += result.samples
        self.tokens += result.tokens
        self.flops += result.flops

    def flush(self) -> dict:
        out = {
            "samples_per_s": self.samples / max(self.time, 1e-9),
            "tokens_per_s": self.tokens / max(self.time, 1e-9),
            "data_wait_frac": self.wait / max(self.time, 1e-9),
            "step_time_s": self.time / max(self.steps, 1),  # training only: no eval, checkpoints
        }
        if self.flops:  # model FLOP/s of this rank, and its share of the device's peak
            out["flops_per_s"] = self.flops / max(self.time, 1e-9)
            if self.peak:
                out["mfu"] = out["flops_per_s"] / self.peak
        self.reset()
        return out
