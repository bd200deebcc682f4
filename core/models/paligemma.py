"""PaliGemma: a SigLIP vision tower, one linear projector and a Gemma decoder, with prefix-LM
attention (transformers' `PaliGemmaForConditionalGeneration`, big_vision's `proj/paligemma`).

    model = core.models.from_pretrained("paligemma-3b-pt-224-dir")          # -> PaliGemma
    logits = model(input_ids=ids, pixel_values=px, token_type_ids=tt, attention_mask=am)
    new_tokens = model.generate(ids, px, max_new_tokens=32, attention_mask=am)

The sequence is `[image tokens][BOS prefix \\n][suffix EOS][pad]`: the image tokens (ids
`image_token_index`, replaced by the projected patch features) and the prefix attend to each
other bidirectionally (token_type_ids 0), the suffix causally (token_type_ids 1). Who sees whom
comes from one rule (core.models.attention.ar_mask, big_vision's): `mask_ar` 0 for prefix
tokens, 1 for suffix tokens; packed rows add `segment_ids` so samples never see each other.

As transformers 5 computes it: the patch features enter unscaled (Gemma scales the token
embeddings by sqrt(hidden) inside its embedding; the features replace already-scaled rows),
and positions count from 1 (`position_ids = cumsum(attention_mask)`, per sample when packed).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .decoder import Decoder, DecoderConfig, _default_positions
from .registry import register
from .vision import SiglipVision, _args_from

ARCHITECTURE = "PaliGemmaForConditionalGeneration"
# Checkpoint prefixes -> our modules. transformers 5 keeps modules under `model.` in memory and
# writes the older on-disk layout (the hub checkpoints' too), with or without the SigLIP
# `vision_model.` level.
_PREFIXES = (
    ("model.vision_tower.vision_model.", "vision."),
    ("model.vision_tower.", "vision."),
    ("vision_tower.vision_model.", "vision."),
    ("vision_tower.", "vision."),
    ("model.multi_modal_projector.linear.", "projector."),
    ("multi_modal_projector.linear.", "projector."),
    ("model.language_model.", "lm.model."),
    ("language_model.model.", "lm.model."),
    ("language_model.lm_head.", "lm.lm_head."),
    ("lm_head.", "lm.lm_head."),
    ("language_model.", "lm.model."),
)


@register
class PaliGemma(nn.Module):
    MODEL_TYPES = ("paligemma",)

    def __init__(self, vision: SiglipVision, lm: Decoder, image_token_index: int, config: dict):
        super().__init__()
        self.vision = vision
        self.projector = nn.Linear(vision.hidden_size, lm.hidden_size, bias=True)
        self.lm = lm
        self.image_token_index = image_token_index
        self.config = config  # the config.json it was built from (hf_config writes it back)

    @property
    def num_image_tokens(self) -> int:
        return self.vision.num_tokens

    def blocks(self) -> dict[str, nn.ModuleList]:
        return {"vision": self.vision.blocks, "lm": self.lm.layers}

    # ------------------------------------------------------------------ forward

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[n, C, H, W] -> projected patch features [n, N, hidden]."""
        return self.projector(self.vision(pixel_values))

    def embed(
        self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None, checked: bool = False
    ) -> torch.Tensor:
        """Token embeddings [B, T, H] with each image's features at its image tokens (in order:
        image i fills the i-th run of `num_image_tokens` image tokens). `checked`: the caller
        has counted the image tokens on the host (training batches: core/data/packing.py), so
        no device-to-host sync checks them here."""
        where = input_ids == self.image_token_index
        ids = input_ids.masked_fill(where, 0)  # the image id may lie outside the vocabulary
        embeds = self.lm.embed(ids)
        if pixel_values is None:
            return embeds
        features = self.image_features(pixel_values.to(embeds.dtype))
        if not checked and where.sum().item() != features.shape[0] * features.shape[1]:
            raise ValueError(
                f"{int(where.sum())} image tokens for {features.shape[0]} images of "
                f"{features.shape[1]} tokens each"
            )
        return embeds.masked_scatter(where.unsqueeze(-1), features.to(embeds.dtype))

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        mask_ar: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        return_hidden: bool = False,
        images_checked: bool = False,
    ) -> torch.Tensor:
        """Logits [B, T, V] (or final hidden states). `token_type_ids` [B, T] (0 prefix, 1
        suffix, as transformers) or `mask_ar` (big_vision's name for the same); neither: the
        whole row is prefix (bidirectional), as transformers without token_type_ids computes
        nothing else for training. `attention_mask` [B, T] marks real tokens (right padding);
        `segment_ids` [B, T] packs samples into rows (-1 = padding)."""
        if mask_ar is None:
            mask_ar = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
        if position_ids is None:
            position_ids = positions(input_ids, attention_mask, segment_ids)
        x = self.embed(input_ids, pixel_values, checked=images_checked)
        return self.lm(
            inputs_embeds=x, position_ids=position_ids, attention_mask=attention_mask,
            mask_kind="prefix" if segment_ids is None else "packed", mask_ar=mask_ar,
            segment_ids=segment_ids, return_hidden=return_hidden,
        )  # fmt: skip

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None,
        max_new_tokens: int,
        attention_mask: torch.Tensor | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        prefix_lm: bool = True,
        **options,
    ) -> torch.Tensor:
        """The new tokens [B, <= max_new_tokens] after left-padded prompts (image tokens, BOS,
        prefix, "\\n"): the whole prompt is the bidirectional prefix (prefill), every new token
        causal (KV-cache decoding); `prefix_lm=False`: the prompt causal too (a model trained
        so). `options`: core.models.generation.GenerationConfig fields (greedy by default;
        do_sample, top_k, top_p, num_beams, ...)."""
        from .generation import generate

        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        x = self.embed(input_ids, pixel_values)
        prefix = torch.full((x.shape[0],), x.shape[1], device=x.device) if prefix_lm else None
        if eos_token_id is None:
            eos_token_id = self.lm.config.eos_token_id
        return generate(
            _OneBasedPositions(self.lm), inputs_embeds=x, attention_mask=attention_mask,
            prefix_len=prefix, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
            **options,
        )  # fmt: skip

    # -- Hugging Face checkpoint protocol (see core/models/__init__.py) --

    @classmethod
    def from_hf_config(cls, cfg: dict) -> PaliGemma:
        vision_cfg = {"model_type": "siglip_vision_model", **(cfg.get("vision_config") or {})}
        if vision_cfg.get("vision_use_head", False):
            raise ValueError("PaliGemma's SigLIP tower has no pooling head (vision_use_head)")
        vision_cfg["vision_use_head"] = False
        vision = SiglipVision(_args_from(SiglipVision.ARGS, vision_cfg))
        text_cfg = DecoderConfig.from_hf(cfg)
        projection = cfg.get(
            "projection_dim", (cfg.get("vision_config") or {}).get("projection_dim")
        )
        if projection not in (None, text_cfg.hidden_size):
            raise ValueError(
                f"projection_dim {projection} differs from the decoder's hidden size "
                f"{text_cfg.hidden_size}"
            )
        image_token = cfg.get("image_token_index", cfg.get("image_token_id"))
        if image_token is None:
            raise ValueError("PaliGemma config without image_token_index")
        return cls(vision, Decoder(text_cfg), int(image_token), dict(cfg))

    @classmethod
    def hf_state_dict_from(cls, state: dict[str, torch.Tensor], cfg: dict) -> dict:
        out = {}
        for key, tensor in state.items():
            if key.endswith("rotary_emb.inv_freq"):
                continue
            for old, new in _PREFIXES:
                if key.startswith(old):
                    key = new + key[len(old) :]
                    break
            out[key] = tensor  # unknown keys stay, so loading names them as unexpected
        return out

    def load_hf_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        parts = {"vision.": {}, "projector.": {}, "lm.": {}}
        unexpected = []
        for key, tensor in state.items():
            part = next((p for p in parts if key.startswith(p)), None)
            if part is None:
                unexpected.append(key)
            else:
                parts[part][key[len(part) :]] = tensor
        if unexpected:
            raise KeyError(f"checkpoint does not match PaliGemma: unexpected {sorted(unexpected)}")
        self.vision.load_hf_state_dict(parts["vision."])
        self.lm.load_hf_state_dict(parts["lm."])
        missing = {"weight", "bias"} - parts["projector."].keys()
        if missing or len(parts["projector."]) != 2:
            raise KeyError(f"checkpoint's projector: missing {sorted(missing)}")
        self.projector.load_state_dict(parts["projector."], assign=True)

    def hf_config(self) -> dict:
        text = self.lm.hf_config()
        dtype = text["dtype"]
        for key in ("architectures", "dtype", "torch_dtype"):
            text.pop(key, None)
        text["num_image_tokens"] = self.num_image_tokens
        vision = self.vision.hf_config()
        vision.pop("architectures", None)
        vision["projection_dim"] = self.lm.hidden_size
        return {
            "architectures": [ARCHITECTURE],
            "model_type": "paligemma",
            "image_token_index": self.image_token_index,
            "projection_dim": self.lm.hidden_size,
            "hidden_size": self.lm.hidden_size,
            "vocab_size": self.lm.config.vocab_size,
            "tie_word_embeddings": self.lm.config.tie_embeddings,
            "text_config": text,
            "vision_config": vision,
            "dtype": dtype,
        }

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """transformers 5's on-disk layout (what its save_pretrained writes)."""
        out = {f"vision_tower.{k}": v for k, v in self.vision.hf_state_dict().items()}
        out.update({f"multi_modal_projector.linear.{k}": v
                    for k, v in self.projector.state_dict().items()})  # fmt: skip
        for key, value in self.lm.hf_state_dict().items():
            out[f"language_model.{key}"] = value  # model.* and (untied) lm_head.*
        return out


