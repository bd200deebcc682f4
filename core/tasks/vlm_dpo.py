"""Staged VLM, stage 4: preference optimisation (DPO and its TRL variants, core/losses.py).

Samples are preference pairs {image, prompt, chosen, rejected}: the shards of `vlscale shards
rlaif-v` (core/data/preference_sources.py), or the synthetic shapes shards, whose records carry
the same fields under "preference". Each pair becomes two sequences rendered with the chat
template as SFT samples are (core/data/chat.py): [system], user (image + prompt), assistant
(chosen, or rejected); supervised on the response and its end-of-turn token only. Both sequences
of every pair are packed into the same rows as any SFT sample (core/data/packing.py); each pair's
image is encoded once (one vision forward per image of the micro-batch) and its embeddings are
placed at the image pads of both sequences.

A sequence's log-probability is the sum of its supervised tokens' log-probs, summed per
sequence out of the packed rows. The loss of a pair is `dpo_loss` of its policy and reference
log-probs (`task.dpo.loss`: sigmoid, robust, hinge or ipo; IPO takes per-token means), plus
`task.dpo.sft_weight` x the chosen response's mean per-token NLL (RPO's SFT term, averaged per
pair here where TRL averages over the batch's chosen tokens), plus, with `task.dpo.mdpo`, mDPO's
conditional and anchor terms (Wang et al. 2024, luka-group/mDPO's trainer): a third sequence per
pair, the chosen response on a random crop of 1-20% of each image resized back (drawn from the
sample key: the same crop on every rank, engine and resume), and -ls(beta ((pc - pcrop) -
(rc - rcrop))) - ls(beta (pc - rc)) per pair (both sigmoid; at step 1 a pair's loss is then
3 ln 2). `forward` returns the sum over
the micro-batch's pairs and `loss_weight` is its number of pairs: every pair of the global batch
weighs the same (core/tasks/base.py, rule 3).

The reference model (`task.dpo.reference`):

- `lora` (the default): the policy is the LM with fresh LoRA adapters (B = 0, so policy =
  reference at step 1) on top of `task.init_from`'s weights, whose own adapters are merged first;
  the reference is the same LM with its adapters switched off, run under no_grad. Anything
  trainable but LoRA weights is a ConfigError: the projector (or the tower) would drift under the
  reference and it would stop being the model the pairs are scored against.
- `copy`: a frozen copy of the projector and LM (`reference.*`, taken after `init_from` is
  loaded) for a fully fine-tuned LM. It is a module of the task, so engines shard it (its own
  unit under FSDP) and give it no optimizer state (it never trains). Checkpoints and exports
  leave it out (`rebuilt_prefixes`): every build of the task rebuilds it from init_from, and a
  resume whose rebuilt copy differs from the one the run started with (init_from changed) is
  refused (core/loop.py, check_rebuilt). The vision tower must stay frozen: both models read
  it.
- `precomputed`: the reference log-probs of every pair of data.train and data.val, images
  included, read from `task.dpo.reference_logps`, a JSON file `precompute_reference_logps`
  writes (by default beside the shards) from the policy as it starts (with mDPO, also the chosen
  response's on the crop, which the sample key draws: the same crop every time). It holds the
  model's hash (every weight of the starting model but LoRA adapters, which start as a no-op)
  and each pair's (its image bytes and both rendered sequences): a file of another model is a
  ConfigError when the task is built, a pair whose hash differs (other shards, template,
  tokenizer) stops the run, and a pair the file lacks is skipped and counted (BadSample
  "no_reference_logps"). No reference forward runs.

Metrics, TRL's names, over the micro-batch's pairs of every rank (one all-reduce in training;
the last micro-batch's under gradient accumulation): rewards/chosen, rewards/rejected,
rewards/margins, rewards/accuracies (chosen reward > rejected reward), logps/chosen and
logps/rejected (the policy's). Every rank runs the same modules in the same order (one blank
image for a micro-batch without images, as in stage 1-3), so ZeRO-3 and FSDP never hang.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from torch import nn

from .. import deferred_init, distributed, lazy_tensors
from ..config import Config, ConfigError
from ..data.chat import IGNORE, ChatProcessor, VLMDecoder
from ..data.cot import cot_images, read_cot_record
from ..data.errors import BadSample
from ..data.packing import ROW_MULTIPLE, balanced_rows, check_image_count
from ..data.preference_sources import preference_fields
from ..data.shards import open_shard
from ..data.stream import expand_urls
from ..flops import TowerCost
from ..losses import DPO_KINDS, dpo_loss
from ..models.vlm import splice_images
from .base import PreferenceScorer, TaskOutput, register_task
from .common import vision_lm_costs
from .vlm import VLMConfig, VLMDataConfig, VLMTask, on_meta

log = logging.getLogger(__name__)
LOGPS_FORMAT = "vlscale-dpo-reference-logps/1"

# A sequence's side; its index in the batch is sides * pair + side (sides: 2, or 3 with mDPO's
# chosen response on the cropped image).
CHOSEN, REJECTED, CROPPED = 0, 1, 2
CROP_AREA = (0.01, 0.2)  # mDPO's corrupted image: a crop of 1-20% of the image, resized back


@dataclass
class DPOConfig:
    """`task.dpo`. Defaults are TRL's DPOConfig (beta 0.1, sigmoid, no smoothing, no SFT term)."""

    beta: float = 0.1
    loss: Literal["sigmoid", "robust", "hinge", "ipo"] = "sigmoid"
    label_smoothing: float = 0.0  # cDPO / robust DPO's label-flip rate (sigmoid, robust only)
    sft_weight: float = 0.0  # RPO's alpha: x the chosen response's mean token NLL per pair
    reference: Literal["lora", "copy", "precomputed"] = "lora"
    reference_logps: str = ""  # reference precomputed: the file precompute_reference_logps wrote
    # mDPO (Wang et al. 2024): + -ls(beta ((pc - pcrop) - (rc - rcrop))), the chosen response
    # preferred on the image over on a crop of it, and + -ls(beta (pc - rc)), the anchor (delta 0)
    mdpo: bool = False


