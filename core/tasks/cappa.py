"""Captioning pre-training of an image tower: CapPa (Tschannen et al., 2023) and the SigLIP 2-style
objective that adds CapPa's decoder loss to the sigmoid loss on one tower (Tschannen et al., 2025).

    task.kind: cappa     image tower -> every output token -> decoder (core/models/cappa.py)
    task.kind: siglip2   the siglip kind's two towers and sigmoid loss, plus the same decoder on
                         the image tower's tokens; loss = contrastive_weight * sigmoid +
                         caption_weight * decoder

The decoder is trained per example in one of CapPa's two modes, drawn with probability
`masked_pred_prob` (big_vision's default 0.75) from the loop's RNG (checkpointed, so a resumed run
draws the same): parallel prediction (the target inputs replaced by the mask token, a
`masking_ratio` share of them, pad inputs always; bidirectional attention; every target predicted
at once) or autoregressive (inputs shifted right, causal). Cross-entropy over the target tokens
(never padding), normalised over the target tokens of the global batch (`loss_weight`).

LocCa-style extra decoder tasks (`task.decoder_tasks`: {caption, referring, grounded} -> weight),
each a prompt the decoder reads (prefix-LM in autoregressive mode, unmasked in parallel mode) and
a target it writes, built from a sample's shapes metadata (the synthetic data's JSON):
  caption    ""                        -> the caption
  referring  "What is at the top left?" -> "medium purple cross" (one shape, its cell named)
  grounded   "Where is each shape?"    -> "top left: medium purple cross; left: ..." (cell order)
A sample's task is drawn from its key (deterministic across epochs and resumes; a sample keeps its
task); samples without shapes metadata (real captions) always get the caption task.
"""

from __future__ import annotations

import json
import random
import zlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed, models
from ..config import Config, ConfigError, TaskConfig
from ..data.errors import BadSample
from ..data.preprocess import ImageTextDecoder, member_keys
from ..data.synthetic import POSITIONS, describe
from ..export import save_image_processor, save_tokenizer
from ..flops import TowerCost
from ..losses import sigmoid_loss
from ..models.cappa import CapPaDecoder, CapPaDecoderArgs
from .base import Captioner, ImageEncoder, Task, TaskOutput, register_task
from .common import build_tokenizer, load_tower, make_stream, tower_features, val_mixture
from .siglip import ImageTextDataConfig, SigLIPConfig, SigLIPTask

DECODER_TASKS = ("caption", "referring", "grounded")
GROUNDED_PROMPT = "Where is each shape?"


@dataclass
class DecoderConfig:
    """The caption decoder (core/models/cappa.py); 0 = the image tower's value. Positions:
    data.max_text_len."""

    layers: int = 6
    width: int = 0
    heads: int = 0
    mlp_dim: int = 0


@dataclass
class CaptioningConfig:
    """CapPa's objective (module docstring), shared by the cappa and siglip2 kinds."""

    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    masked_pred_prob: float = 0.75  # per example: parallel prediction, else autoregressive
    masking_ratio: float = 1.0  # parallel mode: share of target inputs masked (pads always)
    decoder_tasks: dict[str, float] = field(default_factory=lambda: {"caption": 1.0})


@dataclass
class CapPaConfig(CaptioningConfig, TaskConfig):
    pass


@dataclass
class SigLIP2Config(CaptioningConfig, SigLIPConfig):
    contrastive_weight: float = 1.0
    caption_weight: float = 1.0


# ---------------------------------------------------------------------------- data


