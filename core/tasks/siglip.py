"""SigLIP-style contrastive training: image tower + text tower, pooled, projected, L2-normalised,
sigmoid loss with learnable temperature and bias (Zhai et al., 2023).

A whole SigLIP (a `google/siglip-*` SiglipModel checkpoint named as both model.vision and
model.text) trains as it is: its vision tower's attention-pooling head and its text tower's head
give the embeddings (pooling: map, text_pooling: tower, embed_dim: 0, no projections), its
logit_scale and logit_bias start the loss, and `vlscale export` writes OUT/siglip/, a SiglipModel
checkpoint. A text tower's own conventions come from the tower (SigLIP's: captions padded to its
max_position_embeddings and read with the padding, the last position pooled by its head)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .. import models
from ..config import Config, ConfigError, DataConfig, TaskConfig
from ..data.preprocess import ImageTextDecoder, member_keys, with_attributes
from ..export import save_image_processor, save_tokenizer
from ..flops import TowerCost
from ..losses import sigmoid_loss
from ..models import hub, two_tower
from .base import ImageTextEmbedder, Task, TaskOutput, register_task
from .common import (
    build_tokenizer,
    load_tower,
    make_stream,
    pool_tokens,
    tower_features,
    val_mixture,
)


@dataclass
class SigLIPConfig(TaskConfig):
    embed_dim: int = 768  # 0: no projections, the pooled features are the embeddings
    pooling: Literal["mean", "cls", "map", "last"] = "mean"  # image tower pooling
    # tower: the text tower's own pooled output (SigLIP's, which it needs: head(last position))
    text_pooling: Literal["mean", "last", "tower"] = "mean"
    text_attention: Literal["causal", "bidirectional"] = "causal"
    init_logit_scale: float = math.log(10.0)
    init_logit_bias: float = -10.0
    loss_chunk_size: int = 0  # 0 = whole local block at once


@dataclass
class ImageTextDataConfig(DataConfig):
    """Image-caption pairs (CC3M-layout shards: KEY.jpg + KEY.txt)."""

    max_text_len: int = 77
    max_caption_bytes: int = 4096
    # Members holding the image / the caption, `;`-separated: the first a sample has is used;
    # a sample with none is skipped (missing_image / missing_text).
    image_keys: str = "jpg;png;webp"
    text_keys: str = "txt;caption"


@register_task
class SigLIPTask(Task, ImageTextEmbedder):
    kind = "siglip"
    Config = SigLIPConfig
    DataConfig = ImageTextDataConfig

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        t = cfg.task
        if not (cfg.model.text or cfg.model.text_config):
            raise ConfigError("task.kind=siglip: set model.text or model.text_config")
        for name in ("image_keys", "text_keys"):
            if not member_keys(getattr(cfg.data, name)):
                raise ConfigError(f"data.{name}: names no member extension (e.g. jpg;png)")
        self.tokenizer = build_tokenizer(cfg)
        self.whole = whole_checkpoint(cfg)
        self.vision = load_tower(cfg.model.vision, cfg.model.vision_config, cfg.model.image_size)
        # A text tower built from a config gets the tokenizer's vocabulary unless it names one.
        text_config = {"vocab_size": len(self.tokenizer), **cfg.model.text_config}
        text_config = text_config if not cfg.model.text else {}
        self.text = load_tower(cfg.model.text, text_config, part="text")
        if getattr(self.text, "lm_head", None) is not None:
            self.text.lm_head = None  # a text tower pools hidden states; no vocabulary head
        # SigLIP's text tower: no attention mask (padding is input), fixed caption length.
        self.text_reads_padding = getattr(self.text, "reads_padding", False)
        check_text_tower(cfg, self.text)
        self.image_pooling = t.pooling
        self.text_pooling = t.text_pooling
        self.text_mask_kind = t.text_attention
        self.loss_chunk_size = t.loss_chunk_size or None
        if t.pooling == "map" and not self.vision.has_head:
            raise ValueError("task.pooling=map needs a SigLIP vision tower with its attention head")
        if t.pooling == "cls" and not self.vision.has_cls_token:
            raise ValueError("task.pooling=cls needs a vision tower with a CLS token (ViT)")
        text_dim = self.text.pooled_size if t.text_pooling == "tower" else self.text.hidden_size
        self.image_proj = self.text_proj = None
        if t.embed_dim:
            self.image_proj = nn.Linear(self.vision.hidden_size, t.embed_dim, bias=False)
            self.text_proj = nn.Linear(text_dim, t.embed_dim, bias=False)
            for proj in (self.image_proj, self.text_proj):
                nn.init.normal_(proj.weight, std=proj.in_features**-0.5)
        elif self.vision.hidden_size != text_dim:
            raise ConfigError(
                f"task.embed_dim=0 (no projections) needs pooled features of one width: image "
                f"{self.vision.hidden_size}, text {text_dim}; set task.embed_dim"
            )
        scale, bias = t.init_logit_scale, t.init_logit_bias
        if self.whole and not hub.building_on_meta():  # the checkpoint's own temperature, bias
            scale, bias = two_tower.read_logits(hub.resolve(cfg.model.vision))
        self.logit_scale = nn.Parameter(torch.tensor(float(scale)))
        self.logit_bias = nn.Parameter(torch.tensor(float(bias)))
        self.decoder = ImageTextDecoder(
            image_size=self.vision.image_size,
            mean=self.vision.image_mean,
            std=self.vision.image_std,
            tokenizer=self.tokenizer,
            max_text_len=cfg.data.max_text_len,
            max_pixels=cfg.data.max_pixels,
            max_caption_bytes=cfg.data.max_caption_bytes,
            image_keys=cfg.data.image_keys,
            text_keys=cfg.data.text_keys,
        )

    def blocks(self) -> dict[str, nn.ModuleList]:
        return {"vision": self.vision.blocks, "text": self.text.layers}

    def tokens_per_sample(self) -> dict[str, int]:
        return {"vision": self.vision.num_tokens, "text": self.cfg.data.max_text_len}

    def tower_costs(self) -> dict[str, TowerCost]:
        text = self.text.config
        vision = TowerCost.of(self.vision, len(self.vision.blocks), self.vision.hidden_size)
        # A text tower's own pooling head runs once per caption, with the projections.
        pooler = [self.text.head] if self.text_pooling == "tower" else []
        text = TowerCost.of(self.text, text.num_layers, text.num_heads * text.head_dim,
                            exclude=tuple(pooler))  # fmt: skip
        projections = [m for m in (self.image_proj, self.text_proj) if m is not None]
        heads = nn.ModuleList(projections + pooler)  # on pooled features
        upstream = vision.grad_flows or text.grad_flows
        return {"vision": vision, "text": text,
                "heads": TowerCost.of(heads, 0, 0, grad_upstream=upstream)}  # fmt: skip

    def flops(self, batch: dict) -> float:
        c, n = self.costs, len(batch["pixel_values"])
        per_image = self.vision.num_tokens
        lengths = batch["attention_mask"].sum(dim=1)
        if self.text_reads_padding:  # every position is input
            lengths = torch.full_like(lengths, batch["attention_mask"].shape[1])
        return (c["vision"].flops(n * per_image, n * per_image**2)
                + c["text"].flops(int(lengths.sum()), int((lengths**2).sum()))
                + c["heads"].flops(n, 0))  # fmt: skip

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return tower_features(self.vision, pixel_values)

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.embed_image(self.vision(pixel_values))

    def embed_image(self, hidden: torch.Tensor) -> torch.Tensor:
        """The image tower's output tokens -> the normalised image embedding."""
        if self.image_pooling == "map":
            pooled = self.vision.pool(hidden)
        elif self.image_pooling == "cls":
            pooled = hidden[:, 0]
        else:
            tokens = hidden[:, 1:] if self.vision.has_cls_token else hidden
            pooled = pool_tokens(tokens, None, self.image_pooling)
        if self.image_proj is not None:
            pooled = self.image_proj(pooled)
        return F.normalize(pooled.float(), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = None if self.text_reads_padding else attention_mask
        hidden = self.text(
            input_ids=input_ids, attention_mask=mask, mask_kind=self.text_mask_kind,
            return_hidden=True,
        )  # fmt: skip
        if self.text_pooling == "tower":
            pooled = self.text.pool(hidden)
        else:
            pooled = pool_tokens(hidden, mask, self.text_pooling)
        if self.text_proj is not None:
            pooled = self.text_proj(pooled)
        return F.normalize(pooled.float(), dim=-1)

    def forward(self, batch: dict) -> TaskOutput:
        image = self.encode_image(batch["pixel_values"])
        text = self.encode_text(batch["input_ids"], batch["attention_mask"])
        loss = sigmoid_loss(
            image, text, self.logit_scale, self.logit_bias, chunk_size=self.loss_chunk_size
        )
        return TaskOutput(  # a mean over the batch's pairs: micro-batches weigh equally
            loss=loss,
            samples=image.shape[0],
            tokens=batch["attention_mask"].sum(),
            metrics={
                "temperature": self.logit_scale.detach().exp(),
                "logit_bias": self.logit_bias.detach(),
            },
        )

    def export_hf(self, out, state: dict) -> None:
        """The towers as Hugging Face checkpoints: out/vision (+ the image processor of its
        training preprocessing), out/text (+ the tokenizer); a whole SigLIP as one SiglipModel
        checkpoint, out/siglip (+ both)."""
        if self.whole:
            path = out / "siglip"
            two_tower.save_whole(self.vision, self.text, self.logit_scale, self.logit_bias, path)
            save_image_processor(self.vision, path, crop=self.decoder.load_image.crop)
            # padding="max_length" then pads as training did (SigLIP's own tokenizers say 64)
            tok = self.tokenizer
            length = tok.model_max_length
            tok.model_max_length = self.cfg.data.max_text_len
            try:
                save_tokenizer(tok, path)
            finally:
                tok.model_max_length = length
            return
        models.save_pretrained(self.vision, out / "vision")
        save_image_processor(self.vision, out / "vision", crop=self.decoder.load_image.crop)
        models.save_pretrained(self.text, out / "text")
        save_tokenizer(self.tokenizer, out / "text")

    def model_card(self) -> dict:
        t, data = self.cfg.task, self.cfg.data
        eos = (f"an EOS ({self.tokenizer.eos_token!r}) at the end, which vlscale appends when the "
               "tokenizer does not add it itself")  # fmt: skip
        padding = (f"padded to {data.max_text_len} tokens with the pad token and read with the "
                   "padding (no attention mask), as SigLIP does" if self.text_reads_padding
                   else "padding is masked")  # fmt: skip
        if self.whole:
            notes = [
                "- siglip/ is the whole model, a transformers `SiglipModel`: its image and text "
                "embeddings (`pooler_output` of each tower, normalised) and `logits_per_image` = "
                "exp(logit_scale) * image . text + logit_bias are vlscale's.",
                f"- Captions: at most {data.max_text_len} tokens, {eos}; {padding} "
                '(`padding="max_length"`).',
                "- siglip/'s image processor is the training preprocessing: the shorter side "
                f"resized to {self.vision.image_size} (bicubic), the centre square cropped.",
            ]
            return {"tags": ["siglip", "contrastive", "image-text-retrieval"],
                    "notes": "\n".join(notes)}  # fmt: skip
        image = {
            "map": "vision/'s attention-pooling head",
            "cls": "vision/'s CLS token",
            "mean": "the mean of vision/'s patch tokens",
            "last": "vision/'s last token",
        }[t.pooling]
        text = (
            "text/'s pooled output (`pooler_output`)" if t.text_pooling == "tower"
            else f"the {t.text_pooling} of text/'s hidden states over the real tokens"
        )  # fmt: skip
        if self.image_proj is not None:
            image, text = f"image_proj({image})", f"text_proj({text})"
        stored = "`image_proj`, `text_proj`, " if self.image_proj is not None else ""
        notes = [
            f"- Embeddings: image = normalize({image}); text = normalize({text}); pair logits "
            f"= exp(logit_scale) * image . text + logit_bias. {stored}"
            "`logit_scale` and `logit_bias` are in `model.safetensors`.",
            f"- Captions: at most {data.max_text_len} tokens, no special tokens but {eos}; "
            f"{padding}.",
            "- vision/'s image processor is the training preprocessing: the shorter side resized "
            f"to {self.vision.image_size} (bicubic), the centre square cropped.",
        ]
        # Decoder text towers (they have an lm_head attribute) run causally in transformers.
        if t.text_attention == "bidirectional" and hasattr(self.text, "lm_head"):
            notes.append(
                "- text/ was trained with bidirectional attention: transformers runs it causally, "
                "which changes its hidden states; for the trained embeddings load it with vlscale "
                "(`core.models.from_pretrained`, called with `mask_kind='bidirectional'`)."
            )
        return {
            "tags": ["siglip", "contrastive", "image-text-retrieval"],
            "notes": "\n".join(notes),
        }

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = [self.decoder.tokenize(text) for text in texts]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])

    def preprocess_image(self, data: bytes) -> torch.Tensor:
        return self.decoder.load_image(data)

    def train_stream(self, dist):
        return make_stream(self.cfg, dist, self.cfg.data.train, self.decoder, train=True)

    def val_stream(self, dist, batch_size: int, subsets: list[str] | None = None):
        """Validation pairs with each sample's JSON metadata as "attributes" (for zero-shot)."""
        decode = with_attributes(self.decoder)
        return make_stream(
            self.cfg, dist, self.cfg.data.val, decode, train=False, batch_size=batch_size,
            mixture=val_mixture(self.cfg, subsets),
        )  # fmt: skip


