"""Model FLOPs of a training step, as torchtitan and the PaLM paper (appendix B) count them, and the
peak FLOP/s of common accelerators, for MFU.

A tower applies its matmul weights (P of them: every nn.Linear and patch-embedding Conv2d weight;
embedding lookups cost nothing) to each of its tokens: 2P FLOPs per token forward. Backward costs
2P per token for the gradient of the input, needed wherever a gradient has to pass through the
tower (it trains, or something before it does), plus 2 P_trained per token for the weight
gradients. A fully trained tower so costs 6P per token, a frozen first tower (the VLM's vision
tower in stage align) 2P: forward only, and a frozen LM under a trained projector 4P. A tower
any of whose weights train is counted with input gradients all through it but its patch
embedding (pixels need none), a single projection (a projector, a head) only where something
before it trains: exact for trained, frozen and frozen-under-trained towers and the tasks' heads
(tests/test_flops.py checks each against torch's own count); autograd also skips the input
gradients below the first trained weight, so when only a tower's top blocks train the count is
high by the frozen blocks' backward (measured there too).

Attention scores and their weighted sum add 4 * layers * (heads * head_dim) * T FLOPs per token
forward for a sequence of T tokens (T^2 per sequence, the full square whatever the mask, as
PaLM's 12LHQT counts it), times 3 where the gradient passes through. Packed rows attend within
each sample, so the squares are summed per sample. Norms, activations, softmax and the loss are
not counted (they are a few percent at these widths); MFU = achieved model FLOP/s / peak.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# Dense peak FLOP/s per GPU (vendor datasheets, without sparsity): bf16 tensor cores and plain fp32.
PEAK_FLOPS = {
    "H200": {"bf16": 989e12, "fp32": 67e12},
    "H100": {"bf16": 989e12, "fp32": 67e12},  # SXM; H100 PCIe/NVL: 756e12 / 51e12
    "A100": {"bf16": 312e12, "fp32": 19.5e12},
    "L40S": {"bf16": 362e12, "fp32": 91.6e12},
    "L4": {"bf16": 121e12, "fp32": 30.3e12},
    "A10": {"bf16": 125e12, "fp32": 31.2e12},
    "V100": {"bf16": 0.0, "fp32": 15.7e12},  # no bf16
}


def peak_flops(device: torch.device, precision: str) -> float | None:
    """The device's dense peak for `precision` (bf16 | fp32), or None where unknown (CPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    if "H100" in name and ("PCIe" in name or "NVL" in name):
        return {"bf16": 756e12, "fp32": 51e12}[precision]
    for gpu, peaks in PEAK_FLOPS.items():
        if gpu in name:
            return peaks[precision] or None
    return None


@dataclass(frozen=True)
class TowerCost:
    """What a tower's FLOPs depend on, read once from the module (see the module docstring)."""

    params: int  # matmul weights applied to each token
    trained: int  # of which trained (requires_grad)
    layers: int
    attn_dim: int  # heads * head_dim (of the queries)
    grad_flows: bool  # a gradient passes through it in backward
    grad_upstream: bool = False  # something before it trains: its input needs a gradient
    stem: int = 0  # of `params`, the patch embedding's: its input (pixels) needs no gradient

    @classmethod
    def of(cls, module: nn.Module, layers: int, attn_dim: int, grad_upstream: bool = False,
           exclude: tuple[nn.Module, ...] = ()) -> TowerCost:  # fmt: skip
        """`grad_upstream`: something before this tower trains, so its input needs a gradient.
        `exclude`: submodules not applied to every token (an LM head the task applies only at
        supervised positions: count it with a TowerCost of its own)."""
        skip = {id(m) for e in exclude for m in e.modules()}
        weights = [m.weight for m in module.modules()
                   if isinstance(m, (nn.Linear, nn.Conv2d)) and id(m) not in skip]  # fmt: skip
        params = sum(w.numel() for w in weights)
        trained = sum(w.numel() for w in weights if w.requires_grad)
        stem = sum(m.weight.numel() for m in module.modules()
                   if isinstance(m, nn.Conv2d) and id(m) not in skip)  # fmt: skip
        return cls(params, trained, layers, attn_dim, grad_upstream or trained > 0, grad_upstream,
                   stem)  # fmt: skip

    def flops(self, tokens: int, sum_sq_len: int) -> float:
        """Training FLOPs for `tokens` tokens in sequences whose squared lengths sum to
        `sum_sq_len`."""
        # A single matmul (layers == 0: a projector, a head) needs its input's gradient only
        # when something before it trains; a tower's blocks pass gradients between themselves.
        input_grads = self.grad_upstream or (self.grad_flows and self.layers > 0)
        matmul = 2 * self.params * tokens  # forward
        if input_grads:
            matmul += 2 * (self.params if self.grad_upstream else self.params - self.stem) * tokens
        matmul += 2 * self.trained * tokens
        attention = 4 * self.layers * self.attn_dim * sum_sq_len * (3 if self.grad_flows else 1)
        return float(matmul + attention)


def segment_square_sum(segment_ids: torch.Tensor) -> int:
    """Sum over the samples packed in [R, L] rows of their length squared (segment -1: padding)."""
    total = 0
    for row in segment_ids:
        counts = torch.bincount(row[row >= 0])
        total += int((counts * counts).sum())
    return total
