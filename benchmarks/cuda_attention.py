"""The attention entry point on a GPU: the same function as a float64 reference, which kernels
run it, and what packed rows cost there.

    python benchmarks/cuda_attention.py            # on CUDA (falls back to CPU: a dry run)
    python benchmarks/cuda_attention.py --json out.json

1. Parity. For every mask kind the models use (causal, bidirectional, prefix-LM by length and by
   big_vision's mask_ar, packed causal and packed prefix-LM with padding, padded keys, one-token
   KV-cache decoding) `core.models.attention.attention` runs on the device in fp32 and bf16,
   forward and backward, against the textbook formula softmax(q k^T * scale + mask) v in
   float64 on the CPU (GQA by repeating k and v; the mask from `build_mask`, whose semantics the
   CPU tests check against hand-written cases), from the same inputs rounded to fp32 or bf16, so
   what is left is the kernel's own error. Prints the largest absolute error of the output
   and of dq, dk, dv, each over the reference's largest magnitude. flash-attn takes the causal
   and packed-causal cases when it is installed (`HAVE_FLASH`); torch SDPA the rest.
2. Kernels. torch's profiler names the CUDA kernels each case launched (flash, memory-efficient,
   cuDNN or the math fallback).
3. Cost of packing without flash-attn: forward + backward of a Qwen2.5-0.5B-shaped attention
   layer (14 query / 2 KV heads of 64, bf16) over rows of T tokens, causal (one sample per row)
   against packed rows of `--segments` samples each (SDPA with a dense [B, 1, T, T] mask; default
   8 and 32: a few long samples, and a VLM's many short ones), and against
   one causal SDPA call per segment (what `_per_segment` does on the CPU). Median of `--iters`,
   CUDA-synchronised; ratios against the causal row.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.models.attention import HAVE_FLASH, attention, build_mask  # noqa: E402


def reference(q, k, v, mask_kind, **kw):
    """softmax(q k^T * scale + mask) v in float64, GQA by repetition."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    mask = build_mask(mask_kind, q.shape[2], k.shape[2], device=q.device, **kw)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1) @ v


def cases(gen: torch.Generator) -> dict[str, tuple[int, int, str, dict]]:
    """name -> (q_len, kv_len, mask_kind, mask arguments), batch 3, 256 keys."""
    S, B = 256, 3
    seg = torch.full((B, S), -1, dtype=torch.long)
    seg[0, :100], seg[0, 100:256] = 0, 1  # two samples fill the row
    seg[1, :60], seg[1, 60:70], seg[1, 70:200] = 0, 1, 2  # three, then padding
    seg[2, :S] = 0
    mask_ar = torch.ones(B, S, dtype=torch.long)
    for row, starts in ((0, [(0, 30), (100, 140)]), (1, [(0, 20), (60, 65), (70, 90)]),
                        (2, [(0, 64)])):  # fmt: skip
        for a, b in starts:
            mask_ar[row, a:b] = 0  # each sample opens with a bidirectional prefix
    key_padding = torch.ones(B, S, dtype=torch.bool)
    key_padding[1, 200:], key_padding[2, 17:] = False, False
    return {
        "causal": (S, S, "causal", {}),
        "bidirectional (vision)": (S, S, "bidirectional", {}),
        "bidirectional, padded keys": (S, S, "bidirectional", {"key_padding": key_padding}),
        "prefix-LM by prefix_len": (S, S, "prefix", {"prefix_len": torch.tensor([0, 77, 256])}),
        "prefix-LM by mask_ar": (S, S, "prefix", {"mask_ar": mask_ar}),
        "packed causal, padding": (S, S, "packed", {"segment_ids": seg}),
        "packed prefix-LM": (S, S, "packed", {"segment_ids": seg, "mask_ar": mask_ar}),
        "decode 1 token (KV cache)": (1, S, "causal", {}),
        "causal, padded keys": (S, S, "causal", {"key_padding": key_padding}),
    }


def kernels_of(fn) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        names = {e.key for e in prof.key_averages() if "CUDA" in str(e.device_type)}
    except Exception as err:  # the profiler is a nicety here; parity must still print
        return [f"profiler failed: {err!r}"[:80]]
    marks = ("flash", "fmha", "attention", "efficient", "cudnn", "softmax")
    hits = [n for n in names if any(m in n.lower() for m in marks)]
    return sorted(hits)[:4] or sorted(names)[:4]


