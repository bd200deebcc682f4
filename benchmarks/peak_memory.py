"""Peak resident memory per rank, every engine, W = 1, 2, 4 ranks on CPU (issue 14 item 9).

    python benchmarks/peak_memory.py                    # 164M two-tower model, every engine
    python benchmarks/peak_memory.py --world-sizes 2 --engines ddp,fsdp
    python benchmarks/peak_memory.py --mmap-threshold 131072   # freed memory returned to the OS

Each run is a real `vlscale train` job under torchrun (one rank per process, gloo, fp32): build
the SigLIP-style task from two Hugging Face checkpoints (a ViT-B/16-sized SigLIP vision tower and
a 9-layer Qwen3 text tower, random weights written by transformers' save_pretrained) -> wrap it
in the engine -> 5 training steps -> the final checkpoint -> the final evaluation (retrieval);
then `vlscale export` of that run, offline in one process. Every rank records its VmHWM (peak
resident set, /proc/self/status) after each phase, so the table says where the peak came from,
and the peak of its anonymous memory (RssAnon sampled every 10 ms: the `anon` columns), which
leaves out the page cache of the memory-mapped checkpoint files that VmHWM counts (see AnonPeak).

Against it: the bound of issue 14 item 9, 1.25 x (parameter + gradient + optimizer bytes) / W
+ activations + the fixed cost of a process, where the model-state bytes are the engine's own
`memory_per_rank` (what `vlscale plan` prints), activations are measured on one forward of the
model (benchmarks/memory.py's heap measure) and the fixed cost is the same job (engine, W) with a
tiny model (one 32-wide block per tower): the interpreter, torch, DeepSpeed, the data worker's
share, the evaluation code.
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

GiB = 2**30
PHASES = ("build", "engine", "train", "checkpoint", "eval")
STEPS = 5

# Tower sizes: "base" is 164M parameters (86M vision, 78M text with its embedding), "tiny" measures
# what a process costs with (nearly) no model.
SIZES = {
    "base": dict(vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                             num_attention_heads=12),
                 text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=9,
                           num_attention_heads=12, num_key_value_heads=4, head_dim=64)),
    "tiny": dict(vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=2),
                 text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=16)),
}  # fmt: skip


def status(field: str) -> int:
    """A memory figure of this process from /proc/self/status, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def vm_hwm() -> int:
    """This process's peak resident set in bytes (VmHWM)."""
    return status("VmHWM")


class AnonPeak:
    """The peak of this process's anonymous resident memory (RssAnon: heap, tensors), sampled
    every 10 ms by a thread. VmHWM also counts the file pages of memory-mapped checkpoints a
    process has touched (the towers are loaded memory-mapped; sharding reads every page once):
    those pages are the kernel's page cache, shared by every rank of a node and dropped under
    pressure. A spike shorter than 10 ms can be missed."""

    def __init__(self):
        import threading

        self.peak = self.peak_since = status("RssAnon")
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while True:
            now = status("RssAnon")
            self.peak, self.peak_since = max(self.peak, now), max(self.peak_since, now)
            time.sleep(0.01)


# ---------------------------------------------------------------------------- inputs


