"""Staged VLM training (SiQ-VL style): frozen vision tower -> pixel-shuffle projector -> LM.

Stage 1 trains the projector only; stage 2 starts from stage 1 (`task.init_from`) and trains the
LM too, fully or with LoRA adapters (peft). Samples are conversations rendered with the
tokenizer's chat template (core/data/chat_template.py) and packed into rows
(core/data/packing.py); the loss is the mean over every supervised token of the global batch
(the loop passes the global count in as `loss_denominator`), not a mean of micro-batch means.
Stage 3 (chain-of-thought SFT) is stage `sft` with `data.cot_format` set: samples are CoT shards
rendered as reasoning then answer (core/data/cot.py), and the reasoning and answer tokens' mean
losses are logged apart.

Every rank runs the same modules in the same order whatever its batch holds: a text-only batch
sends one blank image through the vision tower and projector and adds 0 x its output to the loss.
ZeRO-3 and FSDP gather parameters (and reduce gradients) per module collectively, and DDP
expects gradients for every trainable parameter: a rank that skipped the projector would hang
the others.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .. import deferred_init, models
from ..config import Config, ConfigError, DataConfig, TaskConfig
from ..consolidate import load_run_weights
from ..data.chat import ChatProcessor, VLMEvalDecoder, VLMTrainDecoder, add_image_tokens
from ..data.cot import ANSWER, REASONING, CoTEvalDecoder, CoTProcessor, CoTTrainDecoder
from ..data.packing import PackedCollate, PromptCollate, supervised_targets
from ..export import save_generation_config, save_image_processor, save_tokenizer
from ..flops import TowerCost, segment_square_sum
from ..lora import LoraConfig, add_lora, has_lora, merge_lora_state, write_peft_adapter
from ..models import hub
from ..models.generation import generate
from ..models.vlm import Projector, choose_shuffle, splice_images
from .base import Generative, ImageEncoder, Task, TaskOutput, register_task
from .common import (
    build_tokenizer,
    load_tower,
    make_stream,
    tower_features,
    val_mixture,
    vision_lm_costs,
)

log = logging.getLogger(__name__)


@dataclass
class ProjectorConfig:
    """Vision tokens -> LM embeddings. Pixel shuffle folds r x r neighbouring patches into one
    token (r^2 times the channels), then a linear map (optionally LayerNorm first, or a 2-layer
    MLP). pixel_shuffle=0 picks r for `image_tokens` tokens per image."""

    kind: Literal["linear", "layernorm", "mlp"] = "linear"
    pixel_shuffle: int = 0
    image_tokens: int = 0  # with pixel_shuffle=0; 0 = r=1 (no shuffle)


@dataclass
class VLMConfig(TaskConfig):
    """Stages (SiQ-VL): `align` trains the projector only; `sft` the LM too, every weight
    (lm_tuning full) or LoRA adapters. `task.trainable` overrides either default (the tiny demo
    also trains the vision tower: [vision.*, projector.*, lm.*])."""

    stage: Literal["align", "sft"] = "align"
    lm_tuning: Literal["full", "lora"] = "full"
    lora: LoraConfig = field(default_factory=LoraConfig)
    init_from: str = ""  # a previous stage's run directory (its newest checkpoint)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    # The vision features the projector reads (CLS dropped): 0 the tower's output (after
    # SigLIP's / ViT's final LayerNorm; CLIP's has none), k != 0 transformers' hidden_states[k],
    # the output of block k, negative from the end: -2 is LLaVA-1.5's (CLIP) penultimate layer.
    vision_feature_layer: int = 0


@dataclass
class VLMDataConfig(DataConfig):
    """Conversations with images (FineVision-converted shards), rendered with the tokenizer's
    chat template (core/data/chat_template.py)."""

    max_seq_len: int = 1024  # a sample's tokens; packed rows have this length
    system_prompt: str = "You are a helpful assistant."  # "": none (Gemma's template takes none)
    # The chat template's arguments; Qwen3 without thinking: its prompt ends `<think>\n\n</think>`
    chat_template_kwargs: dict = field(default_factory=lambda: {"enable_thinking": False})
    max_images: int = 8  # per sample
    # Chain-of-thought SFT (stage 3): "" reads FineVision conversations; think / llava_cot read
    # CoT shards ({question, reasoning, answer} + image: `vlscale shards llava-cot`) and train
    # the assistant turn `<think>reasoning</think> answer` / LLaVA-CoT's <SUMMARY><CAPTION>
    # <REASONING><CONCLUSION> (core/data/cot.py). Qwen3 with think: enable_thinking true.
    cot_format: Literal["", "think", "llava_cot"] = ""


@register_task
class VLMTask(Task, Generative, ImageEncoder):
    kind = "vlm"
    Config = VLMConfig
    DataConfig = VLMDataConfig

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        t, m = cfg.task, cfg.model
        if not (m.text or m.text_config):
            raise ConfigError("task.kind=vlm: set model.text or model.text_config")
        self.tokenizer = build_tokenizer(cfg)  # its pad token is set (EOS when it has none)
        add_image_tokens(self.tokenizer)  # those it lacks (Llama's, SmolLM2's, Gemma's)
        self.vision = load_tower(m.vision, m.vision_config, m.image_size)
        text_config = {"vocab_size": len(self.tokenizer), **m.text_config}
        self.lm = load_tower(m.text, text_config if not m.text else {})
        if len(self.tokenizer) > self.lm.config.vocab_size:  # a pretrained LM: rows for them
            self.lm.resize_token_embeddings(len(self.tokenizer))
        grid = self.vision.image_size // self.vision.patch_size
        p = t.projector
        factor = p.pixel_shuffle or choose_shuffle(grid, p.image_tokens)
        if grid % factor:
            raise ConfigError(
                f"task.projector.pixel_shuffle={factor} does not divide the vision tower's "
                f"{grid}x{grid} patch grid ({self.vision.image_size} px / patch "
                f"{self.vision.patch_size})"
            )
        self.tokens_per_image = (grid // factor) ** 2
        self.feature_layer = t.vision_feature_layer
        blocks = len(self.vision.blocks)
        if not -blocks <= self.feature_layer <= blocks:
            raise ConfigError(
                f"task.vision_feature_layer={self.feature_layer}: the vision tower has {blocks} "
                f"blocks; valid: -{blocks}..{blocks} (0: its output)"
            )
        self.processor = chat_processor(self.tokenizer, self.tokens_per_image, cfg.data)
        self.image_token_id = self.processor.image_pad_id
        self.end_of_turn_id = self.processor.end_of_turn_id
        self.projector = Projector(self.vision.hidden_size, self.lm.hidden_size, factor, p.kind)
        if t.init_from and not on_meta(self):
            self.load_previous_stage(t.init_from)
        if t.stage == "sft" and t.lm_tuning == "lora":
            add_lora(self.lm, t.lora)
        d = cfg.data
        common = dict(
            image_size=self.vision.image_size,
            mean=self.vision.image_mean,
            std=self.vision.image_std,
            max_images=d.max_images,
            max_pixels=d.max_pixels,
        )
        if d.cot_format:
            try:
                cot = CoTProcessor(self.processor, d.cot_format)
            except ValueError as err:
                raise ConfigError(f"data.cot_format={d.cot_format}: {err}") from None
            self.train_decoder = CoTTrainDecoder(cot, max_seq_len=d.max_seq_len, **common)
            self.eval_decoder = CoTEvalDecoder(cot, **common)
        else:
            self.train_decoder = VLMTrainDecoder(
                self.processor, max_seq_len=d.max_seq_len, **common
            )
            self.eval_decoder = VLMEvalDecoder(self.processor, **common)
        # Questions in the SFT layout whatever this stage reads (prompt_stream's `data`).
        self.question_decoder = VLMEvalDecoder(self.processor, **common)

    def blocks(self) -> dict[str, nn.ModuleList]:
        return {"vision": self.vision.blocks, "lm": self.lm.layers}

    def tokens_per_sample(self) -> dict[str, int]:
        return {"vision": self.vision.num_tokens, "lm": self.cfg.data.max_seq_len}

    def keeps_activations(self) -> dict[str, bool]:
        keeps = super().keeps_activations()  # the vision tower: its own (frozen: run no_grad)
        keeps["lm"] = any(p.requires_grad for p in self.parameters())  # behind the projector
        return keeps

    def logits_per_sample(self) -> tuple[int, int]:
        # at supervised targets only (forward): at most every position of a full row
        return self.cfg.data.max_seq_len, self.lm.lm_head.out_features

    def answer_format(self) -> str:
        return self.cfg.data.cot_format

    def tower_costs(self) -> dict[str, TowerCost]:
        return vision_lm_costs(self.vision, self.projector, self.lm)

    def flops(self, batch: dict) -> float:
        c = self.costs
        images = max(len(batch["pixel_values"]), 1)  # a text-only batch runs one blank image
        patches = self.vision.num_tokens
        return (c["vision"].flops(images * patches, images * patches**2)
                + c["projector"].flops(images * self.tokens_per_image, 0)
                + c["lm"].flops(batch["real_tokens"], segment_square_sum(batch["segment_ids"]))
                + c["lm_head"].flops(batch["supervised_tokens"], 0))  # fmt: skip

    def default_trainable(self) -> list[str]:
        t = self.cfg.task
        if t.stage == "align":
            return ["projector.*"]
        # sft with LoRA: the base LM stays frozen, its adapters train
        return ["projector.*", "lm.*.lora_*" if t.lm_tuning == "lora" else "lm.*"]

    def check_config(self) -> None:
        t = self.cfg.task
        if t.lm_tuning == "lora" and t.stage != "sft":
            raise ConfigError("task.lm_tuning=lora needs task.stage=sft (align trains no LM)")
        for entry in self.cfg.eval.evaluators:  # resolved: [{name: {options}}]
            options = entry.get("cot") if isinstance(entry, dict) else None
            if options is not None and not (self.cfg.data.cot_format or options.get("format")):
                raise ConfigError(
                    "eval.evaluators: cot scores chains of thought; set data.cot_format (think | "
                    "llava_cot) and point data.val at CoT shards"
                )

    # ------------------------------------------------------------------ stages
    def load_previous_stage(self, run_dir: str) -> None:
        """Every weight of the previous stage's newest checkpoint (vision, projector, LM; LoRA
        adapters merged into the LM). The architecture must be the same."""

        # Under fsdp each rank reads only its shards' rows of them (consolidate.load_run_weights).
        def merge(previous: dict, state):
            return merge_lora_state(state, previous["task"].get("lora", {}).get("alpha", 0))

        load_run_weights(self, run_dir, f"task.init_from={run_dir}", merge)
        log.info("initialised from %s", run_dir)

    # ------------------------------------------------------------------ model
    def embed_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[n, 3, S, S] -> [n, tokens_per_image, H_lm]. n = 0 runs one blank image (see the module
        docstring) and returns it: the caller adds 0 x its sum."""
        if pixel_values.shape[0] == 0:
            size = self.vision.image_size
            pixel_values = pixel_values.new_zeros(1, 3, size, size)
        frozen = not any(p.requires_grad for p in self.vision.parameters())
        with torch.no_grad() if frozen else contextlib.nullcontext():
            if self.feature_layer:
                features = self.vision.hidden_state(pixel_values, self.feature_layer)
            else:
                features = self.vision(pixel_values)
        if self.vision.has_cls_token:
            features = features[:, 1:]
        return self.projector(features)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The tower's output tokens mean-pooled (CLS dropped), before the projector: its final
        output whichever layer the projector reads (`vision_feature_layer`)."""
        return tower_features(self.vision, pixel_values)

    def preprocess_image(self, data: bytes) -> torch.Tensor:
        return self.train_decoder.load_image(data)  # what val_stream decodes images with

    def input_embeddings(self, input_ids: torch.Tensor, pixel_values: torch.Tensor):
        embeds = self.lm.embed(input_ids)
        images = self.embed_images(pixel_values)
        if pixel_values.shape[0] == 0:
            return embeds + 0.0 * images.sum().to(embeds.dtype)
        return splice_images(embeds, input_ids, images, self.image_token_id)

    def loss_weight(self, batch: dict) -> float:
        """Supervised next-token targets (counted by the packing collate): every token of the
        global batch weighs the same, however samples were packed or spread over ranks."""
        return float(batch["supervised_tokens"])

    def forward(self, batch: dict) -> TaskOutput:
        input_ids, labels, segments = batch["input_ids"], batch["labels"], batch["segment_ids"]
        embeds = self.input_embeddings(input_ids, batch["pixel_values"])
        hidden = self.lm(
            inputs_embeds=embeds, mask_kind="packed", segment_ids=segments, return_hidden=True
        )
        # Logits only where a target is supervised: the LM head over the whole row is most of
        # the memory of a small-vocabulary-heavy model (Qwen's 151k vocabulary).
        where = supervised_targets(labels, segments)
        logits = self.lm.lm_head(hidden[:, :-1][where]).float()
        metrics = {"packing_efficiency": batch["real_tokens"] / input_ids.numel()}
        if "label_kinds" in batch:  # chain of thought: each kind's mean loss, logged apart
            losses = F.cross_entropy(logits, labels[:, 1:][where], reduction="none")
            loss = losses.sum()
            metrics.update(kind_losses(losses.detach(), batch["label_kinds"][:, 1:][where]))
        else:
            loss = F.cross_entropy(logits, labels[:, 1:][where], reduction="sum")
        return TaskOutput(
            loss=loss,
            samples=batch["num_samples"],
            tokens=batch["supervised_tokens"],
            metrics=metrics,
        )

    def export_hf(self, out, state: dict) -> None:
        """vision/ (+ its image processor), projector.safetensors, lm/ (adapters merged) and, for
        LoRA runs, lm_base/ + lm_adapter/ (peft) — each loadable without vlscale (`vlscale
        export`). lm/ and lm_base/ carry the tokenizer, whose default chat template renders
        prompts as training did (ChatProcessor.export_template), and a generation config that
        stops at the end-of-turn token."""
        models.save_pretrained(self.vision, out / "vision")
        save_image_processor(self.vision, out / "vision", crop=self.eval_decoder.load_image.crop)
        projector = {k: v for k, v in state.items() if k.startswith("projector.")}
        hub.write_safetensors(projector, out / "projector.safetensors")
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
            self._export_lm_files(out / name)
        if has_lora(lm_state):
            write_peft_adapter(state, "lm.", self.cfg.task.lora, out / "lm_adapter", "../lm_base")

    def _export_lm_files(self, path) -> None:
        tok = self.tokenizer
        save_tokenizer(tok, path, chat_template=self.processor.export_template())
        # No answer is longer than a training sequence; vlscale generate's default is 64.
        save_generation_config(
            path, eos_token_id=self.end_of_turn_id, pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id, max_new_tokens=min(512, self.cfg.data.max_seq_len),
        )  # fmt: skip

    def model_card(self) -> dict:
        t, size = self.cfg.task, self.vision.image_size
        notes = [
            f"- The parts compose as vlscale's VLM: each image, resized to {size} x {size} "
            "(vision/'s image processor), goes through vision/"
            + (f" (read at transformers' hidden_states[{t.vision_feature_layer}], a block's "
               "output)" if t.vision_feature_layer else "")
            + (" (its CLS token dropped)" if self.vision.has_cls_token else "")
            + f", then the projector (`projector.*` in projector.safetensors: pixel shuffle "
            f"{self.projector.factor} x {self.projector.factor}, {t.projector.kind}), giving "
            f"{self.tokens_per_image} embeddings that replace, in order, the "
            f"{self.tokens_per_image} `<|image_pad|>` input embeddings the chat template writes "
            "per image (between `<|vision_start|>` and `<|vision_end|>`). transformers has no "
            "class for this composition: `vlscale generate` runs it.",
            "- lm/'s default chat template renders conversations exactly as training did"
            + (f" (system prompt {self.processor.system_prompt!r} unless the conversation has "
               "its own)" if self.processor.system_prompt else " (no system turn)")
            + "; another template the source tokenizer had is kept as `chat_template=\"source\"`"
            f". Generation stops at `{self.processor.end_of_turn}` (generation_config.json, "
            "greedy).",
        ]  # fmt: skip
        if t.lm_tuning == "lora":
            notes.append("- lm/ has the LoRA adapters merged; lm_base/ + lm_adapter/ (peft) are "
                         "the same model unmerged.")  # fmt: skip
        tags = ["vision-language", "image-text-to-text", f"stage-{t.stage}"]
        return {"tags": tags + (["lora"] if t.lm_tuning == "lora" else []),
                "notes": "\n".join(notes)}  # fmt: skip

    # ------------------------------------------------------------------ data
    def packed_collate(self) -> PackedCollate:
        return PackedCollate(
            self.cfg.data.max_seq_len,
            self.tokenizer.pad_token_id,
            self.image_token_id,
            self.tokens_per_image,
        )

    def prompt_collate(self) -> PromptCollate:
        """Left-padded prompts for generation (evaluation, `vlscale generate`)."""
        return PromptCollate(
            self.tokenizer.pad_token_id, self.image_token_id, self.tokens_per_image
        )

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
    def prompt_stream(self, dist, batch_size: int, subsets: list[str], data: str = ""):
        decoder = self.question_decoder if data else self.eval_decoder
        return make_stream(
            self.cfg, dist, data or self.cfg.data.val, decoder, train=False,
            collate=self.prompt_collate(), mixture=val_mixture(self.cfg, subsets, data),
            batch_size=batch_size,
        )  # fmt: skip

    def prompt_batch(self, items: list[tuple[str, list[bytes]]]) -> dict:
        samples = []
        for prompt, images in items:
            pixels = [self.eval_decoder.load_image(data) for data in images]
            ids = self.processor.prompt([{"user": prompt, "assistant": ""}], len(images))
            size = self.vision.image_size
            samples.append({
                "prompt_ids": torch.tensor(ids),
                "pixel_values": torch.stack(pixels) if pixels else torch.empty(0, 3, size, size),
            })  # fmt: skip
        return self.prompt_collate()(samples)

    @torch.no_grad()
    def generate(self, batch: dict, max_new_tokens: int, **options) -> list[str]:
        """Left-padded prompts decoded with the KV cache up to the end of the turn."""
        tokens = self.generate_tokens(
            batch["input_ids"], batch["attention_mask"], batch["pixel_values"], max_new_tokens,
            **options,
        )  # fmt: skip
        return decode_until(self.tokenizer, tokens.cpu(), self.end_of_turn_id)

    @torch.no_grad()
    def generate_tokens(self, input_ids, attention_mask, pixel_values, max_new_tokens: int,
                        **options) -> torch.Tensor:  # fmt: skip
        """New tokens [B, <= max_new_tokens] for left-padded prompts [B, T]."""
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


def kind_losses(losses: torch.Tensor, kinds: torch.Tensor) -> dict[str, torch.Tensor]:
    """`reasoning_loss` and `answer_loss`: the mean of the per-target losses of each kind (the
    micro-batch's; a kind with no target gives 0), tensors read only on logging steps."""
    out = {}
    for name, kind in (("reasoning_loss", REASONING), ("answer_loss", ANSWER)):
        mine = kinds == kind
        out[name] = (losses * mine).sum() / mine.sum().clamp(min=1)
    return out


def decode_until(tokenizer, tokens: torch.Tensor, stop_id: int) -> list[str]:
    """Each row's text up to (not including) its first `stop_id`."""
    answers = []
    for row in tokens.tolist():
        if stop_id in row:
            row = row[: row.index(stop_id)]
        answers.append(tokenizer.decode(row, skip_special_tokens=True))
    return answers


def chat_processor(tokenizer, tokens_per_image: int, data):
    """The chat processor; a tokenizer without the image tokens, or a template that cannot render
    the conversation, is a config error."""
    try:
        return ChatProcessor(
            tokenizer, tokens_per_image, data.system_prompt or None, data.chat_template_kwargs
        )
    except ValueError as err:
        raise ConfigError(f"model.tokenizer: {err}") from None


def on_meta(module: nn.Module) -> bool:
    return not all(deferred_init.has_values(p) for p in module.parameters())