class CaptionSampleDecoder:
    """A caption sample -> the image-text decoder's fields (pixel_values, input_ids,
    attention_mask: the caption as a text tower reads it) plus the caption decoder's:
    decoder_ids [L] (prompt, target, EOS, padding), decoder_prompt_len, decoder_len (real
    tokens), caption (the text) and attributes (the JSON metadata or None)."""

    def __init__(self, base: ImageTextDecoder, tasks: dict[str, float], seed: int):
        self.base = base
        self.tasks = {name: float(w) for name, w in tasks.items() if w > 0}
        self.seed = seed

    def __call__(self, sample: dict) -> dict:
        out = self.base(sample)
        caption = self.base.caption(sample)
        try:
            attributes = json.loads(sample["json"]) if "json" in sample else None
        except ValueError:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            attributes = None
        shapes = attributes.get("shapes") if isinstance(attributes, dict) else None
        task = self.pick(sample["__key__"], bool(shapes))
        prompt, target = decoder_texts(task, caption, shapes, sample["__key__"], self.seed)
        ids, prompt_len, length = self.tokenize(prompt, target)
        out.update(
            decoder_ids=ids, decoder_prompt_len=torch.tensor(prompt_len),
            decoder_len=torch.tensor(length), caption=caption, attributes=attributes,
        )  # fmt: skip
        return out

    def pick(self, key: str, has_shapes: bool) -> str:
        names = [n for n in self.tasks if has_shapes or n == "caption"]
        if not names:
            raise BadSample("no_decoder_task")  # only shapes tasks enabled, a plain caption
        rng = random.Random(zlib.crc32(f"{self.seed}/{key}".encode()))
        return rng.choices(names, weights=[self.tasks[n] for n in names])[0]

    def tokenize(self, prompt: str, target: str) -> tuple[torch.Tensor, int, int]:
        base, length = self.base, self.base.max_text_len
        prompt_ids = base.tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
        if not prompt:  # the caption exactly as the text tower reads it (with the tokenizer's
            ids, mask = base.tokenize(target)  # own special tokens, EOS, truncation)
            return ids, 0, int(mask.sum())
        target_ids = base.tokenizer(target, add_special_tokens=False)["input_ids"]
        room = length - len(prompt_ids) - 1
        if room < 1:
            raise BadSample("long_prompt")
        real = prompt_ids + target_ids[:room] + [base.eos_id]
        ids = torch.full((length,), base.pad_id, dtype=torch.int64)
        ids[: len(real)] = torch.tensor(real)
        return ids, len(prompt_ids), len(real)


def decoder_texts(task: str, caption: str, shapes, key: str, seed: int) -> tuple[str, str]:
    """(prompt, target) of one decoder task (module docstring)."""
    if task == "caption":
        return "", caption
    if task == "referring":
        rng = random.Random(zlib.crc32(f"{seed}/{key}/referring".encode()))
        shape = rng.choice(shapes)
        return f"What is at the {shape['position']}?", describe(shape)
    ordered = sorted(shapes, key=lambda s: POSITIONS.index(s["position"]))
    return GROUNDED_PROMPT, "; ".join(f"{s['position']}: {describe(s)}" for s in ordered)


def collate(samples: list[dict]) -> dict:
    """Stack tensors, list the rest (keys, captions, metadata)."""
    out = {}
    for name in samples[0]:
        values = [s[name] for s in samples]
        out[name] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return out


# ---------------------------------------------------------------------------- the objective


