"""Conversations -> Qwen2.5 ChatML token ids with a supervision mask, and the VLM sample decoders.

A conversation is FineVision's `texts`: a list of {"user": str, "assistant": str} turns. It is
rendered as Qwen's chat template renders it (Qwen2-VL placement of images):

    <|im_start|>system\\n{system}<|im_end|>\\n
    <|im_start|>user\\n{images}{user}<|im_end|>\\n<|im_start|>assistant\\n{assistant}<|im_end|>\\n
    ... one user/assistant pair per turn

Each image is <|vision_start|> + <|image_pad|> x image_tokens + <|vision_end|>; all of a sample's
images open the first user turn. Special tokens are inserted by id and the text between them is
tokenised piece by piece, as the tokenizer itself splits a rendered template at special tokens;
an assistant's content is also tokenised apart from its "assistant\\n" header, exactly as at
generation time, where the prompt ends with that header. The ids therefore equal tokenising the
rendered template whenever no assistant content starts with a newline.

Labels equal the ids on every assistant turn's content and its <|im_end|> (the model learns to
stop), IGNORE (-100) everywhere else. They are not shifted: position t's target is labels[t+1].
"""

from __future__ import annotations

import json
import re

import torch

from core.data.errors import BadSample
from core.data.preprocess import ImageLoader
from core.data.tokenizer import (
    DEFAULT_SYSTEM_PROMPT,
    IM_END,
    IM_START,
    IMAGE_PAD,
    VISION_END,
    VISION_START,
)

IGNORE = -100
CHAT_TOKENS = (IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD)
# Shard members holding a sample's images: "0.jpg", "1.png", ... (see core/data/finevision.py)
IMAGE_MEMBER = re.compile(r"^(\d+)\.([a-z0-9]+)$")


def special_token_ids(tokenizer, tokens) -> dict[str, int]:
    """{token: id} for tokens that must each be one token of `tokenizer`; ValueError naming
    the first one it lacks (or splits)."""
    vocab = tokenizer.get_vocab()
    ids = {}
    for token in tokens:
        if token not in vocab:
            raise ValueError(
                f"the tokenizer has no {token!r} token, which the Qwen2.5 chat format needs "
                "(Qwen2.5's own tokenizers and `vlscale shards synthetic-vqa`'s have it)"
            )
        if tokenizer.encode(token, add_special_tokens=False) != [vocab[token]]:
            raise ValueError(f"the tokenizer does not encode {token!r} as a single token")
        ids[token] = vocab[token]
    return ids


def clean_texts(texts) -> list[dict[str, str]]:
    """FineVision `texts` as a list of {"user", "assistant"} strings (None -> "").
    BadSample("empty_texts") when there is no turn, BadSample("bad_texts") when it is not a
    list of such turns."""
    if not isinstance(texts, list) or not texts:
        raise BadSample("empty_texts")
    turns = []
    for turn in texts:
        if not isinstance(turn, dict):
            raise BadSample("bad_texts")
        user, assistant = turn.get("user"), turn.get("assistant")
        user = "" if user is None else user
        assistant = "" if assistant is None else assistant
        if not isinstance(user, str) or not isinstance(assistant, str):
            raise BadSample("bad_texts")
        turns.append({"user": user, "assistant": assistant})
    return turns


def has_answer(turns: list[dict[str, str]]) -> bool:
    """Whether some assistant turn says anything: otherwise there is nothing to learn."""
    return any(turn["assistant"].strip() for turn in turns)


class ChatProcessor:
    """Qwen2.5 ChatML ids and labels for conversations with images (see the module docstring).

    `system_prompt=None` leaves the system turn out (Qwen's own template would insert its
    default one). Texts containing a chat/vision special token raise
    BadSample("special_token_in_text"): it would break the conversation or the image count.
    """

    def __init__(
        self, tokenizer, image_tokens: int, system_prompt: str | None = DEFAULT_SYSTEM_PROMPT
    ):
        if image_tokens < 1:
            raise ValueError(f"image_tokens must be at least 1, got {image_tokens}")
        self.tokenizer = tokenizer
        self.image_tokens = image_tokens
        self.system_prompt = system_prompt
        ids = special_token_ids(tokenizer, CHAT_TOKENS)
        self.im_start, self.im_end = ids[IM_START], ids[IM_END]
        self.image_pad_id = ids[IMAGE_PAD]
        self._chat_ids = set(ids.values())
        self._image = [ids[VISION_START]] + [ids[IMAGE_PAD]] * image_tokens + [ids[VISION_END]]
        self._newline = self._text("\n")
        self._assistant_header = [self.im_start, *self._text("assistant\n")]
        self._system = []
        if system_prompt is not None:
            try:
                system = self._text("system\n" + system_prompt)
            except BadSample:
                raise ValueError(
                    f"the system prompt contains a special token: {system_prompt!r}"
                ) from None
            self._system = [self.im_start, *system, self.im_end, *self._newline]

    def encode(self, texts: list[dict], num_images: int) -> tuple[list[int], list[int]]:
        """(input_ids, labels) of the whole conversation, every turn kept."""
        return self._render(texts, num_images, prompt=False)

    def prompt(self, texts: list[dict], num_images: int) -> list[int]:
        """Ids for generating the last answer: every turn, the last assistant content left out,
        ending with <|im_start|>assistant\\n."""
        return self._render(texts, num_images, prompt=True)[0]

    def _render(self, texts, num_images: int, prompt: bool) -> tuple[list[int], list[int]]:
        if num_images < 0:
            raise ValueError(f"num_images must be >= 0, got {num_images}")
        turns = clean_texts(texts)
        ids = list(self._system)
        labels = [IGNORE] * len(ids)

        def add(pieces: list[int], supervised: bool) -> None:
            ids.extend(pieces)
            labels.extend(pieces if supervised else [IGNORE] * len(pieces))

        for index, turn in enumerate(turns):
            if index == 0 and num_images:
                user = [*self._text("user\n"), *self._image * num_images, *self._text(turn["user"])]
            else:
                user = self._text("user\n" + turn["user"])
            add([self.im_start, *user, self.im_end, *self._newline], False)
            add(self._assistant_header, False)
            if prompt and index == len(turns) - 1:
                break
            add([*self._text(turn["assistant"]), self.im_end], True)
            add(self._newline, False)
        return ids, labels

    def _text(self, text: str) -> list[int]:
        if not text:
            return []
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if not self._chat_ids.isdisjoint(ids):
            raise BadSample("special_token_in_text")
        return ids


