"""`vlscale report RUN_DIR`: print a run's evaluation table and (re)draw its curves."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a run directory (runs/<recipe name>)")


def main(args) -> int:
    from core.report import read_metrics, write_report

    run_dir = Path(args.run_dir)
    rows = read_metrics(run_dir)
    if not rows:
        print(f"{run_dir}: no metrics.jsonl yet")
        return 1
    train_rows = [r for r in rows if "loss" in r]
    if train_rows:
        first, last = train_rows[0], train_rows[-1]
        print(f"run        {run_dir}")
        print(f"steps      {last['step']}  (loss {first['loss']:.4f} -> {last['loss']:.4f})")
        print(f"throughput {last.get('samples_per_s', 0):.0f} samples/s, "
              f"data wait {100 * last.get('data_wait_frac', 0):.1f}%")  # fmt: skip
    eval_path = run_dir / "eval.json"
    if eval_path.exists():
        ev = json.loads(eval_path.read_text())
        print(f"\nevaluation at step {ev.get('step')}")
        width = max(len(k) for k in ev)
        for key, value in ev.items():
            if key == "step":
                continue
            shown = f"{value:.4f}" if isinstance(value, float) else value
            print(f"  {key:<{width}}  {shown}")
    png = write_report(run_dir)
    print(f"\ncurves: {png}  ({run_dir / 'report.html'})")
    return 0