class CaptionHead(nn.Module):
    """The decoder and CapPa's objective on image tokens (module docstring)."""

    def __init__(self, cfg: CaptioningConfig, tokenizer, image_width: int, image_heads: int,
                 max_len: int):  # fmt: skip
        super().__init__()
        d = cfg.decoder
        width = d.width or image_width
        self.decoder = CapPaDecoder(CapPaDecoderArgs(
            vocab_size=len(tokenizer), hidden_size=width,
            intermediate_size=d.mlp_dim or 4 * width, num_hidden_layers=d.layers,
            num_attention_heads=d.heads or image_heads, max_position_embeddings=max_len,
            encoder_hidden_size=image_width,
        ))  # fmt: skip
        self.masked_pred_prob = cfg.masked_pred_prob
        self.masking_ratio = cfg.masking_ratio
        pad = tokenizer.pad_token_id
        self.pad_id = tokenizer.eos_token_id if pad is None else pad
        self.start_id = self.pad_id  # what shifted-right inputs begin with (big_vision: pad 0)
        self.eos_id = tokenizer.eos_token_id

    @staticmethod
    def target_mask(batch: dict) -> torch.Tensor:
        """[B, L] bool: the positions whose token is supervised (after the prompt, real)."""
        ids = batch["decoder_ids"]
        pos = torch.arange(ids.shape[1], device=ids.device)[None]
        return (pos >= batch["decoder_prompt_len"][:, None]) & (pos < batch["decoder_len"][:, None])

    def loss(self, encoded: torch.Tensor, batch: dict) -> tuple[torch.Tensor, dict]:
        """Sum of the target tokens' cross-entropy, and the metrics."""
        ids = batch["decoder_ids"]
        B, L = ids.shape
        targets = self.target_mask(batch)
        prompt = ~targets & (torch.arange(L, device=ids.device)[None]
                             < batch["decoder_prompt_len"][:, None])  # fmt: skip
        # The loop's RNG (checkpointed): drawn on the host so every device type draws alike.
        parallel = (torch.rand(B) < self.masked_pred_prob).to(ids.device)
        chosen = torch.rand(B, L) < self.masking_ratio
        masked = (chosen.to(ids.device) & targets) | ~(targets | prompt)  # pads always masked
        parallel_in = torch.where(masked, self.decoder.mask_token_id, ids)
        ar_in = torch.cat([torch.full_like(ids[:, :1], self.start_id), ids[:, :-1]], dim=1)
        inputs = torch.where(parallel[:, None], parallel_in, ar_in)
        # Parallel rows: one group (bidirectional). Autoregressive rows: the start token and the
        # prompt inputs form the prefix (positions <= prompt_len), the rest is causal.
        pos = torch.arange(L, device=ids.device)[None]
        mask_ar = (~parallel[:, None]) & (pos > batch["decoder_prompt_len"][:, None])
        logits = self.decoder(inputs, encoded, mask_ar)
        ce = F.cross_entropy(logits[targets].float(), ids[targets], reduction="none")
        rows = targets.nonzero()[:, 0]
        in_parallel = parallel[rows]
        metrics = {}
        for name, which in (("parallel", in_parallel), ("ar", ~in_parallel)):
            n = which.sum()
            metrics[f"{name}_loss"] = (ce.detach() * which).sum() / n.clamp(min=1)
        metrics["parallel_fraction"] = parallel.float().mean()
        return ce.sum(), metrics

    @torch.no_grad()
    def generate(self, encoded: torch.Tensor, prompt_ids: list[list[int]], max_new_tokens: int):
        """Greedy autoregressive decoding after each row's prompt -> new token ids per row
        (up to and excluding EOS). The decoder is rerun on the whole prefix at each step (no KV
        cache: captions are short and the image tokens are encoded once)."""
        B, limit = encoded.shape[0], self.decoder.max_length
        rows = [[self.start_id, *p] for p in prompt_ids]
        done = [False] * B
        new: list[list[int]] = [[] for _ in range(B)]
        dev, inputs = encoded.device, None

        def pad():  # sharded evaluation: a forward to keep pace with other ranks, dropped
            ids, mask_ar = inputs or (torch.full((B, 1), self.start_id), torch.zeros(B, 1) > 0)
            self.decoder(ids.to(dev), encoded, mask_ar.to(dev))

        for step in range(max_new_tokens + 1):
            length = max(len(r) for r in rows)
            if distributed.finished(step == max_new_tokens or length > limit or all(done), pad):
                break
            ids = torch.full((B, length), self.pad_id, dtype=torch.long)
            last = torch.zeros(B, dtype=torch.long)
            prompt_len = torch.zeros(B, dtype=torch.long)
            for i, r in enumerate(rows):
                ids[i, : len(r)] = torch.tensor(r)
                last[i] = len(r) - 1
                prompt_len[i] = len(prompt_ids[i])
            pos = torch.arange(length)[None]
            mask_ar = pos > prompt_len[:, None]
            inputs = (ids, mask_ar)
            logits = self.decoder(ids.to(dev), encoded, mask_ar.to(dev))
            nxt = logits[torch.arange(B, device=dev), last.to(dev)].argmax(-1).tolist()
            for i, token in enumerate(nxt):
                if done[i]:
                    continue
                if token == self.eos_id:
                    done[i] = True
                    continue
                new[i].append(token)
                rows[i].append(token)
        return new

    @torch.no_grad()
    def log_likelihood(self, encoded: torch.Tensor, ids: torch.Tensor, length: torch.Tensor):
        """[B] log p(ids[:length] | image) autoregressively (no prompt): the scoring classifier."""
        B, L = ids.shape
        inputs = torch.cat([torch.full_like(ids[:, :1], self.start_id), ids[:, :-1]], dim=1)
        pos = torch.arange(L, device=ids.device)[None]
        logits = self.decoder(inputs, encoded, pos > 0).float()
        logp = logits.log_softmax(-1).gather(-1, ids[..., None])[..., 0]
        return (logp * (pos < length[:, None])).sum(-1)


