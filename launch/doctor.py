"""`vlscale doctor [RECIPE] [key=value ...]`: a self-check before a long job on a new node/cluster.

Each check prints one line, `ok`, `skip` (with why) or `FAIL`:
  devices     torch, CUDA and its driver, every GPU's name and memory (or the CPU cores)
  matmul      bf16 (GPU) / fp32 (CPU) matmul TFLOP/s, and its share of the device's peak
  flash-attn  installed, and equal to SDPA on a packed bf16 batch (max abs difference)
  all-reduce  bus bandwidth of an all-reduce over the job's ranks (torchrun or SLURM; `srun
              vlscale doctor` / `torchrun --nproc_per_node=8 -m launch.cli doctor`)
  run         RECIPE for --steps steps in a temporary run directory: its model FLOP/s and MFU,
              step time and data wait (last logging window), and its peak memory beside what
              `vlscale plan` predicts for its engine
Run under several ranks, every rank checks its own devices; rank 0 prints. Exit code 1 if any
check failed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

GiB = 2**30
FLASH_TOLERANCE = 2e-2  # bf16: flash-attn and SDPA round differently (about 2^-7 relative)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", nargs="?", help="a recipe to run for --steps steps (optional)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides of the recipe")
    parser.add_argument("--steps", type=int, default=20, help="training steps of the recipe run")
    parser.add_argument(
        "--size", type=int, default=0, help="matmul side (default 8192 GPU, 1024 CPU)"
    )
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")


class Report:
    def __init__(self, is_main: bool):
        self.is_main, self.rows = is_main, []

    def add(self, name: str, status: str, detail: str, **values) -> None:
        self.rows.append({"check": name, "status": status, "detail": detail, **values})
        if self.is_main:
            print(f"{status:<4}  {name:<10}  {detail}", flush=True)

    @property
    def failed(self) -> bool:
        return any(r["status"] == "FAIL" for r in self.rows)


def check_devices(report: Report, device: torch.device) -> None:
    if device.type == "cuda":
        gpus = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
        names = ", ".join(f"{p.name} {p.total_memory / GiB:.0f} GiB" for p in gpus)
        report.add("devices", "ok", f"torch {torch.__version__}, CUDA {torch.version.cuda}, "
                   f"driver {_driver()}, {len(gpus)} GPU(s): {names}")  # fmt: skip
    else:
        cores = f"{os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads"
        report.add("devices", "ok", f"torch {torch.__version__}, no CUDA device; {cores}")


def _driver() -> str:
    try:
        import subprocess

        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)  # fmt: skip
        return out.stdout.split()[0] if out.returncode == 0 and out.stdout else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def matmul_tflops(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 5) -> float:
    """Achieved TFLOP/s of an n x n x n matmul (the best of `repeats`, after one warm-up)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for i in range(repeats + 1):
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        if i:  # the first run warms up (kernel selection, allocation)
            best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e12


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_matmul(report: Report, device: torch.device, size: int) -> None:
    from core.flops import peak_flops

    precision = "bf16" if device.type == "cuda" else "fp32"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    n = size or (8192 if device.type == "cuda" else 1024)
    tflops = matmul_tflops(device, dtype, n)
    peak = peak_flops(device, precision)
    if peak:
        share = f", {100 * tflops * 1e12 / peak:.0f}% of the {peak / 1e12:.0f} TFLOP/s peak"
    else:
        share = ", peak unknown for this device (set logging.peak_flops for MFU)"
    report.add("matmul", "ok", f"{precision} {n}x{n}: {tflops:.2f} TFLOP/s{share}",
               tflops=tflops, peak_tflops=peak / 1e12 if peak else None)  # fmt: skip


def check_flash(report: Report, device: torch.device) -> None:
    from core.models import attention as attn

    if device.type != "cuda":
        report.add("flash-attn", "skip", "needs a CUDA device; the SDPA path is in use")
        return
    if not attn.HAVE_FLASH:  # pragma: no cover - CUDA only
        report.add("flash-attn", "skip", "not installed (pip install '.[gpu]'); SDPA in use")
        return
    diff = flash_vs_sdpa(device)  # pragma: no cover - CUDA only
    status = "ok" if diff <= FLASH_TOLERANCE else "FAIL"  # pragma: no cover
    report.add("flash-attn", status, f"packed bf16 batch: max |flash - SDPA| = {diff:.2e} "
               f"(tolerance {FLASH_TOLERANCE})", max_abs_diff=diff)  # fmt: skip  # pragma: no cover


def flash_vs_sdpa(device: torch.device) -> float:  # pragma: no cover - CUDA only
    """Max abs difference between the flash-attn and SDPA paths of core.models.attention on a
    packed batch (two rows of three and two samples)."""
    from core.models import attention as attn

    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(2, 8, 96, 64, device=device, dtype=torch.bfloat16, generator=g)
               for _ in range(3))  # fmt: skip
    segments = torch.tensor([[0] * 30 + [1] * 40 + [2] * 26, [0] * 60 + [1] * 36], device=device)
    flash = attn.attention(q, k, v, "packed", segment_ids=segments)
    attn.HAVE_FLASH = False  # the same call through SDPA
    try:
        sdpa = attn.attention(q, k, v, "packed", segment_ids=segments)
    finally:
        attn.HAVE_FLASH = True
    return float((flash.float() - sdpa.float()).abs().max())


