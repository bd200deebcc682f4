"""Memory: measured model state per engine (benchmarks/memory.py) against `vlscale plan`, and the
activation memory activation checkpointing saves."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.memory import measure_activations  # noqa: E402
from core.engines import ENGINES  # noqa: E402
from launch.plan import model_state  # noqa: E402

SHAPES = [  # tiny_siglip's shapes, 8 samples a batch
    "data.batch_size=8",
    "model.vision_config.image_size=32",
    "data.max_text_len=16",
]


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> list[str]:
    """SHAPES plus shards and a tokenizer of our own: a fresh clone has no data/shapes."""
    from core.data.synthetic import write_synthetic_shards

    out = tmp_path_factory.mktemp("shapes")
    write_synthetic_shards(out, n_train=64, n_val=16, seed=0, shard_size=64, image_size=32)
    return [
        *SHAPES,
        f"model.tokenizer={out / 'tokenizer'}",
        f"data.train={out / 'train-000000.tar'}",
        f"data.val={out / 'val-000000.tar'}",
    ]


@pytest.mark.slow
def test_activation_checkpointing_cuts_activation_memory(small):
    acts = measure_activations(["engine.precision=fp32", *small], batch_size=8)
    assert acts["full"] < 0.25 * acts["none"], acts
    assert acts["full"] < acts["every_k"] < 0.8 * acts["none"], acts


def _measure(nproc: int, precision: str, small: list[str]) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    script = [str(ROOT / "benchmarks" / "memory.py"), *small, f"engine.precision={precision}"]
    if nproc == 1:
        cmd = [sys.executable, *script]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={29900 + os.getpid() % 50}", *script]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


@pytest.mark.slow
@pytest.mark.parametrize("nproc, precision", [(1, "fp32"), (2, "fp32"), (2, "bf16")])
def test_plan_agrees_with_measured_model_state(nproc, precision, small):
    rows = {r["engine"]: r for r in _measure(nproc, precision, small)}
    assert sorted(rows) == sorted(ENGINES)  # benchmarks/memory.py measures every engine
    for kind, r in rows.items():
        planned = model_state(kind, "none", precision, r["n_params"], r["n_trained"], nproc)
        for part in ("params", "grads", "optimizer"):
            assert planned[part] == pytest.approx(r[part], rel=0.10), (kind, part, planned, r)
    if nproc == 2:
        total = {k: r["params"] + r["grads"] + r["optimizer"] for k, r in rows.items()}
        assert total["fsdp"] <= 0.55 * total["ddp"], total
        if precision == "bf16":  # fp32 ZeRO-3 also keeps an fp32 master beside fp32 weights
            # 2N/W bf16 weights + 4T/W master + 4T/W fp32 gradients + 8T/W AdamW = 9/16 of ddp
            assert total["zero3"] <= 0.5625 * total["ddp"] * 1.001, total
