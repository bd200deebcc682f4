"""The report draws whatever the run logged: one panel per evaluation metric family."""

from __future__ import annotations

import json

from core.report import eval_panels, write_report


def test_eval_metrics_are_grouped_into_families():
    rows = [
        {"step": 10, "loss": 2.0, "lr": 1e-3, "samples_per_s": 100.0},
        {"step": 10, "eval/i2t_r1": 0.2, "eval/t2i_r1": 0.3, "eval/i2t_r5": 0.5,
         "eval/num_pairs": 512, "eval/zeroshot_acc": 0.4},
        {"step": 20, "eval/vqa_acc": 0.5, "eval/vqa_acc/shapes_colour": 0.7,
         "eval/vqa_acc/shapes_shape": 0.3, "eval/loss": 1.5, "event": "resume"},
    ]  # fmt: skip
    assert eval_panels(rows) == {
        "r1": ["eval/i2t_r1", "eval/t2i_r1"],
        "r5": ["eval/i2t_r5"],
        "zeroshot_acc": ["eval/zeroshot_acc"],
        "vqa_acc": ["eval/vqa_acc", "eval/vqa_acc/shapes_colour", "eval/vqa_acc/shapes_shape"],
        "loss": ["eval/loss"],
    }


def test_a_vlm_run_gets_its_vqa_panel(tmp_path):
    import matplotlib.pyplot as plt

    rows = [{"step": s, "loss": 3.0 / s, "lr": 1e-3, "samples_per_s": 50.0} for s in (1, 2, 3)]
    rows += [{"step": 3, "eval/vqa_acc": 0.6, "eval/vqa_acc/shapes_colour": 0.9, "eval/loss": 1.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    titles = []
    real = plt.Axes.set_title
    plt.Axes.set_title = lambda ax, title, *a, **k: titles.append(title) or real(ax, title, *a, **k)
    try:
        png = write_report(tmp_path)
    finally:
        plt.Axes.set_title = real
    assert png.stat().st_size > 0
    assert titles == ["train loss", "learning rate", "samples / s", "vqa_acc (val)", "loss (val)"]
