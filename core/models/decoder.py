"""Decoder-only causal LMs: Qwen2 / Qwen2.5, Qwen3, Gemma (also the Gemma inside PaliGemma) and
Llama (Llama 2 / 3, SmolLM2).

One `Decoder` class; the families differ only by a few `DecoderConfig` switches. Module names
copy transformers' so our state dict *is* a Hugging Face state dict
(`model.layers.0.self_attn.q_proj.weight`, `lm_head.weight`, ...), and every op follows
transformers' computation order and dtypes (fp32 RMSNorm, fp32 RoPE angles, Gemma's (1 + w) norm
and sqrt(hidden) embedding scale), so fp32 and bf16 logits agree with transformers' to rounding.
RoPE: every `rope_parameters` type these families use (core/models/rope.py).

A checkpoint loads from either transformers layout: the task-head one (`XForCausalLM`) or the
base-model one (`XModel`: keys without the `model.` prefix and no `lm_head`, e.g.
Qwen/Qwen3-Embedding-*). A base checkpoint has no vocabulary head, so its model gets the
embeddings as head (`tie_embeddings` set); `save_pretrained` writes the layout it was loaded
from, and a model whose `lm_head` is None (a text tower) the base layout.

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

from .. import lazy_tensors
from .attention import attention
from .cache import KVCache
from .generation import generate
from .registry import register
from .rope import DEFAULT_THETA, inv_freq, read_rope_parameters

ACTIVATIONS = {"silu": F.silu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}
ARCHITECTURES = {
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma": "GemmaForCausalLM",
    "llama": "LlamaForCausalLM",
}
BASE_ARCHITECTURES = {k: arch.replace("ForCausalLM", "Model") for k, arch in ARCHITECTURES.items()}
LAYOUTS = ("causal_lm", "base")  # checkpoint layouts: XForCausalLM, XModel

# What each transformers family hard-codes; hf_config() refuses a config it could not express.
FAMILY_TRAITS = {
    "qwen2": dict(
        qkv_bias=True, o_bias=False, mlp_bias=False, qk_norm=False, norm_plus_one=False,
        embed_scale=False,
    ),
    "qwen3": dict(mlp_bias=False, qk_norm=True, norm_plus_one=False, embed_scale=False),
    "gemma": dict(mlp_bias=False, qk_norm=False, norm_plus_one=True, embed_scale=True),
    "llama": dict(qk_norm=False, norm_plus_one=False, embed_scale=False),
}  # fmt: skip
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
    "llama": dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, hidden_act="silu", max_position_embeddings=2048,
        rms_norm_eps=1e-6, tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
        bos_token_id=1, eos_token_id=2,
    ),
}  # fmt: skip
DEFAULT_ROPE_THETA = DEFAULT_THETA


@dataclass
class DecoderConfig:
    model_type: str  # the transformers family hf_config() writes: qwen2, qwen3, gemma or llama
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = DEFAULT_ROPE_THETA
    # transformers' `rope_parameters` besides rope_theta, e.g. {"rope_type": "llama3",
    # "factor": 8.0, ...}; None = plain RoPE (core/models/rope.py)
    rope_scaling: dict | None = None
    rms_eps: float = 1e-6
    act: str = "silu"  # key of ACTIVATIONS
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False  # Llama's mlp_bias: biases on gate/up/down projections
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

    @property
    def rope_parameters(self) -> dict:
        """transformers 5's `rope_parameters`: {rope_type, rope_theta, <the type's parameters>}."""
        return {"rope_type": "default", **(self.rope_scaling or {}), "rope_theta": self.rope_theta}

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
        if model_type == "llama":
            traits.update(mlp_bias=get("mlp_bias"))
        max_positions = get("max_position_embeddings")
        rope_parameters = read_rope_parameters(cfg, max_positions)
        theta = rope_parameters.pop("rope_theta")
        return cls(
            model_type=model_type,
            vocab_size=get("vocab_size"),
            hidden_size=get("hidden_size"),
            intermediate_size=get("intermediate_size"),
            num_layers=get("num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=get("num_key_value_heads") or heads,
            head_dim=get("head_dim") or get("hidden_size") // heads,
            rope_theta=theta,
            rope_scaling=rope_parameters if rope_parameters["rope_type"] != "default" else None,
            rms_eps=get("rms_norm_eps"),
            act=act,
            tie_embeddings=get("tie_word_embeddings"),
            max_position_embeddings=max_positions,
            initializer_range=cfg.get("initializer_range", 0.02),
            pad_token_id=get("pad_token_id"),
            bos_token_id=get("bos_token_id"),
            eos_token_id=get("eos_token_id"),
            **traits,
        )


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
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
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
    MODEL_TYPES = ("qwen2", "qwen3", "gemma", "llama")  # PaliGemma: core/models/paligemma.py

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.config = cfg
        self.layout = "causal_lm"  # the checkpoint layout save_pretrained writes (LAYOUTS)
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
        if self.config.tie_embeddings and self.lm_head is not None:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.no_grad()
    def resize_token_embeddings(self, size: int) -> None:
        """Grow the vocabulary to `size` rows, for tokens added to the tokenizer (a VLM's image
        tokens): the embedding's (and an untied head's) new rows start at the mean of its rows,
        transformers' `mean_resizing` without its random spread; existing rows are unchanged."""
        old = self.config.vocab_size
        if size < old:
            raise ValueError(f"resize_token_embeddings: {size} rows < the current {old}")
        if size == old:
            return
        for part in (self.model.embed_tokens, self.lm_head):  # stand-ins read first (fsdp)
            if part is not None:
                lazy_tensors.materialize(part)

        def grown(weight: torch.Tensor) -> nn.Parameter:
            mean = weight.float().mean(dim=0, keepdim=True).to(weight.dtype)
            rows = torch.cat([weight, mean.expand(size - old, -1)])
            return nn.Parameter(rows, requires_grad=weight.requires_grad)

        embed = self.model.embed_tokens
        embed.weight, embed.num_embeddings = grown(embed.weight), size
        if self.lm_head is not None and not self.config.tie_embeddings:
            self.lm_head.weight, self.lm_head.out_features = grown(self.lm_head.weight), size
        self.config.vocab_size = size
        self.tie_weights()

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
        cast to bf16 by `model.to(dtype)`), scaled by the RoPE type's attention factor (yarn,
        longrope), then cast to the activation dtype like transformers."""
        cfg = self.config
        freq, scale = inv_freq(
            cfg.rope_parameters, cfg.head_dim, cfg.max_position_embeddings, position_ids
        )
        freqs = position_ids[..., None].float() * freq
        angles = torch.cat((freqs, freqs), dim=-1)
        cos, sin = angles.cos(), angles.sin()
        if scale != 1.0:
            cos, sin = cos * scale, sin * scale
        return cos.to(dtype), sin.to(dtype)

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
        if return_hidden:
            return x
        if self.lm_head is None:
            raise ValueError("this Decoder has no lm_head (a text tower): pass return_hidden=True")
        return self.lm_head(x)

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
        """Checkpoint tensors under our keys: without the rotary tables some old checkpoints
        saved (a PaliGemma checkpoint's decoder: core/models/paligemma.py maps its keys)."""
        return {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}

    def load_hf_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Either layout: `XForCausalLM` (`model.*`, `lm_head.weight` unless tied) or `XModel`
        (no `model.` prefix, no head: the embeddings become the head, see the module doc)."""
        state = dict(state)
        base = "embed_tokens.weight" in state and not any(k.startswith("model.") for k in state)
        self.set_layout("base" if base else "causal_lm")
        expected = set(self.hf_state_dict())
        if self.config.tie_embeddings and not base:
            state.pop("lm_head.weight", None)  # some tied checkpoints store the copy too
        missing, unexpected = expected - state.keys(), state.keys() - expected
        if missing or unexpected:
            arch = (BASE_ARCHITECTURES if base else ARCHITECTURES).get(self.config.model_type)
            raise KeyError(
                f"checkpoint does not match {self.config.model_type} Decoder ({arch} layout): "
                f"missing {sorted(missing)}, unexpected {sorted(unexpected)}"
            )
        if base:
            state = {f"model.{k}": v for k, v in state.items()}
        self.load_state_dict(state, strict=False, assign=True)
        self.tie_weights()

    def set_layout(self, layout: str) -> None:
        """The checkpoint layout hf_config / hf_state_dict write; "base" ties the head to the
        embeddings (a base checkpoint has none of its own)."""
        if layout not in LAYOUTS:
            raise ValueError(f"unknown checkpoint layout {layout!r}; valid: {', '.join(LAYOUTS)}")
        self.layout = layout
        if layout == "base":
            self.config.tie_embeddings = True
            self.tie_weights()

    def _writes_base_layout(self) -> bool:
        return self.layout == "base" or self.lm_head is None

    def hf_config(self) -> dict:
        cfg = self.config
        traits = dict(FAMILY_TRAITS.get(cfg.model_type, {}))
        if cfg.model_type != "qwen2":
            traits["o_bias"] = cfg.qkv_bias  # one `attention_bias` for q, k, v and o
        wrong = {k: getattr(cfg, k) for k, v in traits.items() if getattr(cfg, k) != v}
        if cfg.model_type not in ARCHITECTURES or wrong:
            raise ValueError(f"transformers' {cfg.model_type!r} cannot express options {wrong}")
        dtype = str(next(self.parameters()).dtype).removeprefix("torch.")
        base = self._writes_base_layout()
        out = {
            "architectures": [(BASE_ARCHITECTURES if base else ARCHITECTURES)[cfg.model_type]],
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
            # A base layout has no head: transformers' XForCausalLM then ties it, as we do.
            "tie_word_embeddings": cfg.tie_embeddings or base,
            # transformers 5 reads rope_parameters; 4.x plain RoPE's top-level rope_theta.
            "rope_parameters": cfg.rope_parameters,
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
        if cfg.model_type == "llama":
            out["mlp_bias"] = cfg.mlp_bias
        return out

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        state = self.state_dict()
        if self._writes_base_layout():  # XModel: the inner model's tensors, no head
            return {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
        # transformers saves a tied lm_head only once, as the embedding.
        tied = self.config.tie_embeddings
        return {k: v for k, v in state.items() if not (tied and k == "lm_head.weight")}


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
