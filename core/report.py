"""Curves of a run from its metrics.jsonl: `report.png` and a small `report.html`."""

from __future__ import annotations

import json
from pathlib import Path

PANELS = [
    ("loss", "train loss"),
    ("lr", "learning rate"),
    ("eval/i2t_r1", "R@1 (val)"),
    ("samples_per_s", "samples / s"),
]


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a kill: skip it, keep the rest
    return rows


def write_report(run_dir: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4 * len(PANELS), 3.2))
    for ax, (key, title) in zip(axes, PANELS):
        points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        if key == "eval/i2t_r1":
            t2i = [(r["step"], r["eval/t2i_r1"]) for r in rows if "eval/t2i_r1" in r]
            if t2i:
                ax.plot(*zip(*t2i), marker="o", label="t2i")
            if points:
                ax.plot(*zip(*points), marker="o", label="i2t")
                ax.legend()
        elif points:
            ax.plot(*zip(*points))
        for r in rows:  # mark resumes so an interruption is visible on every curve
            if r.get("event") == "resume":
                ax.axvline(r["step"], color="gray", linestyle=":", linewidth=1)
        ax.set_title(title)
        ax.set_xlabel("step")
        if key == "loss" and points and min(v for _, v in points) > 0:
            ax.set_yscale("log")
    fig.suptitle(run_dir.name)
    fig.tight_layout()
    png = run_dir / "report.png"
    fig.savefig(png, dpi=100)
    plt.close(fig)
    eval_path = run_dir / "eval.json"
    table = ""
    if eval_path.exists():
        ev = json.loads(eval_path.read_text())
        table = "".join(f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in ev.items())
    (run_dir / "report.html").write_text(
        f"<html><body><h2>{run_dir.name}</h2><img src='report.png'>"
        f"<h3>evaluation</h3><table>{table}</table></body></html>"
    )
    return png
