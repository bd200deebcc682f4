"""PaliGemma-style samples: `[image tokens][BOS prefix \\n][suffix EOS]`, the prefix
bidirectional (mask_ar 0) and the suffix causal (mask_ar 1); only the suffix and its EOS are
supervised (transformers' PaliGemmaProcessor with `suffix=`, big_vision's `mask_ar` /
`mask_loss`).

Sources, each shard sample becoming one or more (prefix, suffix) examples:
  - FineVision-format conversations (`json` with texts + images `0.jpg`, ...): every turn is
    an example, `prefix` template filled with its question, its answer the suffix (a
    multi-turn conversation is expanded, each turn seeing the images);
  - captioned images (CC3M's `jpg` + `txt`, the shapes shards): prefix `caption en`.
Per-source templates (`data.prefixes`) override the default, e.g. a captioning subset of
FineVision-format shards gets `caption en` instead of `answer en {question}`.

The tokenizer must have PaliGemma's `<image>` token (google/paligemma-* tokenizers do;
`paligemma_tokenizer` adds it, and `<loc0000>`...`<loc1023>` / `<seg000>`...`<seg127>` as
single tokens, to one of ours).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .chat import clean_texts, image_members, read_record
from .errors import BadSample
from .preprocess import ImageLoader

IGNORE = -100
IMAGE_TOKEN = "<image>"
LOC_TOKENS = tuple(f"<loc{i:04d}>" for i in range(1024))  # detection: y0 x0 y1 x1 in 1/1024
SEG_TOKENS = tuple(f"<seg{i:03d}>" for i in range(128))  # segmentation codebook
CAPTION_PREFIX = "caption en"
QUESTION_PREFIX = "answer en {question}"


def paligemma_tokenizer(source: str | Path, out: str | Path):
    """`source`'s tokenizer with PaliGemma's tokens added and saved to `out`: `<image>` (special)
    and the location / segmentation tokens (single, ordinary tokens: decoding keeps them, as
    PaliGemma's detection outputs need), plus <bos>/<eos>/<pad> where it has none."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(source))
    specials = {}
    for name, value in (("bos_token", "<bos>"), ("eos_token", "<eos>"), ("pad_token", "<pad>")):
        if getattr(tok, name) is None:
            specials[name] = value
    tok.add_special_tokens(specials)
    tok.add_tokens([IMAGE_TOKEN], special_tokens=True)
    tok.add_tokens(list(LOC_TOKENS + SEG_TOKENS))
    tok.save_pretrained(str(out))
    return tok


class PrefixLMProcessor:
    """(prefix, suffix, number of images) -> input_ids, labels, mask_ar (lists of ints)."""

    def __init__(self, tokenizer, tokens_per_image: int):
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (IMAGE_TOKEN,)}
        unk = tokenizer.unk_token_id
        if ids[IMAGE_TOKEN] in (None, unk):
            raise ValueError(
                f"the tokenizer has no {IMAGE_TOKEN} token: use a PaliGemma tokenizer, or add "
                "PaliGemma's tokens to yours (`vlscale shards paligemma-tokenizer`)"
            )
        if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer needs a bos and an eos token")
        self.tokenizer = tokenizer
        self.image_id = ids[IMAGE_TOKEN]
        self.bos, self.eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        self.tokens_per_image = tokens_per_image
        self._specials = set(tokenizer.all_special_ids)

    def _text(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if not self._specials.isdisjoint(ids):
            raise BadSample("special_token_in_text")
        return ids

    def prompt(self, prefix: str, num_images: int) -> list[int]:
        """The prefix part: image tokens, BOS, the prefix and the "\\n" separator."""
        images = [self.image_id] * (self.tokens_per_image * num_images)
        return images + [self.bos] + self._text(prefix + "\n")

    def encode(self, prefix: str, suffix: str, num_images: int):
        """(input_ids, labels, mask_ar): labels are the suffix's tokens and EOS (IGNORE over the
        prefix), mask_ar 0 over the prefix and 1 over the suffix."""
        head = self.prompt(prefix, num_images)
        tail = self._text(suffix) + [self.eos]
        ids = head + tail
        labels = [IGNORE] * len(head) + tail
        mask_ar = [0] * len(head) + [1] * len(tail)
        return ids, labels, mask_ar


def examples(sample: dict, prefixes: dict[str, str], default: str) -> tuple[list, list[bytes]]:
    """A shard sample -> ([(prefix, suffix), ...], image bytes). `prefixes` maps a record's
    `source` to its template; `default` is the question template."""
    if "json" in sample and b'"texts"' in sample["json"]:  # FineVision-format conversation
        record = read_record(sample)
        images = image_members(sample)
        if len(images) != record["num_images"]:
            raise BadSample("image_count_mismatch")
        template = prefixes.get(record.get("source") or "", default)
        pairs = [(_fill(template, turn["user"]), turn["assistant"].strip())
                 for turn in clean_texts(record.get("texts"))]  # fmt: skip
    else:  # a captioned image (CC3M wds: jpg + txt)
        text = sample.get("txt")
        image = next((sample[k] for k in ("jpg", "jpeg", "png", "webp") if k in sample), None)
        if text is None or image is None:
            raise BadSample("missing_caption_or_image")
        caption = text.decode("utf-8", errors="strict") if isinstance(text, bytes) else text
        pairs, images = [(prefixes.get("caption", CAPTION_PREFIX), caption.strip())], [image]
    pairs = [(p, s) for p, s in pairs if s]
    if not pairs:
        raise BadSample("no_supervised_tokens")
    if not images:
        raise BadSample("no_image")  # PaliGemma reads one image (or several) per example
    return pairs, images


def _fill(template: str, question: str) -> str:
    return template.replace("{question}", question.strip())


class PrefixLMTrainDecoder:
    """Raw sample -> {"parts": [{"input_ids", "labels", "mask_ar"} per example], "pixel_values"
    [n, 3, S, S]}. Each part is packed as its own sample (it sees the images again). An example
    longer than `max_seq_len` makes the sample bad ("too_long"): never truncated."""

    def __init__(self, processor: PrefixLMProcessor, loader: ImageLoader, max_seq_len: int,
                 prefixes: dict[str, str], default_prefix: str, max_images: int = 8):  # fmt: skip
        self.processor, self.load_image = processor, loader
        self.max_seq_len, self.max_images = max_seq_len, max_images
        self.prefixes, self.default_prefix = prefixes, default_prefix

    def __call__(self, sample: dict) -> dict:
        pairs, images = examples(sample, self.prefixes, self.default_prefix)
        if len(images) > self.max_images:
            raise BadSample("too_many_images")
        parts = []
        for prefix, suffix in pairs:
            ids, labels, mask_ar = self.processor.encode(prefix, suffix, len(images))
            if len(ids) > self.max_seq_len:
                raise BadSample("too_long")
            parts.append({"input_ids": torch.tensor(ids), "labels": torch.tensor(labels),
                          "mask_ar": torch.tensor(mask_ar)})  # fmt: skip
        return {"parts": parts, "pixel_values": torch.stack([self.load_image(b) for b in images])}


class PrefixLMEvalDecoder:
    """Raw sample -> the last example's prompt for generation: {"pixel_values", "prompt_ids",
    "answer", "answers", "source", "key"} (as core.data.chat.VLMEvalDecoder's)."""

    def __init__(self, processor: PrefixLMProcessor, loader: ImageLoader,
                 prefixes: dict[str, str], default_prefix: str):  # fmt: skip
        self.processor, self.load_image = processor, loader
        self.prefixes, self.default_prefix = prefixes, default_prefix

    def __call__(self, sample: dict) -> dict:
        pairs, images = examples(sample, self.prefixes, self.default_prefix)
        prefix, answer = pairs[-1]
        source = ""
        answers = [answer]
        if "json" in sample:
            record = json.loads(sample["json"])
            source = record.get("source") if isinstance(record.get("source"), str) else ""
            answers = record.get("answers", answers)  # e.g. VQAv2's 10 human answers
            if not (isinstance(answers, list) and answers
                    and all(isinstance(a, str) for a in answers)):  # fmt: skip
                raise BadSample("bad_answers")
        return {
            "pixel_values": torch.stack([self.load_image(b) for b in images]),
            "prompt_ids": torch.tensor(self.processor.prompt(prefix, len(images))),
            "answer": answer,
            "answers": answers,
            "source": source,
            "key": sample["__key__"],
        }