class CaptionerMixin(Captioner):
    """Captioner capability and data plumbing of a task with `self.captioner` (a CaptionHead),
    `self.text_decoder` (a CaptionSampleDecoder), `self.tokenizer` and `image_tokens(pixels)`.
    Listed after Task in a kind's bases: FSDP2 swaps the task's class for a subclass, which
    Python refuses when a mixin comes before nn.Module."""

    def caption(self, pixel_values: torch.Tensor, max_new_tokens: int) -> list[str]:
        encoded = self.image_tokens(pixel_values)
        new = self.captioner.generate(encoded, [[] for _ in range(len(encoded))], max_new_tokens)
        return [self.tokenizer.decode(t, skip_special_tokens=True).strip() for t in new]

    def score_texts(self, pixel_values: torch.Tensor, texts: list[str]) -> torch.Tensor:
        encoded = self.image_tokens(pixel_values)
        scores = []
        for text in texts:
            ids, mask = self.text_decoder.base.tokenize(text)
            n = encoded.shape[0]
            ids = ids.to(encoded.device)[None].expand(n, -1)
            length = mask.sum().to(encoded.device).expand(n)
            scores.append(self.captioner.log_likelihood(encoded, ids, length).float().cpu())
        return torch.stack(scores, dim=1)

    def caption_streams(self, dist, train: bool, batch_size: int = 0, subsets=None):
        urls = self.cfg.data.train if train else self.cfg.data.val
        mixture = None if train else val_mixture(self.cfg, subsets)
        return make_stream(self.cfg, dist, urls, self.text_decoder, train=train, collate=collate,
                           batch_size=batch_size, mixture=mixture)  # fmt: skip

    def captioner_activations(self, keeps: dict[str, bool]) -> dict[str, bool]:
        """The decoder reads the image tower's tokens: it keeps activations when either trains."""
        return {**keeps, "captioner.decoder": keeps["vision"] or keeps["captioner.decoder"]}

    def captioner_logits(self) -> tuple[int, int]:
        return self.cfg.data.max_text_len, self.captioner.decoder.lm_head.out_features

    def decoder_costs(self, image_width: int, upstream: bool) -> dict[str, TowerCost]:
        """Self-attention blocks on the text tokens; the cross-attention keys and values on the
        image tokens (their own cost); the logits only at targets."""
        dec = self.captioner.decoder
        kv = [m for layer in dec.layers for m in (layer.cross_attn.k_proj, layer.cross_attn.v_proj)]
        c = dec.config
        return {
            "decoder": TowerCost.of(dec, c.num_layers, c.hidden_size, grad_upstream=upstream,
                                    exclude=(dec.lm_head, *kv)),
            "decoder_kv": TowerCost.of(nn.ModuleList(kv), 0, 0, grad_upstream=upstream),
            "decoder_head": TowerCost.of(dec.lm_head, 0, 0, grad_upstream=True),
        }  # fmt: skip

    def decoder_flops(self, batch: dict, image_tokens: int) -> float:
        c = self.costs
        n, L = batch["decoder_ids"].shape
        rows = n * L
        # self-attention L x L and cross-attention L x image_tokens pairs per row
        targets = int(CaptionHead.target_mask(batch).sum())
        return (c["decoder"].flops(rows, n * (L * L + L * image_tokens))
                + c["decoder_kv"].flops(n * image_tokens, 0)
                + c["decoder_head"].flops(targets, 0))  # fmt: skip


def check_captioning(cfg: Config) -> None:
    t, length = cfg.task, cfg.data.max_text_len
    if not 0.0 <= t.masked_pred_prob <= 1.0:
        raise ConfigError(f"task.masked_pred_prob={t.masked_pred_prob}: must be in [0, 1]")
    if not 0.0 < t.masking_ratio <= 1.0:
        raise ConfigError(f"task.masking_ratio={t.masking_ratio}: must be in (0, 1]")
    unknown = sorted(set(t.decoder_tasks) - set(DECODER_TASKS))
    if unknown:
        raise ConfigError(
            f"task.decoder_tasks: unknown {unknown}; valid: {', '.join(DECODER_TASKS)}"
        )
    if any(w < 0 for w in t.decoder_tasks.values()) or not any(t.decoder_tasks.values()):
        raise ConfigError(f"task.decoder_tasks={t.decoder_tasks}: weights >= 0, one > 0")
    if length < 4:
        raise ConfigError(f"data.max_text_len={length}: the decoder needs a few positions")


# ---------------------------------------------------------------------------- the kinds


