"""Conversations -> token ids with a supervision mask (the tokenizer's own chat template), and
the VLM sample decoders.

A conversation is FineVision's `texts`: a list of {"user": str, "assistant": str} turns. It is
rendered with the tokenizer's chat template (ChatML when it has none) as a system message
(`data.system_prompt`), then one user and one assistant message per turn; all of a sample's
images open the first user message, each as <|vision_start|> + <|image_pad|> x image_tokens +
<|vision_end|> (Qwen2-VL's placement). The rendered string is tokenised once.

Labels equal the ids on every assistant turn's content and its end-of-turn token (the model
learns to stop), IGNORE (-100) everywhere else (core/data/chat_template.py states the rule and
how it holds for each template). They are not shifted: position t's target is labels[t+1].
"""

from __future__ import annotations

import json
import re

import torch
from jinja2.exceptions import TemplateError

from core.data.chat_template import IGNORE as IGNORE  # re-exported: the decoders' label value
from core.data.chat_template import ChatTemplate
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

IMAGE_TOKENS = (VISION_START, VISION_END, IMAGE_PAD)
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
                f"the tokenizer has no {token!r} token, which vlscale's VLM needs (Qwen2.5's own "
                "tokenizers and `vlscale shards synthetic-vqa`'s have all of "
                f"{', '.join((IM_START, IM_END, *IMAGE_TOKENS))}; the VLM task adds the image "
                "tokens a tokenizer lacks, with embedding rows for them)"
            )
        if tokenizer.encode(token, add_special_tokens=False) != [vocab[token]]:
            raise ValueError(f"the tokenizer does not encode {token!r} as a single token")
        ids[token] = vocab[token]
    return ids


def add_image_tokens(tokenizer) -> list[str]:
    """Add the image tokens `tokenizer` lacks, as special tokens (ids after its vocabulary: only
    an LM whose embeddings are sized to the tokenizer has rows for them). Returns those added."""
    vocab = tokenizer.get_vocab()
    missing = [token for token in IMAGE_TOKENS if token not in vocab]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    return missing


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
    """Ids and labels for conversations with images, rendered with the tokenizer's chat template
    (core/data/chat_template.py: which tokens are supervised, and why).

    Messages: an optional system turn (`system_prompt`; None passes none, and the template may
    write its own default, as Qwen2.5's and SmolLM2's do), then a user and an assistant message
    per turn, every text stripped. The sample's images open the first user message, each as
    <|vision_start|> + <|image_pad|> x image_tokens + <|vision_end|> (the projector's embeddings
    replace the pads), so every template places them as it places that message's text.
    `template_kwargs` go to the template (e.g. {"enable_thinking": False} for Qwen3).

    Texts containing one of the tokenizer's added tokens raise BadSample("special_token_in_text"):
    it would break the conversation or the image count. A template that rejects the system turn
    (Gemma's) or writes no end-of-turn token is a ValueError naming the fix.
    """

    def __init__(
        self, tokenizer, image_tokens: int, system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
        template_kwargs: dict | None = None,
    ):  # fmt: skip
        if image_tokens < 1:
            raise ValueError(f"image_tokens must be at least 1, got {image_tokens}")
        self.tokenizer = tokenizer
        self.image_tokens = image_tokens
        self.system_prompt = system_prompt.strip() if system_prompt is not None else None
        if tokenizer.chat_template is None:  # the ChatML fallback needs Qwen's chat tokens
            special_token_ids(tokenizer, (IM_START, IM_END))
        ids = special_token_ids(tokenizer, IMAGE_TOKENS)
        self.image_pad_id = ids[IMAGE_PAD]
        self.image_block = VISION_START + IMAGE_PAD * image_tokens + VISION_END
        self.chat = ChatTemplate(tokenizer, kwargs=template_kwargs)
        self.end_of_turn_id, self.end_of_turn = self.chat.end_of_turn_id, self.chat.end_of_turn
        if self.system_prompt is not None:
            try:
                self.chat.check_text(self.system_prompt)
            except BadSample:
                raise ValueError(
                    f"the system prompt contains a special token: {system_prompt!r}"
                ) from None
        try:  # a conversation as training renders it: the template must accept it
            self.encode([{"user": "Hi", "assistant": "Hello"}], 1)
        except TemplateError as err:
            raise ValueError(
                f"the tokenizer's chat template rejects vlscale's conversation ({err})"
                + ("; set data.system_prompt: '' if it takes no system turn"
                   if self.system_prompt is not None else "")
            ) from None  # fmt: skip

    def messages(self, texts: list[dict], num_images: int, prompt: bool = False) -> list[dict]:
        """The conversation as chat messages with string contents (images as their pads);
        `prompt` leaves the last assistant message out."""
        if num_images < 0:
            raise ValueError(f"num_images must be >= 0, got {num_images}")
        turns = clean_texts(texts)
        out = []
        if self.system_prompt is not None:
            out.append({"role": "system", "content": self.system_prompt})
        for index, turn in enumerate(turns):
            user, assistant = turn["user"].strip(), turn["assistant"].strip()
            self.chat.check_text(user)
            self.chat.check_text(assistant)
            images = self.image_block * num_images if index == 0 else ""
            out.append({"role": "user", "content": images + user})
            if not (prompt and index == len(turns) - 1):
                out.append({"role": "assistant", "content": assistant})
        return out

    def encode(self, texts: list[dict], num_images: int) -> tuple[list[int], list[int]]:
        """(input_ids, labels) of the whole conversation, every turn kept."""
        return self.chat.encode(self.messages(texts, num_images))

    def prompt(self, texts: list[dict], num_images: int) -> list[int]:
        """Ids for generating the last answer: every turn, the last assistant content left out,
        then the template's generation prompt."""
        return self.chat.prompt_ids(self.messages(texts, num_images, prompt=True))

    def export_template(self) -> str:
        """A chat template with which `apply_chat_template` renders conversations (images as
        {"type": "image"} parts) as this processor does."""
        return self.chat.export_template(self.system_prompt, self.image_block)