@dataclass
class VLMDPOConfig(VLMConfig):
    """Stage 4 trains the LM (`stage: sft`) with LoRA (reference `lora`, or `precomputed`) or
    fully (`copy`, or `precomputed`)."""

    stage: Literal["align", "sft"] = "sft"
    lm_tuning: Literal["full", "lora"] = "lora"
    dpo: DPOConfig = field(default_factory=DPOConfig)


@register_task
class VLMDPOTask(VLMTask, PreferenceScorer):
    kind = "vlm_dpo"
    Config = VLMDPOConfig
    DataConfig = VLMDataConfig

    def __init__(self, cfg: Config, load_reference: bool = True):
        """`load_reference` False builds a `precomputed` task without its file (to write it)."""
        self._check_modes(cfg)
        super().__init__(cfg)  # init_from loaded (its adapters merged), then fresh adapters
        if cfg.task.dpo.reference in ("copy", "precomputed"):
            # The copy, and the starting model's digest, are computed from the weights: under
            # fsdp these are read whole on every rank here (stand-ins until now).
            lazy_tensors.materialize(self)
            deferred_init.materialize(self)  # random weights too (core/deferred_init.py)
        d = cfg.data
        common = dict(image_size=self.vision.image_size, mean=self.vision.image_mean,
                      std=self.vision.image_std, max_images=d.max_images,
                      max_pixels=d.max_pixels)  # fmt: skip
        reference = None
        if cfg.task.dpo.reference == "precomputed" and load_reference and not on_meta(self):
            reference = read_reference_logps(cfg.task.dpo.reference_logps, model_hash(self))
        self.train_decoder = PreferenceTrainDecoder(
            self.processor, max_seq_len=d.max_seq_len, reference=reference,
            crop=cfg.task.dpo.mdpo, **common,
        )  # fmt: skip
        self.eval_decoder = PreferencePromptDecoder(self.processor, **common)
        if cfg.task.dpo.reference == "copy":
            # Taken after init_from is loaded and before any step: the policy as it starts.
            self.reference = ReferenceModel(self.projector, self.lm, self.image_token_id)

    @staticmethod
    def _check_modes(cfg: Config) -> None:
        t = cfg.task
        if t.stage != "sft":
            raise ConfigError("task.kind=vlm_dpo trains the LM: task.stage must be sft")
        if t.dpo.reference == "lora" and t.lm_tuning != "lora":
            raise ConfigError(
                "task.dpo.reference=lora is the LM with its adapters off: set task.lm_tuning: "
                "lora, or task.dpo.reference: copy to fine-tune the whole LM"
            )
        if t.dpo.reference == "precomputed" and not t.dpo.reference_logps:
            raise ConfigError(
                "task.dpo.reference=precomputed: set task.dpo.reference_logps to the file "
                "precompute_reference_logps wrote (core/tasks/vlm_dpo.py)"
            )
        if t.dpo.reference == "copy" and t.lm_tuning != "full":
            raise ConfigError(
                "task.dpo.reference=copy with LoRA would copy the LM for nothing: use "
                "task.dpo.reference: lora (the adapters off are the reference)"
            )
        if cfg.data.cot_format:
            raise ConfigError("task.kind=vlm_dpo reads preference pairs: unset data.cot_format")
        if t.dpo.loss not in DPO_KINDS:
            raise ConfigError(f"task.dpo.loss={t.dpo.loss!r}; the kinds are {DPO_KINDS}")
        if t.dpo.sft_weight < 0:
            raise ConfigError(f"task.dpo.sft_weight={t.dpo.sft_weight} must be >= 0")

    def blocks(self) -> dict[str, nn.ModuleList]:
        blocks = super().blocks()
        if self.cfg.task.dpo.reference == "copy":
            blocks["reference"] = self.reference.lm.layers  # frozen: one FSDP unit
        return blocks

    def rebuilt_prefixes(self) -> tuple[str, ...]:
        # the copy is init_from's projector and LM, rebuilt by every build of this task
        return ("reference.",) if self.cfg.task.dpo.reference == "copy" else ()

    def tokens_per_sample(self) -> dict[str, int]:
        # a sample is a pair: its chosen and rejected sequences, each up to a row
        tokens = {**super().tokens_per_sample(), "lm": 2 * self.cfg.data.max_seq_len}
        if self.cfg.task.dpo.reference == "copy":
            tokens["reference"] = 2 * self.cfg.data.max_seq_len
        return tokens

    def logits_per_sample(self) -> tuple[int, int]:
        positions, vocab = super().logits_per_sample()
        return 2 * positions, vocab

    def default_trainable(self) -> list[str]:
        if self.cfg.task.dpo.reference == "lora":
            return ["lm.*.lora_*"]  # only the adapters: the reference is the rest, as it is
        return ["projector.*", "lm.*.lora_*" if self.cfg.task.lm_tuning == "lora" else "lm.*"]

    def tower_costs(self) -> dict[str, TowerCost]:
        # build_task calls this once the trainable patterns are set: the modes' rules on what
        # trains can only be checked here (`task.trainable` may override the defaults).
        trainable = [n for n, p in self.named_parameters() if p.requires_grad]
        if self.cfg.task.dpo.reference == "lora":
            others = [n for n in trainable if "lora_" not in n]
            if others:
                raise ConfigError(
                    "task.dpo.reference=lora: only LoRA weights may train (the reference is "
                    f"every other weight as it is), but {others[0]!r} would (task.trainable)"
                )
        elif self.cfg.task.dpo.reference == "copy":
            bad = [n for n in trainable if n.startswith(("reference.", "vision."))]
            if bad:
                raise ConfigError(
                    f"task.dpo.reference=copy: {bad[0]!r} would train; the reference copy and "
                    "the vision tower (which policy and reference share) must stay frozen"
                )
        return vision_lm_costs(self.vision, self.projector, self.lm)

    # ------------------------------------------------------------------ model
    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[n, 3, S, S] -> the features the projector reads; n = 0 runs one blank image (every
        rank runs the tower). The tower is frozen in stage 4 (checked above)."""
        if pixel_values.shape[0] == 0:
            size = self.vision.image_size
            pixel_values = pixel_values.new_zeros(1, 3, size, size)
        with torch.no_grad():
            if self.feature_layer:
                features = self.vision.hidden_state(pixel_values, self.feature_layer)
            else:
                features = self.vision(pixel_values)
        return features[:, 1:] if self.vision.has_cls_token else features

    @contextlib.contextmanager
    def adapters_off(self):
        """The LM without its LoRA adapters (peft's flag on each adapted layer, set directly:
        peft's enable_adapters would also flip the adapters' requires_grad, which the engines
        read once)."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        layers = [m for m in self.lm.modules() if isinstance(m, BaseTunerLayer)]
        for layer in layers:
            layer._disable_adapters = True
        try:
            yield
        finally:
            for layer in layers:
                layer._disable_adapters = False

    def reference_logps(self, batch: dict, features, policy_embeds) -> torch.Tensor:
        if self.cfg.task.dpo.reference == "precomputed":
            return batch["reference_logps"].reshape(-1)  # [P, 2] -> sequence 2p + side
        with torch.no_grad():
            if self.cfg.task.dpo.reference == "lora":  # the embeddings train nothing: shared
                with self.adapters_off():
                    return sequence_logps(self.lm, policy_embeds, batch)[0]
            return self.reference(batch, features)

    def loss_weight(self, batch: dict) -> float:
        """Pairs: the loss is a sum of per-pair losses."""
        return float(batch["num_pairs"])

    def pair_logps(self, batch: dict) -> tuple[torch.Tensor, ...]:
        """(policy, reference, log-prob sums, supervised token counts), each [P, sides]; policy
        and reference are what the loss compares (IPO's per-token means, else the sums)."""
        features = self.vision_features(batch["pixel_values"])  # once per image
        embeds = pair_embeddings(self.lm, self.projector, batch, features, self.image_token_id)
        ref_logps = self.reference_logps(batch, features, embeds)
        logps, counts = sequence_logps(self.lm, embeds, batch)
        if self.cfg.task.dpo.loss == "ipo":  # IPO's per-token means (core/losses.py)
            policy, reference = logps / counts.clamp(min=1), ref_logps / counts.clamp(min=1)
        else:
            policy, reference = logps, ref_logps
        sides = batch["sides"]
        return tuple(t.view(-1, sides) for t in (policy, reference, logps, counts))

    def pair_loss(self, policy: torch.Tensor, reference: torch.Tensor):
        d = self.cfg.task.dpo
        return dpo_loss(policy[:, CHOSEN], policy[:, REJECTED], reference[:, CHOSEN],
                        reference[:, REJECTED], beta=d.beta, kind=d.loss,
                        label_smoothing=d.label_smoothing)  # fmt: skip

    def pair_rewards(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.pair_loss(*self.pair_logps(batch)[:2])
        return out.chosen_rewards, out.rejected_rewards

    def forward(self, batch: dict) -> TaskOutput:
        d = self.cfg.task.dpo
        policy, reference, logps, counts = self.pair_logps(batch)
        out = self.pair_loss(policy, reference)
        loss = out.losses.sum()
        # the preference term alone, per pair: ln 2 at the first step with policy = reference
        # (sigmoid), whatever the SFT and mDPO terms add to `loss`
        extra = {"dpo_loss": out.losses.detach().sum()}
        if d.mdpo:  # sigmoid terms, as mDPO's (whatever task.dpo.loss is)
            conditional = dpo_loss(
                policy[:, CHOSEN],
                policy[:, CROPPED],
                reference[:, CHOSEN],
                reference[:, CROPPED],
                beta=d.beta,
                kind="sigmoid",
            ).losses
            anchor = -F.logsigmoid(d.beta * (policy[:, CHOSEN] - reference[:, CHOSEN].detach()))
            loss = loss + conditional.sum() + anchor.sum()
            extra |= {"mdpo/conditional_loss": conditional.detach().sum(),
                      "mdpo/anchor_loss": anchor.detach().sum()}  # fmt: skip
        if d.sft_weight:
            nll = -(logps[:, CHOSEN] / counts[:, CHOSEN].clamp(min=1)).sum()
            loss = loss + d.sft_weight * nll
            extra["sft_loss"] = nll.detach()  # unweighted: the chosen responses' token NLL
        metrics = self.pair_metrics(out, logps.detach(), extra)
        metrics["packing_efficiency"] = batch["real_tokens"] / batch["input_ids"].numel()
        return TaskOutput(loss=loss, samples=batch["num_pairs"],
                          tokens=batch["supervised_tokens"], metrics=metrics)  # fmt: skip

    def pair_metrics(self, out, logps: torch.Tensor, extra: dict) -> dict[str, torch.Tensor]:
        """TRL's reward and log-prob means (and `extra`'s sums as means) over every rank's
        pairs of this micro-batch."""
        chosen, rejected = out.chosen_rewards, out.rejected_rewards
        sums = torch.stack([
            chosen.sum(), rejected.sum(), (chosen > rejected).sum().to(chosen.dtype),
            logps[:, CHOSEN].sum().to(chosen.dtype), logps[:, REJECTED].sum().to(chosen.dtype),
            torch.tensor(float(len(chosen)), dtype=chosen.dtype, device=chosen.device),
            *[v.to(chosen.dtype) for v in extra.values()],
        ])  # fmt: skip
        # Every rank trains in lockstep, so one all-reduce here is safe; evaluation may give
        # ranks different batch counts, so it reports each rank's own pairs.
        if self.training and torch_dist.is_initialized():
            torch_dist.all_reduce(sums)
        c, r, right, lc, lr, _, *rest = (sums / sums[5].clamp(min=1)).unbind()
        return {"rewards/chosen": c, "rewards/rejected": r, "rewards/margins": c - r,
                "rewards/accuracies": right, "logps/chosen": lc, "logps/rejected": lr,
                **dict(zip(extra, rest))}  # fmt: skip

    # ------------------------------------------------------------------ results
    def export_hf(self, out, state: dict) -> None:
        """As stage 1-3's; the reference copy (mode `copy`) is left out."""
        super().export_hf(out, {k: v for k, v in state.items() if not k.startswith("reference.")})

    def model_card(self) -> dict:
        card = super().model_card()
        d = self.cfg.task.dpo
        card["tags"] = card["tags"] + ["dpo"]
        card["notes"] += (f"\n- Stage 4: preference optimisation ({d.loss} loss, beta {d.beta}, "
                          f"reference: {d.reference}).")  # fmt: skip
        return card

    # ------------------------------------------------------------------ data
    def packed_collate(self) -> PreferenceCollate:
        return PreferenceCollate(
            self.cfg.data.max_seq_len,
            self.tokenizer.pad_token_id,
            self.image_token_id,
            self.tokens_per_image,
        )


# ---------------------------------------------------------------------------- model
def pair_embeddings(lm, projector, batch: dict, features, image_token_id: int) -> torch.Tensor:
    """The LM's input embeddings of a packed batch, `features` (vision_features) projected."""
    input_ids = batch["input_ids"]
    embeds = lm.embed(input_ids)
    images = projector(features)
    if batch["pixel_values"].shape[0] == 0:  # the blank image: joined with weight 0
        return embeds + 0.0 * images.sum().to(embeds.dtype)
    # Each pair's image, encoded once, at the pads of its chosen and its rejected sequence.
    return splice_images(embeds, input_ids, images[batch["image_index"]], image_token_id)


def sequence_logps(lm, embeds: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-prob sums [sides * P], supervised token counts [sides * P]) of the batch's
    sequences (sequence sides * p + side), out of the packed rows."""
    labels, segments = batch["labels"], batch["segment_ids"]
    hidden = lm(inputs_embeds=embeds, mask_kind="packed", segment_ids=segments, return_hidden=True)
    where = (labels[:, 1:] != IGNORE) & (segments[:, 1:] == segments[:, :-1])
    logits = lm.lm_head(hidden[:, :-1][where]).float()  # only where a target is supervised
    token_logps = -F.cross_entropy(logits, labels[:, 1:][where], reduction="none")
    owner = batch["sequence_ids"][:, 1:][where]
    n = batch["sides"] * batch["num_pairs"]
    logps = token_logps.new_zeros(n).index_add(0, owner, token_logps)
    counts = token_logps.new_zeros(n).index_add(0, owner, torch.ones_like(token_logps))
    return logps, counts


class ReferenceModel(nn.Module):
    """Mode `copy`'s reference: frozen copies of the projector and LM, with one forward from the
    vision features to the sequence log-probs, so that an engine that gathers the module for its
    forward (FSDP: the frozen tower is one unit) holds the full copy during that call only."""

    def __init__(self, projector: nn.Module, lm: nn.Module, image_token_id: int):
        super().__init__()
        self.projector, self.lm = copy.deepcopy(projector), copy.deepcopy(lm)
        self.image_token_id = image_token_id
        self.requires_grad_(False)

    def forward(self, batch: dict, features: torch.Tensor) -> torch.Tensor:
        embeds = pair_embeddings(self.lm, self.projector, batch, features, self.image_token_id)
        return sequence_logps(self.lm, embeds, batch)[0]


# ---------------------------------------------------------------------------- data
class _PreferenceDecoder(VLMDecoder):
    def _read(self, sample: dict) -> tuple[dict, dict, list[bytes]]:
        record = read_cot_record(sample)  # json with an optional int num_images
        images = cot_images(sample)  # numbered members, or the one `{key}.{ext}`
        if record.get("num_images", len(images)) != len(images):
            raise BadSample("image_count_mismatch")
        if len(images) > self.max_images:
            raise BadSample("too_many_images")
        fields = preference_fields(record)
        for name in fields:
            if not fields[name].strip():
                raise BadSample(f"empty_{name}")
        if fields["chosen"].strip() == fields["rejected"].strip():
            raise BadSample("same_responses")
        return record, fields, images


class PreferenceTrainDecoder(_PreferenceDecoder):
    """Raw pair -> {"pixel_values" [n, 3, S, S], "chosen_ids", "chosen_labels", "rejected_ids",
    "rejected_labels" (int64), "pair_key"}: prompt + each response rendered as a one-turn SFT
    sample (labels on the response and its end-of-turn token). BadSample reasons: those of reading
    (missing_json, bad_json, missing_<field>, empty_<field>, same_responses,
    image_count_mismatch, too_many_images, special_token_in_text, bad_image) and too_long
    (either sequence over max_seq_len: skipped, never truncated).

    With `reference` (mode `precomputed`: {pair_key: {"hash", "chosen", "rejected"[,
    "cropped"]}}) it adds "reference_logps" (float32 [2]: chosen, rejected; [3] with mDPO's
    crops: + the chosen response on them) and "sample_hash", and a pair the table
    lacks is BadSample("no_reference_logps"); a pair whose hash differs is a ValueError (the
    run stops: the table is of other data). `hash_samples` adds "sample_hash" alone."""

    def __init__(self, processor: ChatProcessor, image_size: int, mean, std, max_seq_len: int,
                 max_images: int = 8, max_pixels: int = 64_000_000,
                 reference: dict | None = None, crop: bool = False):  # fmt: skip
        super().__init__(processor, image_size, mean, std, max_images, max_pixels)
        self.max_seq_len = max_seq_len
        self.crop = crop  # mDPO: add "cropped_pixel_values"
        self.reference = reference  # precomputed: {key: {"hash", "chosen", "rejected"}}
        self.hash_samples = False  # add "sample_hash" (precompute_reference_logps's)

    def __call__(self, sample: dict) -> dict:
        _, fields, images = self._read(sample)
        out: dict = {"pair_key": pair_key(sample)}
        for side in ("chosen", "rejected"):
            turn = [{"user": fields["prompt"], "assistant": fields[side]}]
            ids, labels = self.processor.encode(turn, len(images))
            if len(ids) > self.max_seq_len:
                raise BadSample("too_long")
            out[f"{side}_ids"] = torch.tensor(ids, dtype=torch.int64)
            out[f"{side}_labels"] = torch.tensor(labels, dtype=torch.int64)
        if self.reference is not None or self.hash_samples:
            out["sample_hash"] = sample_hash(images, out["chosen_ids"], out["rejected_ids"])
        if self.reference is not None:
            entry = self.reference.get(pair_key(sample))
            if entry is None:
                raise BadSample("no_reference_logps")
            if entry["hash"] != out["sample_hash"]:
                raise ValueError(
                    f"sample {pair_key(sample)}: the precomputed reference log-probs are of "
                    "another sample (other shards, chat template, tokenizer or data settings): "
                    "write them again with precompute_reference_logps"
                )
            sides = ["chosen", "rejected"] + (["cropped"] if self.crop else [])
            if self.crop and "cropped" not in entry:
                raise ValueError(
                    f"sample {pair_key(sample)}: the precomputed reference log-probs hold none "
                    "on mDPO's cropped images: write them again from this (task.dpo.mdpo) recipe"
                )
            out["reference_logps"] = torch.tensor([entry[side] for side in sides])
        pixels = self._pixels(images)
        if self.crop:
            if not images:
                raise BadSample("no_image")  # nothing for mDPO's conditional term to crop
            rng = random.Random(hashlib.sha256(sample["__key__"].encode()).digest())
            out["cropped_pixel_values"] = torch.stack([random_crop(p, rng) for p in pixels])
        return {"pixel_values": pixels, **out}


def random_crop(pixels: torch.Tensor, rng: random.Random) -> torch.Tensor:
    """A crop of `CROP_AREA` of the image's area (aspect ratio 3/4 to 4/3, log-uniform: as
    torchvision's RandomResizedCrop, which mDPO's corruption uses) resized back to its size."""
    _, h, w = pixels.shape
    area = rng.uniform(*CROP_AREA) * h * w
    ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    ch = max(1, min(h, round(math.sqrt(area / ratio))))
    cw = max(1, min(w, round(math.sqrt(area * ratio))))
    top, left = rng.randint(0, h - ch), rng.randint(0, w - cw)
    crop = pixels[None, :, top : top + ch, left : left + cw]
    return F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False)[0]


class PreferencePromptDecoder(_PreferenceDecoder):
    """Raw pair -> {"pixel_values", "prompt_ids", "answer" (the chosen response), "answers",
    "source", "key"}: generation samples of the prompts (`generation` evaluator)."""

    def __call__(self, sample: dict) -> dict:
        record, fields, images = self._read(sample)
        prompt = self.processor.prompt([{"user": fields["prompt"], "assistant": ""}], len(images))
        source = record.get("source")
        return {
            "pixel_values": self._pixels(images),
            "prompt_ids": torch.tensor(prompt, dtype=torch.int64),
            "answer": fields["chosen"],
            "answers": [fields["chosen"]],
            "source": source if isinstance(source, str) else "",
            "key": sample["__key__"],
        }


class PreferenceCollate:
    """Pairs -> one packed batch, both sequences of every pair packed like SFT samples
    (balanced rows, core/data/packing.py; a segment per sequence): input_ids / labels /
    segment_ids / sequence_ids [R, L] (sequence sides * pair + side; -1 on padding),
    pixel_values [N, 3, S, S] (each pair's images once, pair by pair; then, with mDPO, their
    crops), image_index [M] (the image at each image-pad block, row-major: a pair's images
    appear twice), and host-side counts `num_pairs`, `pair_keys`, `sides` (2, or 3: mDPO's
    chosen sequence on the crops),
    `num_samples` (pairs), `real_tokens`, `supervised_tokens`."""

    def __init__(self, max_seq_len: int, pad_id: int, image_token_id: int, tokens_per_image: int):
        self.max_seq_len = max_seq_len
        self.pad_id = pad_id
        self.image_token_id = image_token_id
        self.tokens_per_image = tokens_per_image

    def __call__(self, pairs: list[dict]) -> dict:
        # mDPO: a third sequence per pair, the chosen one on the crops (after every image)
        cropped = bool(pairs) and "cropped_pixel_values" in pairs[0]
        sides = 3 if cropped else 2
        sequences = []
        images = sum(len(pair["pixel_values"]) for pair in pairs)
        first, crop_first = 0, images
        for pair in pairs:
            n = len(pair["pixel_values"])
            for side in ("chosen", "rejected"):
                sequences.append((pair[f"{side}_ids"], pair[f"{side}_labels"], first, n))
            if cropped:
                sequences.append((pair["chosen_ids"], pair["chosen_labels"], crop_first, n))
                crop_first += n
            first += n
        lengths = [len(ids) for ids, _, _, _ in sequences]
        rows = balanced_rows(lengths, self.max_seq_len, multiple=ROW_MULTIPLE)
        used = max(sum(lengths[i] for i in row) for row in rows)
        width = min(self.max_seq_len, -(-used // ROW_MULTIPLE) * ROW_MULTIPLE)
        shape = (len(rows), width)
        input_ids = torch.full(shape, self.pad_id, dtype=torch.long)
        labels = torch.full(shape, IGNORE, dtype=torch.long)
        segment_ids = torch.full(shape, -1, dtype=torch.long)
        sequence_ids = torch.full(shape, -1, dtype=torch.long)
        image_index = []
        for r, row in enumerate(rows):
            start = 0
            for seg, i in enumerate(row):
                ids, labs, image, n = sequences[i]
                end = start + lengths[i]
                input_ids[r, start:end], labels[r, start:end] = ids, labs
                segment_ids[r, start:end], sequence_ids[r, start:end] = seg, i
                image_index += range(image, image + n)
                start = end
        pixel_values = [p["pixel_values"] for p in pairs]
        pixel_values += [p["cropped_pixel_values"] for p in pairs] if cropped else []
        pixel_values = torch.cat(pixel_values) if pixel_values else torch.empty(0)
        check_image_count(input_ids, len(image_index), self.tokens_per_image, self.image_token_id)
        same = segment_ids[:, 1:] == segment_ids[:, :-1]
        extra = {}
        if pairs and "reference_logps" in pairs[0]:
            extra["reference_logps"] = torch.stack([p["reference_logps"] for p in pairs])
        return {
            **extra,
            "input_ids": input_ids,
            "labels": labels,
            "segment_ids": segment_ids,
            "sequence_ids": sequence_ids,
            "pixel_values": pixel_values,
            "image_index": torch.tensor(image_index, dtype=torch.long),
            "num_pairs": len(pairs),
            "pair_keys": [p["pair_key"] for p in pairs],
            "sides": sides,
            "num_samples": len(pairs),
            "real_tokens": sum(lengths),
            "supervised_tokens": int(((labels[:, 1:] != IGNORE) & same).sum()),
        }


# ---------------------------------------------------------------------------- precomputed
def model_hash(task: nn.Module) -> str:
    """sha256 of the starting model: every tensor of the state dict, names and dtypes included,
    but LoRA adapters (a no-op at the start: B = 0) and a `copy` reference."""
    digest = hashlib.sha256()
    for name, tensor in sorted(task.state_dict().items()):
        if "lora_" in name or name.startswith("reference."):
            continue
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def pair_key(sample: dict) -> str:
    """A pair's name in the reference log-prob file: shard file name and sample key (splits
    reuse keys; the shards' directory may move)."""
    return f"{Path(sample['__url__']).name}/{sample['__key__']}"


