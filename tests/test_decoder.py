"""Our Decoder (Qwen2, Qwen3, Gemma, PaliGemma's Gemma, Llama) vs transformers on tiny random
models. RoPE types and checkpoint layouts: tests/test_llama_and_layouts.py."""

import json

import pytest
import torch
import torch.nn.functional as F
import transformers as hf

import core.models
from core.models import hub
from core.models.attention import attention, build_mask
from core.models.decoder import Decoder, _default_positions

TOL = 1e-5
VOCAB = 128
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2)
VARIANTS = {
    "qwen2": hf.Qwen2Config(
        **SMALL, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False
    ),
    "qwen2_tied": hf.Qwen2Config(
        **SMALL, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True
    ),
    # head_dim 24 != hidden / heads = 16
    "qwen3": hf.Qwen3Config(**SMALL, num_attention_heads=4, num_key_value_heads=2, head_dim=24),
    # hidden 48: sqrt(48) is not a bf16 number, so the embedding scale's rounding is tested
    "gemma": hf.GemmaConfig(
        **{**SMALL, "hidden_size": 48}, num_attention_heads=4, num_key_value_heads=1, head_dim=16
    ),
    # attention and MLP biases; Llama 3's RoPE scaling (positions 16+ are past its original 8)
    "llama": hf.LlamaConfig(
        **SMALL, num_attention_heads=4, num_key_value_heads=2, attention_bias=True, mlp_bias=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 1e4, "factor": 4.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8},
    ),
}  # fmt: skip


def randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Random values for every parameter, biases and norm weights included (their init is 0/1)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1 if p.dim() > 1 else 0.3)
    return model.eval()


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, tmp_path_factory):
    """(transformers model, its checkpoint dir, our model loaded from it)."""
    path = tmp_path_factory.mktemp(request.param)
    theirs = hf.AutoModelForCausalLM.from_config(
        VARIANTS[request.param], attn_implementation="sdpa"
    )
    randomize(theirs)
    theirs.save_pretrained(path)
    return theirs, path, core.models.from_pretrained(path)


def ids(batch=2, seq=16, seed=1):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def max_diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


@torch.no_grad()
def test_logits_match_transformers(pair):
    theirs, _, ours = pair
    assert isinstance(ours, Decoder)
    x = ids()
    expected = theirs(x).logits
    assert expected.std() > 0.05  # a real signal, not ~0 logits that would match anything
    assert max_diff(ours(x), expected) <= TOL
    hidden = ours(x, return_hidden=True)
    assert max_diff(ours.lm_head(hidden), expected) <= TOL


@torch.no_grad()
def test_bf16_logits_match_transformers(pair):
    theirs, path, _ = pair
    ours = core.models.from_pretrained(path, dtype=torch.bfloat16)
    theirs = hf.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.bfloat16, attn_implementation="sdpa"
    )
    x = ids()
    expected = theirs(x).logits
    got = ours(x)
    assert got.dtype == torch.bfloat16
    # Same ops in the same order and dtypes on the same kernels: bitwise equal. Any change of
    # rounding order (norm casts, embedding scale, RoPE dtype) shows up as whole bf16 ulps.
    assert max_diff(got, expected) == 0.0


def test_greedy_generate_matches_transformers(pair):
    theirs, _, ours = pair
    prompt = ids(seq=10, seed=2)
    mask = torch.ones_like(prompt)
    mask[0, :3] = 0  # row 0 is left-padded
    theirs.generation_config.eos_token_id = None  # never stop early
    theirs.generation_config.pad_token_id = 0
    expected = theirs.generate(prompt, attention_mask=mask, max_new_tokens=16, do_sample=False)
    got = ours.generate(prompt, 16, attention_mask=mask)
    assert got.shape == (2, 16)
    assert torch.equal(got, expected[:, prompt.shape[1] :])
    # A VLM passes embeddings (image tokens spliced in) instead of ids.
    embedded = ours.generate(None, 16, attention_mask=mask, inputs_embeds=ours.embed(prompt))
    assert torch.equal(embedded, got)


def test_generate_stops_at_eos(pair):
    _, _, ours = pair
    prompt = ids(seq=8, seed=3)
    free = ours.generate(prompt, 10)
    eos = int(free[0, 2])
    got = ours.generate(prompt, 10, eos_token_id=[eos, VOCAB + 5])
    first = int((free[0] == eos).nonzero()[0])
    assert torch.equal(got[0, : first + 1], free[0, : first + 1])
    assert (got[0, first:] == eos).all()  # finished rows repeat eos
    if not (free[1] == eos).any():  # row 1 never finishes: decoding ran to the end
        assert torch.equal(got[1], free[1])


