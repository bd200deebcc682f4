"""Sequence packing for decoder training, and left-padded prompt batches for generation.

A batch of tokenised samples becomes a few rows of at most `max_seq_len` tokens, filled
first-fit-decreasing. Each sample keeps its own segment id in its row: attention stays inside
the sample (mask kind "packed") and positions restart at 0 per sample, so a packed row computes
exactly what the samples would compute alone, without padding every sample to the longest.
"""

from __future__ import annotations

import torch

IGNORE = -100
ROW_MULTIPLE = 16  # rows are trimmed to the longest one, rounded up to this (kernel friendly)
# Per-token fields some samples carry besides ids and labels, packed the same way: {name: the
# value of padding}. Prefix-LM samples' mask_ar (core/data/prefix_lm.py: 0 prefix, 1 causal),
# chain-of-thought samples' label_kinds (core/data/cot.py: -1 unsupervised, 0 reasoning, 1 answer).
TOKEN_FIELDS = {"mask_ar": 1, "label_kinds": -1}


def first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Sample indices per row: longest first, each into the first row with room."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if lengths[i] > capacity:
            raise ValueError(f"sample of {lengths[i]} tokens does not fit a row of {capacity}")
        for r, room in enumerate(free):
            if lengths[i] <= room:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(capacity - lengths[i])
    return rows


class PackedCollate:
    """Samples {"input_ids", "labels" [T], "pixel_values" [n, 3, S, S]} -> one packed batch:
    input_ids / labels / segment_ids [R, L] (segment -1 = padding), pixel_values [N, 3, S, S] in
    the order their image tokens appear (row-major), and host-side counts for the loop:
    `supervised_tokens` (next-token targets the loss sums over), `num_samples`, `real_tokens`.
    The TOKEN_FIELDS the samples carry are packed alongside, [R, L] each."""

    def __init__(self, max_seq_len: int, pad_id: int, image_token_id: int, tokens_per_image: int):
        self.max_seq_len = max_seq_len
        self.pad_id = pad_id
        self.image_token_id = image_token_id
        self.tokens_per_image = tokens_per_image

    def __call__(self, samples: list[dict]) -> dict:
        lengths = [len(s["input_ids"]) for s in samples]
        rows = first_fit_decreasing(lengths, self.max_seq_len)
        used = max(sum(lengths[i] for i in row) for row in rows)
        width = min(self.max_seq_len, -(-used // ROW_MULTIPLE) * ROW_MULTIPLE)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        segment_ids = torch.full((len(rows), width), -1, dtype=torch.long)
        extra = {
            name: torch.full((len(rows), width), pad, dtype=torch.long)
            for name, pad in TOKEN_FIELDS.items()
            if name in samples[0]
        }
        images = []
        for r, row in enumerate(rows):
            start = 0
            for seg, i in enumerate(row):
                end = start + lengths[i]
                input_ids[r, start:end] = samples[i]["input_ids"]
                labels[r, start:end] = samples[i]["labels"]
                segment_ids[r, start:end] = seg
                for name, packed in extra.items():
                    packed[r, start:end] = samples[i][name]
                images.append(samples[i]["pixel_values"])
                start = end
        pixel_values = torch.cat(images) if images else torch.empty(0)
        check_image_count(input_ids, len(pixel_values), self.tokens_per_image, self.image_token_id)
        batch = {
            "input_ids": input_ids,
            "labels": labels,
            "segment_ids": segment_ids,
            "pixel_values": pixel_values,
            "num_samples": len(samples),
            "real_tokens": sum(lengths),
            "supervised_tokens": int(supervised_targets(labels, segment_ids).sum()),
        }
        return {**batch, **extra}


def supervised_targets(labels: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor:
    """[R, L-1] bool: position t predicts labels[t+1] of the same sample."""
    same = segment_ids[:, 1:] == segment_ids[:, :-1]
    return (labels[:, 1:] != IGNORE) & same


def check_image_count(input_ids, num_images: int, tokens_per_image: int, image_token_id: int):
    found = int((input_ids == image_token_id).sum())
    if found != num_images * tokens_per_image:
        raise ValueError(
            f"{found} image-pad tokens for {num_images} images of {tokens_per_image} tokens "
            f"(expected {num_images * tokens_per_image}): the prompt and the images disagree"
        )


class PromptCollate:
    """Eval samples {"prompt_ids", "pixel_values", ...} -> left-padded prompts for generation:
    input_ids / attention_mask [B, T], pixel_values, and the other fields as lists."""

    def __init__(self, pad_id: int, image_token_id: int, tokens_per_image: int):
        self.pad_id = pad_id
        self.image_token_id = image_token_id
        self.tokens_per_image = tokens_per_image

    def __call__(self, samples: list[dict]) -> dict:
        width = max(len(s["prompt_ids"]) for s in samples)
        input_ids = torch.full((len(samples), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(samples), width), dtype=torch.long)
        for b, s in enumerate(samples):
            n = len(s["prompt_ids"])
            input_ids[b, width - n :] = s["prompt_ids"]
            attention_mask[b, width - n :] = 1
        images = [s["pixel_values"] for s in samples]
        pixel_values = torch.cat(images) if images else torch.empty(0)
        check_image_count(input_ids, len(pixel_values), self.tokens_per_image, self.image_token_id)
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "pixel_values": pixel_values,
        }
        for key in samples[0]:
            if key not in ("prompt_ids", "pixel_values"):
                batch[key] = [s[key] for s in samples]
        return batch
