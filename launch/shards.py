"""`vlscale shards synthetic|cc3m`: write or fetch webdataset shards (+ sizes.json)."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from core.data.shards import CC3M_REPO, fetch_cc3m
from core.data.synthetic import write_synthetic_shards


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


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
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
