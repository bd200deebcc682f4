"""`vlscale export` streams (issue 14 item 4): the safetensors writer, stand-ins, shards with an
index, and an export's peak memory measured in a process of its own against the model's size.

The engines' readers are checked elsewhere against independent references: every engine's
export against the others and against the eager read (tests/test_engines.py), ZeRO-2/3 with
frozen weights against DeepSpeed's own zero_to_fp32 (tests/test_vlm_engines.py), LoRA merging
through stand-ins against peft (tests/test_vlm_task.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from test_train import ROOT, run_cli, tiny_overrides

from core import lazy_tensors
from core.lazy_tensors import StandIns
from core.models import hub


def test_writer_round_trips_every_dtype_and_layout(tmp_path):
    tensors = {
        "f32": torch.randn(3, 5), "f16": torch.randn(4).half(),
        "bf16": torch.randn(2, 3).bfloat16(), "i64": torch.arange(7),
        "i32": torch.arange(3, dtype=torch.int32),
        "i8": torch.tensor([-3, 4], dtype=torch.int8), "u8": torch.tensor([250], dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]), "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 4), "transposed": torch.randn(4, 6).t(),
    }  # fmt: skip
    tensors["tied"] = tensors["f32"]  # safetensors' own save_file refuses shared memory
    file = tmp_path / "x.safetensors"
    hub.write_safetensors(tensors, file, metadata={"format": "pt"})
    loaded = load_file(file)  # safetensors' reader validates header, offsets and length
    assert loaded.keys() == tensors.keys()
    for key, tensor in tensors.items():
        assert loaded[key].dtype == tensor.dtype and torch.equal(loaded[key], tensor), key
    with safe_open(str(file), "pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_large_state_dicts_are_sharded_with_an_index(tmp_path):
    state = {f"w{i}": torch.full((1000,), float(i)) for i in range(9)}  # 4000 bytes each
    state["big"] = torch.ones(5000)  # over the limit alone: a shard of its own
    hub.save_state_dict(state, tmp_path, max_shard_bytes=10_000)
    index = json.loads((tmp_path / hub.INDEX).read_text())
    assert index["metadata"]["total_size"] == 9 * 4000 + 20_000
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) == 6 and not (tmp_path / hub.SINGLE).exists()
    for shard in shards:
        held = [k for k, f in index["weight_map"].items() if f == shard]
        assert sum(state[k].numel() * 4 for k in held) <= 10_000 or held == ["big"]
    loaded = hub.load_state_dict(tmp_path)
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)


def test_stand_ins_are_read_only_when_written_and_refuse_what_was_computed_from_them(tmp_path):
    reads = []

    def read():
        reads.append(1)
        return torch.arange(6.0).reshape(2, 3)

    stand_ins = StandIns()
    with stand_ins.active():
        weight = stand_ins.stand_in(torch.empty(2, 3, device="meta"), read)
        linear = torch.nn.Linear(3, 2, bias=False, device="meta")
        linear.load_state_dict({"weight": weight}, assign=True)
        doubled = lazy_tensors.derived(lambda w: w * 2, linear.weight, like=linear.weight)
        assert weight.untyped_storage().nbytes() == 4 and not reads  # nothing read yet
        file = tmp_path / "ok.safetensors"
        hub.write_safetensors({"w": linear.state_dict()["weight"], "twice": doubled,
                               "flat": weight.reshape(6)}, file)  # fmt: skip
        assert len(reads) == 3  # once per tensor written
        with pytest.raises(ValueError, match="computed from one's placeholder"):
            hub.write_safetensors({"bad": weight * 2}, tmp_path / "bad.safetensors")
        with pytest.raises(ValueError, match="slice or cast"):
            hub.write_safetensors({"row": weight[0]}, tmp_path / "row.safetensors")
    loaded = load_file(file)
    assert torch.equal(loaded["w"], torch.arange(6.0).reshape(2, 3))
    assert torch.equal(loaded["twice"], 2 * loaded["w"])
    assert torch.equal(loaded["flat"], torch.arange(6.0))
    # Without active stand-ins derived computes at once.
    assert torch.equal(lazy_tensors.derived(lambda w: w + 1, torch.ones(2), like=torch.ones(2)),
                       torch.full((2,), 2.0))  # fmt: skip


@pytest.mark.parametrize(
    "text, expected",
    [("5GB", 5 * 10**9), ("500MB", 500 * 10**6), ("2GiB", 2 * 2**30), ("1.5gb", 1.5e9),
     ("20KB", 20_000), ("4096", 4096)],
)  # fmt: skip
def test_max_shard_size_reads_transformers_units(text, expected):
    from launch.export import shard_bytes

    assert shard_bytes(text) == expected


def test_max_shard_size_refuses_what_is_no_size():
    import argparse

    from launch.export import shard_bytes

    with pytest.raises(argparse.ArgumentTypeError, match="a size like 5GB"):
        shard_bytes("five gigabytes")


WIDE = {  # ~31M parameters (124 MB in fp32): big enough that a copy of it shows in VmHWM
    "model.vision_config.hidden_size": 512, "model.vision_config.intermediate_size": 2048,
    "model.vision_config.num_hidden_layers": 5, "model.vision_config.num_attention_heads": 8,
    "model.text_config.hidden_size": 512, "model.text_config.intermediate_size": 2048,
    "model.text_config.num_hidden_layers": 5, "model.text_config.num_attention_heads": 8,
    "model.text_config.num_key_value_heads": 8, "model.text_config.head_dim": 64,
    "task.embed_dim": 512, "data.batch_size": 4, "checkpoint.every": 1, "eval.evaluators": "[]",
}  # fmt: skip

MEASURE = """
import json, sys
from launch.export import export

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