def whole_checkpoint(cfg: Config) -> bool:
    """Whether model.vision and model.text name one whole two-tower checkpoint (a SiglipModel),
    trained as it is (module docstring); the task settings that would change it are errors."""
    m, t = cfg.model, cfg.task
    if not m.vision or m.vision != m.text:
        return False
    path = hub.resolve(m.vision)
    if not two_tower.is_whole(path):
        model_type = hub.read_config(path)["model_type"]
        raise ConfigError(
            f"model.vision and model.text are one checkpoint, {m.vision} (model_type "
            f"{model_type!r}): only a whole SigLIP (model_type siglip) loads as both towers"
        )
    required = {"pooling": "map", "text_pooling": "tower", "text_attention": "bidirectional",
                "embed_dim": 0}  # fmt: skip
    wrong = {k: v for k, v in required.items() if getattr(t, k) != v}
    defaults = SigLIPConfig()
    unused = [k for k in ("init_logit_scale", "init_logit_bias")
              if getattr(t, k) != getattr(defaults, k)]  # fmt: skip
    if wrong or unused:
        settings = ", ".join(f"task.{k}: {v}" for k, v in required.items())
        raise ConfigError(
            f"model.vision and model.text are one whole SigLIP ({m.vision}), trained as it is: "
            f"set {settings}"
            + (f" (not {', '.join(f'{k}={getattr(t, k)}' for k in wrong)})" if wrong else "")
            + (f"; drop {', '.join(f'task.{k}' for k in unused)}: the checkpoint's own "
               "logit_scale and logit_bias start the loss" if unused else "")
        )  # fmt: skip
    return True