@register_task
class CapPaTask(Task, CaptionerMixin, ImageEncoder):
    kind = "cappa"
    Config = CapPaConfig
    DataConfig = ImageTextDataConfig

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        for name in ("image_keys", "text_keys"):
            if not member_keys(getattr(cfg.data, name)):
                raise ConfigError(f"data.{name}: names no member extension (e.g. jpg;png)")
        check_captioning(cfg)
        self.tokenizer = build_tokenizer(cfg)
        self.vision = load_tower(cfg.model.vision, cfg.model.vision_config, cfg.model.image_size)
        self.captioner = CaptionHead(cfg.task, self.tokenizer, self.vision.hidden_size,
                                     self.vision.num_heads, cfg.data.max_text_len)  # fmt: skip
        self.text_decoder = CaptionSampleDecoder(image_text_decoder(cfg, self.vision,
                                                                    self.tokenizer),
                                                 cfg.task.decoder_tasks, cfg.seed)  # fmt: skip

    def blocks(self) -> dict[str, nn.ModuleList]:
        return {"vision": self.vision.blocks, "captioner.decoder": self.captioner.decoder.layers}

    def tokens_per_sample(self) -> dict[str, int]:
        return {"vision": self.vision.num_tokens, "captioner.decoder": self.cfg.data.max_text_len}

    def keeps_activations(self) -> dict[str, bool]:
        return self.captioner_activations(super().keeps_activations())

    def logits_per_sample(self) -> tuple[int, int]:
        return self.captioner_logits()

    def image_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vision(pixel_values)

    def loss_weight(self, batch: dict) -> float:
        return float(CaptionHead.target_mask(batch).sum())  # the decoder's target tokens

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return tower_features(self.vision, pixel_values)

    def preprocess_image(self, data: bytes) -> torch.Tensor:
        return self.text_decoder.base.load_image(data)

    def forward(self, batch: dict) -> TaskOutput:
        loss, metrics = self.captioner.loss(self.vision(batch["pixel_values"]), batch)
        return TaskOutput(loss=loss, samples=len(batch["pixel_values"]),
                          tokens=batch["decoder_len"].sum(), metrics=metrics)  # fmt: skip

    def tower_costs(self) -> dict[str, TowerCost]:
        vision = TowerCost.of(self.vision, len(self.vision.blocks), self.vision.hidden_size)
        return {"vision": vision,
                **self.decoder_costs(self.vision.hidden_size, vision.grad_flows)}  # fmt: skip

    def flops(self, batch: dict) -> float:
        n, p = len(batch["pixel_values"]), self.vision.num_tokens
        return self.costs["vision"].flops(n * p, n * p * p) + self.decoder_flops(batch, p)

    def train_stream(self, dist):
        return self.caption_streams(dist, train=True)

    def val_stream(self, dist, batch_size: int, subsets: list[str] | None = None):
        return self.caption_streams(dist, train=False, batch_size=batch_size, subsets=subsets)

    def export_hf(self, out, state: dict) -> None:
        """vision/: the image tower in HF layout (+ the image processor of its training
        preprocessing); decoder/: the caption decoder (vlscale's format) + the tokenizer."""
        export_tower_and_decoder(self, out)

    def model_card(self) -> dict:
        return {"tags": ["cappa", "image-captioning", "vision-encoder"],
                "notes": decoder_notes(self)}  # fmt: skip