def check_all_reduce(report: Report, dist) -> None:
    import torch.distributed as tdist

    if dist.world_size == 1:
        report.add("all-reduce", "skip", "one rank: start it under torchrun or srun to measure")
        return
    numel = (256 if dist.device.type == "cuda" else 16) * 2**20 // 4  # 256 MiB / 16 MiB fp32
    buffer = torch.ones(numel, device=dist.device)
    tdist.all_reduce(buffer)  # warm-up (and connection set-up)
    times = []
    for _ in range(5):
        _sync(dist.device)
        tdist.barrier()
        start = time.perf_counter()
        tdist.all_reduce(buffer)
        _sync(dist.device)
        times.append(time.perf_counter() - start)
    seconds = sorted(times)[len(times) // 2]
    n = dist.world_size
    bus = buffer.numel() * 4 * 2 * (n - 1) / n / seconds / 1e9  # nccl-tests' bus bandwidth
    ok = float(buffer[0]) == float(n**6)  # 1 summed over n ranks, six times
    backend = tdist.get_backend()
    report.add("all-reduce", "ok" if ok else "FAIL", f"{backend}, {n} ranks, "
               f"{buffer.numel() * 4 / 2**20:.0f} MiB: bus bandwidth {bus:.1f} GB/s"
               + ("" if ok else "; the sum is wrong"), bus_gb_per_s=bus)  # fmt: skip


def check_run(report: Report, recipe: str, overrides: list[str], steps: int, dist) -> None:
    """The recipe for `steps` steps in a temporary run directory; MFU and memory vs the plan."""
    from core import distributed
    from core.loop import train
    from core.recipe import load_config
    from launch.plan import activations, buffers, count_parameters, model_state

    tmp = distributed.broadcast_object(tempfile.mkdtemp(prefix="vlscale-doctor-") if
                                       dist.is_main else None)  # fmt: skip
    over = [*overrides, f"run_dir={tmp}", "resume=none", f"optim.max_steps={steps}",
            f"logging.every={max(1, steps // 2)}", "logging.wandb.mode=disabled",
            "checkpoint.every=0", "eval.evaluators=[]", "logging.progress=false",
            "logging.report=false"]  # fmt: skip
    cfg = load_config(recipe, over)
    if dist.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dist.device)
    start = time.perf_counter()
    train(cfg, final_checkpoint=False)  # a throwaway run: no checkpoint to write and delete
    seconds = time.perf_counter() - start
    rows = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "loss" in r][-1]
    n, t = count_parameters(cfg)
    planned = sum(model_state(cfg.engine.kind, cfg.engine.offload, cfg.engine.precision, n, t,
                              dist.world_size).values())  # fmt: skip
    planned += buffers(cfg, cfg.engine.kind, cfg.engine.offload, t, dist.world_size)
    planned += activations(cfg, "full" if cfg.engine.activation_checkpointing != "none" else "none")
    if dist.device.type == "cuda":
        used, what = torch.cuda.max_memory_allocated(dist.device), "peak allocated"
    else:  # the process's peak resident set: the runtime and data workers' share included
        used, what = _peak_rss(), "peak resident (process, runtime included)"
    mfu = f"MFU {100 * last['mfu']:.1f}%" if "mfu" in last else "MFU unknown (no peak)"
    flops = last.get("flops_per_s", 0) / 1e12
    # The last logging window's step time and the share of it spent waiting for batches: a low
    # MFU with a high data wait is the input pipeline's, not the model's.
    step_s, wait = last.get("step_time_s", float("nan")), last.get("data_wait_frac", float("nan"))
    report.add("run", "ok", f"{cfg.name} ({cfg.engine.kind}, {cfg.engine.precision}, "
               f"{dist.world_size} ranks): {steps} steps in {seconds:.0f} s, loss "
               f"{rows[0 if 'loss' in rows[0] else 1].get('loss', float('nan')):.3f} -> "
               f"{last['loss']:.3f}, {flops:.3f} model TFLOP/s per rank, {mfu}, "
               f"{step_s:.3f} s/step, data wait {100 * wait:.1f}%; memory: plan "
               f"{planned / GiB:.3f} GiB, {what} {used / GiB:.3f} GiB", tflops=flops,
               mfu=last.get("mfu"), step_time_s=step_s, data_wait_frac=wait,
               planned_gib=planned / GiB, used_gib=used / GiB)  # fmt: skip
    if dist.is_main:
        shutil.rmtree(tmp, ignore_errors=True)


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def main(args) -> int:
    from core import distributed

    dist = distributed.init_distributed()
    report = Report(dist.is_main)
    check_devices(report, dist.device)
    check_matmul(report, dist.device, args.size)
    check_flash(report, dist.device)
    check_all_reduce(report, dist)
    if args.recipe:
        check_run(report, args.recipe, args.overrides, args.steps, dist)
    else:
        report.add("run", "skip", "give a recipe (vlscale doctor RECIPE) for a short run")
    if args.json and dist.is_main:
        args.json.write_text(json.dumps(report.rows, indent=2))
    distributed.barrier()  # no rank tears its process group down while another still uses it
    distributed.cleanup()
    return 1 if report.failed else 0
