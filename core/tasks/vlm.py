"""Staged VLM training (SiQ-VL style): frozen vision tower -> pixel-shuffle projector -> LM.

Stage 1 trains the projector only; stage 2 starts from stage 1 (`task.init_from`) and trains the
LM too, fully or with LoRA adapters (peft). Samples are ChatML conversations packed into rows
(core/data/packing.py); the loss is the mean over every supervised token of the global batch
(the loop passes the global count in as `loss_denominator`), not a mean of micro-batch means.

Every rank runs the same modules in the same order whatever its batch holds: a text-only batch
sends one blank image through the vision tower and projector and adds 0 x its output to the loss.
ZeRO-3 and FSDP gather parameters (and reduce gradients) per module collectively, and DDP
expects gradients for every trainable parameter: a rank that skipped the projector would hang
the others.
"""

from __future__ import annotations

import contextlib
import logging

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Config, ConfigError
from ..data.packing import supervised_targets
from ..models.vlm import Projector, choose_shuffle, splice_images
from .common import build_tokenizer, load_tower

log = logging.getLogger(__name__)


class VLMTask(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        t, m = cfg.task, cfg.model
        if t.stage not in (1, 2):
            raise ConfigError(f"task.stage={t.stage}: the vlm task has stages 1 and 2")
        self.tokenizer = build_tokenizer(cfg)  # its pad token is set (EOS when it has none)
        self.vision = load_tower(m.vision, m.vision_config, m.image_size)
        text_config = {"vocab_size": len(self.tokenizer), **m.text_config}
        self.lm = load_tower(m.text, text_config if not m.text else {})
        grid = self.vision.image_size // self.vision.patch_size
        p = m.projector
        factor = p.pixel_shuffle or choose_shuffle(grid, p.image_tokens)
        if grid % factor:
            raise ConfigError(
                f"model.projector.pixel_shuffle={factor} does not divide the vision tower's "
                f"{grid}x{grid} patch grid ({self.vision.image_size} px / patch "
                f"{self.vision.patch_size})"
            )
        self.tokens_per_image = (grid // factor) ** 2
        self.processor = chat_processor(self.tokenizer, self.tokens_per_image, cfg.data)
        self.image_token_id = self.processor.image_pad_id
        self.end_of_turn_id = self.processor.im_end
        self.projector = Projector(self.vision.hidden_size, self.lm.hidden_size, factor, p.kind)
        self.cfg = cfg
        if t.init_from and not _on_meta(self):
            self.load_previous_stage(t.init_from)
        self.set_trainable(t.stage, t.lm_tuning, t.train_vision)
        if t.stage == 2 and t.lm_tuning == "lora":
            from ..lora import add_lora

            add_lora(self.lm, t.lora)
        self.train_decoder, self.eval_decoder = self.sample_decoders(cfg)

    # ------------------------------------------------------------------ stages
    def load_previous_stage(self, run_dir: str) -> None:
        """Every weight of the previous stage's newest checkpoint (vision, projector, LM; LoRA
        adapters merged into the LM). The architecture must be the same."""
        from ..consolidate import fit_state, run_state
        from ..lora import merge_lora_state

        previous, state = run_state(run_dir)
        state = merge_lora_state(state, previous.task.lora.alpha)
        self.load_state_dict(fit_state(state, self.state_dict(), f"task.init_from={run_dir}"))
        log.info("initialised from %s", run_dir)

    def set_trainable(self, stage: int, lm_tuning: str, train_vision: bool) -> None:
        self.vision.requires_grad_(train_vision)
        self.projector.requires_grad_(True)
        # Stage 2 with LoRA: the base LM stays frozen; add_lora makes the adapters trainable.
        self.lm.requires_grad_(stage == 2 and lm_tuning == "full")

    # ------------------------------------------------------------------ model
    def embed_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[n, 3, S, S] -> [n, tokens_per_image, H_lm]. n = 0 runs one blank image (see the module
        docstring) and returns it: the caller adds 0 x its sum."""
        if pixel_values.shape[0] == 0:
            size = self.vision.image_size
            pixel_values = pixel_values.new_zeros(1, 3, size, size)
        frozen = not any(p.requires_grad for p in self.vision.parameters())
        with torch.no_grad() if frozen else contextlib.nullcontext():
            features = self.vision(pixel_values)
        if getattr(self.vision, "has_cls_token", False):
            features = features[:, 1:]
        return self.projector(features)

    def input_embeddings(self, input_ids: torch.Tensor, pixel_values: torch.Tensor):
        embeds = self.lm.embed(input_ids)
        images = self.embed_images(pixel_values)
        if pixel_values.shape[0] == 0:
            return embeds + 0.0 * images.sum().to(embeds.dtype)
        return splice_images(embeds, input_ids, images, self.image_token_id)

    def forward(self, batch: dict) -> dict:
        input_ids, labels, segments = batch["input_ids"], batch["labels"], batch["segment_ids"]
        embeds = self.input_embeddings(input_ids, batch["pixel_values"])
        hidden = self.lm(
            inputs_embeds=embeds, mask_kind="packed", segment_ids=segments, return_hidden=True
        )
        # Logits only where a target is supervised: the LM head over the whole row is most of
        # the memory of a small-vocabulary-heavy model (Qwen's 151k vocabulary).
        where = supervised_targets(labels, segments)
        logits = self.lm.lm_head(hidden[:, :-1][where]).float()
        loss_sum = F.cross_entropy(logits, labels[:, 1:][where], reduction="sum")
        denominator = batch.get("loss_denominator") or where.sum().clamp(min=1)
        return {
            "loss": loss_sum / denominator,
            "num_samples": batch["num_samples"],
            "num_tokens": batch["loss_tokens"],
            "metrics": {"packing_efficiency": batch["real_tokens"] / input_ids.numel()},
        }

    @torch.no_grad()
    def answer(self, input_ids, attention_mask, pixel_values, max_new_tokens: int, **options):
        """New tokens for left-padded prompts [B, T], decoded with the KV cache; `options` are
        core.models.generation.GenerationConfig fields (greedy by default)."""
        from ..models.generation import generate

        embeds = self.input_embeddings(input_ids, pixel_values)
        return generate(
            self.lm,
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            eos_token_id=self.end_of_turn_id,
            pad_token_id=self.tokenizer.pad_token_id,
            **options,
        )

    def export_hf(self, out, state: dict) -> None:
        """vision/, projector.safetensors, lm/ (adapters merged) and, for LoRA runs, lm_base/ +
        lm_adapter/ (peft) — each loadable without vlscale (`vlscale export`)."""
        from safetensors.torch import save_file

        from .. import models
        from ..lora import has_lora, merge_lora_state, write_peft_adapter

        models.save_pretrained(self.vision, out / "vision")
        projector = {k: v.contiguous() for k, v in state.items() if k.startswith("projector.")}
        save_file(projector, out / "projector.safetensors")
        lm_state = {k[3:]: v for k, v in state.items() if k.startswith("lm.")}
        alpha = self.cfg.task.lora.alpha
        for name, weights in (("lm", merge_lora_state(lm_state, alpha)),
                              ("lm_base", merge_lora_state(lm_state, 0.0))):  # fmt: skip
            if name == "lm_base" and not has_lora(lm_state):
                break
            with torch.device("meta"):
                plain = models.from_config(self.lm.hf_config())
            plain.load_state_dict(weights, assign=True)
            models.save_pretrained(plain, out / name)
        if has_lora(lm_state):
            write_peft_adapter(state, "lm.", self.cfg.task.lora, out / "lm_adapter", "../lm_base")

    # ------------------------------------------------------------------ data and evaluation
    def sample_decoders(self, cfg: Config):
        from ..data.chat import VLMEvalDecoder, VLMTrainDecoder

        d = cfg.data
        common = dict(
            image_size=self.vision.image_size,
            mean=self.vision.image_mean,
            std=self.vision.image_std,
            max_images=d.max_images,
            max_pixels=d.max_pixels,
        )
        train = VLMTrainDecoder(self.processor, max_seq_len=d.max_seq_len, **common)
        evaluation = VLMEvalDecoder(self.processor, **common)
        return train, evaluation

    def packed_collate(self):
        from ..data.packing import PackedCollate

        return PackedCollate(
            self.cfg.data.max_seq_len,
            self.tokenizer.pad_token_id,
            self.image_token_id,
            self.tokens_per_image,
        )

    def prompt_collate(self):
        """Left-padded prompts for generation (evaluation, `vlscale generate`)."""
        from ..data.packing import PromptCollate

        return PromptCollate(
            self.tokenizer.pad_token_id, self.image_token_id, self.tokens_per_image
        )

    def train_stream(self, cfg: Config, dist):
        from .common import make_stream

        return make_stream(
            cfg, dist, cfg.data.train, self.train_decoder, train=True,
            collate=self.packed_collate(), mixture=cfg.data.mixture,
        )  # fmt: skip

    def evaluate(self, cfg: Config, dist) -> dict:
        from ..evaluate_vlm import evaluate_vlm

        return evaluate_vlm(self, cfg, dist)

    def generation_samples(self, cfg: Config, dist) -> list[dict]:
        from ..evaluate_vlm import generation_samples

        return generation_samples(self, cfg, dist)


def chat_processor(tokenizer, tokens_per_image: int, data):
    """The ChatML processor; a tokenizer without Qwen's chat and vision tokens is a config error."""
    from ..data.chat import ChatProcessor

    try:
        return ChatProcessor(tokenizer, tokens_per_image, data.system_prompt or None)
    except ValueError as err:
        raise ConfigError(f"model.tokenizer: {err}") from None


def _on_meta(module: nn.Module) -> bool:
    return any(p.is_meta for p in module.parameters())
