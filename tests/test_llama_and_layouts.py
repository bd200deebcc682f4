"""Llama, the RoPE types (core/models/rope.py) and the base-model checkpoint layout, each against
transformers on tiny random fp32 models. The Llama family's other checks (bf16, generation,
packing, prefix-LM) are tests/test_decoder.py's and test_generation.py's `llama` variants."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers as hf
from safetensors import safe_open

import core.models
from core.models import hub
from core.models.decoder import Decoder

TOL = 1e-5
VOCAB = 128
MAX_POS = 32  # max_position_embeddings of the RoPE configs; the long inputs go beyond it
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2)
FAMILIES = {
    "qwen2": lambda **kw: hf.Qwen2Config(
        **SMALL, num_attention_heads=4, num_key_value_heads=2, **kw
    ),
    "qwen3": lambda **kw: hf.Qwen3Config(
        **SMALL, num_attention_heads=4, num_key_value_heads=2, head_dim=16, **kw
    ),
    "gemma": lambda **kw: hf.GemmaConfig(
        **SMALL, num_attention_heads=4, num_key_value_heads=1, head_dim=16, **kw
    ),
    # attention and MLP biases, head_dim 24 != hidden / heads
    "llama": lambda **kw: hf.LlamaConfig(
        **SMALL, num_attention_heads=4, num_key_value_heads=2, head_dim=24, attention_bias=True,
        mlp_bias=True, **kw,
    ),
}  # fmt: skip
HALF_DIMS = {"qwen2": 8, "qwen3": 8, "gemma": 8, "llama": 12}  # head_dim / 2 per family
# Every rope_parameters type, with lengths chosen so the scaling matters for the test inputs
# (T = 40 > MAX_POS, and > original_max_position_embeddings = 8 for yarn / longrope).
ROPES = {
    "default": {"rope_type": "default", "rope_theta": 5e5},
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 3.0},  # 3: not exact in the fp32 arithmetic
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8},
    "yarn_options": {
        "rope_type": "yarn", "factor": 3.0, "original_max_position_embeddings": 8,
        "mscale": 0.707, "mscale_all_dim": 1.0, "beta_fast": 16, "truncate": False,
    },
    "yarn_attention_factor": {
        "rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 16,
        "attention_factor": 0.8, "beta_slow": 2,
    },
    # factor left out: transformers takes max_position_embeddings / original (Phi3's way)
    "longrope": {"rope_type": "longrope", "original_max_position_embeddings": 8},
    # theta 1000, head_dim 16: wavelengths on all three sides of Llama 3's band (8, 16)
    "llama3": {
        "rope_type": "llama3", "rope_theta": 1000.0, "factor": 4.0, "low_freq_factor": 1.0,
        "high_freq_factor": 2.0, "original_max_position_embeddings": 16,
    },
}  # fmt: skip


def rope_config(family: str, rope: str):
    params = dict(ROPES[rope])
    if rope == "longrope":
        n = HALF_DIMS[family]
        params["short_factor"] = [1.0 + 0.1 * i for i in range(n)]
        params["long_factor"] = [1.0 + 0.7 * i for i in range(n)]
    return FAMILIES[family](max_position_embeddings=MAX_POS, rope_parameters=params)


def randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Random values for every parameter, biases and norm weights included (their init is 0/1)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1 if p.dim() > 1 else 0.3)
    return model.eval()


def ids(batch=2, seq=16, seed=1):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def max_diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


def saved_pair(config, path, cls=hf.AutoModelForCausalLM):
    theirs = randomize(cls.from_config(config, attn_implementation="sdpa"))
    theirs.save_pretrained(path)
    return theirs, core.models.from_pretrained(path)


# -- RoPE types --


@pytest.mark.parametrize("rope", list(ROPES))
@pytest.mark.parametrize("family", list(FAMILIES))
@torch.no_grad()
def test_rope_types_match_transformers(family, rope, tmp_path):
    theirs, ours = saved_pair(rope_config(family, rope), tmp_path)
    assert isinstance(ours, Decoder) and ours.config.model_type == family
    for seq in (6, 40):  # within and beyond every original / maximum length
        x = ids(seq=seq)
        expected = theirs(x).logits
        assert max_diff(ours(x), expected) <= TOL, seq
        # The same ops in the same order: the rotary tables are equal to the bit.
        positions = torch.arange(seq)[None]
        tables = theirs.model.rotary_emb(torch.zeros(1, dtype=torch.float32), positions)
        assert all(map(torch.equal, ours.rope_cos_sin(positions, torch.float32), tables))
    # The scaling is really in effect: plain RoPE with the same weights differs.
    plain = core.models.from_pretrained(tmp_path)
    plain.config.rope_scaling = None
    if rope != "default":
        assert max_diff(plain(x), expected) > 1e-3
    # Written back as transformers 5 writes it, and transformers computes the same from it.
    core.models.save_pretrained(ours, tmp_path / "ours")
    written = json.loads((tmp_path / "ours" / "config.json").read_text())["rope_parameters"]
    assert written == {k: v for k, v in theirs.config.rope_parameters.items() if k != "type"}
    reloaded = hf.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert max_diff(reloaded(x).logits, expected) <= TOL


@pytest.mark.parametrize("rope", list(ROPES))
@torch.no_grad()
def test_rope_types_generate_with_kv_cache_as_transformers(rope, tmp_path):
    """Greedy decoding across the lengths where dynamic and longrope change frequencies (8 for
    longrope, MAX_POS for dynamic), with a left-padded row."""
    theirs, ours = saved_pair(rope_config("llama", rope), tmp_path)
    theirs.generation_config.eos_token_id = None
    theirs.generation_config.pad_token_id = 0
    for seq in (5, 28):
        prompt = ids(seq=seq, seed=2)
        mask = torch.ones_like(prompt)
        mask[0, :2] = 0
        expected = theirs.generate(prompt, attention_mask=mask, max_new_tokens=12, do_sample=False)
        assert torch.equal(ours.generate(prompt, 12, attention_mask=mask), expected[:, seq:])


@torch.no_grad()
def test_old_rope_scaling_spelling_loads(tmp_path):
    """Hub configs from before transformers 5: `rope_scaling` with `type`, top-level rope_theta,
    and (Phi3's layout) a top-level original_max_position_embeddings that wins."""
    config = rope_config("llama", "yarn")
    theirs, _ = saved_pair(config, tmp_path)
    old = json.loads((tmp_path / "config.json").read_text())
    old.pop("rope_parameters")
    scaling = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 20}
    old.update(rope_theta=10000.0, original_max_position_embeddings=8, rope_scaling=scaling)
    (tmp_path / "config.json").write_text(json.dumps(old))
    ours = core.models.from_pretrained(tmp_path)
    assert ours.config.rope_parameters == {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8,
        "rope_theta": 10000.0,
    }  # fmt: skip
    x = ids(seq=40)
    assert max_diff(ours(x), theirs(x).logits) <= TOL
    transformers_reads = hf.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert max_diff(transformers_reads(x).logits, theirs(x).logits) <= TOL