def read_record(sample: dict) -> dict:
    """The sample's `json` member: {"texts", "source", "num_images", ...}."""
    data = sample.get("json")
    if data is None:
        raise BadSample("missing_json")
    try:
        record = json.loads(data)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise BadSample("bad_json") from None
    if not isinstance(record, dict) or not isinstance(record.get("num_images"), int):
        raise BadSample("bad_json")
    return record


def image_members(sample: dict) -> list[bytes]:
    """The sample's image bytes in order ("0.jpg", "1.png", ...)."""
    found = {}
    for name, data in sample.items():
        match = IMAGE_MEMBER.match(name)
        if match:
            found[int(match.group(1))] = data
    if sorted(found) != list(range(len(found))):
        raise BadSample("image_count_mismatch")  # a gap or a duplicate index
    return [found[i] for i in range(len(found))]


class _VLMDecoder:
    def __init__(
        self,
        processor: ChatProcessor,
        image_size: int,
        mean,
        std,
        max_images: int = 8,
        max_pixels: int = 64_000_000,
    ):
        self.processor = processor
        self.image_size = image_size
        self.max_images = max_images
        self.load_image = ImageLoader(image_size, mean, std, max_pixels, crop=False)

    def _read(self, sample: dict) -> tuple[dict, list[dict], list[bytes]]:
        record = read_record(sample)
        images = image_members(sample)
        if len(images) != record["num_images"]:
            raise BadSample("image_count_mismatch")
        if len(images) > self.max_images:
            raise BadSample("too_many_images")
        return record, clean_texts(record.get("texts")), images

    def _pixels(self, images: list[bytes]) -> torch.Tensor:
        if not images:
            return torch.empty((0, 3, self.image_size, self.image_size), dtype=torch.float32)
        return torch.stack([self.load_image(data) for data in images])


class VLMTrainDecoder(_VLMDecoder):
    """Raw sample -> {"pixel_values": float32 [n, 3, S, S] (n may be 0), "input_ids": int64 [T],
    "labels": int64 [T]}, T <= max_seq_len.

    Images are resized to S x S (bicubic) and normalised with mean/std. BadSample reasons:
    missing_json, bad_json, empty_texts, bad_texts, image_count_mismatch (json vs members),
    too_many_images, no_supervised_tokens (every answer is blank), special_token_in_text,
    too_long, bad_image, too_large (pixels).
    """

    def __init__(
        self,
        processor: ChatProcessor,
        image_size: int,
        mean,
        std,
        max_seq_len: int,
        max_images: int = 8,
        max_pixels: int = 64_000_000,
    ):
        super().__init__(processor, image_size, mean, std, max_images, max_pixels)
        self.max_seq_len = max_seq_len

    def __call__(self, sample: dict) -> dict:
        _, texts, images = self._read(sample)
        if not has_answer(texts):  # only the turns' <|im_end|> would be supervised
            raise BadSample("no_supervised_tokens")
        ids, labels = self.processor.encode(texts, len(images))
        if len(ids) > self.max_seq_len:
            raise BadSample("too_long")
        return {
            "pixel_values": self._pixels(images),
            "input_ids": torch.tensor(ids, dtype=torch.int64),
            "labels": torch.tensor(labels, dtype=torch.int64),
        }


class VLMEvalDecoder(_VLMDecoder):
    """Raw sample -> {"pixel_values", "prompt_ids": int64 [Tp], "answer": str (the last
    assistant turn), "source": str, "key": str}, for generating the last answer.

    BadSample reasons as VLMTrainDecoder's, plus empty_answer; too_long when
    `max_prompt_len` is set and the prompt is longer.
    """

    def __init__(
        self,
        processor: ChatProcessor,
        image_size: int,
        mean,
        std,
        max_images: int = 8,
        max_pixels: int = 64_000_000,
        max_prompt_len: int | None = None,
    ):
        super().__init__(processor, image_size, mean, std, max_images, max_pixels)
        self.max_prompt_len = max_prompt_len

    def __call__(self, sample: dict) -> dict:
        record, texts, images = self._read(sample)
        answer = texts[-1]["assistant"]
        if not answer.strip():
            raise BadSample("empty_answer")
        prompt = self.processor.prompt(texts, len(images))
        if self.max_prompt_len is not None and len(prompt) > self.max_prompt_len:
            raise BadSample("too_long")
        source = record.get("source")
        return {
            "pixel_values": self._pixels(images),
            "prompt_ids": torch.tensor(prompt, dtype=torch.int64),
            "answer": answer,
            "source": source if isinstance(source, str) else "",
            "key": sample["__key__"],
        }