@torch.no_grad()
def test_save_pretrained_loads_in_transformers(pair, tmp_path):
    theirs, _, ours = pair
    core.models.save_pretrained(ours, tmp_path)
    reloaded = hf.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa")
    assert type(reloaded) is type(theirs)
    x = ids()
    assert max_diff(reloaded(x).logits, theirs(x).logits) <= TOL


@torch.no_grad()
def test_sharded_checkpoint_loads_identically(pair, tmp_path):
    _, _, ours = pair
    core.models.save_pretrained(ours, tmp_path, max_shard_bytes=20_000)
    index = json.loads((tmp_path / hub.INDEX).read_text())
    assert len(set(index["weight_map"].values())) > 2
    loaded = core.models.from_pretrained(tmp_path)
    before, after = ours.state_dict(), loaded.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    x = ids()
    assert torch.equal(loaded(x), ours(x))


@torch.no_grad()
def test_packed_rows_match_separate_sequences(pair):
    _, _, ours = pair
    lengths = [5, 6, 3]
    seqs = [ids(1, n, seed=10 + n) for n in lengths]
    packed = torch.cat([*seqs, torch.zeros(1, 2, dtype=torch.long)], dim=1)  # + 2 padding
    segment_ids = torch.cat(
        [torch.full((1, n), i) for i, n in enumerate(lengths)] + [torch.full((1, 2), -1)], dim=1
    )
    out = ours(packed, mask_kind="packed", segment_ids=segment_ids)
    start = 0
    for seq in seqs:
        n = seq.shape[1]
        assert max_diff(out[:, start : start + n], ours(seq)) <= TOL
        start += n


def test_default_positions():
    # RoPE is relative, so a uniform position shift only changes rounding: check the ids directly.
    segments = torch.tensor([[0, 0, 0, 1, 1, 2, -1, -1]])
    packed = _default_positions(8, 0, torch.device("cpu"), segments, None)
    assert packed.tolist() == [[0, 1, 2, 0, 1, 0, 0, 1]]
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    padded = _default_positions(2, 3, torch.device("cpu"), None, mask)  # 3 cached + 2 new
    assert padded.tolist() == [[1, 2], [3, 4]]
    assert _default_positions(2, 3, torch.device("cpu"), None, None).tolist() == [[3, 4]]


@torch.no_grad()
def test_prefix_lm_matches_explicit_boolean_mask(pair):
    theirs, _, ours = pair
    x = ids()
    prefix_len = torch.tensor([6, 11])
    T = x.shape[1]
    hand = torch.zeros(2, 1, T, T, dtype=torch.bool)
    for b in range(2):
        for i in range(T):
            for j in range(T):
                hand[b, 0, i, j] = j <= i or j < prefix_len[b]
    # transformers takes a ready 4D boolean mask as is (True = attend).
    expected = theirs(x, attention_mask=hand).logits
    got = ours(x, mask_kind="prefix", prefix_len=prefix_len)
    assert max_diff(got, expected) <= TOL
    assert max_diff(got[0, :5], ours(x)[0, :5]) > 1e-3  # the prefix really is bidirectional


def hand_mask(kind, q_len, kv_len, batch, prefix_len=None, segment_ids=None, key_padding=None):
    mask = torch.zeros(batch, 1, q_len, kv_len, dtype=torch.bool)
    for b in range(batch):
        for i in range(q_len):
            q = kv_len - q_len + i  # queries are the last q_len positions
            for k in range(kv_len):
                if kind == "causal":
                    ok = k <= q
                elif kind == "bidirectional":
                    ok = True
                elif kind == "prefix":
                    ok = k <= q or k < prefix_len[b]
                else:
                    seg = segment_ids[b]
                    ok = (seg[q] >= 0 and seg[k] == seg[q] and k <= q) or k == q
                if key_padding is not None:
                    ok = ok and bool(key_padding[b, k])
                mask[b, 0, i, k] = ok
    return mask


@pytest.mark.parametrize("kind", ["causal", "bidirectional", "prefix", "packed"])
@pytest.mark.parametrize("q_len", [7, 3])
@pytest.mark.parametrize("padded", [False, True])
def test_build_mask_matches_hand_built(kind, q_len, padded):
    kv_len, batch = 7, 2
    prefix_len = torch.tensor([2, 5])
    segment_ids = torch.tensor([[0, 0, 1, 1, 1, -1, -1], [0, 1, 1, 2, 2, 2, 2]])
    key_padding = torch.tensor([[0, 1, 1, 1, 1, 1, 1], [1] * 7]).bool() if padded else None
    got = build_mask(
        kind, q_len, kv_len, device=torch.device("cpu"), prefix_len=prefix_len,
        segment_ids=segment_ids, key_padding=key_padding,
    )  # fmt: skip
    expected = hand_mask(kind, q_len, kv_len, batch, prefix_len, segment_ids, key_padding)
    if got is None:  # "no mask" is only allowed when everything may attend
        assert expected.all()
    else:
        assert torch.equal(got.expand_as(expected), expected)