@pytest.mark.parametrize(
    "rope, message",
    [
        ({"rope_type": "su", "factor": 2.0}, "unsupported RoPE type 'su'.*supported: default"),
        ({"rope_type": "yarn"}, r"missing \['factor'\]"),
        ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0}, "high_freq_factor"),
        ({"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 0.5},
         r"unknown \['partial_rotary_factor'\]"),
    ],
)  # fmt: skip
def test_bad_rope_parameters_are_clear_errors(rope, message):
    cfg = {**SMALL, "model_type": "llama", "num_attention_heads": 4, "rope_parameters": rope}
    with pytest.raises(ValueError, match=message):
        core.models.from_config(cfg)


# -- Llama --


@torch.no_grad()
def test_llama_untied_unbiased_defaults(tmp_path):
    """A SmolLM2-like config (defaults: no biases, head_dim = hidden / heads) with tied
    embeddings, and a Llama-3-like one (untied, llama3 RoPE, rope_theta 5e5)."""
    smol = hf.LlamaConfig(**SMALL, num_attention_heads=4, num_key_value_heads=2,
                          tie_word_embeddings=True)  # fmt: skip
    llama3 = hf.LlamaConfig(
        **SMALL, num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=64,
        rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 16},
    )  # fmt: skip
    for name, config in (("smol", smol), ("llama3", llama3)):
        theirs, ours = saved_pair(config, tmp_path / name)
        assert ours.config.tie_embeddings == config.tie_word_embeddings
        assert not any(k.endswith("bias") for k in ours.state_dict())
        assert ours.config.head_dim == 16
        x = ids(seq=24)
        assert max_diff(ours(x), theirs(x).logits) <= TOL
        core.models.save_pretrained(ours, tmp_path / f"{name}_ours")
        written = json.loads((tmp_path / f"{name}_ours" / "config.json").read_text())
        assert written["architectures"] == ["LlamaForCausalLM"]
        assert written["attention_bias"] is False and written["mlp_bias"] is False


# -- checkpoint layouts: XForCausalLM and XModel --


