"""`vlscale doctor` on CPU: the checks that need a GPU say so; the matmul, the all-reduce over
2 gloo ranks and a short recipe run report real figures."""

from __future__ import annotations

import json
import subprocess
import sys

from test_train import ROOT, metrics, run_cli, tiny_overrides


def test_doctor_cpu_path_with_a_short_run(shapes_dir, tmp_path):
    out = tmp_path / "doctor.json"
    over = [o for o in tiny_overrides(shapes_dir, tmp_path / "unused", 4) if "run_dir" not in o]
    done = run_cli(["doctor", "tiny_siglip", *over, "--steps", "4", "--size", "256",
                    "--json", str(out)], stdout=subprocess.PIPE, text=True)  # fmt: skip
    stdout, _ = done.communicate(timeout=300)
    assert done.returncode == 0, stdout
    rows = {r["check"]: r for r in json.loads(out.read_text())}
    assert [rows[c]["status"] for c in ("devices", "matmul", "flash-attn", "all-reduce", "run")] \
        == ["ok", "ok", "skip", "skip", "ok"]  # fmt: skip
    assert "needs a CUDA device" in rows["flash-attn"]["detail"]
    assert rows["matmul"]["tflops"] > 0 and rows["matmul"]["peak_tflops"] is None
    run = rows["run"]
    assert run["tflops"] > 0 and run["mfu"] is None  # no CPU peak: FLOP/s, no MFU
    assert 0 < run["planned_gib"] < run["used_gib"]  # the CPU figure includes the runtime
    assert run["step_time_s"] > 0 and 0 <= run["data_wait_frac"] < 1
    assert f"data wait {100 * run['data_wait_frac']:.1f}%" in rows["run"]["detail"]
    assert "skip  flash-attn" in stdout and "tiny_siglip (ddp, fp32, 1 ranks)" in stdout


def test_doctor_measures_the_all_reduce_across_ranks(tmp_path):
    out = tmp_path / "doctor.json"
    port = "29677"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={port}", "-m", "launch.cli", "doctor", "--size", "128",
           "--json", str(out)]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {r["check"]: r for r in json.loads(out.read_text())}
    assert rows["all-reduce"]["status"] == "ok" and rows["all-reduce"]["bus_gb_per_s"] > 0
    assert "gloo, 2 ranks" in rows["all-reduce"]["detail"]
    assert done.stdout.count("all-reduce") == 1  # rank 0 prints


def test_doctor_run_writes_no_checkpoint_and_no_report(shapes_dir, tmp_path, monkeypatch):
    # A throwaway run: for a large model the final checkpoint would be the slowest part of the
    # check (9-16 s at 528M parameters on the H200) and a full copy on disk.
    from core.distributed import init_distributed
    from launch import doctor

    run_dir = tmp_path / "doctor_run"
    run_dir.mkdir()
    monkeypatch.setattr(doctor.tempfile, "mkdtemp", lambda prefix: str(run_dir))
    monkeypatch.setattr(doctor.shutil, "rmtree", lambda *a, **k: None)  # keep it to look at
    over = [o for o in tiny_overrides(shapes_dir, tmp_path / "unused", 2) if "run_dir" not in o]
    report = doctor.Report(is_main=True)
    doctor.check_run(report, "tiny_siglip", over, 2, init_distributed())
    assert report.rows[-1]["status"] == "ok"
    assert [r["step"] for r in metrics(run_dir) if "loss" in r] == [1, 2]  # it trained
    ckpts = run_dir / "checkpoints"
    assert not ckpts.exists() or not any(ckpts.iterdir())
    assert not (run_dir / "report.png").exists()