def test_attention_prefix_and_gqa_match_sdpa_with_hand_mask():
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 4, 9, 8, generator=g)
    k, v = torch.randn(2, 2, 9, 8, generator=g), torch.randn(2, 2, 9, 8, generator=g)
    prefix_len = torch.tensor([3, 7])
    mask = hand_mask("prefix", 9, 9, 2, prefix_len)
    expected = F.scaled_dot_product_attention(
        q, k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1), attn_mask=mask
    )
    assert max_diff(attention(q, k, v, "prefix", prefix_len=prefix_len), expected) <= 1e-6
    causal = F.scaled_dot_product_attention(
        q,
        k.repeat_interleave(2, dim=1),
        v.repeat_interleave(2, dim=1),
        attn_mask=hand_mask("causal", 9, 9, 2),
    )
    assert max_diff(attention(q, k, v), causal) <= 1e-6


@torch.no_grad()
def test_prefix_generate_with_cache_matches_full_recompute(pair):
    _, _, ours = pair
    prompt = ids(seq=9, seed=5)
    mask = torch.ones_like(prompt)
    mask[1, :2] = 0
    prefix_len = torch.tensor([4, 6])  # from the row start, padding included
    got = ours.generate(prompt, 6, attention_mask=mask, prefix_len=prefix_len)
    seq = prompt
    for _ in range(6):
        full_mask = torch.cat([mask, torch.ones(2, seq.shape[1] - mask.shape[1])], 1)
        logits = ours(seq, mask_kind="prefix", prefix_len=prefix_len, attention_mask=full_mask)
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(got, seq[:, prompt.shape[1] :])


@torch.no_grad()
def test_old_format_config_loads(tmp_path):
    """Hub checkpoints (Qwen2.5, Qwen3, PaliGemma) use the pre-5 config.json layout."""
    cfg = hf.Qwen2Config(**SMALL, num_attention_heads=4, num_key_value_heads=2)
    cfg.rope_parameters = {"rope_type": "default", "rope_theta": 1e6}
    theirs = randomize(hf.Qwen2ForCausalLM(cfg))
    theirs.save_pretrained(tmp_path)
    old = json.loads((tmp_path / "config.json").read_text())
    for key in ("rope_parameters", "layer_types", "dtype"):
        old.pop(key)
    old.update(
        rope_theta=1000000.0, rope_scaling=None, torch_dtype="float32", use_sliding_window=False,
        sliding_window=32768, max_window_layers=21, transformers_version="4.43.1",
    )  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(old))
    ours = core.models.from_pretrained(tmp_path)
    assert ours.config.rope_theta == 1e6
    x = ids()
    assert max_diff(ours(x), theirs(x).logits) <= TOL


# config.json of real hub checkpoints (older transformers format), weights not needed.
HUB_CONFIGS = {
    "Qwen/Qwen2.5-0.5B-Instruct": {
        "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0,
        "bos_token_id": 151643, "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 896,
        "initializer_range": 0.02, "intermediate_size": 4864, "max_position_embeddings": 32768,
        "max_window_layers": 21, "model_type": "qwen2", "num_attention_heads": 14,
        "num_hidden_layers": 24, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True,
        "torch_dtype": "bfloat16", "transformers_version": "4.43.1", "use_cache": True,
        "use_sliding_window": False, "vocab_size": 151936,
    },
    "Qwen/Qwen3-0.6B": {
        "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
        "hidden_size": 1024, "initializer_range": 0.02, "intermediate_size": 3072,
        "max_position_embeddings": 40960, "max_window_layers": 28, "model_type": "qwen3",
        "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8,
        "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000,
        "sliding_window": None, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        "transformers_version": "4.51.0", "use_cache": True, "use_sliding_window": False,
        "vocab_size": 151936,
    },
    "google/paligemma-3b-pt-224": {
        "architectures": ["PaliGemmaForConditionalGeneration"], "bos_token_id": 2,
        "eos_token_id": 1, "hidden_size": 2048, "ignore_index": -100,
        "image_token_index": 257152, "model_type": "paligemma", "pad_token_id": 0,
        "projection_dim": 2048,
        "text_config": {
            "hidden_size": 2048, "intermediate_size": 16384, "model_type": "gemma",
            "num_attention_heads": 8, "num_hidden_layers": 18, "num_image_tokens": 256,
            "num_key_value_heads": 1, "torch_dtype": "float32", "vocab_size": 257216,
        },
        "torch_dtype": "float32", "transformers_version": "4.41.0.dev0",
        "vision_config": {
            "hidden_size": 1152, "intermediate_size": 4304, "model_type": "siglip_vision_model",
            "num_attention_heads": 16, "num_hidden_layers": 27, "num_image_tokens": 256,
            "patch_size": 14, "projection_dim": 2048, "projector_hidden_act": "gelu_fast",
            "vision_use_head": False,
        },
    },
    "HuggingFaceTB/SmolLM2-135M": {
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 0, "eos_token_id": 0, "hidden_act": "silu", "hidden_size": 576,
        "initializer_range": 0.041666666666666664, "intermediate_size": 1536,
        "is_llama_config": True, "max_position_embeddings": 8192, "mlp_bias": False,
        "model_type": "llama", "num_attention_heads": 9, "num_hidden_layers": 30,
        "num_key_value_heads": 3, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
        "rope_interleaved": False, "rope_scaling": None, "rope_theta": 100000,
        "tie_word_embeddings": True, "torch_dtype": "bfloat16", "transformers_version": "4.42.3",
        "use_cache": True, "vocab_size": 49152,
    },
    "meta-llama/Llama-3.2-1B": {
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 128000, "eos_token_id": 128001, "head_dim": 64, "hidden_act": "silu",
        "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 8192,
        "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
        "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8,
        "pretraining_tp": 1, "rms_norm_eps": 1e-05,
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        "transformers_version": "4.45.0.dev0", "use_cache": True, "vocab_size": 128256,
    },
}  # fmt: skip


