"""What vlscale's training step costs over a bare PyTorch loop, and how long it waits for data.

Both loops train copies of the same tiny_siglip task on the same in-memory batches with the same
AdamW settings and gradient clipping; they are timed alternately in one process, so machine
noise hits both alike. Then the real ShardStream (2 workers) feeds vlscale's step, and the
fraction of step time spent waiting for batches is measured.

    python benchmarks/overhead.py [--steps 20 --rounds 5 --data data/shapes]
"""

from __future__ import annotations

import argparse
import copy
import itertools
import statistics
import tempfile
import time
from pathlib import Path

import torch

from core.data.synthetic import write_synthetic_shards
from core.distributed import init_distributed
from core.engines import build_engine
from core.loop import seed_everything, train_step
from core.optim import build_optimizer
from core.recipe import load_config
from core.tasks import build_task


def bare_step(model, optimizer, batch, clip: float) -> None:
    loss = model(batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/shapes", help="shapes shards (made if absent)")
    parser.add_argument("--steps", type=int, default=20, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    data = Path(args.data)
    if not (data / "sizes.json").exists():
        write_synthetic_shards(data, n_train=4000, n_val=256, seed=0, shard_size=500)
    n_train = sum(1 for _ in data.glob("train-*.tar"))
    cfg = load_config(
        "tiny_siglip",
        [
            f"run_dir={tempfile.mkdtemp()}",
            f"data.train={data}/train-{{000000..{n_train - 1:06d}}}.tar",
            f"model.tokenizer={data}/tokenizer",
            f"data.num_workers={args.workers}",
            "logging.wandb.mode=disabled",
        ],
    )
    dist = init_distributed()
    seed_everything(0)
    task = build_task(cfg)
    bare = copy.deepcopy(task)
    engine = build_engine(task, cfg, dist, cfg.optim.lr, cfg.optim.max_steps)
    optimizer = build_optimizer(bare, cfg.optim, cfg.optim.lr)

    stream = task.train_stream(dist)
    batches = list(itertools.islice(iter(stream), 8))
    print(f"tiny_siglip, batch {cfg.data.batch_size}, {args.rounds} rounds x {args.steps} steps")

    def time_vlscale() -> float:
        cycle = itertools.cycle(batches)
        start = time.perf_counter()
        for _ in range(args.steps):
            train_step(task, engine, cycle, 1, dist)
        return time.perf_counter() - start

    def time_bare() -> float:
        cycle = itertools.cycle(batches)
        start = time.perf_counter()
        for _ in range(args.steps):
            bare_step(bare, optimizer, next(cycle), cfg.optim.grad_clip)
        return time.perf_counter() - start

    time_vlscale(), time_bare()  # warm-up
    ours, theirs = [], []
    for _ in range(args.rounds):
        ours.append(time_vlscale())
        theirs.append(time_bare())
    samples = args.steps * cfg.data.batch_size
    ours_sps, bare_sps = samples / statistics.median(ours), samples / statistics.median(theirs)
    print(f"bare PyTorch loop  {bare_sps:8.1f} samples/s (median of {args.rounds})")
    print(f"vlscale train_step {ours_sps:8.1f} samples/s")
    print(f"ratio vlscale/bare {ours_sps / bare_sps:.3f}   (goal >= 0.97)")

    live = iter(stream)
    for _ in range(3):  # let the workers fill their prefetch queues
        train_step(task, engine, live, 1, dist)
    waited, start = 0.0, time.perf_counter()
    for _ in range(args.steps * 2):
        waited += train_step(task, engine, live, 1, dist).data_wait
    frac = waited / (time.perf_counter() - start)
    print(f"data wait with {args.workers} workers: {100 * frac:.1f}% of step time  (goal < 5%)")


if __name__ == "__main__":
    main()
