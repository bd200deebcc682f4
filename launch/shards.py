"""`vlscale shards synthetic|cc3m|synthetic-vqa|finevision`: write or fetch training data.

synthetic / cc3m / finevision write webdataset shards (+ sizes.json); synthetic-vqa writes
FineVision-format parquet (+ a tokenizer) that `finevision --source DIR` converts to shards.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from core.data.finevision import FINEVISION_REPO, convert_finevision
from core.data.shards import CC3M_REPO, fetch_cc3m
from core.data.synthetic import VQA_SUBSETS, write_finevision_parquet, write_synthetic_shards


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="source_kind", required=True, metavar="SOURCE")
    synthetic = sub.add_parser(
        "synthetic",
        help="seeded coloured-shapes shards, captions, QA and a BPE tokenizer",
        description="Write train-*.tar / val-*.tar, sizes.json and tokenizer/ into --out.",
    )
    synthetic.add_argument("--out", type=Path, required=True)
    synthetic.add_argument("--train", type=int, required=True, help="train samples")
    synthetic.add_argument("--val", type=int, required=True, help="validation samples")
    synthetic.add_argument("--seed", type=int, default=0)
    synthetic.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    synthetic.add_argument("--image-size", type=int, default=64, help="image side in pixels")
    cc3m = sub.add_parser(
        "cc3m",
        help="copy or download CC3M webdataset shards and verify them",
        description="Copy cc3m-{split}-NNNN.tar from a local directory, or download them from a "
        "Hugging Face dataset, into --out; then read every tar back and write sizes.json.",
    )
    cc3m.add_argument("--out", type=Path, required=True)
    cc3m.add_argument(
        "--source", default=CC3M_REPO, help="local directory or hub dataset id (%(default)s)"
    )
    cc3m.add_argument("--splits", nargs="+", default=["train", "validation"])
    vqa = sub.add_parser(
        "synthetic-vqa",
        help="seeded shapes conversations as FineVision-format parquet and a chat tokenizer",
        description="Write <subset>/train-00000.parquet and val-00000.parquet for every subset ("
        + ", ".join(VQA_SUBSETS)
        + ") and tokenizer/ (Qwen2.5 chat specials) into --out; convert them with "
        "`vlscale shards finevision --source OUT`.",
    )
    vqa.add_argument("--out", type=Path, required=True)
    vqa.add_argument("--train", type=int, required=True, help="train rows per subset")
    vqa.add_argument("--val", type=int, required=True, help="validation rows per subset")
    vqa.add_argument("--seed", type=int, default=0)
    vqa.add_argument("--image-size", type=int, default=64, help="image side in pixels")
    finevision = sub.add_parser(
        "finevision",
        help="convert FineVision subsets (hub or local parquet) to webdataset shards",
        description="Stream each subset from a hub dataset (one config per subset) or read "
        "<source>/<subset>/train-*.parquet, and write <out>/<subset>/{train,val}-NNNNNN.tar and "
        "sizes.json. The first --val-samples rows of a subset go to val (a local subset's "
        "val-*.parquet when it has one). Unusable rows are skipped and reported.",
    )
    finevision.add_argument(
        "--source", default=FINEVISION_REPO, help="hub dataset id or local directory (%(default)s)"
    )
    finevision.add_argument(
        "--subsets", required=True, help="comma-separated subset (config) names, e.g. a,b,c"
    )
    finevision.add_argument("--out", type=Path, required=True)
    finevision.add_argument("--val-samples", type=int, default=256, help="per subset")
    finevision.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    finevision.add_argument(
        "--max-samples", type=int, default=None, help="rows read per subset (default: all)"
    )


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    if args.source_kind == "synthetic-vqa":
        files = write_finevision_parquet(
            args.out, args.train, args.val, args.seed, image_size=args.image_size
        )
        seconds = time.perf_counter() - start
        print(
            f"{sum(files.values())} rows in {len(files)} parquet files and a tokenizer at "
            f"{args.out} ({seconds:.1f} s)"
        )
        return 0
    if args.source_kind == "finevision":
        return _finevision(args, start)
    if args.source_kind == "synthetic":
        sizes = write_synthetic_shards(
            args.out, args.train, args.val, args.seed, args.shard_size, args.image_size
        )
        bad = []
    else:
        sizes, bad = fetch_cc3m(args.out, args.source, args.splits)
    seconds = time.perf_counter() - start
    print(
        f"{sum(sizes.values())} samples in {len(sizes)} shards at {args.out} ({seconds:.1f} s)"
        + (f"; unreadable, left out of sizes.json: {', '.join(bad)}" if bad else "")
    )
    return 1 if bad else 0


def _finevision(args: argparse.Namespace, start: float) -> int:
    subsets = [name.strip() for name in args.subsets.split(",") if name.strip()]
    try:
        if not subsets:
            raise ValueError("--subsets names no subset")
        results = convert_finevision(
            args.source, subsets, args.out, args.val_samples, args.shard_size, args.max_samples
        )
    except (FileNotFoundError, ValueError) as err:  # bad source, subset or sizes: one line
        print(f"vlscale shards finevision: error: {err}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    for subset, result in results.items():
        skipped = result["skipped"]
        reasons = ", ".join(f"{reason} {n}" for reason, n in skipped.items())
        print(
            f"{subset}: {result['train']} train, {result['val']} val samples"
            + (f"; skipped {sum(skipped.values())} rows ({reasons})" if skipped else "")
        )
    empty = [subset for subset, result in results.items() if not result["train"]]
    print(
        f"{len(results)} subsets at {args.out} ({seconds:.1f} s)"
        + (f"; no train samples in: {', '.join(empty)}" if empty else "")
    )
    return 1 if empty else 0