def checkpoint_keys(path) -> set[str]:
    keys = set()
    for file in path.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            keys |= set(f.keys())
    return keys


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("family", list(FAMILIES))
@torch.no_grad()
def test_task_head_layout_round_trip(family, tied, tmp_path):
    config = FAMILIES[family](tie_word_embeddings=tied)
    theirs, ours = saved_pair(config, tmp_path / "theirs")
    assert ours.layout == "causal_lm" and ours.config.tie_embeddings == tied
    x = ids()
    assert max_diff(ours(x), theirs(x).logits) <= TOL
    hidden = theirs.model(x).last_hidden_state
    assert max_diff(ours(x, return_hidden=True), hidden) <= TOL
    core.models.save_pretrained(ours, tmp_path / "ours")
    written = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert written["architectures"] == [type(theirs).__name__]
    assert checkpoint_keys(tmp_path / "ours") == checkpoint_keys(tmp_path / "theirs")
    reloaded = hf.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert type(reloaded) is type(theirs)
    assert max_diff(reloaded(x).logits, theirs(x).logits) <= TOL


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("family", list(FAMILIES))
@torch.no_grad()
def test_base_model_layout_round_trip(family, tied, tmp_path):
    """An `XModel` checkpoint (no `model.` prefix, no lm_head; Qwen3-Embedding's layout) loads
    with the embeddings as head, and saves back as an `XModel` that transformers loads."""
    config = FAMILIES[family](tie_word_embeddings=tied)
    theirs, ours = saved_pair(config, tmp_path / "theirs", cls=hf.AutoModel)
    assert not any(k.startswith("model.") for k in checkpoint_keys(tmp_path / "theirs"))
    assert ours.layout == "base" and ours.config.tie_embeddings
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    x = ids()
    expected = theirs(x).last_hidden_state
    hidden = ours(x, return_hidden=True)
    assert max_diff(hidden, expected) <= TOL
    assert torch.equal(ours(x), hidden @ theirs.embed_tokens.weight.T)

    core.models.save_pretrained(ours, tmp_path / "ours")
    written = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert written["architectures"] == [type(theirs).__name__]  # e.g. Qwen3Model
    assert written["tie_word_embeddings"] is True
    assert checkpoint_keys(tmp_path / "ours") == checkpoint_keys(tmp_path / "theirs")
    base = hf.AutoModel.from_pretrained(tmp_path / "ours").eval()
    assert type(base) is type(theirs)
    assert max_diff(base(x).last_hidden_state, expected) <= TOL
    # transformers' task-head model on it ties the head too: the same logits as ours.
    lm = hf.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert max_diff(lm(x).logits, ours(x)) <= TOL
    again = core.models.from_pretrained(tmp_path / "ours")
    assert again.layout == "base" and torch.equal(again(x), ours(x))


@torch.no_grad()
def test_base_layout_is_read_from_the_keys_not_the_architectures(tmp_path):
    """Qwen3-Embedding's config.json names Qwen3ForCausalLM over base-layout weights."""
    theirs, _ = saved_pair(FAMILIES["qwen3"](tie_word_embeddings=True), tmp_path, hf.AutoModel)
    config = json.loads((tmp_path / "config.json").read_text())
    config["architectures"] = ["Qwen3ForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    ours = core.models.from_pretrained(tmp_path)
    assert ours.layout == "base"
    x = ids()
    assert max_diff(ours(x, return_hidden=True), theirs(x).last_hidden_state) <= TOL


@torch.no_grad()
def test_text_tower_without_head_saves_the_base_layout(tmp_path):
    """The SigLIP task drops a text tower's lm_head: its export is an `XModel` (AutoModel)."""
    theirs, ours = saved_pair(FAMILIES["llama"](tie_word_embeddings=False), tmp_path / "theirs")
    ours.lm_head = None
    x = ids()
    with pytest.raises(ValueError, match="return_hidden=True"):
        ours(x)
    core.models.save_pretrained(ours, tmp_path / "ours")
    written = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert written["architectures"] == ["LlamaModel"]
    base = hf.AutoModel.from_pretrained(tmp_path / "ours").eval()
    expected = theirs.model(x).last_hidden_state
    assert max_diff(base(x).last_hidden_state, expected) <= TOL
    assert max_diff(ours(x, return_hidden=True), expected) <= TOL


@pytest.mark.parametrize("layout", ["causal_lm", "base"])
def test_mismatched_checkpoint_names_missing_and_unexpected_keys(layout, tmp_path):
    config = FAMILIES["qwen3"](tie_word_embeddings=False)
    cls = hf.AutoModel if layout == "base" else hf.AutoModelForCausalLM
    randomize(cls.from_config(config)).save_pretrained(tmp_path)
    state = hub.load_state_dict(tmp_path)
    prefix = "" if layout == "base" else "model."
    state.pop(f"{prefix}layers.1.mlp.up_proj.weight")
    state[f"{prefix}layers.1.mlp.extra.weight"] = torch.zeros(1)
    hub.save_state_dict(state, tmp_path)
    arch = "Qwen3Model" if layout == "base" else "Qwen3ForCausalLM"
    message = (
        rf"qwen3 Decoder \({arch} layout\): missing \['{prefix}layers.1.mlp.up_proj.weight'\], "
        rf"unexpected \['{prefix}layers.1.mlp.extra.weight'\]"
    )
    with pytest.raises(KeyError, match=message):
        core.models.from_pretrained(tmp_path)


# -- Llama in the recipes: the VLM's language model and a SigLIP text tower --


def test_llama_as_the_vlm_language_model(vqa, tmp_path):
    """The staged VLM with a Llama LM (attention and MLP biases): one FSDP unit per Llama
    block, packed rows equal separate samples, and the export loads as LlamaForCausalLM."""
    from test_vlm_task import decoded, vlm_task

    from core.models.decoder import DecoderBlock

    llama = {"model.text_config.model_type": "llama", "model.text_config.attention_bias": "true",
             "model.text_config.mlp_bias": "true"}  # fmt: skip
    task = vlm_task(vqa, tmp_path, **llama).eval()
    assert task.lm.config.model_type == "llama" and task.lm.config.mlp_bias
    blocks = task.blocks()["lm"]
    assert len(blocks) == 2 and all(isinstance(b, DecoderBlock) for b in blocks)
    samples = decoded(task, vqa, "shapes_colour", 3) + decoded(task, vqa, "shapes_text", 2)
    collate = task.packed_collate()
    packed = collate(samples)
    with torch.no_grad():
        total = task(packed).loss
        alone = sum(task(collate([s])).loss for s in samples)
    torch.testing.assert_close(total, alone, rtol=1e-5, atol=1e-5)
    task.export_hf(tmp_path / "out", task.state_dict())
    lm = hf.AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "lm").eval()
    assert type(lm).__name__ == "LlamaForCausalLM"
    x = ids() % lm.config.vocab_size
    with torch.no_grad():
        assert max_diff(lm(x).logits, task.lm(x)) <= TOL


