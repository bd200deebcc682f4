"""Text encoders (towers that embed a caption, unlike the decoders of core/models/decoder.py):
SigLIP's, computing what `transformers` computes.

  SigLIP text  SiglipTextModel as transformers 5 saves it (`embeddings.token_embedding`,
               `encoder.layers.N.self_attn.q_proj`, `final_layer_norm`, `head`); transformers 4
               saved it under `text_model.`, and a full SiglipModel checkpoint (model_type
               `siglip`) holds it there beside the vision tower: load that one with
               `core.models.from_pretrained(path, part="text")`.

SigLIP was trained on captions padded to `max_position_embeddings` tokens with no attention mask:
padding is input like any token, and the pooled output is `head` of the LAST position, whatever
it holds (`pad_to_length`, `reads_padding`). Tasks read those attributes rather than knowing the
family.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from .registry import register
from .vision import SiglipEncoder, _args_from, activation


@dataclass
class SiglipTextArgs:
    """SiglipTextConfig's fields and defaults (google/siglip-base-patch16-224)."""

    vocab_size: int = 32000
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 64
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    attention_dropout: float = 0.0
    pad_token_id: int | None = 1
    bos_token_id: int | None = 49406
    eos_token_id: int | list[int] | None = 49407
    projection_size: int | None = None  # None: hidden_size

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}"
            )
        activation(self.hidden_act)
        self.projection_size = self.projection_size or self.hidden_size

    # What tasks read of a text tower's config (the names of core.models.decoder's).
    @property
    def num_layers(self) -> int:
        return self.num_hidden_layers

    @property
    def num_heads(self) -> int:
        return self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


class SiglipTextEmbeddings(nn.Module):
    def __init__(self, args: SiglipTextArgs):
        super().__init__()
        d = args.hidden_size
        self.token_embedding = nn.Embedding(args.vocab_size, d)
        self.position_embedding = nn.Embedding(args.max_position_embeddings, d)
        for table in (self.token_embedding, self.position_embedding):
            nn.init.normal_(table.weight, std=d**-0.5)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        length, table = input_ids.shape[1], self.position_embedding.weight
        if length > len(table):
            raise ValueError(f"{length} tokens is longer than max_position_embeddings={len(table)}")
        return self.token_embedding(input_ids) + table[:length]


@register
class SiglipText(nn.Module):
    """SiglipTextModel: token + learned position embeddings, pre-norm bidirectional encoder,
    final LayerNorm; pooled output = head(last position)."""

    MODEL_TYPES = ("siglip_text_model",)
    TEXT_TOWER_OF = ("siglip",)  # two-tower checkpoints whose text tower this is
    ARCHITECTURE = "SiglipTextModel"
    reads_padding = True  # no attention mask in training: padded positions are input too
    mask_kinds = ("bidirectional",)

    def __init__(self, args: SiglipTextArgs):
        super().__init__()
        self.config = args
        self.embeddings = SiglipTextEmbeddings(args)
        self.encoder = SiglipEncoder(args)
        self.final_layer_norm = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)
        self.head = nn.Linear(args.hidden_size, args.projection_size)

    @property
    def layers(self) -> nn.ModuleList:
        return self.encoder.layers

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def pooled_size(self) -> int:
        return self.config.projection_size

    @property
    def pad_to_length(self) -> int:
        """Captions are padded to this many tokens: the pooled position is the last of them."""
        return self.config.max_position_embeddings

    # ------------------------------------------------------------------ checkpoints
    @classmethod
    def from_hf_config(cls, cfg: dict) -> SiglipText:
        if cfg["model_type"] in cls.TEXT_TOWER_OF:
            cfg = cfg.get("text_config") or {}  # hub configs may list only non-default keys
        return cls(_args_from(SiglipTextArgs, cfg))

    @staticmethod
    def hf_state_dict_from(state: dict[str, torch.Tensor], cfg: dict) -> dict[str, torch.Tensor]:
        # Full SiglipModel checkpoints and transformers 4's SiglipTextModel: under `text_model.`
        # (a full one also holds vision_model.*, logit_scale and logit_bias).
        prefix = "text_model."
        if any(k.startswith(prefix) for k in state):
            state = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
        return {k: v for k, v in state.items() if not k.endswith("position_ids")}

    def load_hf_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = set(self.state_dict())
        missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
        if missing or unexpected:
            raise ValueError(
                f"{type(self).__name__}: checkpoint does not match the model config; "
                f"missing {missing}, unexpected {unexpected}"
            )
        self.load_state_dict(state, assign=True)  # no buffers, no tied weights

    def hf_config(self) -> dict:
        return {
            "model_type": self.MODEL_TYPES[0],
            "architectures": [self.ARCHITECTURE],
            **asdict(self.config),
        }

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.state_dict())

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        mask_kind: str = "bidirectional",
        return_hidden: bool = True,
    ) -> torch.Tensor:
        """[B, T] ids -> the final hidden states [B, T, D] (transformers' last_hidden_state).
        `attention_mask` [B, T] (1 = real token) hides padded keys; SigLIP itself runs with
        none. The keyword arguments of a decoder text tower, which this tower has no other
        value of: it is bidirectional and has no vocabulary head."""
        if mask_kind not in self.mask_kinds:
            raise ValueError(f"SigLIP's text tower is bidirectional; got mask_kind={mask_kind!r}")
        if not return_hidden:
            raise ValueError("SigLIP's text tower has no vocabulary head: it returns hidden states")
        hidden = self.encoder(self.embeddings(input_ids), attention_mask)
        return self.final_layer_norm(hidden)

    def pool(self, hidden: torch.Tensor) -> torch.Tensor:
        """head(the last position) [B, projection_size]: SiglipTextModel's pooler_output."""
        return self.head(hidden[:, -1])