def write_inputs(work: Path, size: str) -> Path:
    """Shards, a tokenizer and the two towers' checkpoints under `work`; returns the recipe."""
    import torch
    import transformers as hf
    import yaml

    from core.data.synthetic import write_synthetic_shards

    shapes = work / "shapes"
    if not (shapes / "tokenizer").exists():
        write_synthetic_shards(shapes, n_train=256, n_val=64, seed=0, shard_size=256,
                               image_size=64)  # fmt: skip
    tokenizer = hf.AutoTokenizer.from_pretrained(shapes / "tokenizer")
    towers = work / size
    if not (towers / "text" / "config.json").exists():
        torch.manual_seed(0)
        s = SIZES[size]
        vision = hf.SiglipVisionConfig(**s["vision"], image_size=64, patch_size=8,
                                       vision_use_head=False)  # fmt: skip
        hf.SiglipVisionModel(vision).save_pretrained(towers / "vision")
        text = hf.Qwen3Config(**s["text"], vocab_size=len(tokenizer), max_position_embeddings=64,
                              tie_word_embeddings=True)  # fmt: skip
        hf.Qwen3Model(text).save_pretrained(towers / "text")
    recipe = {
        "seed": 0,
        "model": {"vision": str(towers / "vision"), "text": str(towers / "text"),
                  "tokenizer": str(shapes / "tokenizer")},
        "task": {"kind": "siglip", "embed_dim": 256, "pooling": "mean", "text_pooling": "mean",
                 "text_attention": "bidirectional"},
        "data": {"train": str(shapes / "train-000000.tar"), "val": str(shapes / "val-000000.tar"),
                 "batch_size": 8, "num_workers": 1, "max_text_len": 32},
        "optim": {"lr": 1e-4, "max_steps": STEPS, "warmup_steps": 0},
        "engine": {"precision": "fp32"},
        "checkpoint": {"every": 0, "keep": 1},
        "logging": {"every": 1, "wandb": {"mode": "disabled"}},
        "eval": {"every": 0, "batch_size": 32, "evaluators": ["retrieval"]},
    }  # fmt: skip
    path = work / f"{size}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


# ---------------------------------------------------------------------------- in a rank


def worker(recipe: str, run_dir: str, kind: str, out: str) -> None:
    """One rank of a training job: core.loop.train with VmHWM taken after each phase."""
    import core.loop as loop
    from core.recipe import load_config

    marks: dict[str, int] = {}
    anon = AnonPeak()

    def marked(fn, phase, when=lambda *a: True):
        def wrapper(*args, **kwargs):
            result = fn(*args, **kwargs)
            if when(*args):
                marks[phase] = vm_hwm()
            return result

        return wrapper

    calls: list[dict] = []

    def timed(fn, name):  # RssAnon when a call starts, and its peak while the call runs
        def wrapper(*args, **kwargs):
            start = status("RssAnon")
            anon.peak_since = start
            result = fn(*args, **kwargs)
            calls.append({"call": name, "start": start, "peak": anon.peak_since})
            return result

        return wrapper

    build_engine = loop.build_engine

    def engine_with_calls(*args, **kwargs):
        engine = build_engine(*args, **kwargs)
        engine.forward_backward = timed(engine.forward_backward, "forward_backward")
        engine.step = timed(engine.step, "step")
        return engine

    loop.build_task = marked(loop.build_task, "build")
    loop.build_engine = marked(engine_with_calls, "engine")
    loop.train_step = marked(loop.train_step, "train")
    loop.save_checkpoint = marked(loop.save_checkpoint, "checkpoint")
    loop.run_evaluators = marked(loop.run_evaluators, "eval", lambda due, *a: bool(due))
    extra = json.loads(os.environ.get("PEAK_MEMORY_SET", "[]"))
    cfg = load_config(recipe, [f"engine.kind={kind}", f"run_dir={run_dir}", *extra])
    loop.train(cfg)
    rank = int(os.environ.get("RANK", "0"))
    row = {"rank": rank, "peak": vm_hwm(), "anon": anon.peak,
           **{f"after_{k}": marks.get(k) for k in PHASES}, "calls": calls}  # fmt: skip
    Path(out, f"rank{rank}.json").write_text(json.dumps(row))


def export_worker(run_dir: str, out: str, result: str) -> None:
    """`vlscale export` in this process, then its VmHWM."""
    from launch.export import export

    anon = AnonPeak()
    export(run_dir, out)
    Path(result).write_text(json.dumps({"peak": vm_hwm(), "anon": anon.peak}))


# ---------------------------------------------------------------------------- driver


