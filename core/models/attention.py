"""The one attention entry point every model calls.

flash-attn (varlen) on CUDA when it is importable, torch SDPA otherwise. Both paths take the same
arguments and compute the same function; the SDPA path is the reference the tests check.

Mask kinds:
  causal         token t sees tokens <= t (offset by the KV-cache length when decoding)
  bidirectional  every token sees every token (vision towers, bidirectional text towers)
  prefix         prefix-LM: bidirectional over each row's prefix, causal after. The prefix is
                 given by `mask_ar` [B, S] (big_vision's autoregressive mask: 0 = prefix token,
                 1 = causal token) or, for a prefix at the row start, by `prefix_len` [B]
  packed         several sequences in one row, given by `segment_ids` [B, T] (-1 = padding);
                 nothing across segments; inside a segment causal, or prefix-LM per sample
                 when `mask_ar` is given. Wide causal packed rows on CPU skip the dense
                 mask: SDPA per segment (`_per_segment`), the same function at the
                 segments' cost (`_per_segment_pays` says when that is faster)

One rule builds every causal and prefix-LM mask (`ar_mask`, big_vision's): position i sees j
when cumsum(mask_ar)[j] <= cumsum(mask_ar)[i]. Prefix tokens share a group, so they see each
other; each causal token opens a group of its own, so it sees what came before and itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:  # optional extra `gpu`
    from flash_attn import flash_attn_func, flash_attn_varlen_func  # type: ignore

    HAVE_FLASH = True
except ImportError:  # pragma: no cover - flash-attn is never installed on CPU machines
    HAVE_FLASH = False

MASK_KINDS = ("causal", "bidirectional", "prefix", "packed")


def build_mask(
    mask_kind: str,
    q_len: int,
    kv_len: int,
    *,
    device: torch.device,
    prefix_len: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
    key_padding: torch.Tensor | None = None,
    mask_ar: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Boolean mask [B or 1, 1, q_len, kv_len] (True = may attend), or None for 'no mask'.

    Queries are the last `q_len` positions of the `kv_len` keys (KV-cache decoding).
    `key_padding` [B, kv_len] marks real keys with True; `mask_ar` [B, kv_len] as above.
    """
    if mask_kind not in MASK_KINDS:
        raise ValueError(f"unknown mask_kind {mask_kind!r}; valid: {', '.join(MASK_KINDS)}")
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    k_pos = torch.arange(kv_len, device=device)[None, :]
    if mask_kind == "bidirectional":
        mask = None
    elif mask_kind == "causal":
        mask = (k_pos <= q_pos)[None, None]
    elif mask_kind == "prefix":
        if mask_ar is None:
            if prefix_len is None:
                raise ValueError("mask_kind='prefix' needs mask_ar [B, S] or prefix_len [B]")
            mask_ar = k_pos >= prefix_len.to(device)[:, None]  # [B, kv]
        mask = ar_mask(mask_ar, q_len)[:, None]
    else:  # packed
        if segment_ids is None:
            raise ValueError("mask_kind='packed' needs segment_ids [B, T]")
        seg_q = segment_ids[:, -q_len:]
        same = seg_q[:, :, None] == segment_ids[:, None, :]
        order = (k_pos <= q_pos)[None] if mask_ar is None else ar_mask(mask_ar, q_len)
        mask = (same & order & (seg_q[:, :, None] >= 0))[:, None]
        # Padding rows (segment -1) would see nothing and give NaN in softmax: let them see
        # themselves; their outputs are ignored by every loss.
        mask = mask | (torch.eye(kv_len, device=device, dtype=torch.bool)[-q_len:][None, None])
    if key_padding is not None:
        kp = key_padding[:, None, None, :].to(torch.bool)
        mask = kp if mask is None else mask & kp
    return mask


def ar_mask(mask_ar: torch.Tensor, q_len: int) -> torch.Tensor:
    """[B, q_len, S] bool from mask_ar [B, S]: the last `q_len` positions are the queries. The
    groups count within the row, so in a packed row a later sample's prefix shares a group only
    with itself (the segment mask removes the earlier samples it could otherwise see)."""
    group = mask_ar.long().cumsum(dim=-1)
    return group[:, None, :] <= group[:, -q_len:, None]


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask_kind: str = "causal",
    *,
    prefix_len: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
    key_padding: torch.Tensor | None = None,
    mask_ar: torch.Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """q [B, Hq, T, D], k/v [B, Hkv, S, D] with Hq % Hkv == 0 (GQA/MQA) -> [B, Hq, T, D]."""
    B, Hq, T, D = q.shape
    S = k.shape[2]
    if _use_flash(q, mask_kind, prefix_len, key_padding, mask_ar):
        return _flash(q, k, v, mask_kind, segment_ids, scale, dropout_p)
    if mask_kind == "causal" and key_padding is None and T == S:
        return F.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=scale, dropout_p=dropout_p, enable_gqa=Hq != k.shape[1]
        )
    if mask_kind == "packed" and mask_ar is None and key_padding is None and T == S:
        if segment_ids is None:
            raise ValueError("mask_kind='packed' needs segment_ids [B, T]")
        if q.device.type == "cpu":
            runs = _segment_runs(segment_ids)
            if _per_segment_pays(runs, T):
                return _per_segment(q, k, v, runs, scale, dropout_p)
    mask = build_mask(
        mask_kind, T, S, device=q.device, prefix_len=prefix_len,
        segment_ids=segment_ids, key_padding=key_padding, mask_ar=mask_ar,
    )  # fmt: skip
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, scale=scale, dropout_p=dropout_p, enable_gqa=Hq != k.shape[1]
    )


