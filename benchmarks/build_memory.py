"""Peak resident memory per rank once a randomly initialised model is built and wrapped, ddp,
fsdp and zero3 side by side, W = 1, 2, 4 ranks on CPU (issue 14 item 1).

    python benchmarks/build_memory.py
    python benchmarks/build_memory.py --world-sizes 2 --mmap-threshold 131072

Each run is `vlscale train` under torchrun (gloo, fp32) on benchmarks/peak_memory.py's 164M
two-tower model, but with random towers (configs, no checkpoints: a SigLIP trained from scratch),
stopped once the engine is built (the weights initialised and, under fsdp, sharded). ddp holds
the whole model on every rank; under fsdp and zero3 the task is built deferred
(core/deferred_init.py) and each rank replays and keeps only its shards (zero3: its partitions,
engines/zero.py partition_while_reading), so its peak should be the process's fixed cost plus
about 1/W of the model (zero3 once DeepSpeed has allocated its optimizer state: 5/W of it, fp32
weights, masters, gradients and AdamW's two moments). The fixed cost is measured by the same
job with the tiny towers.
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

def record(key):
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            hwm = int(line.split()[1]) * 1024
    path = os.path.join({out!r}, "rank" + os.environ["RANK"] + ".json")
    seen = json.loads(open(path).read()) if os.path.exists(path) else {{}}
    with open(path, "w") as f:
        f.write(json.dumps({{**seen, key: hwm}}))

def built(*args, _real=loop.build_engine, **kwargs):
    _real(*args, **kwargs)
    record("built")
    raise SystemExit(0)

if {deepspeed!r}:  # what a rank holds when DeepSpeed is given the model
    import deepspeed

    def initialize(*args, _real=deepspeed.initialize, **kwargs):
        record("initialize")
        return _real(*args, **kwargs)

    deepspeed.initialize = initialize
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


def peak(work: Path, size: str, engine: str, world: int) -> dict[str, int]:
    """The largest rank's VmHWM once the engine is built (`built`) and, under DeepSpeed, when
    deepspeed.initialize is called (`initialize`: the weights read, under zero3 partitioned;
    DeepSpeed's optimizer state not yet allocated)."""
    run = Path(tempfile.mkdtemp(dir=work, prefix=f"{size}-{engine}-{world}-"))
    script = run / "driver.py"
    driver = DRIVER.format(root=str(ROOT), out=str(run), deepspeed=engine.startswith("zero"))
    script.write_text(textwrap.dedent(driver))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}",
           f"--master_port={29650 + os.getpid() % 50}", str(script), "train", "tiny_siglip",
           *overrides(work, size, engine, run / "run")]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    ranks = [json.loads((run / f"rank{r}.json").read_text()) for r in range(world)]
    return {key: max(rank[key] for rank in ranks) for key in ranks[0]}


def fp32_bytes(work: Path) -> int:
    """The model's weights in fp32, from a build on the meta device."""
    import torch

    from core.recipe import load_config
    from core.tasks import build_task

    cfg = load_config("tiny_siglip", overrides(work, "base", "ddp", work / "unused"))
    with torch.device("meta"):
        task = build_task(cfg)
    return sum(p.numel() * 4 for p in task.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world-sizes", default="1,2,4")
    parser.add_argument("--engines", default="ddp,fsdp,zero3")
    parser.add_argument("--mmap-threshold", type=int, default=0, metavar="BYTES",
                        help="fix glibc's mmap threshold (MALLOC_MMAP_THRESHOLD_)")  # fmt: skip
    args = parser.parse_args()
    if args.mmap_threshold:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    work = Path(tempfile.mkdtemp(prefix="build_memory-"))
    engines = args.engines.split(",")
    model_bytes = fp32_bytes(work)
    print(
        "model part = the job's VmHWM minus the same job's with tiny towers, MiB; "
        "x model = / the model's fp32 bytes"
    )
    for world in [int(w) for w in args.world_sizes.split(",")]:
        for engine in engines:
            fixed = peak(work, "tiny", engine, world)
            total = peak(work, "base", engine, world)
            for key in total:
                part = total[key] - fixed[key]
                print(
                    f"W={world} {engine:>5} {key:>10}: {total[key] / MiB:6.0f} MiB, model "
                    f"part {part / MiB:5.0f} MiB = {part / model_bytes:.2f}x",
                    flush=True,
                )


if __name__ == "__main__":
    main()
