"""Decoder-only causal LMs: Qwen2 / Qwen2.5, Qwen3 and Gemma (also the Gemma inside PaliGemma).

One `Decoder` class; the families differ only by a few `DecoderConfig` switches. Module names
copy transformers' so our state dict *is* a Hugging Face state dict
(`model.layers.0.self_attn.q_proj.weight`, `lm_head.weight`, ...), and every op follows
transformers' computation order and dtypes (fp32 RMSNorm, fp32 RoPE angles, Gemma's (1 + w) norm
and sqrt(hidden) embedding scale), so fp32 and bf16 logits agree with transformers' to rounding.

    model = core.models.from_pretrained("Qwen2.5-0.5B-dir")      # -> Decoder
    logits = model(input_ids)                                   # [B, T, V]
    hidden = model(inputs_embeds=x, mask_kind="prefix", prefix_len=p, return_hidden=True)
    new_tokens = model.generate(prompt_ids, 32, eos_token_id=eos, attention_mask=pad_mask)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention
from .cache import KVCache
from .generation import generate
from .registry import register

ACTIVATIONS = {"silu": F.silu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}
ARCHITECTURES = {
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma": "GemmaForCausalLM",
}

# What each transformers family hard-codes; hf_config() refuses a config it could not express.
FAMILY_TRAITS = {
    "qwen2": dict(
        qkv_bias=True, o_bias=False, qk_norm=False, norm_plus_one=False, embed_scale=False
    ),
    "qwen3": dict(qk_norm=True, norm_plus_one=False, embed_scale=False),
    "gemma": dict(qk_norm=False, norm_plus_one=True, embed_scale=True),
}
# transformers' config defaults for the fields a hub config.json may omit (PaliGemma's
# `text_config` lists only a few and relies on GemmaConfig's defaults).
HF_DEFAULTS = {
    "qwen2": dict(
        vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
        num_attention_heads=32, hidden_act="silu", max_position_embeddings=32768,
        rms_norm_eps=1e-6, tie_word_embeddings=False,
    ),
    "qwen3": dict(
        vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, head_dim=128, hidden_act="silu",
        max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False,
        attention_bias=False,
    ),
    "gemma": dict(
        vocab_size=256000, hidden_size=3072, intermediate_size=24576, num_hidden_layers=28,
        num_attention_heads=16, num_key_value_heads=16, head_dim=256,
        hidden_act="gelu_pytorch_tanh", max_position_embeddings=8192, rms_norm_eps=1e-6,
        tie_word_embeddings=True, attention_bias=False, pad_token_id=0, eos_token_id=1,
        bos_token_id=2,
    ),
}  # fmt: skip
DEFAULT_ROPE_THETA = 10000.0


@dataclass
class DecoderConfig:
    model_type: str  # the transformers family hf_config() writes: qwen2, qwen3 or gemma
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = DEFAULT_ROPE_THETA
    rms_eps: float = 1e-6
    act: str = "silu"  # key of ACTIVATIONS
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k, before RoPE
    norm_plus_one: bool = False  # Gemma: RMSNorm scales by (1 + weight), weights start at 0
    embed_scale: bool = False  # Gemma: embeddings are multiplied by sqrt(hidden_size)
    tie_embeddings: bool = False
    max_position_embeddings: int = 32768
    initializer_range: float = 0.02  # std of random init (models trained from scratch)
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self):
        if self.act not in ACTIVATIONS:
            raise ValueError(f"unsupported activation {self.act!r}; supported: {list(ACTIVATIONS)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} not a multiple of {self.num_kv_heads}")

    @classmethod
    def from_hf(cls, cfg: dict) -> DecoderConfig:
        """From a transformers config.json dict, current (`rope_parameters`) or older
        (top-level `rope_theta`, `rope_scaling`, `torch_dtype`) format."""
        if cfg["model_type"] == "paligemma":
            cfg = dict(cfg["text_config"])
            cfg.setdefault("model_type", "gemma")
            if cfg["model_type"] != "gemma":
                raise ValueError(f"PaliGemma with a {cfg['model_type']!r} decoder is not supported")
            # transformers 5 marks PaliGemma's text config bidirectional; here the caller picks
            # the mask per forward (mask_kind="prefix" for PaliGemma's prefix-LM).
            cfg.pop("use_bidirectional_attention", None)
        model_type = cfg["model_type"]
        if model_type not in HF_DEFAULTS:
            raise ValueError(f"Decoder does not load model_type {model_type!r}")
        _reject_unsupported(cfg)
        defaults = HF_DEFAULTS[model_type]

        def get(key: str):
            return cfg.get(key, defaults.get(key))

        heads = get("num_attention_heads")
        act = get("hidden_act")
        if model_type == "gemma":
            # Gemma's "gelu" means the tanh approximation (transformers #29402); transformers 4
            # read it from `hidden_activation` when present.
            act = cfg.get("hidden_activation") or act
            act = "gelu_pytorch_tanh" if act == "gelu" else act
        traits = dict(FAMILY_TRAITS[model_type])
        if model_type != "qwen2":  # Qwen2 hard-codes its biases; the others have one switch
            traits.update(qkv_bias=get("attention_bias"), o_bias=get("attention_bias"))
        return cls(
            model_type=model_type,
            vocab_size=get("vocab_size"),
            hidden_size=get("hidden_size"),
            intermediate_size=get("intermediate_size"),
            num_layers=get("num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=get("num_key_value_heads") or heads,
            head_dim=get("head_dim") or get("hidden_size") // heads,
            rope_theta=float(_rope_theta(cfg)),
            rms_eps=get("rms_norm_eps"),
            act=act,
            tie_embeddings=get("tie_word_embeddings"),
            max_position_embeddings=get("max_position_embeddings"),
            initializer_range=cfg.get("initializer_range", 0.02),
            pad_token_id=get("pad_token_id"),
            bos_token_id=get("bos_token_id"),
            eos_token_id=get("eos_token_id"),
            **traits,
        )


def _rope_theta(cfg: dict) -> float:
    # Older configs: top-level rope_theta + optional rope_scaling; current: rope_parameters.
    # As in transformers, rope_scaling wins over rope_parameters.
    rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    extra = set(rope) - {"rope_type", "type", "rope_theta"}
    if rope_type != "default" or extra:
        raise ValueError(
            f"unsupported RoPE parameters {rope} (only plain RoPE, rope_type 'default', is "
            "implemented; scaled RoPE would silently compute different positions)"
        )
    return rope.get("rope_theta", cfg.get("rope_theta") or DEFAULT_ROPE_THETA)


def _reject_unsupported(cfg: dict) -> None:
    """Raise on config options that would change the computation but are not implemented."""
    problems = []
    # transformers: with use_sliding_window, layers >= max_window_layers (default 28) use it
    sliding = cfg.get("use_sliding_window") and cfg.get("sliding_window") is not None
    if sliding and cfg.get("max_window_layers", 28) < cfg.get("num_hidden_layers", 0):
        problems.append(
            f"sliding-window attention (use_sliding_window, sliding_window="
            f"{cfg['sliding_window']}, max_window_layers={cfg.get('max_window_layers')})"
        )
    if any(t != "full_attention" for t in cfg.get("layer_types") or []):
        problems.append(f"layer_types {sorted(set(cfg['layer_types']))}")
    if cfg.get("attention_dropout"):
        problems.append(f"attention_dropout={cfg['attention_dropout']}")
    if cfg.get("use_bidirectional_attention"):
        problems.append("use_bidirectional_attention=true")
    for key in ("partial_rotary_factor", "quantization_config", "final_logit_softcapping"):
        if cfg.get(key) is not None:
            problems.append(f"{key}={cfg[key]}")
    if problems:
        raise ValueError(f"unsupported {cfg['model_type']} config options: {'; '.join(problems)}")


@dataclass
class AttnMask:
    """Who may attend to whom: the mask arguments of `core.models.attention.attention`."""

    kind: str = "causal"
    prefix_len: torch.Tensor | None = None  # [B], mask_kind "prefix"
    segment_ids: torch.Tensor | None = None  # [B, T], mask_kind "packed"
    key_padding: torch.Tensor | None = None  # [B, S] bool, True = real token
    mask_ar: torch.Tensor | None = None  # [B, S], "prefix"/"packed": 0 = prefix, 1 = causal


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, plus_one: bool = False):
        super().__init__()
        self.eps = eps
        self.plus_one = plus_one
        self.weight = nn.Parameter(torch.zeros(dim) if plus_one else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 whatever the activation dtype, like transformers. The fused op gives
        # the same bits as transformers' x * rsqrt(mean(x^2) + eps) and a faster backward.
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        if self.plus_one:  # Gemma multiplies in fp32, then casts
            return (normed * (1.0 + self.weight.float())).type_as(x)
        return self.weight * normed.to(x.dtype)  # Qwen/Llama cast, then multiply


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """q/k [B, H, T, D], cos/sin [B or 1, T, D]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


class Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx  # which KV-cache slot this layer uses
        self.head_dim = cfg.head_dim
        q_dim, kv_dim = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, q_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, kv_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, kv_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(q_dim, cfg.hidden_size, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(
        self,
        x: torch.Tensor,
        rope_cos_sin: tuple[torch.Tensor, torch.Tensor],
        mask: AttnMask,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, -1, self.head_dim)
        k = self.k_proj(x).view(B, T, -1, self.head_dim)
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q.transpose(1, 2), k.transpose(1, 2), *rope_cos_sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        out = attention(
            q, k, v, mask.kind, prefix_len=mask.prefix_len, segment_ids=mask.segment_ids,
            key_padding=mask.key_padding, mask_ar=mask.mask_ar, scale=self.head_dim**-0.5,
        )  # fmt: skip
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.act = ACTIVATIONS[cfg.act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderBlock(nn.Module):
    """Pre-norm attention + gated MLP. Self-contained: engines wrap it (FSDP, checkpointing)."""

    def __init__(self, cfg: DecoderConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_eps, cfg.norm_plus_one)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_eps, cfg.norm_plus_one)
        self.mlp = MLP(cfg)

    def forward(
        self,
        x: torch.Tensor,
        rope_cos_sin: tuple[torch.Tensor, torch.Tensor],
        mask: AttnMask | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope_cos_sin, mask or AttnMask(), cache)
        return x + self.mlp(self.post_attention_layernorm(x))


@register
class Decoder(nn.Module):
    MODEL_TYPES = ("qwen2", "qwen3", "gemma")  # a PaliGemma checkpoint: core/models/paligemma.py

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.config = cfg
        # Named like transformers' `<Family>Model` under `model.` so state-dict keys are HF's.
        self.model = nn.ModuleDict(
            dict(
                embed_tokens=nn.Embedding(cfg.vocab_size, cfg.hidden_size, cfg.pad_token_id),
                layers=nn.ModuleList(DecoderBlock(cfg, i) for i in range(cfg.num_layers)),
                norm=RMSNorm(cfg.hidden_size, cfg.rms_eps, cfg.norm_plus_one),
            )
        )
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.init_weights(cfg.initializer_range)

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.layers

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def num_heads(self) -> int:
        return self.config.num_heads

    def init_weights(self, std: float = 0.02) -> None:
        """transformers' init: N(0, std) weights, zero biases, zero padding embedding."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, RMSNorm):
                nn.init.constant_(module.weight, 0.0 if module.plus_one else 1.0)
        pad = self.config.pad_token_id
        if pad is not None:
            with torch.no_grad():
                self.model.embed_tokens.weight[pad].zero_()
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)
        if self.config.embed_scale:
            # sqrt(hidden) rounded to the weight dtype first, as transformers does
            # (sqrt(3072) = 55.43 becomes 55.5 in bf16).
            scale = torch.tensor(self.config.hidden_size**0.5, dtype=torch.float32)
            x = x * scale.to(x.dtype)
        return x

    def rope_cos_sin(
        self, position_ids: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [B or 1, T, head_dim] for RoPE. Angles in fp32 (recomputed, no buffer to be
        cast to bf16 by `model.to(dtype)`), then cast to the activation dtype like transformers."""
        dim = self.config.head_dim
        exponents = torch.arange(0, dim, 2, dtype=torch.float32, device=position_ids.device) / dim
        inv_freq = 1.0 / (self.config.rope_theta**exponents)
        freqs = position_ids[..., None].float() * inv_freq
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        mask_kind: str = "causal",
        prefix_len: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        mask_ar: torch.Tensor | None = None,
        cache: KVCache | None = None,
        return_hidden: bool = False,
    ) -> torch.Tensor:
        """Logits [B, T, V], or the final (normed) hidden states [B, T, H] if return_hidden.

        input_ids [B, T] or inputs_embeds [B, T, H] (already embedded, e.g. with image tokens
        spliced in: see `embed`). attention_mask [B, S] marks real tokens with 1, S = cached +
        new positions. position_ids [B or 1, T] default to: 0.. per segment (packed), the count of
        real tokens before each token (attention_mask: left padding), else cache length + 0...
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if mask_kind == "packed" and cache is not None:
            raise ValueError("packed sequences cannot be decoded with a KV cache")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        T = x.shape[1]
        past = 0 if cache is None else cache.length
        if attention_mask is not None and attention_mask.shape[1] != past + T:
            raise ValueError(
                f"attention_mask covers {attention_mask.shape[1]} positions, expected "
                f"cached + new = {past} + {T}"
            )
        if position_ids is None:
            position_ids = _default_positions(
                T, past, x.device, segment_ids if mask_kind == "packed" else None, attention_mask
            )
        rope = self.rope_cos_sin(position_ids, x.dtype)
        key_padding = None if attention_mask is None else attention_mask.bool()
        mask = AttnMask(mask_kind, prefix_len, segment_ids, key_padding, mask_ar)
        for block in self.model.layers:
            x = block(x, rope, mask, cache)
        x = self.model.norm(x)
        return x if return_hidden else self.lm_head(x)

    def generate(
        self,
        input_ids: torch.Tensor | None,
        max_new_tokens: int,
        eos_token_id: int | Sequence[int] | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        prefix_len: torch.Tensor | None = None,
        **options,
    ) -> torch.Tensor:
        """Decode with a KV cache -> the new tokens [B, <= max_new_tokens]; greedy unless
        `options` (GenerationConfig fields: do_sample, top_p, num_beams, ...) say otherwise.

        Batched prompts are left-padded, real tokens marked by attention_mask [B, T]. With
        prefix_len [B] (counted from the row start, padding included) the prompt's prefix is
        bidirectional (PaliGemma). A row that emitted an eos token repeats it (or pad_token_id)
        until every row has finished, which ends decoding. See core.models.generation.
        """
        return generate(
            self, input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
            prefix_len=prefix_len, max_new_tokens=max_new_tokens,
            eos_token_id=eos_token_id, **options,
        )  # fmt: skip

    # -- Hugging Face checkpoint protocol (see core/models/__init__.py) --

    @classmethod
    def from_hf_config(cls, cfg: dict) -> Decoder:
        return cls(DecoderConfig.from_hf(cfg))

    @classmethod
    def hf_state_dict_from(cls, state: dict[str, torch.Tensor], cfg: dict) -> dict:
        """Checkpoint tensors under our keys: PaliGemma's language model only (transformers 5 and
        older key layouts), without the rotary tables some old checkpoints saved."""
        if cfg["model_type"] == "paligemma":
            state = _paligemma_text_state(state)
        return {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}

    def load_hf_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = set(self.hf_state_dict())
        state = dict(state)
        if self.config.tie_embeddings:
            state.pop("lm_head.weight", None)  # some tied checkpoints store the copy too
        missing, unexpected = expected - state.keys(), state.keys() - expected
        if missing or unexpected:
            raise KeyError(
                f"checkpoint does not match {self.config.model_type} Decoder: "
                f"missing {sorted(missing)}, unexpected {sorted(unexpected)}"
            )
        self.load_state_dict(state, strict=False, assign=True)
        self.tie_weights()

    def hf_config(self) -> dict:
        cfg = self.config
        traits = dict(FAMILY_TRAITS.get(cfg.model_type, {}))
        if cfg.model_type != "qwen2":
            traits["o_bias"] = cfg.qkv_bias  # one `attention_bias` for q, k, v and o
        wrong = {k: getattr(cfg, k) for k, v in traits.items() if getattr(cfg, k) != v}
        if cfg.model_type not in ARCHITECTURES or wrong:
            raise ValueError(f"transformers' {cfg.model_type!r} cannot express options {wrong}")
        dtype = str(next(self.parameters()).dtype).removeprefix("torch.")
        out = {
            "architectures": [ARCHITECTURES[cfg.model_type]],
            "model_type": cfg.model_type,
            "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size,
            "num_hidden_layers": cfg.num_layers,
            "num_attention_heads": cfg.num_heads,
            "num_key_value_heads": cfg.num_kv_heads,
            "head_dim": cfg.head_dim,
            "hidden_act": cfg.act,
            "max_position_embeddings": cfg.max_position_embeddings,
            "rms_norm_eps": cfg.rms_eps,
            "tie_word_embeddings": cfg.tie_embeddings,
            # Both RoPE spellings: transformers 5 reads the first, 4.x the second.
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
            "rope_theta": cfg.rope_theta,
            "attention_dropout": 0.0,
            "initializer_range": cfg.initializer_range,
            "pad_token_id": cfg.pad_token_id,
            "bos_token_id": cfg.bos_token_id,
            "eos_token_id": cfg.eos_token_id,
            "dtype": dtype,
            "torch_dtype": dtype,
        }
        if cfg.model_type != "qwen2":
            out["attention_bias"] = cfg.qkv_bias
        return out

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        # transformers saves a tied lm_head only once, as the embedding.
        tied = self.config.tie_embeddings
        return {k: v for k, v in self.state_dict().items() if not (tied and k == "lm_head.weight")}


def _default_positions(
    T: int,
    past: int,
    device: torch.device,
    segment_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
) -> torch.Tensor:
    if segment_ids is not None:  # packed rows: count from 0 again where the segment id changes
        idx = torch.arange(T, device=device).expand_as(segment_ids)
        starts = torch.ones_like(segment_ids, dtype=torch.bool)
        starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
        return idx - torch.where(starts, idx, 0).cummax(dim=1).values
    if attention_mask is not None:  # padding: real tokens are numbered 0.. (as HF generate)
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
    return torch.arange(past, past + T, device=device)[None]


# PaliGemma key prefixes -> ours: transformers' current module layout (`model.language_model.`,
# `lm_head.` unchanged) and the on-disk layout of hub checkpoints such as
# google/paligemma-3b-pt-224 and of transformers' save_pretrained (`language_model.model.`,
# `language_model.lm_head.`); `language_model.` alone is a saved PaliGemmaModel.
_PALIGEMMA_TEXT_PREFIXES = (
    ("model.language_model.", "model."),
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
    ("language_model.", "model."),
)
_PALIGEMMA_OTHER_PREFIXES = (
    "vision_tower.",
    "multi_modal_projector.",
    "model.vision_tower.",
    "model.multi_modal_projector.",
)


def _paligemma_text_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, tensor in state.items():
        if key.startswith(_PALIGEMMA_OTHER_PREFIXES):
            continue
        for old, new in _PALIGEMMA_TEXT_PREFIXES:
            if key.startswith(old):
                key = new + key[len(old) :]
                break
        out[key] = tensor  # unknown keys stay, so loading names them as unexpected
    return out