# Below this width one dense SDPA call beats a call per segment; above it, per segment wins unless
# the segments need most of the row's [T, T] scores anyway, a share that grows with the width as
# the per-call overhead weighs less (2 CPU threads, q [4, 4, T, 64], GQA 2 KV heads, forward +
# backward: T = 128 dense 1.25x faster; T = 256 per segment 1.1-1.3x faster with samples of
# ~32-96 tokens, 1.05x slower at half the dense scores; T = 512 per segment 1.1x faster even at
# 0.84 of them; T = 1024 2.6-4.5x). `benchmarks/packed_attention.py`, BENCHMARKS.md "Attention".
PER_SEGMENT_MIN_LEN = 256


def _max_score_share(width: int) -> float:
    return min(0.9, width / 512)


def _segment_runs(segment_ids: torch.Tensor) -> list[tuple[list[int], list[int]]]:
    """Per row: the ids and lengths of its runs of equal segment id (read on the host)."""
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    runs = []
    for row, row_starts in zip(segment_ids, starts):
        begin = torch.nonzero(row_starts).flatten()
        sizes = torch.diff(begin, append=begin.new_tensor([row.shape[0]]))
        runs.append((row[begin].tolist(), sizes.tolist()))
    return runs


def _per_segment_pays(runs: list[tuple[list[int], list[int]]], width: int) -> bool:
    """Whether SDPA per segment is faster than the dense mask on CPU: rows of at least
    PER_SEGMENT_MIN_LEN whose segments need at most `_max_score_share` of the dense scores."""
    if width < PER_SEGMENT_MIN_LEN:
        return False
    scores = sum(n * n for ids, sizes in runs for seg, n in zip(ids, sizes) if seg >= 0)
    return scores <= _max_score_share(width) * len(runs) * width * width


def _per_segment(q, k, v, runs, scale, dropout_p):
    """Packed rows without the dense [T, T] mask: causal SDPA on each segment alone, so attention
    costs the sum of the segments' squares instead of rows x T^2. Computes what the dense mask
    does (tests/test_packed_attention.py): a segment is a contiguous run of equal id, as in the
    flash path and as PackedCollate lays them out; a padding position (id -1) sees only itself,
    so its output is its own value (its KV head's, for each query head of the group).

    CPU only: the runs are read on the host, and on an accelerator that sync and the many small
    kernels were not measured against the dense mask. Split and cat (not slicing) keep the
    backward to one copy per tensor instead of one full-size gradient per segment.
    (flex_attention, the other way to skip the masked blocks, has no backward on CPU in torch
    2.13.)"""
    groups = q.shape[1] // k.shape[1]
    gqa = groups > 1
    rows = []
    # [1, H, T, D] rows, not unbind's [H, T, D]: CPU SDPA is ~2.5x slower on 3-d inputs
    for (ids, sizes), qb, kb, vb in zip(runs, q.split(1), k.split(1), v.split(1)):
        pieces = []
        for seg, qs, ks, vs in zip(
            ids, qb.split(sizes, dim=2), kb.split(sizes, dim=2), vb.split(sizes, dim=2)
        ):
            if seg < 0:  # padding: the softmax over itself alone is 1
                out = vs.repeat_interleave(groups, dim=1)
            else:
                out = F.scaled_dot_product_attention(
                    qs, ks, vs, is_causal=True, scale=scale, dropout_p=dropout_p, enable_gqa=gqa
                )
            pieces.append(out)
        rows.append(torch.cat(pieces, dim=2))
    return torch.cat(rows)


def _use_flash(q, mask_kind, prefix_len, key_padding, mask_ar) -> bool:
    # flash-attn has no arbitrary masks: prefix-LM and padded keys take the SDPA path.
    return (
        HAVE_FLASH
        and q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
        and mask_kind in ("causal", "bidirectional", "packed")
        and key_padding is None
        and prefix_len is None
        and mask_ar is None
    )


def _flash(q, k, v, mask_kind, segment_ids, scale, dropout_p):  # pragma: no cover - CUDA only
    # flash-attn wants [B, T, H, D].
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    B, T, H, D = q.shape
    if mask_kind != "packed":
        out = flash_attn_func(
            q, k, v, dropout_p=dropout_p, softmax_scale=scale, causal=mask_kind == "causal"
        )
        return out.transpose(1, 2)
    # Packed: segments are contiguous runs of equal id in each row -> cumulative lengths.
    # (Decoding with a packed mask is not supported; T == S here.)
    flat_seg = segment_ids.reshape(-1)
    row_start = torch.zeros_like(flat_seg, dtype=torch.bool)
    row_start[::T] = True
    starts = row_start | torch.cat(
        [flat_seg.new_ones(1, dtype=torch.bool), flat_seg[1:] != flat_seg[:-1]]
    )
    idx = torch.nonzero(starts).flatten()
    cu = torch.cat([idx, idx.new_tensor([flat_seg.numel()])]).to(torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max())
    out = flash_attn_varlen_func(
        q.reshape(B * T, H, D), k.reshape(B * T, -1, D), v.reshape(B * T, -1, D),
        cu, cu, max_len, max_len, dropout_p=dropout_p, softmax_scale=scale, causal=True,
    )  # fmt: skip
    return out.reshape(B, T, H, D).transpose(1, 2)
