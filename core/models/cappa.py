"""CapPa's text decoder (Tschannen et al., 2023, "Image Captioners Are Scalable Vision Learners
Too"), as big_vision builds it (`models/proj/cappa`): pre-LN blocks of self-attention,
cross-attention to every image token and a GELU MLP; no biases in blocks and norms; learned
positions; an extra input embedding, the mask token (id = vocab_size), for parallel prediction;
the logits layer zero-initialised, so training starts from the uniform prediction.

One forward serves both of CapPa's modes and any mix of them in a batch, through the one mask
rule of core/models/attention.py: `mask_ar` 1 on every position is causal (autoregressive
captioning, inputs shifted right), 0 on every position is bidirectional (parallel prediction,
inputs replaced by mask tokens), and 0 on a prompt then 1 on its answer is prefix-LM (LocCa's
task prompts).

Not a transformers model: `core.models.save_pretrained` writes it (config.json with model_type
`vlscale_cappa_decoder` + safetensors) and `core.models.from_pretrained` reads it back.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import deferred_init
from .attention import attention
from .registry import register
from .vision import _args_from, merge_heads, split_heads

MODEL_TYPE = "vlscale_cappa_decoder"


@dataclass
class CapPaDecoderArgs:
    vocab_size: int = 32000
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    max_position_embeddings: int = 64
    encoder_hidden_size: int = 768  # the image tower's width (cross-attention keys and values)
    layer_norm_eps: float = 1e-6
    use_bias: bool = False  # big_vision's CapPa: decoder_bias=False

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}"
            )

    # What tasks read of a tower's config (the names core.models.decoder uses).
    @property
    def num_layers(self) -> int:
        return self.num_hidden_layers

    @property
    def num_heads(self) -> int:
        return self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


class Attention(nn.Module):
    """Multi-head attention of `x` over `context` (itself for self-attention)."""

    def __init__(self, width: int, context_width: int, heads: int, bias: bool):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(width, width, bias=bias)
        self.k_proj = nn.Linear(context_width, width, bias=bias)
        self.v_proj = nn.Linear(context_width, width, bias=bias)
        self.out_proj = nn.Linear(width, width, bias=bias)

    def forward(self, x, context, mask_kind: str, mask_ar=None) -> torch.Tensor:
        q = split_heads(self.q_proj(x), self.heads)
        k = split_heads(self.k_proj(context), self.heads)
        v = split_heads(self.v_proj(context), self.heads)
        return self.out_proj(merge_heads(attention(q, k, v, mask_kind, mask_ar=mask_ar)))


class DecoderBlock(nn.Module):
    def __init__(self, args: CapPaDecoderArgs):
        super().__init__()
        d, bias = args.hidden_size, args.use_bias
        self.self_norm = nn.LayerNorm(d, eps=args.layer_norm_eps, bias=bias)
        self.self_attn = Attention(d, d, args.num_attention_heads, bias)
        self.cross_norm = nn.LayerNorm(d, eps=args.layer_norm_eps, bias=bias)
        self.cross_attn = Attention(d, args.encoder_hidden_size, args.num_attention_heads, bias)
        self.mlp_norm = nn.LayerNorm(d, eps=args.layer_norm_eps, bias=bias)
        self.fc1 = nn.Linear(d, args.intermediate_size, bias=bias)
        self.fc2 = nn.Linear(args.intermediate_size, d, bias=bias)

    def forward(self, x: torch.Tensor, encoded: torch.Tensor, mask_ar: torch.Tensor):
        h = self.self_norm(x)
        x = x + self.self_attn(h, h, "prefix", mask_ar)
        x = x + self.cross_attn(self.cross_norm(x), encoded, "bidirectional")
        return x + self.fc2(F.gelu(self.fc1(self.mlp_norm(x))))


@register
class CapPaDecoder(nn.Module):
    MODEL_TYPES = (MODEL_TYPE,)

    def __init__(self, args: CapPaDecoderArgs):
        super().__init__()
        self.config = args
        d = args.hidden_size
        self.mask_token_id = args.vocab_size
        self.embed_tokens = nn.Embedding(args.vocab_size + 1, d)  # + the mask token
        self.embed_positions = nn.Parameter(torch.empty(args.max_position_embeddings, d))
        self.layers = nn.ModuleList(DecoderBlock(args) for _ in range(args.num_hidden_layers))
        self.norm = nn.LayerNorm(d, eps=args.layer_norm_eps, bias=args.use_bias)
        self.lm_head = nn.Linear(d, args.vocab_size, bias=True)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """big_vision's initialisers: embeddings N(0, 1), positions N(0, 1/width), dense layers
        Xavier-uniform, the logits layer zero (the first loss is ln(vocab) exactly)."""
        if not deferred_init.has_values(self.embed_positions):
            return
        nn.init.normal_(self.embed_tokens.weight, std=1.0)
        nn.init.normal_(self.embed_positions, std=1.0 / math.sqrt(self.config.hidden_size))
        for module in self.layers.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.zeros_(self.lm_head.weight)
        nn.init.zeros_(self.lm_head.bias)

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def max_length(self) -> int:
        return self.config.max_position_embeddings

    def forward(
        self, input_ids: torch.Tensor, encoded: torch.Tensor, mask_ar: torch.Tensor,
        return_hidden: bool = False,
    ) -> torch.Tensor:  # fmt: skip
        """input_ids [B, L] (mask tokens allowed), encoded [B, P, E] image tokens, mask_ar
        [B, L] (module docstring) -> logits [B, L, vocab] (or the normed hidden states)."""
        length = input_ids.shape[1]
        if length > self.max_length:
            raise ValueError(f"{length} decoder positions; the decoder has {self.max_length}")
        x = self.embed_tokens(input_ids) + self.embed_positions[:length].to(encoded.dtype)
        x = x.to(encoded.dtype)
        for layer in self.layers:
            x = layer(x, encoded, mask_ar)
        x = self.norm(x)
        return x if return_hidden else self.lm_head(x)

    # ------------------------------------------------------------------ checkpoint protocol
    @classmethod
    def from_hf_config(cls, cfg: dict) -> CapPaDecoder:
        return cls(_args_from(CapPaDecoderArgs, cfg))

    @staticmethod
    def hf_state_dict_from(state: dict[str, torch.Tensor], cfg: dict) -> dict[str, torch.Tensor]:
        return state

    def load_hf_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        result = self.load_state_dict(state, strict=False, assign=True)
        if result.missing_keys or result.unexpected_keys:
            raise ValueError(
                f"CapPa decoder checkpoint: missing {result.missing_keys}, unexpected "
                f"{result.unexpected_keys}"
            )

    def hf_config(self) -> dict:
        return {"model_type": MODEL_TYPE, **asdict(self.config)}

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.state_dict())