def model_numbers(recipe: Path) -> dict:
    """Parameters (all, trained) and one micro-batch's activation bytes, measured."""
    import torch

    from benchmarks.memory import activation_bytes
    from core.recipe import load_config
    from core.tasks import build_task
    from launch.plan import activations, count_parameters

    cfg = load_config(str(recipe), ["data.num_workers=0"])
    n, t = count_parameters(cfg)
    planned = activations(cfg, "none")
    torch.manual_seed(0)
    task = build_task(cfg)
    batch = next(iter(task.train_stream(_single_rank())))
    acts = activation_bytes(task, batch)
    return {"n_params": n, "n_trained": t, "activations": acts, "planned_activations": planned,
            "recipe": str(recipe)}  # fmt: skip


def _single_rank():
    import torch

    from core.distributed import DistInfo

    return DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def run_job(recipe: Path, kind: str, world: int, work: Path, port: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    name = f"{recipe.stem}-{kind}-w{world}"
    run_dir, marks, exported = work / "runs" / name, work / "marks" / name, work / "exports" / name
    for old in (run_dir, marks, exported):  # a finished run left in --work would only resume
        shutil.rmtree(old, ignore_errors=True)
    marks.mkdir(parents=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}",
           f"--master_port={port}", __file__, "--worker", str(recipe), str(run_dir), kind,
           str(marks)]  # fmt: skip
    t0 = time.monotonic()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{done.stderr[-4000:]}")
    ranks = [json.loads(p.read_text()) for p in sorted(marks.glob("rank*.json"))]
    result = work / "marks" / f"{name}-export.json"
    export = [sys.executable, __file__, "--export-worker", str(run_dir), str(exported),
              str(result)]  # fmt: skip
    done = subprocess.run(export, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"export of {name} failed:\n{done.stderr[-4000:]}")
    for measured in (run_dir, exported):  # ~1.6 GB of checkpoints per row: 24 rows filled 39 GB
        shutil.rmtree(measured)
    export_marks = json.loads(result.read_text())
    return {"engine": kind, "world_size": world, "ranks": ranks, "seconds": time.monotonic() - t0,
            "export_peak": export_marks["peak"], "export_anon": export_marks["anon"]}  # fmt: skip


def model_state_bytes(kind: str, world: int, numbers: dict) -> int:
    """Parameters + gradients + optimizer state per rank: the engine's own memory_per_rank, as
    `vlscale plan` prints it."""
    from launch.plan import model_state

    n, t = numbers["n_params"], numbers["n_trained"]
    return sum(model_state(kind, "none", "fp32", n, t, world).values())


def bound(kind: str, world: int, numbers: dict, overhead: int) -> int:
    """Issue 14's goal for one rank: 1.25 x model state / W + activations + process overhead."""
    return int(1.25 * model_state_bytes(kind, world, numbers) + numbers["activations"] + overhead)


def planned(kind: str, world: int, numbers: dict, overhead: int) -> int:
    """What `vlscale plan` says a rank holds (model state + the engine's buffers + its
    activation estimate), plus the process overhead, which plan leaves to the reader's
    headroom."""
    from core.recipe import load_config
    from launch.plan import buffers

    cfg = load_config(numbers["recipe"], [])
    state = model_state_bytes(kind, world, numbers)
    bufs = buffers(cfg, kind, "none", numbers["n_trained"], world)
    return state + bufs + numbers["planned_activations"] + overhead


COLUMNS = ("engine", "W", "peak", "x ddp", "overhd", "bound", "ok", "plan", "anon", "x ddp",
           "a-ovh", "a-bnd", "a-ok", "build", "engine", "train", "ckpt", "eval", "export",
           "ex-an", "s")  # fmt: skip


def table_line(cells) -> str:
    return " ".join(f"{c:>6.2f}" if isinstance(c, float) else f"{c!s:>6}" for c in cells)


