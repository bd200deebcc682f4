"""bf16 loss parity between engines: 20 steps of a small tiny_siglip (the test's model,
tests/test_engines.py) on 2 gloo ranks, same seed and data, each engine in bf16; ddp in fp32 too.

    python benchmarks/bf16_parity.py              # ddp fp32, every engine in bf16
    python benchmarks/bf16_parity.py --seed 1     # another init and data order
    python benchmarks/bf16_parity.py --accum 2    # 2 micro-batches of 8 per rank and step
    python benchmarks/bf16_parity.py --kinds zero2 zero3 --ds-bf16-grads --ds-bf16-masters

Prints every run's loss curve and, for every pair of runs, the largest relative difference of
their losses over the 20 steps. DeepSpeed's own bf16 numerics, as zero2/zero3 ran before vlscale
changed them: `--ds-bf16-grads` drops `communication_data_type` and `data_types.grad_accum_dtype`
from the generated DeepSpeed config (DeepSpeed then reduces and accumulates gradients in bf16);
`--ds-bf16-masters` leaves DeepSpeed's fp32 masters as it starts them, from the weights rounded
to bf16 (`set_fp32_masters` not called). `--accum 2` splits each rank's 16 samples into 2
micro-batches of 8 (SigLIP's loss is per micro-batch: other curves; exercises the accumulation
dtype). `--seed N`: another model init and data order.
`--json FILE` also writes the curves.
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
STEPS = 20


def overrides(shapes: Path, run_dir: Path, **extra) -> list[str]:
    """tests/test_train.py's tiny_overrides, one checkpoint at the end."""
    over = {
        "run_dir": run_dir,
        "model.vision_config.hidden_size": 32,
        "model.vision_config.intermediate_size": 64,
        "model.vision_config.num_hidden_layers": 2,
        "model.vision_config.num_attention_heads": 2,
        "model.vision_config.image_size": 32,
        "model.text_config.hidden_size": 32,
        "model.text_config.intermediate_size": 64,
        "model.text_config.num_hidden_layers": 2,
        "model.text_config.num_attention_heads": 2,
        "model.text_config.num_key_value_heads": 1,
        "model.text_config.head_dim": 16,
        "model.tokenizer": shapes / "tokenizer",
        "task.embed_dim": 32,
        "data.train": shapes / "train-{000000..000003}.tar",
        "data.val": shapes / "val-000000.tar",
        "data.batch_size": 16,
        "data.num_workers": 1,
        "optim.max_steps": STEPS,
        "optim.warmup_steps": 5,
        "optim.lr": 2e-3,
        "logging.every": 1,
        "logging.progress": "false",
        "logging.wandb.mode": "disabled",
        "checkpoint.every": 0,
        "eval.every": 0,
        "eval.batch_size": 64,
        **extra,
    }
    return [f"{k}={v}" for k, v in over.items()]


def worker(args: list[str], bf16_grads: bool, bf16_masters: bool) -> int:
    """One rank of a run (under torchrun): `vlscale train`, optionally with DeepSpeed's own bf16
    gradient reduction and accumulation, and its masters started from bf16 weights."""
    import core.engines.zero as zero

    if bf16_masters:
        zero.set_fp32_masters = lambda initial, rank: None
    if bf16_grads:
        expected = zero.expected_values

        def without_fp32_keys(cfg, world_size):
            values = expected(cfg, world_size)
            for key in zero.DEFAULT_FP32:
                values.pop(key)
            return values

        zero.expected_values = without_fp32_keys
    from launch.cli import main

    return main(args)


def losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def run(shapes: Path, run_dir: Path, over: dict, flags: list[str]) -> list[float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={29500 + os.getpid() % 500}", __file__, "--worker", *flags, "--",
           "train", "tiny_siglip", *overrides(shapes, run_dir, **over)]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{run_dir.name} failed:\n{done.stderr[-3000:]}")
    return losses(run_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kinds", nargs="+", default=["ddp", "zero2", "zero3", "fsdp"])
    parser.add_argument("--accum", type=int, default=1, help="micro-batches per step (16/accum)")
    parser.add_argument("--seed", type=int, default=0, help="the runs' seed (model init, data)")
    parser.add_argument("--ds-bf16-grads", action="store_true")
    parser.add_argument("--ds-bf16-masters", action="store_true")
    parser.add_argument("--no-fp32", action="store_true", help="skip the ddp fp32 run")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.worker:
        sys.exit(worker([a for a in rest if a != "--"], args.ds_bf16_grads, args.ds_bf16_masters))

    from core.data.synthetic import write_synthetic_shards

    tmp = Path(tempfile.mkdtemp(prefix="bf16_parity."))
    shapes = tmp / "shapes"  # the tests' synthetic shards
    write_synthetic_shards(shapes, n_train=1024, n_val=128, seed=0, shard_size=256, image_size=32)
    batch = {"optim.accum_steps": args.accum, "data.batch_size": 16 // args.accum}
    batch["seed"] = args.seed
    runs = [] if args.no_fp32 else [("ddp fp32", {"engine.kind": "ddp", "seed": args.seed}, [])]
    ds_flags = [
        f for f in ("--ds-bf16-grads", "--ds-bf16-masters") if vars(args)[f[2:].replace("-", "_")]
    ]
    for kind in args.kinds:
        flags = ds_flags if kind in ("zero2", "zero3") else []
        name = " ".join(
            [kind, "bf16", *(["accum"] if args.accum > 1 else []), *(f[2:] for f in flags)]
        )
        runs.append((name, {"engine.kind": kind, "engine.precision": "bf16", **batch}, flags))
    curves = {}
    for name, over, flags in runs:
        start = time.time()
        curves[name] = run(shapes, tmp / name.replace(" ", "_"), over, flags)
        print(
            f"{name:28s} {time.time() - start:5.1f}s  " + " ".join(f"{x:.5f}" for x in curves[name])
        )
    shutil.rmtree(tmp, ignore_errors=True)
    names = list(curves)
    print("\nmax relative loss difference over the steps, row [i] vs column [j]")
    print(" " * 36 + "".join(f"{f'[{j}]':>10s}" for j in range(len(names))))
    for i, a in enumerate(names):
        diffs = [max(abs(x - y) / abs(y) for x, y in zip(curves[a], curves[b])) for b in names]
        print(f"[{i}] {a:32s}" + "".join(f"{d:10.2e}" for d in diffs))
    if args.json:
        args.json.write_text(json.dumps(curves, indent=1))


if __name__ == "__main__":
    main()