@pytest.mark.parametrize("name", list(HUB_CONFIGS))
def test_hub_configs_build_transformers_architecture(name):
    """Our reading of a real config (defaults included) gives transformers' parameter shapes."""
    cfg = HUB_CONFIGS[name]
    theirs_cfg = hf.AutoConfig.for_model(**cfg)
    with torch.device("meta"):
        ours = core.models.from_config(cfg)
        if cfg["model_type"] == "paligemma":  # its decoder (tests/test_paligemma.py: the rest)
            ours = ours.lm
            theirs = hf.GemmaForCausalLM(theirs_cfg.text_config)
        else:
            theirs = hf.AutoModelForCausalLM.from_config(theirs_cfg)
    shapes = {k: v.shape for k, v in ours.hf_state_dict().items()}
    assert shapes == {k: v.shape for k, v in theirs.state_dict().items() if k in shapes}
    assert set(theirs.state_dict()) - set(shapes) <= {"lm_head.weight"}  # tied
    text_cfg = theirs_cfg.get_text_config()
    assert ours.config.rope_theta == text_cfg.rope_parameters["rope_theta"]
    assert ours.config.rope_parameters == {
        k: v for k, v in text_cfg.rope_parameters.items() if k != "type"
    }
    assert ours.config.act == text_cfg.hidden_act
    assert ours.config.tie_embeddings == text_cfg.tie_word_embeddings


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(rope_scaling={"type": "su", "factor": 4.0}), "RoPE type 'su'"),
        (dict(rope_parameters={"rope_type": "linear", "rope_theta": 1e4}), "RoPE parameters"),
        (dict(use_sliding_window=True, sliding_window=8, max_window_layers=1), "sliding-window"),
        (dict(layer_types=["full_attention", "sliding_attention"]), "layer_types"),
        (dict(hidden_act="relu"), "activation"),
        (dict(model_type="gemma", use_bidirectional_attention=True), "bidirectional"),
        (dict(model_type="paligemma", text_config={"model_type": "gemma2"}), "gemma2"),
        (dict(model_type="mistral"), "unsupported model_type"),
    ],
)
def test_unsupported_config_raises(change, message):
    cfg = {
        "model_type": "qwen2", "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "rope_theta": 1e4, **change,
    }  # fmt: skip
    with pytest.raises(ValueError, match=message):
        core.models.from_config(cfg)


def test_hf_config_refuses_what_transformers_cannot_express():
    model = core.models.from_config({**SMALL, "model_type": "qwen2", "num_attention_heads": 4})
    model.config.qkv_bias = False  # transformers' Qwen2 always has q/k/v biases
    with pytest.raises(ValueError, match="qkv_bias"):
        model.hf_config()


def test_resaving_sharded_over_single_file_leaves_no_stale_weights(tmp_path):
    from core.models import from_config, from_pretrained, hub, save_pretrained

    cfg = {"model_type": "qwen2", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}  # fmt: skip
    first, second = from_config(cfg), from_config(cfg)
    torch.nn.init.normal_(second.lm_head.weight)
    save_pretrained(first, tmp_path)
    save_pretrained(second, tmp_path, max_shard_bytes=4096)
    assert not (tmp_path / hub.SINGLE).exists()
    loaded = from_pretrained(tmp_path)
    assert torch.equal(loaded.lm_head.weight, second.lm_head.weight)