@torch.no_grad()
def test_base_layout_checkpoint_as_a_siglip_text_tower(shapes_dir, tmp_path):
    """A Qwen3-Embedding-style checkpoint (Qwen3Model: base layout) as `model.text`: the text
    tower computes transformers' hidden states and exports back as a Qwen3Model."""
    from test_train import tiny_overrides

    from core.recipe import load_config
    from core.tasks import build_task

    tok = hf.AutoTokenizer.from_pretrained(str(shapes_dir / "tokenizer"))
    config = FAMILIES["qwen3"](tie_word_embeddings=True, max_position_embeddings=64)
    config.vocab_size = len(tok)
    theirs, _ = saved_pair(config, tmp_path / "qwen3_embedding", cls=hf.AutoModel)
    over = tiny_overrides(shapes_dir, tmp_path / "run", 1)
    over += [f"model.text={tmp_path / 'qwen3_embedding'}", "task.text_attention=causal"]
    task = build_task(load_config("tiny_siglip", over)).eval()
    assert task.text.layout == "base" and task.text.lm_head is None
    input_ids, mask = task.tokenize(["a red square", "two blue circles above a green one"])
    hidden = task.text(input_ids=input_ids, attention_mask=mask, return_hidden=True)
    expected = theirs(input_ids=input_ids, attention_mask=mask).last_hidden_state
    real = mask.bool()  # padded positions are masked out of the pooling
    assert max_diff(hidden[real], expected[real]) <= TOL
    task.export_hf(tmp_path / "out", task.state_dict())
    exported = hf.AutoModel.from_pretrained(tmp_path / "out" / "text").eval()
    assert type(exported).__name__ == "Qwen3Model"
    got = exported(input_ids=input_ids, attention_mask=mask).last_hidden_state
    assert max_diff(got[real], expected[real]) <= TOL


@pytest.mark.slow
def test_llama_vlm_trains_under_fsdp(vqa, tmp_path):
    """2 gloo ranks, FSDP2 with one unit per Llama block (stage 1 with the LM trained too)."""
    from test_train import metrics, run_cli
    from test_vlm_task import vlm_overrides

    over = {"model.text_config.model_type": "llama", "model.text_config.mlp_bias": "true",
            "engine.kind": "fsdp", "task.trainable": "[projector.*, lm.*]", "eval.every": 0,
            "checkpoint.every": 3}  # fmt: skip
    proc = run_cli(["train", "tiny_vlm_stage1", *vlm_overrides(vqa, tmp_path / "run", 3, **over)],
                   nproc=2)  # fmt: skip
    assert proc.wait(timeout=600) == 0
    losses = [r["loss"] for r in metrics(tmp_path / "run") if "loss" in r]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
