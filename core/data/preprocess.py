"""Decode raw webdataset samples (image + caption bytes) into model-ready tensors."""

from __future__ import annotations

import functools
import io
import json
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from core.data.errors import BadSample

SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)  # maps pixels to [-1, 1]


class ImageTextDecoder:
    """Raw sample dict -> {"pixel_values", "input_ids", "attention_mask", "key"}.

    Raises BadSample (counted and skipped by ShardStream) for data that cannot be used.
    `image_keys` / `text_keys`: the member extensions that may hold the image and the caption,
    `;`-separated (webdataset's alternatives, e.g. "jpg;png;webp"): the first one the sample
    has is used; a sample with none is skipped as missing_image / missing_text.
    Captions always end in EOS: text towers pool at the last real token, and tokenizers
    such as Qwen's add no EOS themselves. Padding uses the pad token, else EOS (Qwen has
    no pad token); the attention mask marks the real tokens.
    """

    def __init__(
        self,
        image_size: int,
        mean,
        std,
        tokenizer,
        max_text_len: int = 77,
        max_pixels: int = 64_000_000,
        max_caption_bytes: int = 2048,
        image_keys: str = "jpg;png;webp",
        text_keys: str = "txt;caption",
    ):
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer needs an EOS token to end captions with")
        self.image_size = image_size
        self.load_image = ImageLoader(image_size, mean, std, max_pixels, crop=True)
        self.tokenizer = tokenizer
        self.max_text_len = max_text_len
        self.max_pixels = max_pixels
        self.max_caption_bytes = max_caption_bytes
        self.image_keys = member_keys(image_keys)
        self.text_keys = member_keys(text_keys)
        if not (self.image_keys and self.text_keys):
            raise ValueError(f"no member key in image_keys={image_keys!r}, text_keys={text_keys!r}")
        self.eos_id = tokenizer.eos_token_id
        pad_id = tokenizer.pad_token_id
        self.pad_id = self.eos_id if pad_id is None else pad_id
        probe = tokenizer("a")["input_ids"]
        self.adds_eos = bool(probe) and probe[-1] == self.eos_id

    def __call__(self, sample: dict) -> dict:
        text = self.caption(sample)
        input_ids, attention_mask = self.tokenize(text)
        return {
            "pixel_values": self.image(sample),
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "key": sample["__key__"],
        }

    def caption(self, sample: dict) -> str:
        data = first_member(sample, self.text_keys)
        if data is None:
            raise BadSample("missing_text")
        if len(data) > self.max_caption_bytes:
            raise BadSample("long_text")
        try:
            text = data.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise BadSample("bad_text") from None
        if not text:
            raise BadSample("empty_text")
        return text

    def tokenize(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        length = self.max_text_len
        ids = self.tokenizer(text, max_length=length, truncation=True)["input_ids"]
        if not self.adds_eos:
            ids = ids[: length - 1] + [self.eos_id]
        input_ids = torch.full((length,), self.pad_id, dtype=torch.int64)
        input_ids[: len(ids)] = torch.tensor(ids, dtype=torch.int64)
        attention_mask = torch.zeros(length, dtype=torch.int64)
        attention_mask[: len(ids)] = 1
        return input_ids, attention_mask

    def image(self, sample: dict) -> torch.Tensor:
        data = first_member(sample, self.image_keys)
        if data is None:
            raise BadSample("missing_image")
        return self.load_image(data)


def member_keys(keys: str) -> tuple[str, ...]:
    """`"jpg;png;webp"` -> ("jpg", "png", "webp"), lower-case as shard readers store them."""
    return tuple(key.strip().lower() for key in keys.split(";") if key.strip())


def first_member(sample: dict, keys: tuple[str, ...]) -> bytes | None:
    """The data of the first of `keys` the sample has (webdataset's getfirst), else None."""
    return next((sample[key] for key in keys if key in sample), None)


class ImageLoader:
    """Encoded image bytes -> normalised float32 [3, S, S]; BadSample for unusable images.

    `crop=True` resizes the shorter side to S and centre-crops a square (the contrastive towers'
    path); `crop=False` resizes the whole image to S x S, as SigLIP's own image processor does
    (VLMs keep every part of the image). Both resample bicubically. JPEGs are first decoded at
    the smallest 1/2^k scale that still covers the target size, which is free.
    """

    def __init__(self, image_size: int, mean, std, max_pixels: int = 64_000_000, crop: bool = True):
        self.image_size = image_size
        # On the host explicitly: a task built under `torch.device("meta")` (export, generate)
        # would otherwise get meta constants, and an in-place op with a meta operand is a
        # silent no-op on a CPU tensor (the pixels would stay unnormalised).
        mean = torch.tensor(mean, dtype=torch.float64, device="cpu").view(3, 1, 1)
        std = torch.tensor(std, dtype=torch.float64, device="cpu").view(3, 1, 1)
        # (pixel / 255 - mean) / std as one multiply-add
        self.scale = (1.0 / (255.0 * std)).float()
        self.shift = (-mean / std).float()
        self.max_pixels = max_pixels
        self.crop = crop

    def __call__(self, data: bytes) -> torch.Tensor:
        size = self.image_size
        try:
            image = Image.open(io.BytesIO(data))  # lazy: reads the header only
            width, height = image.size
            if width * height > self.max_pixels:
                raise BadSample("too_large")
            if self.crop:
                scale = size / min(width, height)
                # draft keeps the decoded size >= the target size
                image.draft("RGB", (int(width * scale) + 1, int(height * scale) + 1))
                image = self._resize_crop(image.convert("RGB"))
            else:
                image.draft("RGB", (size, size))
                image = image.convert("RGB")
                if image.size != (size, size):
                    image = image.resize((size, size), Image.Resampling.BICUBIC)
        except BadSample:
            raise
        except Exception:  # PIL raises many types for broken or non-image data
            raise BadSample("bad_image") from None
        # Channels-first copy while still uint8: float ops on the permuted view are far slower.
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()
        return pixels.float().mul_(self.scale).add_(self.shift)

    def _resize_crop(self, image: Image.Image) -> Image.Image:
        """Resize the shorter side to image_size (bicubic), then centre-crop a square."""
        size = self.image_size
        width, height = image.size
        scale = size / min(width, height)
        # The longer side truncated, as transformers' image processors, torchvision and
        # open_clip compute it: an exported tower's AutoImageProcessor gives the same pixels.
        new_w, new_h = max(size, int(width * scale)), max(size, int(height * scale))
        if (new_w, new_h) != (width, height):
            image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
        left, top = (new_w - size) // 2, (new_h - size) // 2
        return image.crop((left, top, left + size, top + size))


def collate(samples: list[dict]) -> dict:
    """Stack tensors along a new batch dimension; anything else (keys) becomes a list."""
    return {
        name: torch.stack([s[name] for s in samples])
        if isinstance(samples[0][name], torch.Tensor)
        else [s[name] for s in samples]
        for name in samples[0]
    }


def with_attributes(decode: Callable[[dict], dict], key: str = "json") -> Callable[[dict], dict]:
    """Wrap a decoder to also return the sample's JSON metadata (synthetic shapes attributes)
    as "attributes"; None when the sample has none or it does not parse."""
    return functools.partial(_decode_with_attributes, decode, key)


def _decode_with_attributes(decode: Callable[[dict], dict], key: str, sample: dict) -> dict:
    out = decode(sample)
    try:
        out["attributes"] = json.loads(sample[key])
    except (KeyError, ValueError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        out["attributes"] = None
    return out