export(sys.argv[1], sys.argv[2] + "-warmup")  # a tiny run: every import, tokenizer, processor
open("/proc/self/clear_refs", "w").write("5")  # VmHWM := the current resident set
before = status("VmRSS:")
export(sys.argv[3], sys.argv[4])
print(json.dumps({"before": before, "peak": status("VmHWM:")}))
"""


@pytest.mark.slow
def test_export_streams_with_about_one_tensor_in_memory(shapes_dir, tmp_path):
    """A 124 MB model exported in a process of its own: its peak resident memory grows by less
    than a tenth of the model (the largest tensor is 4 MB; the eager export held the state
    twice, 2x the model). The files equal the eager read of the checkpoint, and a sharded
    export (--max-shard-size) holds the same tensors, loadable by transformers."""
    from transformers import AutoModel

    from launch.export import consolidated

    run, tiny = tmp_path / "run", tmp_path / "tiny"
    for where, extra in ((run, WIDE), (tiny, {"checkpoint.every": 1, "eval.evaluators": "[]"})):
        over = tiny_overrides(shapes_dir, where, 1, **extra)
        assert run_cli(["train", "tiny_siglip", *over]).wait(timeout=600) == 0
    out = tmp_path / "export"
    measure = [sys.executable, "-c", textwrap.dedent(MEASURE), str(tiny), str(out), str(run),
               str(out)]  # fmt: skip
    done = subprocess.run(measure, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    memory = json.loads(done.stdout.strip().splitlines()[-1])
    state = consolidated(run)[2]
    model_bytes = sum(t.numel() * t.element_size() for t in state.values())
    largest = max(t.numel() * t.element_size() for t in state.values())
    assert model_bytes > 100e6 and largest < model_bytes / 25
    grew = memory["peak"] - memory["before"]
    print(f"export of a {model_bytes / 1e6:.0f} MB model: peak +{grew / 1e6:.1f} MB")
    assert grew < model_bytes / 10
    exported = load_file(out / "model.safetensors")
    assert exported.keys() == state.keys()
    assert all(torch.equal(exported[k], state[k]) for k in state)

    sharded = tmp_path / "sharded"
    cli = ["export", str(run), str(sharded), "--max-shard-size", "40MB"]
    assert run_cli(cli).wait(timeout=600) == 0
    for part in ("", "vision", "text"):
        index = json.loads((sharded / part / hub.INDEX).read_text())
        assert len(set(index["weight_map"].values())) >= 2, part
        one, many = hub.load_state_dict(out / part), hub.load_state_dict(sharded / part)
        assert one.keys() == many.keys() and all(torch.equal(one[k], many[k]) for k in one)
    theirs = AutoModel.from_pretrained(sharded / "vision").state_dict()
    ours = hub.load_state_dict(out / "vision")
    assert all(torch.equal(theirs[k], ours[k]) for k in ours)
    card = (sharded / "README.md").read_text()
    assert "`model.safetensors.index.json` | every tensor of the task, in" in card


@pytest.mark.slow
def test_checkpoint_export_writes_the_export_when_a_sharded_run_ends(shapes_dir, tmp_path):
    """checkpoint.export=true: rank 0 of a 2-rank fsdp run writes RUN_DIR/export after the final
    checkpoint, the same files `vlscale export` writes from it."""
    from launch.export import consolidated, export

    run = tmp_path / "run"
    extra = {"engine.kind": "fsdp", "checkpoint.export": "true", "eval.evaluators": "[]"}
    over = tiny_overrides(shapes_dir, run, 3, **extra)
    assert run_cli(["train", "tiny_siglip", *over], nproc=2).wait(timeout=600) == 0
    again = export(run, tmp_path / "again")
    for part in ("model.safetensors", "vision/model.safetensors", "text/model.safetensors"):
        ended, offline = load_file(run / "export" / part), load_file(again / part)
        assert ended.keys() == offline.keys(), part
        assert all(torch.equal(ended[k], offline[k]) for k in ended), part
    state = consolidated(run)[2]
    ended = load_file(run / "export" / "model.safetensors")
    assert all(torch.equal(ended[k], state[k]) for k in state)
    assert "step 3" in (run / "export" / "README.md").read_text()