@register_task
class SigLIP2Task(SigLIPTask, CaptionerMixin):
    """The siglip kind plus CapPa's decoder on the image tower (module docstring)."""

    kind = "siglip2"
    Config = SigLIP2Config

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        check_captioning(cfg)
        t = cfg.task
        if (
            t.contrastive_weight < 0
            or t.caption_weight < 0
            or not (t.contrastive_weight or t.caption_weight)
        ):
            raise ConfigError("task.contrastive_weight, task.caption_weight: >= 0, one > 0")
        self.captioner = CaptionHead(t, self.tokenizer, self.vision.hidden_size,
                                     self.vision.num_heads, cfg.data.max_text_len)  # fmt: skip
        self.text_decoder = CaptionSampleDecoder(self.decoder, t.decoder_tasks, cfg.seed)

    def blocks(self) -> dict[str, nn.ModuleList]:
        return {**super().blocks(), "captioner.decoder": self.captioner.decoder.layers}

    def tokens_per_sample(self) -> dict[str, int]:
        return {**super().tokens_per_sample(), "captioner.decoder": self.cfg.data.max_text_len}

    def keeps_activations(self) -> dict[str, bool]:
        return self.captioner_activations(super().keeps_activations())

    def logits_per_sample(self) -> tuple[int, int]:
        return self.captioner_logits()

    def image_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vision(pixel_values)

    def loss_weight(self, batch: dict) -> float:
        return float(CaptionHead.target_mask(batch).sum())  # the decoder's target tokens

    def forward(self, batch: dict) -> TaskOutput:
        t = self.cfg.task
        hidden = self.vision(batch["pixel_values"])
        image = self.embed_image(hidden)
        text = self.encode_text(batch["input_ids"], batch["attention_mask"])
        contrastive = sigmoid_loss(image, text, self.logit_scale, self.logit_bias,
                                   chunk_size=self.loss_chunk_size)  # fmt: skip
        caption, metrics = self.captioner.loss(hidden, batch)
        # The loop divides by the global batch's target tokens (loss_weight): scaling the
        # micro-batch's mean sigmoid loss by its own target tokens keeps it a (token-weighted)
        # mean over micro-batches, on the scale of the decoder's per-token loss.
        tokens = CaptionHead.target_mask(batch).sum()
        loss = t.caption_weight * caption + t.contrastive_weight * contrastive * tokens
        return TaskOutput(
            loss=loss, samples=image.shape[0], tokens=batch["attention_mask"].sum(),
            metrics={**metrics, "contrastive_loss": contrastive.detach(),
                     "caption_loss": caption.detach() / tokens.clamp(min=1),
                     "temperature": self.logit_scale.detach().exp(),
                     "logit_bias": self.logit_bias.detach()},
        )  # fmt: skip

    def tower_costs(self) -> dict[str, TowerCost]:
        costs = super().tower_costs()
        return {**costs, **self.decoder_costs(self.vision.hidden_size, costs["vision"].grad_flows)}

    def flops(self, batch: dict) -> float:
        return super().flops(batch) + self.decoder_flops(batch, self.vision.num_tokens)

    def train_stream(self, dist):
        return self.caption_streams(dist, train=True)

    def val_stream(self, dist, batch_size: int, subsets: list[str] | None = None):
        return self.caption_streams(dist, train=False, batch_size=batch_size, subsets=subsets)

    def export_hf(self, out, state: dict) -> None:
        """The siglip kind's towers, plus decoder/ (the caption decoder and the tokenizer)."""
        super().export_hf(out, state)
        models.save_pretrained(self.captioner.decoder, out / "decoder")
        save_tokenizer(self.tokenizer, out / "decoder")

    def model_card(self) -> dict:
        card = super().model_card()
        return {"tags": [*card["tags"], "siglip2", "image-captioning"],
                "notes": card["notes"] + "\n" + decoder_notes(self)}  # fmt: skip


def image_text_decoder(cfg: Config, vision, tokenizer) -> ImageTextDecoder:
    return ImageTextDecoder(
        image_size=vision.image_size, mean=vision.image_mean, std=vision.image_std,
        tokenizer=tokenizer, max_text_len=cfg.data.max_text_len, max_pixels=cfg.data.max_pixels,
        max_caption_bytes=cfg.data.max_caption_bytes, image_keys=cfg.data.image_keys,
        text_keys=cfg.data.text_keys,
    )  # fmt: skip


def export_tower_and_decoder(task, out) -> None:
    models.save_pretrained(task.vision, out / "vision")
    save_image_processor(task.vision, out / "vision", crop=task.text_decoder.base.load_image.crop)
    models.save_pretrained(task.captioner.decoder, out / "decoder")
    save_tokenizer(task.tokenizer, out / "decoder")


def decoder_notes(task) -> str:
    t = task.cfg.task
    return "\n".join([
        "- vision/ is the image tower in Hugging Face layout (e.g. `SiglipVisionModel`); a VLM "
        "recipe uses it as `model.vision`.",
        f"- decoder/ is the caption decoder ({t.decoder.layers} blocks; CapPa, "
        f"masked_pred_prob {t.masked_pred_prob}, decoder tasks {dict(t.decoder_tasks)}) in "
        "vlscale's format: `core.models.from_pretrained('decoder')`; it cross-attends to every "
        "output token of vision/.",
    ])  # fmt: skip