def positions(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    segment_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """PaliGemma's positions: real tokens counted from 1 (transformers: cumsum of the attention
    mask, +1 on its 0-based count); per sample in a packed row."""
    if segment_ids is not None:  # the decoder's per-segment count, from 1
        return _default_positions(input_ids.shape[1], 0, input_ids.device, segment_ids, None) + 1
    if attention_mask is None:
        return torch.arange(1, input_ids.shape[1] + 1, device=input_ids.device)[None]
    return attention_mask.long().cumsum(-1).clamp(min=1)


class _OneBasedPositions(nn.Module):
    """The decoder as `generate` drives it, with PaliGemma's 1-based positions: the positions
    the decoder derives from the attention mask (0-based), plus one."""

    def __init__(self, lm: Decoder):
        super().__init__()
        self.lm = lm
        self.layers, self.lm_head, self.embed = lm.layers, lm.lm_head, lm.embed

    def forward(self, input_ids=None, *, inputs_embeds=None, attention_mask=None, cache=None,
                **kwargs):  # fmt: skip
        x = inputs_embeds if inputs_embeds is not None else input_ids
        T = x.shape[1]
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:] + 1
        return self.lm(
            input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask, cache=cache,
            position_ids=position_ids, **kwargs,
        )  # fmt: skip
