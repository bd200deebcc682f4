"""PaliGemma-style training (`task.kind: paligemma`): SigLIP + linear projector + Gemma with
prefix-LM attention, the suffix supervised (core/models/paligemma.py, core/data/prefix_lm.py).

The model is either a whole PaliGemma checkpoint (`model.text: google/paligemma-3b-pt-224`, the
transfer recipes) or assembled from a SigLIP vision tower and a Gemma decoder (`model.vision` /
`model.vision_config` + `model.text` / `model.text_config`, as the paper pre-trains it). Nothing
is frozen by default (the paper's choice); `task.freeze: [model.vision.*]` freezes by name.

Examples are packed into rows like the staged VLM's, prefix-LM per packed example (no attention
across examples). The loss sums cross-entropy over the suffix tokens; `task.loss_norm` divides
by the global batch's suffix tokens (`token`) or averages each example's mean first (`example`,
big_vision's per-example normalisation). `task.attention: causal` makes every token causal (the
paper's ablation), in training and generation alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .. import deferred_init, models
from ..config import Config, ConfigError, DataConfig, TaskConfig
from ..consolidate import load_run_weights
from ..data.packing import PackedCollate, PromptCollate, supervised_targets
from ..data.prefix_lm import (
    QUESTION_PREFIX,
    PrefixLMEvalDecoder,
    PrefixLMProcessor,
    PrefixLMTrainDecoder,
)
from ..data.preprocess import ImageLoader
from ..export import save_generation_config, save_image_processor, save_tokenizer
from ..flops import TowerCost, segment_square_sum
from ..models import hub
from ..models.decoder import Decoder
from ..models.paligemma import PaliGemma
from ..models.vision import SiglipVision
from .base import Generative, ImageEncoder, Task, TaskOutput, register_task
from .common import (
    build_tokenizer,
    load_tower,
    make_stream,
    tower_features,
    val_mixture,
    vision_lm_costs,
)
from .vlm import decode_until


@dataclass
class PaliGemmaTaskConfig(TaskConfig):
    """Prefix-LM fine-tuning / pre-training. `init_from`: a previous run of this kind."""

    init_from: str = ""
    loss_norm: Literal["token", "example"] = "token"
    attention: Literal["prefix_lm", "causal"] = "prefix_lm"


@dataclass
class PaliGemmaDataConfig(DataConfig):
    """FineVision-format conversations (each turn an example) and captioned images."""

    max_seq_len: int = 512  # an example's tokens (image tokens included); rows have this length
    prefix: str = QUESTION_PREFIX  # a question's prefix; {question} is replaced by it
    # per-source prefix templates (a record's `source`: the FineVision subset); "caption" is the
    # prefix of captioned-image shards (default "caption en")
    prefixes: dict[str, str] = field(default_factory=dict)
    max_images: int = 1  # per example


@register_task
class PaliGemmaTask(Task, Generative, ImageEncoder):
    kind = "paligemma"
    Config = PaliGemmaTaskConfig
    DataConfig = PaliGemmaDataConfig

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        m, d = cfg.model, cfg.data
        self.tokenizer = build_tokenizer(cfg)
        try:
            image_id = PrefixLMProcessor(self.tokenizer, 1).image_id
        except ValueError as err:
            raise ConfigError(f"model.tokenizer: {err}") from None
        self.model = self._build_model(m, image_id)
        self.processor = PrefixLMProcessor(self.tokenizer, self.model.num_image_tokens)
        if cfg.task.init_from and all(deferred_init.has_values(p) for p in self.parameters()):
            # under fsdp each rank reads its shards' rows alone (as tasks/vlm.py)
            load_run_weights(self, cfg.task.init_from, "task.init_from")
        vision = self.model.vision
        self.loader = ImageLoader(vision.image_size, vision.image_mean, vision.image_std,
                                  d.max_pixels, crop=False)  # fmt: skip
        self.train_decoder = PrefixLMTrainDecoder(
            self.processor, self.loader, d.max_seq_len, d.prefixes, d.prefix, d.max_images
        )
        self.eval_decoder = PrefixLMEvalDecoder(self.processor, self.loader, d.prefixes, d.prefix)

    def _build_model(self, m, image_id: int) -> PaliGemma:
        whole = m.text and hub.read_config(hub.resolve(m.text)).get("model_type") == "paligemma"
        if whole:
            if m.vision or m.vision_config:
                raise ConfigError(
                    f"model.text={m.text!r} is a whole PaliGemma checkpoint: leave model.vision "
                    "and model.vision_config empty"
                )
            model = load_tower(m.text, {})
            if m.image_size:
                model.vision.set_image_size(m.image_size)
            if model.image_token_index != image_id:
                raise ConfigError(
                    f"the tokenizer's <image> is id {image_id}, the checkpoint's "
                    f"image_token_index {model.image_token_index}: use the checkpoint's tokenizer"
                )
            return model
        if not (m.vision or m.vision_config) or not (m.text or m.text_config):
            raise ConfigError(
                "task.kind=paligemma: set model.text to a PaliGemma checkpoint, or a SigLIP "
                "tower (model.vision / model.vision_config) and a Gemma decoder (model.text / "
                "model.text_config)"
            )
        vision = load_tower(m.vision, m.vision_config, m.image_size)
        lm = load_tower(m.text, {"vocab_size": len(self.tokenizer), **m.text_config}
                        if not m.text else {})  # fmt: skip
        if not isinstance(vision, SiglipVision) or vision.has_head:
            raise ConfigError(
                "PaliGemma's vision tower is a SigLIP tower without pooling head "
                "(model_type siglip_vision_model, vision_use_head: false)"
            )
        if not isinstance(lm, Decoder) or lm.config.model_type != "gemma":
            raise ConfigError("PaliGemma's decoder is a Gemma (model_type gemma)")
        cfg = {**lm.hf_config(), "model_type": "paligemma"}
        return PaliGemma(vision, lm, image_id, cfg)

    def blocks(self) -> dict[str, nn.ModuleList]:
        return {"model.vision": self.model.vision.blocks, "model.lm": self.model.lm.layers}

    def tokens_per_sample(self) -> dict[str, int]:
        return {"model.vision": self.model.vision.num_tokens, "model.lm": self.cfg.data.max_seq_len}

    def keeps_activations(self) -> dict[str, bool]:
        keeps = super().keeps_activations()
        keeps["model.lm"] = any(p.requires_grad for p in self.parameters())  # behind the projector
        return keeps

    def logits_per_sample(self) -> tuple[int, int]:
        return self.cfg.data.max_seq_len, self.model.lm.lm_head.out_features  # at the suffix

    def tower_costs(self) -> dict[str, TowerCost]:
        return vision_lm_costs(self.model.vision, self.model.projector, self.model.lm)

    def flops(self, batch: dict) -> float:
        c, n = self.costs, self.model.vision.num_tokens
        images = len(batch["pixel_values"])
        return (c["vision"].flops(images * n, images * n**2)
                + c["projector"].flops(images * n, 0)
                + c["lm"].flops(batch["real_tokens"], segment_square_sum(batch["segment_ids"]))
                + c["lm_head"].flops(batch["supervised_tokens"], 0))  # fmt: skip

    # ------------------------------------------------------------------ objective
    def loss_weight(self, batch: dict) -> float:
        token = self.cfg.task.loss_norm == "token"
        return float(batch["supervised_tokens"] if token else batch["num_samples"])

    def forward(self, batch: dict) -> TaskOutput:
        ids, labels, segments = batch["input_ids"], batch["labels"], batch["segment_ids"]
        mask_ar = batch["mask_ar"]
        if self.cfg.task.attention == "causal":
            mask_ar = torch.ones_like(mask_ar)
        hidden = self.model(
            ids, batch["pixel_values"], mask_ar=mask_ar, segment_ids=segments,
            return_hidden=True, images_checked=True,
        )  # fmt: skip
        where = supervised_targets(labels, segments)
        logits = self.model.lm.lm_head(hidden[:, :-1][where]).float()
        losses = F.cross_entropy(logits, labels[:, 1:][where], reduction="none")
        if self.cfg.task.loss_norm == "token":
            loss = losses.sum()
        else:  # each example's mean, summed: examples are (row, segment) pairs
            rows = torch.arange(ids.shape[0], device=ids.device)[:, None].expand_as(where)
            example = (rows * ids.shape[1] + segments[:, 1:])[where]
            _, example = torch.unique(example, return_inverse=True)
            count = torch.zeros(int(example.max()) + 1, device=ids.device).index_add_(
                0, example, torch.ones_like(losses)
            )
            loss = (losses / count[example]).sum()
        return TaskOutput(
            loss=loss,
            samples=batch["num_samples"],
            tokens=batch["supervised_tokens"],
            metrics={"packing_efficiency": batch["real_tokens"] / ids.numel()},
        )

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The SigLIP tower's output tokens mean-pooled, before the projector."""
        return tower_features(self.model.vision, pixel_values)

    def preprocess_image(self, data: bytes) -> torch.Tensor:
        return self.loader(data)  # the validation images' (resized whole to S x S, no crop)

    # ------------------------------------------------------------------ data
    def packed_collate(self):
        packed = PackedCollate(self.cfg.data.max_seq_len, self.tokenizer.pad_token_id,
                               self.processor.image_id, self.model.num_image_tokens)  # fmt: skip

        def collate(samples: list[dict]) -> dict:  # each example of each sample, packed
            return packed([{**part, "pixel_values": s["pixel_values"]}
                           for s in samples for part in s["parts"]])  # fmt: skip

        return collate

    def train_stream(self, dist):
        return make_stream(
            self.cfg, dist, self.cfg.data.train, self.train_decoder, train=True,
            collate=self.packed_collate(), mixture=self.cfg.data.mixture,
        )  # fmt: skip

    def val_stream(self, dist, batch_size: int, subsets: list[str] | None = None):
        return make_stream(
            self.cfg, dist, self.cfg.data.val, self.train_decoder, train=False,
            collate=self.packed_collate(), mixture=val_mixture(self.cfg, subsets),
            batch_size=batch_size,
        )  # fmt: skip

    # ------------------------------------------------------------------ generation
    def prompt_collate(self) -> PromptCollate:
        return PromptCollate(
            self.tokenizer.pad_token_id, self.processor.image_id, self.model.num_image_tokens
        )

    def prompt_stream(self, dist, batch_size: int, subsets: list[str], data: str = ""):
        return make_stream(
            self.cfg, dist, data or self.cfg.data.val, self.eval_decoder, train=False,
            collate=self.prompt_collate(), mixture=val_mixture(self.cfg, subsets, data),
            batch_size=batch_size,
        )  # fmt: skip

    def prompt_batch(self, items: list[tuple[str, list[bytes]]]) -> dict:
        """(prefix, images) pairs: the prompt is PaliGemma's prefix as given ("caption en",
        "answer en what colour is the circle?"), not filled into a template."""
        samples = []
        for prefix, images in items:
            if not images:
                raise ValueError("PaliGemma needs an image with every prompt")
            samples.append({
                "prompt_ids": torch.tensor(self.processor.prompt(prefix, len(images))),
                "pixel_values": torch.stack([self.loader(data) for data in images]),
            })  # fmt: skip
        return self.prompt_collate()(samples)

    @torch.no_grad()
    def generate(self, batch: dict, max_new_tokens: int, **options) -> list[str]:
        tokens = self.model.generate(
            batch["input_ids"], batch["pixel_values"], max_new_tokens,
            attention_mask=batch["attention_mask"], eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
            prefix_lm=self.cfg.task.attention == "prefix_lm", **options,
        )  # fmt: skip
        return decode_until(self.tokenizer, tokens.cpu(), self.tokenizer.eos_token_id)

    # ------------------------------------------------------------------ export
    def export_hf(self, out, state: dict) -> None:
        """paligemma/: a PaliGemmaForConditionalGeneration checkpoint with its tokenizer, image
        processor, processor (AutoProcessor builds the same input_ids as training) and a
        generation config stopping at EOS."""
        path = out / "paligemma"
        models.save_pretrained(self.model, path)
        save_image_processor(self.model.vision, path, crop=False)
        save_tokenizer(self.tokenizer, path)
        save_generation_config(
            path, eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id, bos_token_id=self.tokenizer.bos_token_id,
            max_new_tokens=min(512, self.cfg.data.max_seq_len),
        )  # fmt: skip
        save_paligemma_processor(path, self.model.num_image_tokens)

    def model_card(self) -> dict:
        notes = (
            "- paligemma/ is a `PaliGemmaForConditionalGeneration` checkpoint with its "
            "processor: `AutoProcessor(images=..., text=prefix)` builds the prompts as training "
            f'did (image tokens, BOS, the prefix, "\\n"); prefixes as in the config (`data.'
            f"prefix` {self.cfg.data.prefix!r})."
        )
        if self.cfg.task.attention == "causal":
            notes += (
                " Trained with causal attention everywhere (`task.attention: causal`): "
                "transformers runs the prefix bidirectionally, which this model never saw."
            )
        return {"tags": ["vision-language", "image-text-to-text", "paligemma"], "notes": notes}


def save_paligemma_processor(path, image_seq_length: int) -> None:
    """processor_config.json (+ the image processor's with `image_seq_length`) so that
    `AutoProcessor.from_pretrained(path)` is transformers' PaliGemmaProcessor."""
    import json

    config = path / "preprocessor_config.json"
    image = json.loads(config.read_text())
    image.update(image_processor_type="SiglipImageProcessor", image_seq_length=image_seq_length,
                 processor_class="PaliGemmaProcessor")  # fmt: skip
    config.write_text(json.dumps(image, indent=2) + "\n")
    (path / "processor_config.json").write_text(
        json.dumps({"processor_class": "PaliGemmaProcessor"}, indent=2) + "\n"
    )