def sample_hash(images: list[bytes], chosen_ids: torch.Tensor, rejected_ids: torch.Tensor) -> str:
    """sha256 of what a pair's reference log-probs depend on besides the model: its image files
    and both rendered sequences (template, tokenizer and texts)."""
    digest = hashlib.sha256()
    for data in images:
        digest.update(len(data).to_bytes(8, "little") + data)
    for ids in (chosen_ids, rejected_ids):
        digest.update(len(ids).to_bytes(8, "little") + ids.numpy().tobytes())
    return digest.hexdigest()


def read_reference_logps(path: str, expected_model: str) -> dict:
    """The pairs' {key: {"hash", "chosen", "rejected"}} of a reference log-prob file; ConfigError
    when it is missing or was written from another model."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(
            f"task.dpo.reference_logps={path}: no such file; write it with "
            "precompute_reference_logps (core/tasks/vlm_dpo.py)"
        )
    data = json.loads(file.read_text())
    if data.get("format") != LOGPS_FORMAT:
        raise ConfigError(f"task.dpo.reference_logps={path}: not a {LOGPS_FORMAT} file")
    if data["model_hash"] != expected_model:
        raise ConfigError(
            f"task.dpo.reference_logps={path} was written from model {data['model_hash'][:16]}, "
            f"but this run starts from {expected_model[:16]} (task.init_from, model or seed "
            "changed): write it again from this run's recipe"
        )
    return data["samples"]


@torch.no_grad()
def precompute_reference_logps(task: VLMDPOTask, out: str | Path | None = None,
                               batch_size: int = 0) -> Path:  # fmt: skip
    """Write the reference log-probs of every pair of `data.train` and `data.val` (images
    included; plain patterns, no `{subset}`) from `task` as built (the policy before its first
    step: the reference), one process.
    `out` defaults to `reference_logps-<model hash[:16]>.json` beside the first shard. Pairs
    the decoder skips are left out (they are skipped in training too)."""
    cfg = task.cfg
    patterns = [p for p in (cfg.data.train, cfg.data.val) if p]
    if any("{subset}" in p for p in patterns):
        raise ConfigError("precompute_reference_logps reads plain shard patterns, not {subset}")
    urls = [u for p in patterns for u in expand_urls(p)]
    digest = model_hash(task)
    out = Path(out) if out else Path(urls[0]).parent / f"reference_logps-{digest[:16]}.json"
    decoder = copy.copy(task.train_decoder)
    decoder.reference, decoder.hash_samples = None, True
    collate, batch_size = task.packed_collate(), batch_size or cfg.data.batch_size
    task.eval()
    off = task.adapters_off() if task.cfg.task.lm_tuning == "lora" else contextlib.nullcontext()
    samples: dict[str, dict] = {}
    skipped = 0

    device = next(task.parameters()).device

    def flush(keys: list[str], pairs: list[dict]) -> None:
        batch = distributed.to_device(collate(pairs), device)
        features = task.vision_features(batch["pixel_values"])
        embeds = pair_embeddings(task.lm, task.projector, batch, features, task.image_token_id)
        logps = sequence_logps(task.lm, embeds, batch)[0].tolist()
        sides = batch["sides"]  # 3 with mDPO: the chosen response on the crops too
        for i, (key, pair) in enumerate(zip(keys, pairs)):
            entry = dict(zip(("chosen", "rejected", "cropped"), logps[sides * i : sides * (i + 1)]))
            samples[key] = {"hash": pair["sample_hash"], **entry}

    keys, pairs = [], []
    with off:
        for url in urls:
            shard = open_shard(url)
            for index in range(len(shard)):
                raw = shard.read(index)
                key = pair_key(raw)
                if key in samples or key in keys:
                    raise ValueError(f"pair {key} appears twice in data.train and data.val")
                try:
                    pairs.append(decoder(raw))
                except BadSample:
                    skipped += 1
                    continue
                keys.append(key)
                if len(pairs) == batch_size:
                    flush(keys, pairs)
                    keys, pairs = [], []
        if pairs:
            flush(keys, pairs)
    out.write_text(json.dumps({"format": LOGPS_FORMAT, "model_hash": digest, "samples": samples}))
    log.info("reference log-probs of %d pairs (%d skipped) -> %s", len(samples), skipped, out)
    return out