def parity(device: torch.device, gen: torch.Generator) -> list[dict]:
    B, Hq, Hkv, D = 3, 8, 2, 64
    rows = []
    for name, (T, S, kind, kw) in cases(gen).items():
        q64 = torch.randn(B, Hq, T, D, generator=gen, dtype=torch.float64)
        k64 = torch.randn(B, Hkv, S, D, generator=gen, dtype=torch.float64)
        v64 = torch.randn(B, Hkv, S, D, generator=gen, dtype=torch.float64)
        up = torch.randn(B, Hq, T, D, generator=gen, dtype=torch.float64)
        for dtype in (torch.float32, torch.bfloat16):
            # The reference sees the inputs rounded to `dtype`: what is left is the kernel's error.
            leaves = [t.to(dtype).double().requires_grad_() for t in (q64, k64, v64)]
            ref = reference(*leaves, kind, **kw)
            ref.backward(up.to(dtype).double())
            ref, ref_grads = ref.detach(), [t.grad for t in leaves]
            dev = [t.to(device, dtype).requires_grad_() for t in (q64, k64, v64)]
            kw_dev = {key: val.to(device) for key, val in kw.items()}
            out = attention(*dev, kind, **kw_dev)
            out.backward(up.to(device, dtype))
            errs = {"out": _rel(out, ref)}
            errs.update({f"d{n}": _rel(t.grad, g) for n, t, g in zip("qkv", dev, ref_grads)})
            row = {"case": name, "dtype": str(dtype).removeprefix("torch."), **errs}
            if device.type == "cuda":
                step = lambda dev=dev, kind=kind, kw=kw_dev: (
                    attention(*dev, kind, **kw).sum().backward()
                )  # noqa: E501
                row["kernels"] = kernels_of(step)
            rows.append(row)
            print(
                f"{name:<28} {row['dtype']:<8} "
                + "  ".join(f"{k} {v:.1e}" for k, v in errs.items())
                + (  # fmt: skip
                    f"   {', '.join(k[:60] for k in row.get('kernels', []))}"
                ),
                flush=True,
            )
    return rows


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.detach().double().cpu() - want).abs().max() / want.abs().max())


def packing_cost(device, T: int, segments: int, iters: int, batch: int) -> dict:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    Hq, Hkv, D = 14, 2, 64
    gen = torch.Generator(device=device).manual_seed(0)

    def leaf(heads):
        x = torch.randn(batch, heads, T, D, device=device, dtype=dtype, generator=gen)
        return x.requires_grad_()

    q, k, v = leaf(Hq), leaf(Hkv), leaf(Hkv)
    seg = torch.arange(T, device=device).div(T // segments, rounding_mode="floor")[None]
    seg = seg.clamp(max=segments - 1).expand(batch, T).contiguous()
    bounds = [(s * (T // segments), T if s == segments - 1 else (s + 1) * (T // segments))
              for s in range(segments)]  # fmt: skip

    def causal():
        attention(q, k, v, "causal").sum().backward()

    def packed():
        attention(q, k, v, "packed", segment_ids=seg).sum().backward()

    def per_segment():
        outs = [attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], "causal") for a, b in bounds]
        torch.cat(outs, dim=2).sum().backward()

    out = {}
    for name, fn in (("causal", causal), ("packed (dense mask)", packed),
                     ("per-segment causal calls", per_segment)):  # fmt: skip
        for _ in range(3):
            fn()
        times = []
        for _ in range(iters):
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - start)
        out[name] = statistics.median(times)
    base = out["causal"]
    print(f"\nfwd+bwd, batch {batch}, T {T}, {segments} segments per packed row, {Hq}/{Hkv} heads "
          f"of {D}, {str(dtype).removeprefix('torch.')}, median of {iters}:")  # fmt: skip
    for name, sec in out.items():
        print(f"  {name:<26} {1e3 * sec:8.2f} ms   {sec / base:5.2f}x causal")
    ms = {name: 1e3 * sec for name, sec in out.items()}
    return {"T": T, "segments": segments, "batch": batch, "ms": ms}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seq", type=int, default=4096, help="row length of the packing comparison")
    p.add_argument("--segments", type=int, nargs="+", default=[8, 32])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"torch {torch.__version__} on {name}; flash-attn installed: {HAVE_FLASH}")
    print("relative max |error| vs float64 reference (out, dq, dk, dv); kernels launched:")
    rows = parity(device, torch.Generator().manual_seed(0))
    cost = [packing_cost(device, args.seq, n, args.iters, args.batch) for n in args.segments]
    if args.json:
        args.json.write_text(json.dumps({"device": name, "flash_attn": HAVE_FLASH,
                                         "parity": rows, "packing": cost}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
