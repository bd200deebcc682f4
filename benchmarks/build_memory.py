"""Peak resident memory per rank once a randomly initialised model is built and wrapped, ddp vs
fsdp side by side, W = 1, 2, 4 ranks on CPU (issue 14 item 1).

    python benchmarks/build_memory.py
    python benchmarks/build_memory.py --world-sizes 2 --mmap-threshold 131072

Each run is `vlscale train` under torchrun (gloo, fp32) on benchmarks/peak_memory.py's 164M
two-tower model, but with random towers (configs, no checkpoints: a SigLIP trained from scratch),
stopped once the engine is built (the weights initialised and, under fsdp, sharded). ddp holds
the whole model on every rank; under fsdp the task is built deferred (core/deferred_init.py) and
each rank replays and keeps only its shards, so its peak should be the process's fixed cost plus
about 1/W of the model. The fixed cost is measured by the same job with the tiny towers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.peak_memory import SIZES  # noqa: E402

MiB = 2**20

DRIVER = """
import json, os, sys
sys.path.insert(0, {root!r})
import core.loop as loop

def built(*args, _real=loop.build_engine, **kwargs):
    _real(*args, **kwargs)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            hwm = int(line.split()[1]) * 1024
    with open(os.path.join({out!r}, "rank" + os.environ["RANK"] + ".json"), "w") as f:
        f.write(json.dumps(hwm))
    raise SystemExit(0)

loop.build_engine = built
from launch.cli import main
sys.exit(main(sys.argv[1:]))
"""


def overrides(work: Path, size: str, engine: str, run: Path) -> list[str]:
    from core.data.synthetic import write_synthetic_shards

    shapes = work / "shapes"
    if not (shapes / "tokenizer").exists():
        write_synthetic_shards(shapes, n_train=64, n_val=32, seed=0, shard_size=64, image_size=64)
    over = {"run_dir": run, "model.tokenizer": shapes / "tokenizer", "engine.kind": engine,
            "data.train": shapes / "train-000000.tar", "data.val": shapes / "val-000000.tar",
            "data.batch_size": 4, "data.num_workers": 0, "optim.max_steps": 1,
            "logging.wandb.mode": "disabled", "eval.evaluators": "[]", "task.embed_dim": 256,
            "model.vision_config.image_size": 64, "model.vision_config.patch_size": 8}  # fmt: skip
    for tower in ("vision", "text"):
        for key, value in SIZES[size][tower].items():
            over[f"model.{tower}_config.{key}"] = value
    return [f"{k}={v}" for k, v in over.items()]


def peak(work: Path, size: str, engine: str, world: int) -> int:
    """The largest rank's VmHWM once the engine is built."""
    run = Path(tempfile.mkdtemp(dir=work, prefix=f"{size}-{engine}-{world}-"))
    script = run / "driver.py"
    script.write_text(textwrap.dedent(DRIVER.format(root=str(ROOT), out=str(run))))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}",
           f"--master_port={29650 + os.getpid() % 50}", str(script), "train", "tiny_siglip",
           *overrides(work, size, engine, run / "run")]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    return max(json.loads((run / f"rank{r}.json").read_text()) for r in range(world))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world-sizes", default="1,2,4")
    parser.add_argument("--engines", default="ddp,fsdp")
    parser.add_argument("--mmap-threshold", type=int, default=0, metavar="BYTES",
                        help="fix glibc's mmap threshold (MALLOC_MMAP_THRESHOLD_)")  # fmt: skip
    args = parser.parse_args()
    if args.mmap_threshold:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    work = Path(tempfile.mkdtemp(prefix="build_memory-"))
    engines = args.engines.split(",")
    print(f"{'W':>2} " + " ".join(f"{e + ' MiB':>10} {e + ' model':>11}" for e in engines)
          + "   fsdp/ddp (model part)")  # fmt: skip
    for world in [int(w) for w in args.world_sizes.split(",")]:
        row, model = [], {}
        for engine in engines:
            fixed = peak(work, "tiny", engine, world)
            total = peak(work, "base", engine, world)
            model[engine] = total - fixed
            row.append(f"{total / MiB:>10.0f} {model[engine] / MiB:>11.0f}")
        ratio = model["fsdp"] / model["ddp"] if {"ddp", "fsdp"} <= model.keys() else float("nan")
        print(f"{world:>2} " + " ".join(row) + f"   {ratio:.2f}x", flush=True)


if __name__ == "__main__":
    main()
