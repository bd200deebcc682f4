"""Curves of a run from its metrics.jsonl: `report.png` and a small `report.html`.

Whatever the run logged is drawn: the training loss, learning rate and throughput, then one panel
per evaluation metric family (`eval/i2t_r1` and `eval/t2i_r1` share the `r1` panel;
`eval/vqa_acc` and `eval/vqa_acc/<subset>` the `vqa_acc` panel), so a new evaluator needs no
change here.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

TRAIN_PANELS = [("loss", "train loss"), ("lr", "learning rate"), ("samples_per_s", "samples / s")]
DIRECTION = re.compile(r"^(i2t|t2i)_")


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


def eval_panels(rows: list[dict]) -> dict[str, list[str]]:
    """Panel title -> the eval/ keys drawn in it, in the order first logged. Counts (num_*) are
    not curves."""
    panels: dict[str, list[str]] = {}
    for row in rows:
        for key, value in row.items():
            if not key.startswith("eval/") or not isinstance(value, (int, float)):
                continue
            name = key[len("eval/") :]
            family = DIRECTION.sub("", name.split("/")[0])
            if family.startswith("num_"):
                continue
            keys = panels.setdefault(family, [])
            if key not in keys:
                keys.append(key)
    return panels


def write_report(run_dir: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    panels = [(title, [key]) for key, title in TRAIN_PANELS]
    panels += [(f"{family} (val)", keys) for family, keys in eval_panels(rows).items()]
    cols = min(4, len(panels))
    n_rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(n_rows, cols, figsize=(4 * cols, 3.2 * n_rows), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    for ax, (title, keys) in zip(axes.flat, panels):
        for key in keys:
            points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            if points:
                label = key[len("eval/") :] if key.startswith("eval/") else key
                ax.plot(*zip(*points), marker="o" if key.startswith("eval/") else None,
                        label=label)  # fmt: skip
        if len(keys) > 1:
            ax.legend(fontsize="small")
        for r in rows:  # mark resumes so an interruption is visible on every curve
            if r.get("event") == "resume":
                ax.axvline(r["step"], color="gray", linestyle=":", linewidth=1)
        ax.set_title(title)
        ax.set_xlabel("step")
        losses = [r["loss"] for r in rows if isinstance(r.get("loss"), (int, float))]
        if keys == ["loss"] and losses and min(losses) > 0:
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
