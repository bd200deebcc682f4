"""RoPE frequencies for transformers' `rope_parameters` types: default, linear, dynamic (NTK),
yarn, longrope and llama3 (the types the Qwen2 / Qwen3 / Llama / Gemma families use).

Each type is computed as transformers' `modeling_rope_utils` computes it, with the same ops in
the same order and dtypes, so the rotary tables are the same numbers. yarn and longrope also
scale cos and sin by an attention factor, as transformers does.

transformers keeps state for one type; here every forward derives its frequencies from its
own position ids (no buffers: `model.to(bf16)` cannot round them, and no host sync):
- dynamic: transformers recomputes the base whenever a forward's longest position
  (max(position_ids) + 1) exceeds both max_position_embeddings and the longest seen so far, and
  returns to the original base once a forward is shorter than max_position_embeddings again.
  We use the forward's own longest position: the same tables for any single forward and for
  generation (prefill, then decoding steps one position longer each), which is where
  transformers' state matters. A long forward followed by a shorter one still above
  max_position_embeddings differs (transformers keeps the longer base).
- longrope: the short factors up to original_max_position_embeddings positions, the long ones
  beyond, chosen per forward by max(position_ids) + 1, as transformers does.
"""

from __future__ import annotations

import math

import torch

DEFAULT_THETA = 10000.0

# rope_type -> (required, optional) parameters besides rope_type and rope_theta, as
# transformers validates them (RotaryEmbeddingConfigMixin._validate_*_rope_parameters).
PARAMETERS = {
    "default": ((), ()),
    "linear": (("factor",), ()),
    "dynamic": (("factor",), ()),
    "yarn": (
        ("factor", "original_max_position_embeddings"),
        ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate"),
    ),
    "longrope": (
        ("short_factor", "long_factor", "original_max_position_embeddings"),
        ("attention_factor", "factor"),
    ),
    "llama3": (
        ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"),
        (),
    ),
}
_NEEDS_ORIGINAL_LENGTH = ("yarn", "longrope", "llama3")


def read_rope_parameters(cfg: dict, max_position_embeddings: int) -> dict:
    """transformers 5's `rope_parameters` ({rope_type, rope_theta, ...}) of a config.json dict in
    either format: current (`rope_parameters`) or older (`rope_scaling` + top-level `rope_theta`;
    `type` for `rope_type`). As in transformers, `rope_scaling` wins over `rope_parameters`, and
    a top-level `original_max_position_embeddings` over the one in the dict (Phi3's layout)."""
    rope = dict(cfg.get("rope_scaling") or cfg.get("rope_parameters") or {})
    rope_type = rope.pop("rope_type", None) or rope.get("type") or "default"
    rope.pop("type", None)
    theta = rope.pop("rope_theta", None) or cfg.get("rope_theta") or DEFAULT_THETA
    if rope_type not in PARAMETERS:
        raise ValueError(
            f"unsupported RoPE type {rope_type!r} in {cfg.get('rope_scaling') or rope}; "
            f"supported: {', '.join(PARAMETERS)}"
        )
    if rope_type in _NEEDS_ORIGINAL_LENGTH:
        if cfg.get("original_max_position_embeddings") is not None:
            rope["original_max_position_embeddings"] = cfg["original_max_position_embeddings"]
        rope.setdefault("original_max_position_embeddings", max_position_embeddings)
    required, optional = PARAMETERS[rope_type]
    missing = [key for key in required if rope.get(key) is None]
    unknown = sorted(set(rope) - set(required) - set(optional))
    if missing or unknown:
        # Unknown keys include partial_rotary_factor, which these families do not implement.
        raise ValueError(
            f"unsupported RoPE parameters for rope_type {rope_type!r}: missing {missing}, "
            f"unknown {unknown}; valid: {', '.join(required + optional)}"
        )
    return {"rope_type": rope_type, "rope_theta": float(theta), **rope}


def _exponents(dim: int, device: torch.device) -> torch.Tensor:
    return torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim


def inv_freq(
    rope: dict, dim: int, max_position_embeddings: int, position_ids: torch.Tensor
) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [dim / 2] fp32, attention factor) for a forward over position_ids."""
    kind, base, device = rope["rope_type"], rope["rope_theta"], position_ids.device
    if kind == "default":
        return 1.0 / (base ** _exponents(dim, device)), 1.0
    if kind == "linear":
        return 1.0 / (base ** _exponents(dim, device)) / rope["factor"], 1.0
    if kind == "yarn":
        return _yarn(rope, dim, device)
    if kind == "llama3":
        return _llama3(rope, dim, device), 1.0
    seq_len = position_ids.max() + 1  # a 0-dim tensor, like transformers' (no host sync)
    if kind == "dynamic":
        return _dynamic(rope, dim, max_position_embeddings, seq_len), 1.0
    return _longrope(rope, dim, max_position_embeddings, seq_len)


def _dynamic(rope: dict, dim: int, max_pos: int, seq_len: torch.Tensor) -> torch.Tensor:
    base, factor = rope["rope_theta"], rope["factor"]
    # transformers builds the original frequencies at init from Python floats (seq_len =
    # max_pos), the longer ones in forward from its 0-dim tensor seq_len: fp32 arithmetic.
    original_base = base * ((factor * max_pos / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    original = 1.0 / (original_base ** _exponents(dim, seq_len.device))
    longer = torch.maximum(
        seq_len, torch.tensor(max_pos, dtype=seq_len.dtype, device=seq_len.device)
    )
    longer_base = base * ((factor * longer / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    scaled = 1.0 / (longer_base ** _exponents(dim, seq_len.device))
    return torch.where(seq_len > max_pos, scaled, original)


def _yarn(rope: dict, dim: int, device: torch.device) -> tuple[torch.Tensor, float]:
    base, factor = rope["rope_theta"], rope["factor"]
    original_max = rope["original_max_position_embeddings"]
    attention_factor = rope.get("attention_factor")
    mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")

    def get_mscale(scale, mscale=1):
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = get_mscale(factor)
    beta_fast = rope.get("beta_fast") or 32
    beta_slow = rope.get("beta_slow") or 1

    def correction_dim(rotations):
        return (dim * math.log(original_max / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers: prevent a division by zero
    ramp = torch.arange(dim // 2, dtype=torch.float32, device=device)
    ramp = torch.clamp((ramp - low) / (high - low), 0, 1)

    pos_freqs = base ** (torch.arange(0, dim, 2).to(device=device, dtype=torch.float) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    extrapolation_factor = 1 - ramp
    freqs = interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor
    return freqs, attention_factor


def _longrope(
    rope: dict, dim: int, max_pos: int, seq_len: torch.Tensor
) -> tuple[torch.Tensor, float]:
    base, original_max = rope["rope_theta"], rope["original_max_position_embeddings"]
    factor = rope.get("factor")
    if factor is None:  # Phi3: the ratio of the extended to the original length
        factor = max_pos / original_max
    attention_factor = rope.get("attention_factor")
    if attention_factor is None:
        attention_factor = (
            1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original_max))
        )
    device = seq_len.device

    def freqs(ext_factors: list[float]) -> torch.Tensor:
        ext = torch.tensor(ext_factors, dtype=torch.float32, device=device)
        return 1.0 / (ext * base ** _exponents(dim, device))

    long, short = freqs(rope["long_factor"]), freqs(rope["short_factor"])
    return torch.where(seq_len > original_max, long, short), attention_factor


def _llama3(rope: dict, dim: int, device: torch.device) -> torch.Tensor:
    base, factor = rope["rope_theta"], rope["factor"]
    low_freq_factor, high_freq_factor = rope["low_freq_factor"], rope["high_freq_factor"]
    old_context_len = rope["original_max_position_embeddings"]
    freqs = 1.0 / (base ** _exponents(dim, device))
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / freqs
    # long wavelengths: divided by factor; short: kept; in between: interpolated smoothly
    scaled = torch.where(wavelen > low_freq_wavelen, freqs / factor, freqs)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)
