"""Packed causal attention on CPU: the dense [T, T] mask vs SDPA per segment, by row width and
sample length, and which one `core.models.attention.attention` picks (`_per_segment_pays`).

  .venv/bin/python benchmarks/packed_attention.py [--threads 2]

Forward + backward of one call with a tiny LM's shapes (q [4, 4, T, 64], k/v 2 heads, fp32); four
rows of samples of random length around --lengths (uniform in [n/2, 3n/2]), each row filled to
within 8 tokens; median of 7 interleaved rounds. Prints dense / per-segment time ratios: > 1 means
per segment is faster. The two outputs are checked equal first.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from core.models.attention import _per_segment, _per_segment_pays, _segment_runs, build_mask


def layout(rows: int, width: int, length: int, gen: torch.Generator) -> torch.Tensor:
    segment_ids = torch.full((rows, width), -1, dtype=torch.long)
    for r in range(rows):
        start, seg = 0, 0
        while start < width - 8:
            n = int(torch.randint(length // 2, length * 3 // 2 + 1, (), generator=gen))
            n = min(n, width - start)
            segment_ids[r, start : start + n] = seg
            seg, start = seg + 1, start + n
    return segment_ids


def time_both(segment_ids: torch.Tensor, gen: torch.Generator) -> tuple[float, float]:
    """Median seconds of forward + backward: (dense mask, per segment)."""
    rows, width = segment_ids.shape
    q = torch.randn(rows, 4, width, 64, generator=gen, requires_grad=True)
    k, v = (torch.randn(rows, 2, width, 64, generator=gen, requires_grad=True) for _ in "kv")
    grad = torch.randn(q.shape, generator=gen)

    def dense():
        mask = build_mask("packed", width, width, device=q.device, segment_ids=segment_ids)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    def per_segment():
        return _per_segment(q, k, v, _segment_runs(segment_ids), None, 0.0)

    torch.testing.assert_close(per_segment(), dense(), atol=1e-5, rtol=1e-5)
    times: dict[str, list[float]] = {"dense": [], "per segment": []}
    for _ in range(7):
        for name, fn in (("dense", dense), ("per segment", per_segment)):
            start = time.perf_counter()
            fn().backward(grad)
            times[name].append(time.perf_counter() - start)
            q.grad = k.grad = v.grad = None
    return statistics.median(times["dense"]), statistics.median(times["per segment"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--widths", type=int, nargs="+", default=[128, 256, 384, 512, 768, 1024])
    p.add_argument("--lengths", type=int, nargs="+", default=[32, 96, 256])
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    print(f"threads={args.threads}; ms, forward + backward, median of 7 interleaved rounds")
    print(
        "| T | sample length | segments | share of dense scores | dense | per segment "
        "| dense / per segment | picked |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for width in args.widths:
        for length in (n for n in args.lengths if n <= width):
            segment_ids = layout(4, width, length, gen)
            runs = _segment_runs(segment_ids)
            d, s = time_both(segment_ids, gen)
            segments = sum(1 for ids, _ in runs for seg in ids if seg >= 0)
            share = sum(n * n for ids, ns in runs for seg, n in zip(ids, ns) if seg >= 0) / (
                4 * width * width
            )
            picked = "per segment" if _per_segment_pays(runs, width) else "dense"
            print(
                f"| {width} | ~{length} | {segments} | {share:.2f} | {1e3 * d:.2f} | {1e3 * s:.2f} "
                f"| {d / s:.2f} | {picked} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
