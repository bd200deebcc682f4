"""`vlscale config` prints the resolved config; `vlscale train --help` lists the recipes and every
config key with its type and default, generated from the dataclasses."""

from __future__ import annotations

import re

import pytest
import yaml

from core.config import RECIPES_DIR
from core.recipe import load_config
from launch.cli import main


def test_config_command_output_round_trips(capsys, tmp_path):
    overrides = ["optim.lr=1e-3", "optim.lr_groups={text_proj: 1e-2, vision: 2e-6}",
                 f"run_dir={tmp_path / 'run'}", "eval.evaluators=[retrieval]"]  # fmt: skip
    assert main(["config", "tiny_siglip", *overrides]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == load_config("tiny_siglip", overrides).to_dict()
    assert printed["optim"]["lr_groups"] == {"text_proj": 0.01, "vision": 2e-6}
    assert printed["resume_changes"] == "refuse" and printed["task"]["kind"] == "siglip"
    assert not (tmp_path / "run").exists()  # nothing started
    assert main(["config", "tiny_siglip", "optim.lrr=1"]) == 2  # the same checks as train
    assert "did you mean 'optim.lr'" in capsys.readouterr().err


def test_train_help_lists_recipes_and_every_key_with_type_and_default(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for recipe in RECIPES_DIR.glob("*.yaml"):
        assert re.search(rf"^  {recipe.stem} ", out, re.M), recipe.stem
    row = re.compile(r"^  (\S+)\s+(\S+)\s+(\S+)", re.M)
    rows = {key: (tp, default) for key, tp, default in row.findall(out)}
    assert rows["optim.lr"] == ("float", "0.0003")
    assert re.search(r"^  optim.lr_groups\s+dict\[str, float\]\s+\{\}\s+\{pattern: lr\}", out, re.M)
    assert rows["resume_changes"] == ("refuse|allow", "refuse")
    assert rows["engine.kind"] == ("str", "ddp")
    assert rows["logging.wandb.mode"][1] == "offline"  # nested sections, flattened
    assert rows["data.batch_size"] == ("int", "32")
    # Each registered kind's own keys under its heading, with the base keys listed once.
    vlm = out[out.index("task.kind=vlm") :]
    assert re.search(r"^  task.stage\s+align\|sft\s+align", vlm, re.M)
    assert re.search(r"^  data.max_seq_len\s+int\s+1024", vlm, re.M)
    assert "task.embed_dim" in out[out.index("task.kind=siglip") : out.index("task.kind=vlm")]
    assert out.count("\n  task.kind ") == 1 and out.count("\n  data.train ") == 1
