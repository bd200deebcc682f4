import subprocess
import sys
from pathlib import Path

from launch.cli import SUBCOMMANDS, main

ROOT = Path(__file__).resolve().parent.parent


def test_console_script_help_lists_working_subcommands():
    vlscale = Path(sys.executable).parent / "vlscale"
    out = subprocess.run([vlscale, "--help"], capture_output=True, text=True, check=True).stdout
    for name in SUBCOMMANDS:
        assert name in out
    assert set(SUBCOMMANDS) == {
        "train",
        "config",
        "shards",
        "report",
        "export",
        "push",
        "generate",
        "eval",
        "plan",
        "submit",
        "status",
        "dpo-reference",
        "doctor",
    }


def test_module_entry_point_matches_console_script():
    out = subprocess.run(
        [sys.executable, "-m", "launch.cli", "train", "--help"],
        capture_output=True, text=True, check=True, cwd=ROOT,
    ).stdout  # fmt: skip
    assert "key.sub=value" in out


def test_bad_override_is_a_clear_error_before_anything_starts(capsys, tmp_path):
    assert main(["train", "tiny_siglip", "optim.lrr=1", f"run_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'optim.lrr'" in err and "did you mean 'optim.lr'" in err
    assert not (tmp_path / "run").exists()  # nothing started


def test_overrides_may_follow_options(capsys, shapes_dir):
    # argparse alone rejects the override after --gpus; the CLI takes it, in order.
    tok = f"model.tokenizer={shapes_dir / 'tokenizer'}"
    assert main(["plan", "tiny_siglip", tok, "--gpus", "2", "data.batch_size=64", "--gpu-mem",
                 "80"]) == 0  # fmt: skip
    assert "micro-batch 64/GPU" in capsys.readouterr().out
    for bad in (["--bogus"], ["stray"]):  # an unknown option or a word without '=' still fails
        try:
            main(["plan", "tiny_siglip", tok, "--gpus", "2", "--gpu-mem", "80", *bad])
        except SystemExit as stop:
            assert stop.code == 2
        else:
            raise AssertionError(f"{bad} was accepted")
        assert "unrecognized arguments" in capsys.readouterr().err