def check_text_tower(cfg: Config, text: nn.Module) -> None:
    """The text tower's own conventions against the task settings (a SigLIP text tower pools
    with its head over captions of its fixed length; decoders have no pooled output)."""
    t, name = cfg.task, type(text).__name__
    has_pool = callable(getattr(text, "pool", None))
    if t.text_pooling == "tower" and not has_pool:
        raise ConfigError(
            f"task.text_pooling=tower needs a text tower with its own pooled output (SigLIP's); "
            f"{name} has none: use mean or last"
        )
    if has_pool and t.text_pooling != "tower":
        raise ConfigError(
            f"{name} pools with its own head (transformers' pooler_output), which would "
            f"otherwise not train: set task.text_pooling: tower (not {t.text_pooling})"
        )
    kinds = getattr(text, "mask_kinds", None)  # the attention a text encoder runs with
    if kinds is not None and t.text_attention not in kinds:
        raise ConfigError(f"{name} runs {' or '.join(kinds)} attention: set task.text_attention: "
                          f"{kinds[0]}")  # fmt: skip
    length = getattr(text, "pad_to_length", None)
    if length is not None and cfg.data.max_text_len != length:
        raise ConfigError(
            f"data.max_text_len={cfg.data.max_text_len}: {name} reads captions padded to "
            f"{length} tokens (max_position_embeddings) and pools the last position; set "
            f"data.max_text_len: {length}"
        )
