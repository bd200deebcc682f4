"""SigLIP-style contrastive training: image tower + text tower, pooled, projected, L2-normalised,
sigmoid loss with learnable temperature and bias (Zhai et al., 2023)."""

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
from .base import ImageTextEmbedder, Task, TaskOutput, register_task
from .common import build_tokenizer, load_tower, make_stream, pool_tokens, val_mixture


@dataclass
class SigLIPConfig(TaskConfig):
    embed_dim: int = 768
    pooling: Literal["mean", "cls", "map", "last"] = "mean"  # image tower pooling
    text_pooling: Literal["mean", "last"] = "mean"
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
        self.vision = load_tower(cfg.model.vision, cfg.model.vision_config, cfg.model.image_size)
        # A text tower built from a config gets the tokenizer's vocabulary unless it names one.
        text_config = {"vocab_size": len(self.tokenizer), **cfg.model.text_config}
        self.text = load_tower(cfg.model.text, text_config if not cfg.model.text else {})
        if getattr(self.text, "lm_head", None) is not None:
            self.text.lm_head = None  # a text tower pools hidden states; no vocabulary head
        self.image_pooling = t.pooling
        self.text_pooling = t.text_pooling
        self.text_mask_kind = t.text_attention
        self.loss_chunk_size = t.loss_chunk_size or None
        if t.pooling == "map" and not self.vision.has_head:
            raise ValueError("task.pooling=map needs a SigLIP vision tower with its attention head")
        if t.pooling == "cls" and not self.vision.has_cls_token:
            raise ValueError("task.pooling=cls needs a vision tower with a CLS token (ViT)")
        self.image_proj = nn.Linear(self.vision.hidden_size, t.embed_dim, bias=False)
        self.text_proj = nn.Linear(self.text.hidden_size, t.embed_dim, bias=False)
        for proj in (self.image_proj, self.text_proj):
            nn.init.normal_(proj.weight, std=proj.in_features**-0.5)
        self.logit_scale = nn.Parameter(torch.tensor(float(t.init_logit_scale)))
        self.logit_bias = nn.Parameter(torch.tensor(float(t.init_logit_bias)))
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
        text = TowerCost.of(self.text, text.num_layers, text.num_heads * text.head_dim)
        heads = nn.ModuleList([self.image_proj, self.text_proj])  # on pooled features
        upstream = vision.grad_flows or text.grad_flows
        return {"vision": vision, "text": text,
                "heads": TowerCost.of(heads, 0, 0, grad_upstream=upstream)}  # fmt: skip

    def flops(self, batch: dict) -> float:
        c, n = self.costs, len(batch["pixel_values"])
        per_image = self.vision.num_tokens
        lengths = batch["attention_mask"].sum(dim=1)
        return (c["vision"].flops(n * per_image, n * per_image**2)
                + c["text"].flops(int(lengths.sum()), int((lengths**2).sum()))
                + c["heads"].flops(n, 0))  # fmt: skip

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.vision(pixel_values)
        if self.image_pooling == "map":
            pooled = self.vision.pool(hidden)
        elif self.image_pooling == "cls":
            pooled = hidden[:, 0]
        else:
            tokens = hidden[:, 1:] if self.vision.has_cls_token else hidden
            pooled = pool_tokens(tokens, None, self.image_pooling)
        return F.normalize(self.image_proj(pooled).float(), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.text(
            input_ids=input_ids,
            attention_mask=attention_mask,
            mask_kind=self.text_mask_kind,
            return_hidden=True,
        )
        pooled = pool_tokens(hidden, attention_mask, self.text_pooling)
        return F.normalize(self.text_proj(pooled).float(), dim=-1)

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
        training preprocessing), out/text (+ the tokenizer)."""
        models.save_pretrained(self.vision, out / "vision")
        save_image_processor(self.vision, out / "vision", crop=self.decoder.load_image.crop)
        models.save_pretrained(self.text, out / "text")
        save_tokenizer(self.tokenizer, out / "text")

    def model_card(self) -> dict:
        t, data = self.cfg.task, self.cfg.data
        image = {
            "map": "vision/'s attention-pooling head",
            "cls": "vision/'s CLS token",
            "mean": "the mean of vision/'s patch tokens",
            "last": "vision/'s last token",
        }[t.pooling]
        notes = [
            f"- Embeddings: image = normalize(image_proj({image})); text = normalize(text_proj("
            f"the {t.text_pooling} of text/'s hidden states over the real tokens)); pair logits "
            "= exp(logit_scale) * image . text + logit_bias. `image_proj`, `text_proj`, "
            "`logit_scale` and `logit_bias` are in `model.safetensors`.",
            f"- Captions: at most {data.max_text_len} tokens, no special tokens but an EOS "
            f"({self.tokenizer.eos_token!r}) at the end, which vlscale appends when the tokenizer "
            "does not add it itself; padding is masked.",
            "- vision/'s image processor is the training preprocessing: the shorter side resized "
            f"to {self.vision.image_size} (bicubic), the centre square cropped.",
        ]
        if t.text_attention == "bidirectional":
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

    def train_stream(self, dist):
        return make_stream(self.cfg, dist, self.cfg.data.train, self.decoder, train=True)

    def val_stream(self, dist, batch_size: int, subsets: list[str] | None = None):
        """Validation pairs with each sample's JSON metadata as "attributes" (for zero-shot)."""
        decode = with_attributes(self.decoder)
        return make_stream(
            self.cfg, dist, self.cfg.data.val, decode, train=False, batch_size=batch_size,
            mixture=val_mixture(self.cfg, subsets),
        )  # fmt: skip