def main() -> None:
    from core.engines import ENGINES

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--world-sizes", default="1,2,4")
    parser.add_argument("--work", default="", help="inputs and runs (default: a temp dir)")
    parser.add_argument("--out", default="", help="append the JSON rows here")
    parser.add_argument(
        "--mmap-threshold",
        type=int,
        default=0,
        metavar="BYTES",
        help="fix glibc's mmap threshold for every job (MALLOC_MMAP_THRESHOLD_), e.g. 131072: "
        "freed blocks go back to the OS instead of staying in the heap (BENCHMARKS.md)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config override for every job, e.g. engine.ds_config=my_zero3.json",
    )
    parser.add_argument(
        "--calls",
        action="store_true",
        help="print, for the peak rank of each job, RssAnon at the start of each training "
        "call (forward_backward, step) and its peak while the call ran",
    )
    args = parser.parse_args()
    os.environ["PEAK_MEMORY_SET"] = json.dumps(args.set)
    if args.mmap_threshold:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    work = Path(args.work or tempfile.mkdtemp(prefix="peak_memory-"))
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    tiny = write_inputs(work, "tiny")
    recipe = write_inputs(work, "base")
    port = 29700 + os.getpid() % 100
    numbers = model_numbers(recipe)
    state = model_state_bytes("ddp", 1, numbers)  # the whole model's
    acts, n = numbers["activations"] / GiB, numbers["n_params"] / 1e6
    plan_acts = numbers["planned_activations"] / GiB
    print(f"{n:.1f}M parameters, model state {state / GiB:.2f} GiB (fp32 AdamW), activations "
          f"{acts:.3f} GiB per micro-batch measured ({plan_acts:.3f} planned); overhead: the "
          "same job with the tiny model")  # fmt: skip
    threshold = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    print("glibc mmap threshold:", f"fixed at {threshold} bytes" if threshold else "glibc's own")
    print(table_line(COLUMNS), "(GiB; s: seconds)")
    rows, ddp_peak, ddp_anon = [], {}, {}
    for world in [int(w) for w in args.world_sizes.split(",")]:
        for kind in args.engines.split(","):
            tiny_row = run_job(tiny, kind, world, work, port + 1 + world)
            overhead = max(r["peak"] for r in tiny_row["ranks"])
            anon_overhead = max(r["anon"] for r in tiny_row["ranks"])
            row = run_job(recipe, kind, world, work, port + 1 + world)
            peak = max(r["peak"] for r in row["ranks"])
            anon = max(r["anon"] for r in row["ranks"])
            top = max(row["ranks"], key=lambda r: r["peak"])
            if kind == "ddp":
                ddp_peak[world], ddp_anon[world] = peak, anon
            limit = bound(kind, world, numbers, overhead)
            anon_limit = bound(kind, world, numbers, anon_overhead)
            plan = planned(kind, world, numbers, overhead)
            row.update(peak=peak, bound=limit, plan=plan, overhead=overhead, anon=anon,
                       anon_bound=anon_limit, anon_overhead=anon_overhead, **numbers)  # fmt: skip
            rows.append(row)
            ratio = f"{peak / ddp_peak[world]:.2f}" if world in ddp_peak else "-"
            anon_ratio = f"{anon / ddp_anon[world]:.2f}" if world in ddp_anon else "-"
            phases = [(top[f"after_{k}"] or 0) / GiB for k in PHASES]
            cells = [kind, world, peak / GiB, ratio, overhead / GiB, limit / GiB,
                     "yes" if peak <= limit else "no", plan / GiB, anon / GiB, anon_ratio,
                     anon_overhead / GiB, anon_limit / GiB, "yes" if anon <= anon_limit else "no",
                     *phases, row["export_peak"] / GiB, row["export_anon"] / GiB,
                     round(row["seconds"])]  # fmt: skip
            print(table_line(cells), flush=True)
            for call in top["calls"] if args.calls else ():
                start, high = call["start"] / GiB, call["peak"] / GiB
                print(f"    {call['call']:>16}: from {start:.3f}, peak {high:.3f} GiB")
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(*sys.argv[2:6])
    elif len(sys.argv) > 1 and sys.argv[1] == "--export-worker":
        export_worker(*sys.argv[2:5])
    else:
        main()
