"""Packed causal attention per segment (core/models/attention.py `_per_segment`) against the
dense-mask SDPA it replaces on CPU: the same outputs and the same gradients; and when each path is
taken (`_per_segment_pays`)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import core.models.attention as attn
from core.models.attention import attention, build_mask


def random_layout(rows: int, width: int, gen: torch.Generator) -> torch.Tensor:
    """Segment ids [rows, width]: runs of random length with fresh ids, padding (-1) runs
    between them and at the row's end, rows of one segment, of one token segments."""
    segment_ids = torch.full((rows, width), -1, dtype=torch.long)
    for r in range(rows):
        start, seg = 0, 0
        while start < width:
            n = int(torch.randint(1, max(2, width // 3), (), generator=gen))
            if torch.rand((), generator=gen) > 0.2:  # else a run of padding
                segment_ids[r, start : start + n] = seg
                seg += 1
            start += n
    segment_ids[0] = 0  # one sample fills a row
    return segment_ids


@pytest.fixture
def always_per_segment(monkeypatch):
    """Short test rows would take the dense path (faster there): force the per-segment one."""
    monkeypatch.setattr(attn, "PER_SEGMENT_MIN_LEN", 0)
    monkeypatch.setattr(attn, "_max_score_share", lambda width: 1.0)


def dense(q, k, v, segment_ids, scale):
    mask = build_mask("packed", q.shape[2], k.shape[2], device=q.device, segment_ids=segment_ids)
    gqa = q.shape[1] != k.shape[1]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


@pytest.mark.parametrize("kv_heads", [4, 2, 1])  # MHA, GQA, MQA
@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
def test_per_segment_equals_dense_mask_with_gradients(kv_heads, dtype, atol, always_per_segment):
    gen = torch.Generator().manual_seed(kv_heads)
    for trial in range(4):
        rows, width, dim = 3, 37 + 11 * trial, 8
        segment_ids = random_layout(rows, width, gen)
        q = torch.randn(rows, 4, width, dim, generator=gen, dtype=dtype, requires_grad=True)
        k = torch.randn(rows, kv_heads, width, dim, generator=gen, dtype=dtype, requires_grad=True)
        v = torch.randn(rows, kv_heads, width, dim, generator=gen, dtype=dtype, requires_grad=True)
        grad_out = torch.randn(rows, 4, width, dim, generator=gen, dtype=dtype)
        ours = attention(q, k, v, "packed", segment_ids=segment_ids, scale=0.3)
        ref = dense(q, k, v, segment_ids, 0.3)
        torch.testing.assert_close(ours, ref, atol=atol, rtol=0)
        grads = torch.autograd.grad(ours, (q, k, v), grad_out)
        ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out)
        for name, g, ref_g in zip("qkv", grads, ref_grads):
            # float32: a gradient sums a few dozen products, rounded in another order
            torch.testing.assert_close(g, ref_g, atol=10 * atol, rtol=0, msg=name)


def test_padding_outputs_their_own_value_and_segments_see_only_themselves(always_per_segment):
    """Independent of build_mask: each segment computed alone with plain causal SDPA, padding
    positions equal to v (each query head reads its KV group's head)."""
    gen = torch.Generator().manual_seed(0)
    segment_ids = torch.tensor([[0, 0, 0, -1, 1, 1, -1, -1]])
    q, k, v = (torch.randn(1, h, 8, 4, generator=gen, dtype=torch.float64) for h in (4, 2, 2))
    out = attention(q, k, v, "packed", segment_ids=segment_ids)
    for start, end in [(0, 3), (4, 6)]:
        alone = F.scaled_dot_product_attention(
            q[:, :, start:end], k[:, :, start:end], v[:, :, start:end], is_causal=True,
            enable_gqa=True,
        )  # fmt: skip
        torch.testing.assert_close(out[:, :, start:end], alone, atol=1e-12, rtol=0)
    for pos in (3, 6, 7):
        torch.testing.assert_close(out[0, :, pos], v[0, [0, 0, 1, 1], pos], atol=0, rtol=0)


def test_cpu_packed_causal_skips_the_dense_mask(monkeypatch, always_per_segment):
    """The equality above would hold trivially if the dense path still ran: it must not for a
    causal packed row on CPU, and must for prefix-LM packing (mask_ar) and decoding (T < S)."""

    def no_dense(*args, **kwargs):
        raise AssertionError("dense mask built")

    monkeypatch.setattr(attn, "build_mask", no_dense)
    q = k = v = torch.randn(2, 2, 6, 4)
    segment_ids = torch.tensor([[0, 0, 1, 1, 1, -1], [0, 0, 0, 0, 0, 0]])
    assert attention(q, k, v, "packed", segment_ids=segment_ids).shape == (2, 2, 6, 4)
    with pytest.raises(AssertionError, match="dense mask built"):
        attention(q, k, v, "packed", segment_ids=segment_ids, mask_ar=torch.ones(2, 6))
    with pytest.raises(AssertionError, match="dense mask built"):
        attention(q[:, :, -1:], k, v, "packed", segment_ids=segment_ids)
    with pytest.raises(ValueError, match="needs segment_ids"):
        attention(q, k, v, "packed")


@pytest.mark.parametrize(
    "width, segment_len, per_segment",
    [
        (128, 16, False),  # narrow rows: one dense call is faster
        (256, 64, True),  # wide rows of short samples: per segment
        (256, 192, False),  # 0.56 of the dense scores: the per-call overhead dominates
        (512, 256, True),  # half of them at twice the width: per segment
        (512, 512, False),  # one sample a row: the segments need all the dense scores
        (1024, 1000, False),  # one long sample in each row: 0.95 of the dense scores
        (1024, 200, True),
    ],
)
def test_per_segment_only_where_it_pays(monkeypatch, width, segment_len, per_segment):
    """The dispatch follows the measured crossover (PER_SEGMENT_MIN_LEN, the share of the dense
    scores the segments need, `_max_score_share`), and both paths give the same output."""
    taken = []
    real = attn._per_segment
    monkeypatch.setattr(attn, "_per_segment", lambda *a: taken.append(True) or real(*a))
    segment_ids = torch.full((2, width), -1, dtype=torch.long)
    for start in range(0, width - segment_len + 1, segment_len):
        segment_ids[:, start : start + segment_len] = start // segment_len
    gen = torch.Generator().manual_seed(width)
    q, k, v = (torch.randn(2, h, width, 8, generator=gen, dtype=torch.float64) for h in (4, 2, 2))
    out = attention(q, k, v, "packed", segment_ids=segment_ids)
    assert bool(taken) is per_segment
    torch.testing.assert_close(out, dense(q, k, v, segment_ids, None), atol=1e-12, rtol=0)
