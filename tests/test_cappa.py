"""CapPa and the SigLIP 2-style objective (core/models/cappa.py, core/tasks/cappa.py): the
decoder's two modes through one mask, the loss against per-example forwards written out by hand,
supervision of the decoder tasks, the combined loss, every engine with exact resume, and the
export (vision/ loads in transformers, decoder/ in vlscale)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_engines import assert_engines_agree, assert_resumed_exactly, kill_after
from test_paligemma_task import shard_samples
from test_train import metrics, run_cli

from core.config import ConfigError
from core.engines import ENGINES
from core.models.cappa import CapPaDecoder, CapPaDecoderArgs
from core.recipe import load_config

STEPS = 6
TINY_VISION = {
    "model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64,
    "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 32, "patch_size": 8,
    "vision_use_head": False,
}  # fmt: skip


def overrides(shapes: Path, run_dir: Path, steps: int = STEPS, **extra) -> list[str]:
    over = {
        "run_dir": str(run_dir),
        "model.vision_config": json.dumps(TINY_VISION),
        "model.tokenizer": str(shapes / "tokenizer"),
        "task.decoder.layers": 2,
        # CapPa's mix of modes and a weight decay (the demo recipe has neither): the tests cover
        # both modes in one batch and the decayed and undecayed parameter groups
        "task.masked_pred_prob": 0.75,
        "optim.weight_decay": 0.1,
        "data.train": str(shapes / "train-{000000..000002}.tar"),
        "data.val": str(shapes / "val-000000.tar"),
        "data.batch_size": 8,
        "data.num_workers": 0,
        "optim.max_steps": steps,
        "optim.warmup_steps": 2,
        "optim.lr": 3e-3,
        "logging.every": 1,
        "logging.progress": "false",
        "logging.wandb.mode": "disabled",
        "logging.report": "false",  # ~1 s a run; drawn by test_loss_goes_down_and_eval_is_written
        "checkpoint.every": 2,
        "eval.every": 0,
        "eval.batch_size": 16,
        "eval.evaluators": json.dumps(["loss"]),
    }
    over.update(extra)
    return [f"{k}={v}" for k, v in over.items()]


def build(shapes, tmp_path, recipe="tiny_cappa", **extra):
    from core.tasks import build_task

    torch.manual_seed(0)
    return build_task(load_config(recipe, overrides(shapes, tmp_path / "run", **extra)))


def batch_of(task, shapes: Path, n: int = 6) -> dict:
    from core.tasks.cappa import collate

    samples = shard_samples(shapes / "train-000000.tar", n)
    return collate([task.text_decoder(s) for s in samples])


def tiny_decoder(**kw) -> CapPaDecoder:
    torch.manual_seed(0)
    args = dict(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=12,
                encoder_hidden_size=24)  # fmt: skip
    decoder = CapPaDecoder(CapPaDecoderArgs(**{**args, **kw}))
    torch.nn.init.normal_(decoder.lm_head.weight)  # zero-initialised: every logit would tie
    return decoder.eval()


# ------------------------------------------------------------------ the decoder


def test_one_mask_gives_causal_bidirectional_and_prefix_rows():
    decoder, encoded = tiny_decoder(), torch.randn(1, 5, 24)
    ids = torch.randint(0, 50, (1, 10))
    changed = ids.clone()
    changed[0, 6] = (ids[0, 6] + 1) % 50
    causal, bidir = torch.ones(1, 10, dtype=torch.bool), torch.zeros(1, 10, dtype=torch.bool)
    prefix = torch.arange(10)[None] > 3  # positions 0..3 one group
    with torch.no_grad():
        run = lambda x, m: decoder(x, encoded, m)  # noqa: E731
        a, b = run(ids, causal), run(changed, causal)
        assert torch.equal(a[:, :6], b[:, :6]) and not torch.allclose(a[:, 6:], b[:, 6:])
        a, b = run(ids, bidir), run(changed, bidir)
        assert not torch.allclose(a[:, :6], b[:, :6])  # everything sees position 6
        pc = ids.clone()
        pc[0, 3] = (ids[0, 3] + 1) % 50
        a, b = run(ids, prefix), run(pc, prefix)
        assert not torch.allclose(a[:, 0], b[:, 0])  # the prefix is bidirectional
        # and matches an explicit boolean mask through torch's own attention
        group = prefix.long().cumsum(-1)
        allowed = group[:, None, :] <= group[:, :, None]
        assert torch.equal(allowed[0, :4, :4], torch.ones(4, 4, dtype=torch.bool))
        assert not allowed[0, 4, 5] and allowed[0, 5, 4]


def test_zero_init_logits_start_at_log_vocab(shapes_dir, tmp_path):
    task = build(shapes_dir, tmp_path)
    batch = batch_of(task, shapes_dir)
    loss = task(batch).loss / task.loss_weight(batch)
    assert loss.item() == pytest.approx(math.log(len(task.tokenizer)), rel=1e-6)


def test_save_and_load_round_trip(tmp_path):
    from core import models

    decoder, encoded = tiny_decoder(), torch.randn(2, 5, 24)
    models.save_pretrained(decoder, tmp_path / "dec")
    again = models.from_pretrained(tmp_path / "dec")
    ids, mask = torch.randint(0, 51, (2, 8)), torch.ones(2, 8, dtype=torch.bool)
    with torch.no_grad():
        assert torch.equal(decoder(ids, encoded, mask), again(ids, encoded, mask))


# ------------------------------------------------------------------ the objective


def reference_loss(task, batch, parallel: torch.Tensor, chosen: torch.Tensor) -> float:
    """CapPa's loss written per example: AR rows shift right after a start token and run causal
    after their prompt; parallel rows replace (chosen) targets and every pad by the mask token
    and run bidirectional. Summed cross-entropy over target tokens."""
    head = task.captioner
    dec, total = head.decoder, 0.0
    encoded = task.vision(batch["pixel_values"])
    for i in range(len(batch["decoder_ids"])):
        ids = batch["decoder_ids"][i].tolist()
        p, n = int(batch["decoder_prompt_len"][i]), int(batch["decoder_len"][i])
        L = len(ids)
        if parallel[i]:
            x = [ids[j] if j < p or (j < n and not chosen[i, j]) else dec.mask_token_id
                 for j in range(L)]  # fmt: skip
            mask_ar = [False] * L
        else:
            x = [head.start_id] + ids[:-1]
            mask_ar = [j > p for j in range(L)]
        logits = dec(torch.tensor([x]), encoded[i : i + 1], torch.tensor([mask_ar]))[0]
        for j in range(p, n):
            total += F.cross_entropy(logits[j], torch.tensor(ids[j]), reduction="sum").item()
    return total


@pytest.mark.parametrize("ratio", [1.0, 0.5])
def test_loss_equals_per_example_forwards(shapes_dir, tmp_path, ratio):
    task = build(shapes_dir, tmp_path, **{
        "task.masking_ratio": ratio, "task.masked_pred_prob": 0.5,
        "task.decoder_tasks": json.dumps({"caption": 1, "referring": 1, "grounded": 1}),
    })  # fmt: skip
    torch.nn.init.normal_(task.captioner.decoder.lm_head.weight, std=0.1)
    batch = batch_of(task, shapes_dir, 8)
    assert (batch["decoder_prompt_len"] > 0).any() and (batch["decoder_prompt_len"] == 0).any()
    torch.manual_seed(3)
    B, L = batch["decoder_ids"].shape
    parallel, chosen = torch.rand(B) < 0.5, torch.rand(B, L) < ratio
    assert parallel.any() and (~parallel).any()
    torch.manual_seed(3)
    with torch.no_grad():
        out = task(batch)
        ref = reference_loss(task, batch, parallel, chosen)
    assert out.loss.item() == pytest.approx(ref, rel=1e-5)
    assert task.loss_weight(batch) == float((batch["decoder_len"] - batch["decoder_prompt_len"])
                                            .sum())  # fmt: skip


def test_supervised_tokens_are_the_targets_exactly(shapes_dir, tmp_path):
    """Decoding the supervised positions gives the target text (+ EOS); the prompt and padding
    are never supervised; a sample keeps its task; no metadata -> caption."""
    from core.data.synthetic import POSITIONS, describe
    from core.tasks.cappa import CaptionHead

    tasks = {"caption": 1, "referring": 1, "grounded": 1}
    task = build(shapes_dir, tmp_path, **{"task.decoder_tasks": json.dumps(tasks)})
    tok = task.tokenizer
    samples = shard_samples(shapes_dir / "train-000000.tar", 24)
    seen = set()
    for s in samples:
        out = task.text_decoder(s)
        assert torch.equal(task.text_decoder(s)["decoder_ids"], out["decoder_ids"])
        batch = {k: out[k][None] for k in ("decoder_ids", "decoder_prompt_len", "decoder_len")}
        target = out["decoder_ids"][CaptionHead.target_mask(batch)[0]].tolist()
        assert target[-1] == tok.eos_token_id
        text = tok.decode(target[:-1])
        prompt = tok.decode(out["decoder_ids"][: int(out["decoder_prompt_len"])])
        shapes = json.loads(s["json"])["shapes"]
        if prompt == "":
            seen.add("caption")
            assert text == s["txt"].decode()
        elif prompt.startswith("What is at the "):
            seen.add("referring")
            where = prompt.removeprefix("What is at the ").removesuffix("?")
            assert text == describe(next(x for x in shapes if x["position"] == where))
        else:
            seen.add("grounded")
            ordered = sorted(shapes, key=lambda x: POSITIONS.index(x["position"]))
            assert text == "; ".join(f"{x['position']}: {describe(x)}" for x in ordered)
    assert seen == set(tasks)
    plain = {k: v for k, v in samples[0].items() if k != "json"}
    assert task.text_decoder(plain)["decoder_prompt_len"] == 0


def test_parallel_inputs_mask_pads_always_and_the_ratio_of_targets(shapes_dir, tmp_path):
    task = build(shapes_dir, tmp_path, **{"task.masking_ratio": 0.5,
                                          "task.masked_pred_prob": 1.0})  # fmt: skip
    batch = batch_of(task, shapes_dir, 16)
    seen = {}
    dec = task.captioner.decoder

    def grab(module, args):
        seen["inputs"], seen["mask_ar"] = args[0], args[2]

    handle = dec.register_forward_pre_hook(grab)
    with torch.no_grad():
        task(batch)
    handle.remove()
    from core.tasks.cappa import CaptionHead

    targets = CaptionHead.target_mask(batch)
    masked = seen["inputs"] == dec.mask_token_id
    assert masked[~targets].all() and not seen["mask_ar"].any()  # pads masked, bidirectional
    share = masked[targets].float().mean().item()
    assert 0.4 < share < 0.6, share
    assert torch.equal(seen["inputs"][targets & ~masked], batch["decoder_ids"][targets & ~masked])


def test_bad_settings_are_clear_errors(shapes_dir, tmp_path):
    with pytest.raises(ConfigError, match="valid: caption, referring, grounded"):
        build(shapes_dir, tmp_path, **{"task.decoder_tasks": json.dumps({"refer": 1})})
    with pytest.raises(ConfigError, match="masked_pred_prob"):
        build(shapes_dir, tmp_path, **{"task.masked_pred_prob": 1.5})


def test_siglip2_loss_is_the_weighted_sum_of_its_parts(shapes_dir, tmp_path):
    from core.losses import sigmoid_loss
    from core.tasks.cappa import CaptionHead

    over = {"model.text_config.hidden_size": 32, "model.text_config.intermediate_size": 64,
            "model.text_config.num_hidden_layers": 1, "model.text_config.num_attention_heads": 2,
            "model.text_config.head_dim": 16, "task.embed_dim": 32,
            "task.contrastive_weight": 0.5, "task.caption_weight": 2.0}  # fmt: skip
    task = build(shapes_dir, tmp_path, "tiny_siglip2", **over)
    batch = batch_of(task, shapes_dir, 8)
    with torch.no_grad():
        torch.manual_seed(1)
        out = task(batch)
        torch.manual_seed(1)
        hidden = task.vision(batch["pixel_values"])
        caption, _ = task.captioner.loss(hidden, batch)
        contrastive = sigmoid_loss(
            task.encode_image(batch["pixel_values"]),
            task.encode_text(batch["input_ids"], batch["attention_mask"]),
            task.logit_scale, task.logit_bias,
        )  # fmt: skip
    tokens = CaptionHead.target_mask(batch).sum()
    expected = 2.0 * caption + 0.5 * contrastive * tokens
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert out.metrics["contrastive_loss"].item() == pytest.approx(contrastive.item(), rel=1e-6)


def test_captions_and_scores_follow_the_decoder(shapes_dir, tmp_path):
    """Greedy captions equal an argmax loop over full forwards; score_texts equals the summed
    log-probabilities of each text computed by hand."""
    task = build(shapes_dir, tmp_path).eval()
    torch.nn.init.normal_(task.captioner.decoder.lm_head.weight, std=0.3)
    batch = batch_of(task, shapes_dir, 3)
    head, dec = task.captioner, task.captioner.decoder
    with torch.no_grad():
        got = task.caption(batch["pixel_values"], 5)
        encoded = task.vision(batch["pixel_values"])
        for i in range(3):
            ids = [head.start_id]
            for _ in range(5):
                logits = dec(torch.tensor([ids]), encoded[i : i + 1],
                             torch.arange(len(ids))[None] > 0)  # fmt: skip
                nxt = int(logits[0, -1].argmax())
                if nxt == head.eos_id:
                    break
                ids.append(nxt)
            assert got[i] == task.tokenizer.decode(ids[1:], skip_special_tokens=True).strip()
        texts = ["a red circle", "a small blue square"]
        scores = task.score_texts(batch["pixel_values"], texts)
        for j, text in enumerate(texts):
            ids, mask = task.text_decoder.base.tokenize(text)
            real = ids[: int(mask.sum())].tolist()
            for i in range(3):
                x = [head.start_id] + real[:-1]
                logits = dec(torch.tensor([x]), encoded[i : i + 1],
                             torch.arange(len(x))[None] > 0)[0]  # fmt: skip
                logp = logits.log_softmax(-1)[torch.arange(len(real)), real].sum()
                assert scores[i, j].item() == pytest.approx(logp.item(), rel=1e-5)


# ------------------------------------------------------------------ engines, resume, export


def train(shapes, run_dir, kind, recipe="tiny_cappa", **extra):
    args = overrides(shapes, run_dir, **{"engine.kind": kind, "engine.precision": "fp32", **extra})
    return run_cli(["train", recipe, *args], nproc=2)


@pytest.fixture(scope="module")
def straight(shapes_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cappa_engines")
    for kind in ENGINES:
        assert train(shapes_dir, root / kind, kind).wait(timeout=600) == 0, f"{kind} failed"
    return root


@pytest.mark.slow
def test_every_engine_agrees_with_ddp(straight):
    assert_engines_agree(straight, STEPS)


@pytest.mark.slow
# One sharded engine: what a CapPa run adds to resume (the per-example mode draws, the decoder)
# is engine-independent; each sharded engine's SIGKILL resume is tests/test_engines.py's, ddp's
# tests/test_train.py's.
@pytest.mark.parametrize("kind", ["fsdp"])
def test_sigkill_and_restart_is_bitwise_exact(shapes_dir, tmp_path, straight, kind):
    run = tmp_path / "killed"
    kill_after(train(shapes_dir, run, kind), run, 3)
    assert train(shapes_dir, run, kind).wait(timeout=600) == 0
    assert_resumed_exactly(run, straight / kind, STEPS)


@pytest.mark.slow
def test_export_vision_loads_in_transformers_and_decoder_in_vlscale(shapes_dir, straight,
                                                                     tmp_path):  # fmt: skip
    from transformers import SiglipVisionModel

    from core import models
    from launch.export import consolidated, export

    run = straight / "ddp"
    export(run, tmp_path / "out")
    task = consolidated(run)[0].eval()
    batch = batch_of(task, shapes_dir, 2)
    hf = SiglipVisionModel.from_pretrained(tmp_path / "out" / "vision").eval()
    decoder = models.from_pretrained(tmp_path / "out" / "decoder")
    with torch.no_grad():
        ours = task.vision(batch["pixel_values"])
        theirs = hf(pixel_values=batch["pixel_values"]).last_hidden_state
        assert torch.allclose(ours, theirs, atol=1e-5)
        ids, m = batch["decoder_ids"], torch.ones_like(batch["decoder_ids"], dtype=torch.bool)
        assert torch.equal(decoder(ids, ours, m), task.captioner.decoder(ids, ours, m))
    assert (tmp_path / "out" / "decoder" / "tokenizer.json").exists()


@pytest.mark.slow
def test_siglip2_trains_on_two_ranks_under_zero3(shapes_dir, tmp_path):
    over = {"model.text_config.hidden_size": 32, "model.text_config.intermediate_size": 64,
            "model.text_config.num_hidden_layers": 1, "model.text_config.num_attention_heads": 2,
            "model.text_config.head_dim": 16, "task.embed_dim": 32,
            "task.decoder_tasks": json.dumps({"caption": 1, "referring": 1})}  # fmt: skip
    run = tmp_path / "s2"
    assert train(shapes_dir, run, "zero3", "tiny_siglip2", **over).wait(timeout=600) == 0
    rows = [r for r in metrics(run) if "loss" in r]
    assert len(rows) == STEPS and rows[-1]["loss"] < rows[0]["loss"]
    assert {"contrastive_loss", "caption_loss", "parallel_loss", "ar_loss"} <= set(rows[0])


def test_decoder_task_draw_is_a_function_of_the_key():
    from core.tasks.cappa import CaptionSampleDecoder

    picker = CaptionSampleDecoder.__new__(CaptionSampleDecoder)
    picker.tasks, picker.seed = {"caption": 1.0, "referring": 1.0, "grounded": 2.0}, 0
    keys = [f"{i:09d}" for i in range(2000)]
    first = [picker.pick(k, True) for k in keys]
    assert first == [picker.pick(k, True) for k in reversed(keys)][::-1]
    share = first.count("grounded") / len(first)
    assert 0.45 < share < 0.55
    assert {picker.pick(k, False) for k in keys[:50]} == {"caption"}
    random.seed(0)  # the draw does not read the global RNG
    assert [picker.pick(k, True) for k in keys[:20]] == first[:20]
