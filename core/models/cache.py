"""The key/value cache of incremental decoding (core/models/decoder.py writes it, generation.py
reorders it for beam search)."""

from __future__ import annotations

import torch


class KVCache:
    """Keys/values of the tokens seen so far, per layer, preallocated for `max_len` positions.

    Each attention layer appends its new keys/values with `update` and attends over everything
    cached; the buffers take the batch, heads and dtype of the first update.
    """

    def __init__(self, num_layers: int, max_len: int):
        self.max_len = max_len
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.lengths = [0] * num_layers

    @property
    def length(self) -> int:
        """Positions cached by completed forwards (the last layer updates last)."""
        return self.lengths[-1]

    def update(
        self, layer_idx: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k/v [B, Hkv, T, D]; return all cached k/v of this layer [B, Hkv, S, D]."""
        if self.keys[layer_idx] is None:
            B, H, _, D = k.shape
            self.keys[layer_idx] = k.new_empty(B, H, self.max_len, D)
            self.values[layer_idx] = v.new_empty(B, H, self.max_len, v.shape[-1])
        start = self.lengths[layer_idx]
        end = start + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions > max_len {self.max_len}")
        self.keys[layer_idx][:, :, start:end] = k
        self.values[layer_idx][:, :, start:end] = v
        self.lengths[layer_idx] = end
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]

    def reorder(self, index: torch.Tensor) -> None:
        """Row i of every layer's cache becomes a copy of row index[i] (beam search: repeat each
        prompt once per beam, then follow the beams that survive each step)."""
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            if k is not None:
                self.keys[i], self.values[i] = k.index_select(0, index), v.index_select(0, index)
