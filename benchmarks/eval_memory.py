"""What evaluation adds to a rank's memory, sharded (eval.sharded, the default) against a full copy
of the weights on every rank (eval.sharded=false), under fsdp and zero3 (issue 14 item 3).

    python benchmarks/eval_memory.py                          # W=4, fsdp and zero3, both modes
    python benchmarks/eval_memory.py --world-size 2 --engines fsdp

Each row is a real `vlscale train` job under torchrun (gloo, fp32, one training step, then the
final evaluation: retrieval over the validation split) on benchmarks/peak_memory.py's 164M
two-tower model, loaded from its Hugging Face checkpoints. Every rank samples its anonymous
resident memory (RssAnon, every 10 ms) and reports the largest rise above its level when the
evaluation round started (`eval rise`: what evaluation allocates on top of the training state)
and the round's seconds. Side by side in one process: the same job with eval.sharded=false.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.peak_memory import AnonPeak, GiB, status, write_inputs  # noqa: E402


def worker(recipe: str, run_dir: str, kind: str, sharded: str, out: str) -> None:
    """One rank: core.loop.train with the evaluation round's memory rise and time recorded."""
    import core.loop as loop
    from core.recipe import load_config

    anon, rounds = AnonPeak(), []
    evaluate = loop.run_evaluators

    def measured(due, *args, **kwargs):
        start, t0 = status("RssAnon"), time.monotonic()
        anon.peak = start
        result = evaluate(due, *args, **kwargs)
        if due:
            rounds.append({"rise": anon.peak - start, "seconds": time.monotonic() - t0})
        return result

    loop.run_evaluators = measured
    over = [f"engine.kind={kind}", f"run_dir={run_dir}", f"eval.sharded={sharded}",
            "optim.max_steps=1"]  # fmt: skip
    metrics = loop.train(load_config(recipe, over))
    rank = int(os.environ.get("RANK", "0"))
    row = {"rank": rank, **rounds[-1], "metrics": metrics}
    Path(out, f"rank{rank}.json").write_text(json.dumps(row))


def run_job(recipe: Path, kind: str, world: int, sharded: bool, work: Path, port: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    name = f"{kind}-w{world}-{'sharded' if sharded else 'full'}"
    run_dir, marks = work / "runs" / name, work / "marks" / name
    for old in (run_dir, marks):
        shutil.rmtree(old, ignore_errors=True)
    marks.mkdir(parents=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}",
           f"--master_port={port}", __file__, "--worker", str(recipe), str(run_dir), kind,
           str(sharded).lower(), str(marks)]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{done.stderr[-4000:]}")
    shutil.rmtree(run_dir)  # ~1.6 GB of checkpoint per job
    ranks = [json.loads(p.read_text()) for p in sorted(marks.glob("rank*.json"))]
    return {"engine": kind, "world_size": world, "sharded": sharded,
            "rise": max(r["rise"] for r in ranks), "seconds": max(r["seconds"] for r in ranks),
            "metrics": ranks[0]["metrics"]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--engines", default="fsdp,zero3")
    parser.add_argument("--world-size", type=int, default=4)
    parser.add_argument("--work", default="", help="inputs and runs (default: a temp dir)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="eval_memory-"))
    recipe = write_inputs(work, "base")
    port = 29600 + os.getpid() % 100

    from core.recipe import load_config
    from launch.plan import count_parameters

    n, _ = count_parameters(load_config(str(recipe)))
    print(f"{n / 1e6:.1f}M parameters: {4 * n / GiB:.2f} GiB in fp32; W={args.world_size}")
    print(f"{'engine':>6} {'full':>10} {'sharded':>10} {'ratio':>6} {'full s':>7} {'shard s':>7}"
          "  (eval rise of the largest rank, GiB)")  # fmt: skip
    for kind in args.engines.split(","):
        full = run_job(recipe, kind, args.world_size, False, work, port)
        sharded = run_job(recipe, kind, args.world_size, True, work, port)
        same = full["metrics"] == sharded["metrics"]
        print(f"{kind:>6} {full['rise'] / GiB:>10.3f} {sharded['rise'] / GiB:>10.3f} "
              f"{sharded['rise'] / full['rise']:>6.2f} {full['seconds']:>7.1f} "
              f"{sharded['seconds']:>7.1f}  metrics equal: {same}", flush=True)  # fmt: skip


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(*sys.argv[2:7])
    else:
        main()