def json_member(sample: dict) -> dict:
    """The sample's `json` member as a dict (BadSample missing_json / bad_json otherwise)."""
    data = sample.get("json")
    if data is None:
        raise BadSample("missing_json")
    try:
        record = json.loads(data)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise BadSample("bad_json") from None
    if not isinstance(record, dict):
        raise BadSample("bad_json")
    return record


def read_record(sample: dict) -> dict:
    """The sample's `json` member: {"texts", "source", "num_images", ...}."""
    record = json_member(sample)
    if not isinstance(record.get("num_images"), int):
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


class VLMDecoder:
    """What the VLM's train and eval decoders share (images, the processor), and the base of the
    chain-of-thought and preference decoders."""

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


class VLMTrainDecoder(VLMDecoder):
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
        if not has_answer(texts):  # only the turns' end-of-turn tokens would be supervised
            raise BadSample("no_supervised_tokens")
        ids, labels = self.processor.encode(texts, len(images))
        if len(ids) > self.max_seq_len:
            raise BadSample("too_long")
        return {
            "pixel_values": self._pixels(images),
            "input_ids": torch.tensor(ids, dtype=torch.int64),
            "labels": torch.tensor(labels, dtype=torch.int64),
        }


class VLMEvalDecoder(VLMDecoder):
    """Raw sample -> {"pixel_values", "prompt_ids": int64 [Tp], "answer": str (the last
    assistant turn), "answers": list[str], "source": str, "key": str}, for generating the last
    answer. `answers` is every accepted answer: the json's optional "answers" list (e.g. VQAv2's
    10 human answers, scored by the `vqa` evaluator's metric), else [answer].

    BadSample reasons as VLMTrainDecoder's, plus empty_answer and bad_answers ("answers" not a
    non-empty list of strings); too_long when `max_prompt_len` is set and the prompt is longer.
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
        answers = record.get("answers", [answer])
        if not (isinstance(answers, list) and answers and all(isinstance(a, str) for a in answers)):
            raise BadSample("bad_answers")
        prompt = self.processor.prompt(texts, len(images))
        if self.max_prompt_len is not None and len(prompt) > self.max_prompt_len:
            raise BadSample("too_long")
        source = record.get("source")
        return {
            "pixel_values": self._pixels(images),
            "prompt_ids": torch.tensor(prompt, dtype=torch.int64),
            "answer": answer,
            "answers": answers,
            "source": source if isinstance(source, str) else "",
            "key": sample["__key__"],
        }
