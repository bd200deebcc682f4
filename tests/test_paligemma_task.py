"""The PaliGemma task (core/tasks/paligemma.py) and its processor (core/data/prefix_lm.py):
supervised tokens, the tokenizer's location tokens, sources and templates, the packed loss
against per-example forwards, every engine with exact resume, export to transformers'
PaliGemmaForConditionalGeneration + PaliGemmaProcessor, and `vlscale generate`."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_engines import assert_engines_agree, assert_resumed_exactly, kill_after
from test_train import ROOT, run_cli

from core.data.errors import BadSample
from core.data.prefix_lm import (
    IGNORE,
    LOC_TOKENS,
    PrefixLMProcessor,
    paligemma_tokenizer,
)
from core.engines import ENGINES
from core.recipe import load_config

SUBSETS = ["shapes_colour", "shapes_shape", "shapes_caption"]
STEPS = 6


@pytest.fixture(scope="module")
def tok_dir(vqa, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pg_tokenizer")
    paligemma_tokenizer(vqa / "tokenizer", out)
    return out


def overrides(vqa: Path, tok: Path, run_dir: Path, steps: int = STEPS, **extra) -> list[str]:
    over = {
        "run_dir": str(run_dir),
        "model.vision": "",
        "model.vision_config": json.dumps(
            {
                "model_type": "siglip_vision_model",
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "image_size": 32,
                "patch_size": 8,
                "vision_use_head": False,
            }
        ),  # fmt: skip
        "model.text_config.hidden_size": 32,
        "model.text_config.intermediate_size": 64,
        "model.text_config.num_hidden_layers": 2,
        "model.text_config.num_attention_heads": 2,
        "model.text_config.head_dim": 16,
        "model.tokenizer": str(tok),
        "data.train": str(vqa / "{subset}" / "train-*.tar"),
        "data.val": str(vqa / "{subset}" / "val-*.tar"),
        "task.freeze": "[]",  # everything trains (the paper's choice; the demo freezes its tower)
        "data.mixture": json.dumps({s: 1 for s in SUBSETS}),
        "data.batch_size": 8,
        "data.num_workers": 0,
        "data.max_seq_len": 64,
        "optim.max_steps": steps,
        "optim.warmup_steps": 2,
        "optim.lr": 3e-3,
        "logging.every": 1,
        "logging.progress": "false",
        "logging.wandb.mode": "disabled",
        "logging.report": "false",  # ~1 s a run; drawn by test_loss_goes_down_and_eval_is_written
        "checkpoint.every": 2,
        "eval.every": 0,
        "eval.batch_size": 8,
        "eval.evaluators": json.dumps(
            [
                {"vqa": {"subsets": ["shapes_colour", "shapes_shape"], "max_new_tokens": 4}},
                {"loss": {"subsets": SUBSETS}},
            ]
        ),  # fmt: skip
    }
    over.update(extra)
    return [f"{k}={v}" for k, v in over.items()]


def build(vqa, tok, tmp_path, **extra):
    from core.tasks import build_task

    torch.manual_seed(0)
    return build_task(load_config("tiny_paligemma", overrides(vqa, tok, tmp_path / "run", **extra)))


def shard_samples(path: Path, n: int) -> list[dict]:
    """The first n samples of a shard as {member suffix: bytes, "__key__": key}."""
    import tarfile

    samples: dict[str, dict] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, _, suffix = member.name.partition(".")
            samples.setdefault(key, {"__key__": key})[suffix] = tar.extractfile(member).read()
    return list(samples.values())[:n]


# ------------------------------------------------------------------ processor and tokenizer


def test_tokenizer_keeps_location_and_segmentation_tokens_whole(tok_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    text = "<loc0012><loc1023><seg005> red circle"
    ids = tok.encode(text, add_special_tokens=False)
    assert ids[:3] == [tok.convert_tokens_to_ids(t) for t in ("<loc0012>", "<loc1023>", "<seg005>")]
    assert len(set(tok.convert_tokens_to_ids(list(LOC_TOKENS)))) == 1024
    assert tok.decode(ids, skip_special_tokens=True).startswith("<loc0012><loc1023><seg005>")


def test_only_the_suffix_and_its_eos_are_supervised(tok_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    proc = PrefixLMProcessor(tok, tokens_per_image=4)
    ids, labels, mask_ar = proc.encode("answer en what colour is it?", "red circle", 2)
    assert ids[:9] == [proc.image_id] * 8 + [tok.bos_token_id]
    supervised = [t for t in labels if t != IGNORE]
    assert tok.decode(supervised) == "red circle" + tok.eos_token
    assert supervised[-1] == tok.eos_token_id
    assert [m for m, label in zip(mask_ar, labels) if label != IGNORE] == [1] * len(supervised)
    assert all(m == 0 for m, label in zip(mask_ar, labels) if label == IGNORE)
    head = len(ids) - len(supervised)
    assert tok.decode(ids[8:head]) == tok.bos_token + "answer en what colour is it?\n"
    assert proc.prompt("answer en what colour is it?", 2) == ids[:head]


def test_a_tokenizer_without_image_token_is_a_clear_error(vqa):
    from transformers import AutoTokenizer

    with pytest.raises(ValueError, match="<image>"):
        PrefixLMProcessor(AutoTokenizer.from_pretrained(str(vqa / "tokenizer")), 4)


def test_sources_templates_and_multiturn_expansion(vqa, tok_dir, tmp_path, shapes_dir):
    task = build(vqa, tok_dir, tmp_path)
    tok, d = task.tokenizer, task.train_decoder
    (qa,) = shard_samples(vqa / "shapes_colour" / "train-000000.tar", 1)
    record = json.loads(qa["json"])
    out = d(qa)
    assert len(out["parts"]) == len(record["texts"]) and out["pixel_values"].shape[0] == 1
    for part, turn in zip(out["parts"], record["texts"]):
        prefix = tok.decode(part["input_ids"][part["labels"] == IGNORE][16:])
        assert prefix == tok.bos_token + f"answer en {turn['user'].strip()}\n"
    (cap,) = shard_samples(vqa / "shapes_caption" / "train-000000.tar", 1)
    (part,) = d(cap)["parts"]
    assert tok.decode(part["input_ids"][16:]).startswith(tok.bos_token + "caption en\n")
    (image_text,) = shard_samples(shapes_dir / "train-000000.tar", 1)  # jpg + txt (CC3M layout)
    (part,) = d(image_text)["parts"]
    supervised = part["labels"][part["labels"] != IGNORE]
    assert tok.decode(supervised) == image_text["txt"].decode().strip() + tok.eos_token
    too_long = build(vqa, tok_dir, tmp_path / "short", **{"data.max_seq_len": 20})
    with pytest.raises(BadSample, match="too_long"):  # rejected and counted, never truncated
        too_long.train_decoder(cap)


# ------------------------------------------------------------------ the objective


@pytest.mark.parametrize("norm", ["token", "example"])
def test_packed_loss_equals_per_example_forwards(vqa, tok_dir, tmp_path, norm):
    extra = {"task.loss_norm": norm, "data.max_seq_len": 128}  # rows of several examples
    task = build(vqa, tok_dir, tmp_path, **extra).eval()
    samples = [
        task.train_decoder(s) for s in shard_samples(vqa / "shapes_colour" / "train-000000.tar", 3)
    ]
    samples += [
        task.train_decoder(s) for s in shard_samples(vqa / "shapes_caption" / "train-000000.tar", 2)
    ]
    batch = task.packed_collate()(samples)
    assert batch["input_ids"].shape[0] < batch["num_samples"]  # examples share rows
    with torch.no_grad():
        out = task(batch)
        expected, units = 0.0, 0
        for s in samples:
            for part in s["parts"]:
                logits = task.model(part["input_ids"][None], s["pixel_values"],
                                    mask_ar=part["mask_ar"][None])[0, :-1]  # fmt: skip
                targets = part["labels"][1:]
                ce = torch.nn.functional.cross_entropy(
                    logits[targets != IGNORE], targets[targets != IGNORE], reduction="sum"
                )
                n = int((targets != IGNORE).sum())
                expected += ce.item() if norm == "token" else ce.item() / n
                units += n if norm == "token" else 1
    assert task.loss_weight(batch) == units
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)


def test_causal_ablation_changes_the_prefix_attention(vqa, tok_dir, tmp_path):
    prefix_lm = build(vqa, tok_dir, tmp_path).eval()
    causal = build(vqa, tok_dir, tmp_path, **{"task.attention": "causal"}).eval()
    causal.load_state_dict(prefix_lm.state_dict())
    samples = [prefix_lm.train_decoder(s)
               for s in shard_samples(vqa / "shapes_colour" / "train-000000.tar", 2)]  # fmt: skip
    batch = prefix_lm.packed_collate()(samples)
    with torch.no_grad():
        assert abs(prefix_lm(batch).loss.item() - causal(batch).loss.item()) > 1e-4


# ------------------------------------------------------------------ engines, resume, export


def train(vqa, tok, run_dir, kind, **extra) -> subprocess.Popen:
    args = overrides(
        vqa, tok, run_dir, **{"engine.kind": kind, "engine.precision": "fp32", **extra}
    )
    return run_cli(["train", "tiny_paligemma", *args], nproc=2)


@pytest.fixture(scope="module")
def straight(vqa, tok_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pg_engines")
    for kind in ENGINES:
        assert train(vqa, tok_dir, root / kind, kind).wait(timeout=600) == 0, f"{kind} failed"
    return root


@pytest.mark.slow
def test_every_engine_agrees_with_ddp(straight):
    assert_engines_agree(straight, STEPS)


@pytest.mark.slow
# One sharded engine: the task adds nothing engine-specific to resume; each sharded engine's
# SIGKILL resume is tests/test_engines.py's, ddp's tests/test_train.py's.
@pytest.mark.parametrize("kind", ["zero3"])
def test_sigkill_and_restart_is_bitwise_exact(vqa, tok_dir, tmp_path, straight, kind):
    run = tmp_path / "killed"
    kill_after(train(vqa, tok_dir, run, kind), run, 3)
    assert train(vqa, tok_dir, run, kind).wait(timeout=600) == 0
    assert_resumed_exactly(run, straight / kind, STEPS)


@pytest.mark.slow
def test_export_loads_in_transformers_and_generates_like_vlscale(vqa, tok_dir, straight, tmp_path):
    """The export is a PaliGemmaForConditionalGeneration + PaliGemmaProcessor: the processor
    builds our prompt ids, the model our logits and greedy tokens; `vlscale generate` prints
    the same answer."""
    from PIL import Image
    from transformers import AutoProcessor, PaliGemmaForConditionalGeneration

    from launch.export import consolidated, export

    run = straight / "ddp"
    export(run, tmp_path / "out")
    path = tmp_path / "out" / "paligemma"
    processor = AutoProcessor.from_pretrained(path)
    model = PaliGemmaForConditionalGeneration.from_pretrained(path).eval()
    task = consolidated(run)[0].eval()
    image_bytes = shard_samples(vqa / "shapes_colour" / "val-000000.tar", 1)[0]["0.jpg"]
    image = Image.open(io.BytesIO(image_bytes)).convert("RGB")
    prefix = "answer en What colour is the circle?"
    inputs = processor(images=image, text=prefix, return_tensors="pt")
    ours = task.prompt_batch([(prefix, [image_bytes])])
    assert inputs["input_ids"].tolist() == ours["input_ids"].tolist()
    assert torch.allclose(inputs["pixel_values"], ours["pixel_values"], atol=1e-5)
    with torch.no_grad():
        theirs = model.generate(**inputs, max_new_tokens=5, do_sample=False)[
            :, ours["input_ids"].shape[1] :
        ]
        mine = task.model.generate(ours["input_ids"], ours["pixel_values"], 5,
                                   eos_token_id=task.tokenizer.eos_token_id)  # fmt: skip
    assert mine.tolist()[0] == theirs.tolist()[0][: mine.shape[1]]
    (tmp_path / "q.png").write_bytes(image_bytes)
    done = subprocess.run(
        [sys.executable, "-m", "launch.cli", "generate", str(run),
         "--image", str(tmp_path / "q.png"), "--prompt", prefix, "--max-new-tokens", "5"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert task.generate(ours, 5)[0] in done.stdout


def test_shards_paligemma_tokenizer_command(vqa, tmp_path):
    from transformers import AutoTokenizer

    done = subprocess.run(
        [sys.executable, "-m", "launch.cli", "shards", "paligemma-tokenizer",
         str(vqa / "tokenizer"), str(tmp_path / "tok")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    source = AutoTokenizer.from_pretrained(str(vqa / "tokenizer"))
    assert tok.convert_tokens_to_ids("<image>") >= len(source)  # added after its vocabulary
    assert tok.encode("<loc0007>", add_special_tokens=False) == [
        tok.convert_tokens_to_ids("<loc0007>")
    ]
    assert tok.bos_token and tok.eos_token and tok.pad_token
