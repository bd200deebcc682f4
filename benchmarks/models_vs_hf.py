"""Forward + backward time of our Decoder vs transformers' module with the same weights.

    python benchmarks/models_vs_hf.py --iters 5    # defaults: qwen2, 4 layers, hidden 512,
                                                    # seq 512, batch 4, fp32, CPU
    python benchmarks/models_vs_hf.py --device cuda --dtype bfloat16 --layers 24 --hidden 896 \
        --intermediate 4864 --heads 14 --kv-heads 2 --vocab 151936 --seq 2048 --batch 8
                                                    # Qwen2.5-0.5B's shape on a GPU

Both run in one process, timed alternately after warmup (ours, theirs, theirs, ours, ...: the
order flips every pair so neither always runs first), so machine load affects both alike.
transformers uses its "sdpa" attention, as we do. Prints the median seconds per iteration and
the ratio theirs / ours (>= 1.0: ours is not slower), both as the ratio of the medians and as
the median ratio of back-to-back pairs (steadier on a shared machine whose load drifts). Below
fp32 it also prints each model's largest logit error against transformers' model in fp32 on the
same rounded weights (the two round differently; neither is the reference).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F
import transformers

import core.models

CONFIGS = {
    "qwen2": transformers.Qwen2Config,
    "qwen3": transformers.Qwen3Config,
    "llama": transformers.LlamaConfig,
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--family", choices=sorted(CONFIGS), default="qwen2")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=1408)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="cpu", help="cpu | cuda (timings CUDA-synchronised)")
    return p.parse_args()


def build_pair(args) -> tuple[torch.nn.Module, torch.nn.Module]:
    """transformers' model and ours, loaded from the checkpoint it saved."""
    cfg = CONFIGS[args.family](
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(args.seq, 128),
        use_cache=False,
    )
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    theirs = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    with tempfile.TemporaryDirectory() as tmp:
        theirs.save_pretrained(tmp)
        ours = core.models.from_pretrained(tmp, dtype=dtype)
    return ours.to(args.device).train(), theirs.to(args.device, dtype).train()


def fwd_bwd(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor, hf: bool) -> float:
    model.zero_grad(set_to_none=True)
    _sync(ids.device)
    start = time.perf_counter()
    logits = model(ids, use_cache=False).logits if hf else model(ids)
    F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten()).backward()
    _sync(ids.device)
    return time.perf_counter() - start


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ours, theirs = build_pair(args)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(args.device)
    labels = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(args.device)
    with torch.no_grad():  # sanity check: same weights, same function
        mine, hf = ours(ids).float(), theirs(ids, use_cache=False).logits.float()
        diff = (mine - hf).abs().max()
        if args.dtype != "float32":
            # Below fp32 the two round differently; the independent reference is transformers'
            # model on the same (rounded) weights in fp32: each one's error against it.
            ref = copy.deepcopy(theirs).float()(ids, use_cache=False).logits
            for name, x in (("ours", mine), ("transformers", hf)):
                e = (x - ref).abs()
                print(f"{args.dtype} vs the fp32 reference, {name}: |logit error| max "
                      f"{e.max():.4f}, mean {e.mean():.5f} (|logit| max {ref.abs().max():.2f}, "
                      f"mean {ref.abs().mean():.3f})")  # fmt: skip
            del ref
    times: dict[str, list[float]] = {"ours": [], "theirs": []}
    pair = [("ours", ours), ("theirs", theirs)]
    for i in range(args.warmup + args.iters):
        for name, model in pair if i % 2 == 0 else pair[::-1]:
            elapsed = fwd_bwd(model, ids, labels, hf=name == "theirs")
            if i >= args.warmup:
                times[name].append(elapsed)
    med = {name: statistics.median(t) for name, t in times.items()}
    print(
        f"{args.family} layers={args.layers} hidden={args.hidden} heads={args.heads}/"
        f"{args.kv_heads} seq={args.seq} batch={args.batch} {args.dtype} "
        f"{args.device} threads={torch.get_num_threads()} iters={args.iters} "
        f"(max |logit diff| {diff:.1e})"
    )
    print(f"fwd+bwd median s/iter: ours {med['ours']:.4f}  transformers {med['theirs']:.4f}")
    paired = statistics.median(t / o for o, t in zip(times["ours"], times["theirs"]))
    print(f"ratio theirs/ours: {med['theirs'] / med['ours']:.3f} (paired: {paired:.3f})")


if __name__ == "__main__":
    main()
