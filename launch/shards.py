"""`vlscale shards synthetic|cc3m|synthetic-vqa|synthetic-cot|synthetic-preference|finevision|
rlaif-v|llava-cot|index|paligemma-tokenizer`: write or fetch training data.

synthetic / cc3m / finevision write webdataset shards (+ sizes.json); rlaif-v (preference pairs,
for DPO) and llava-cot (chain-of-thought, for CoT SFT) convert local copies of those datasets
(core/data/preference_sources.py: the layouts and the shard schema); synthetic-vqa writes
FineVision-format parquet (+ a tokenizer) that `finevision --source DIR` converts to shards;
synthetic-cot writes shapes chains of thought in LLaVA-CoT-100k's layout that `llava-cot` converts;
synthetic-preference writes reasoned shapes preference pairs in RLAIF-V's layout for `rlaif-v`;
index writes the sizes.json of shards written elsewhere (img2dataset, pixparse) from their
`*_stats.json` / `_info.json`, without reading the tars.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from core.data.finevision import FINEVISION_REPO, RATINGS, convert_finevision
from core.data.preference_sources import TAGS, convert_llava_cot, convert_rlaif_v
from core.data.shards import (
    CC3M_REPO,
    fetch_cc3m,
    index_shards,
    listed_counts,
    read_sizes,
    write_sizes,
)
from core.data.synthetic import (
    VQA_SUBSETS,
    write_finevision_parquet,
    write_llava_cot_jsonl,
    write_rlaif_v_parquet,
    write_synthetic_shards,
)


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
        "Hugging Face dataset, into --out, and write sizes.json: shards the source's _info.json "
        "lists are counted from it (as `vlscale shards index` does), the others read back.",
    )
    cc3m.add_argument("--out", type=Path, required=True)
    cc3m.add_argument(
        "--source", default=CC3M_REPO, help="local directory or hub dataset id (%(default)s)"
    )
    cc3m.add_argument("--splits", nargs="+", default=["train", "validation"])
    cc3m.add_argument(
        "--verify", action="store_true", help="read every tar back, even those _info.json lists"
    )
    index = sub.add_parser(
        "index",
        help="write DIR/sizes.json from img2dataset *_stats.json or an _info.json, reading no tar",
        description="Count the shards in DIR matching --pattern from the files their writer left "
        "beside them: img2dataset's NNNNN_stats.json ('successes': samples written to NNNNN.tar) "
        "or an _info.json / info.json (pixparse/timm: splits.<split>.filenames + shard_lengths), "
        "and merge the counts into DIR/sizes.json. A listed count is checked only against the "
        "file size. Exits 2 when DIR has neither kind of file (unless --read), 1 when some "
        "shards could not be counted (they are named, and left out of sizes.json).",
    )
    index.add_argument("dir", type=Path, metavar="DIR")
    index.add_argument("--pattern", default="*.tar", help="shard file names, a glob (%(default)s)")
    index.add_argument(
        "--read",
        action="store_true",
        help="count shards that no stats or info file lists (or lists wrongly) by reading them",
    )
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
    cot = sub.add_parser(
        "synthetic-cot",
        help="seeded shapes chains of thought in LLaVA-CoT-100k's layout (jsonl + images)",
        description="Write OUT/train.jsonl (LLaVA-CoT-100k's rows: a question and a "
        "<SUMMARY><CAPTION><REASONING><CONCLUSION> answer per image) and OUT/images/; convert "
        "them with `vlscale shards llava-cot --source OUT/train.jsonl --images OUT --out DIR`.",
    )
    pref = sub.add_parser(
        "synthetic-preference",
        help="seeded shapes preference pairs, reasoned, in RLAIF-V's layout (parquet)",
        description="Write OUT/RLAIF-V-Dataset_000.parquet (openbmb/RLAIF-V-Dataset's columns): "
        "a colour question per image, chosen the true chain of thought and answer, rejected "
        "the same with a wrong colour, throughout in even rows and in the final answer only in "
        "odd ones, both in --format (as stage 3 renders them); convert with `vlscale shards "
        "rlaif-v --source OUT --out DIR`.",
    )
    for parser_, rows in ((cot, "rows (one image and question each)"),
                          (pref, "pairs (one image each)")):  # fmt: skip
        parser_.add_argument("--out", type=Path, required=True)
        parser_.add_argument("--rows", type=int, required=True, help=rows)
        parser_.add_argument("--seed", type=int, default=0)
        parser_.add_argument("--image-size", type=int, default=64, help="image side in pixels")
    pref.add_argument("--format", choices=("think", "llava_cot"), default="think")
    finevision = sub.add_parser(
        "finevision",
        help="convert FineVision subsets (hub or local parquet) to webdataset shards",
        description="Stream each subset from a hub dataset (one config per subset) or read "
        "<source>/<subset>/train-*.parquet, and write <out>/<subset>/{train,val}-NNNNNN.tar and "
        "sizes.json. Val is held out by a hash of each row's content (images and texts): a "
        "uniform sample, disjoint from train, at a given fraction the same rows whatever the "
        "order, re-download or filtering; --val-fraction of the rows, or about --val-samples of "
        "them (a local subset's val-*.parquet when it has one: its first --val-samples rows). "
        "Unusable rows, and with --min-rating low-rated ones, are skipped and counted by reason.",
    )
    finevision.add_argument(
        "--source", default=FINEVISION_REPO, help="hub dataset id or local directory (%(default)s)"
    )
    finevision.add_argument(
        "--subsets", required=True, help="comma-separated subset (config) names, e.g. a,b,c"
    )
    finevision.add_argument("--out", type=Path, required=True)
    finevision.add_argument(
        "--val-samples",
        type=int,
        default=256,
        help="per subset: the val target count, fraction = N / the subset's rows (%(default)s)",
    )
    finevision.add_argument(
        "--val-fraction",
        type=float,
        default=None,
        help="fraction of a subset's rows held out for val (overrides --val-samples)",
    )
    finevision.add_argument(
        "--min-rating",
        type=int,
        default=None,
        choices=range(1, 6),
        metavar="N",
        help="drop a row when any of --ratings is below N (1-5) on one of its turns "
        "(FineVision's <rating>_min < N); counted as low_<rating> / unrated_<rating>",
    )
    finevision.add_argument(
        "--ratings",
        default=",".join(RATINGS),
        help="the rating columns --min-rating checks, comma-separated (%(default)s)",
    )
    finevision.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes converting rows (output identical for any number; %(default)s)",
    )
    rlaif_v = sub.add_parser(
        "rlaif-v",
        help="convert RLAIF-V preference pairs (local parquet) to webdataset shards",
        description="Read openbmb/RLAIF-V-Dataset parquet files (or HuggingFaceH4/rlaif-v_"
        "formatted's) and write OUT/{train,val}-NNNNNN.tar of {image, prompt, chosen, rejected} "
        "samples and sizes.json. Val is held out by a hash of each sample's image, so all pairs "
        "about one image land on the same side. Unusable rows are skipped and counted by reason.",
    )
    rlaif_v.add_argument(
        "--source", nargs="+", required=True, metavar="PATH",
        help="parquet files, or directories searched for them",
    )  # fmt: skip
    llava_cot = sub.add_parser(
        "llava-cot",
        help="convert LLaVA-CoT-100k (or R1-format) chain-of-thought rows to webdataset shards",
        description="Read Xkev/LLaVA-CoT-100k's train.jsonl (or .json / .parquet rows, e.g. "
        "di-zhang-fdu/llava-cot-100k-r1-format's) with images under --images, and write "
        "OUT/{train,val}-NNNNNN.tar of {image, question, reasoning, answer} samples, one per "
        "question-answer turn, and sizes.json. Answers whose tags do not parse are skipped and "
        "counted (bad_tags), as is every other unusable row or turn, by reason.",
    )
    llava_cot.add_argument(
        "--source", nargs="+", required=True, metavar="PATH",
        help=".jsonl / .json / .parquet files, or directories searched for them",
    )  # fmt: skip
    llava_cot.add_argument(
        "--images", type=Path, required=True, help="the directory the rows' image paths are in"
    )
    llava_cot.add_argument(
        "--tags",
        choices=[t.replace("_", "-") for t in TAGS],
        default="llava-cot",
        help="answer format: <SUMMARY>..<CONCLUSION> (llava-cot) or <think>..<answer> (r1)",
    )
    for preference_or_cot in (rlaif_v, llava_cot):
        preference_or_cot.add_argument("--out", type=Path, required=True)
        preference_or_cot.add_argument(
            "--val-fraction",
            type=float,
            default=0.01,
            help="fraction of the images whose samples are held out for val (%(default)s)",
        )
        preference_or_cot.add_argument(
            "--shard-size", type=int, default=1000, help="samples per shard"
        )
        preference_or_cot.add_argument(
            "--max-samples", type=int, default=None, help="rows read (default: all)"
        )
    paligemma = sub.add_parser(
        "paligemma-tokenizer",
        help="a tokenizer plus PaliGemma's <image>, <loc####> and <seg###> tokens",
        description="Load the tokenizer in SOURCE, add PaliGemma's <image> token (special), the "
        "1024 <loc####> and 128 <seg###> tokens (single tokens that decoding keeps) and <bos>/"
        "<eos>/<pad> where it has none, and save it to OUT (task.kind paligemma's model.tokenizer"
        "; google/paligemma-* tokenizers have these tokens already).",
    )
    paligemma.add_argument("source", type=Path, metavar="SOURCE")
    paligemma.add_argument("out", type=Path, metavar="OUT")
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
    if args.source_kind == "synthetic-cot":
        path = write_llava_cot_jsonl(args.out, args.rows, args.seed, image_size=args.image_size)
        seconds = time.perf_counter() - start
        print(f"{args.rows} rows at {path} (images in {args.out / 'images'}; {seconds:.1f} s)")
        return 0
    if args.source_kind == "synthetic-preference":
        path = write_rlaif_v_parquet(args.out, args.rows, args.seed, args.image_size, args.format)
        print(f"{args.rows} pairs at {path} ({time.perf_counter() - start:.1f} s)")
        return 0
    if args.source_kind == "finevision":
        return _finevision(args, start)
    if args.source_kind in ("rlaif-v", "llava-cot"):
        return _preference_or_cot(args, start)
    if args.source_kind == "paligemma-tokenizer":
        from core.data.prefix_lm import paligemma_tokenizer

        tok = paligemma_tokenizer(args.source, args.out)
        print(f"{len(tok)} tokens ({args.source} + PaliGemma's) at {args.out}")
        return 0
    if args.source_kind == "index":
        return _index(args, start)
    if args.source_kind == "synthetic":
        sizes = write_synthetic_shards(
            args.out, args.train, args.val, args.seed, args.shard_size, args.image_size
        )
        bad = []
    else:
        sizes, bad = fetch_cc3m(args.out, args.source, args.splits, verify=args.verify)
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
            args.source,
            subsets,
            args.out,
            args.val_samples,
            args.shard_size,
            args.max_samples,
            val_fraction=args.val_fraction,
            min_rating=args.min_rating,
            rating_columns=[name.strip() for name in args.ratings.split(",") if name.strip()],
            workers=args.workers,
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


def _preference_or_cot(args: argparse.Namespace, start: float) -> int:
    options = dict(
        val_fraction=args.val_fraction, shard_size=args.shard_size, max_samples=args.max_samples
    )
    try:
        if args.source_kind == "rlaif-v":
            result = convert_rlaif_v(args.source, args.out, **options)
            read = f"{result['rows']} rows"
        else:
            tags = args.tags.replace("-", "_")
            result = convert_llava_cot(args.source, args.images, args.out, tags=tags, **options)
            read = f"{result['rows']} rows, {result['turns']} turns"
    except (FileNotFoundError, ValueError) as err:  # bad source or sizes: one line
        print(f"vlscale shards {args.source_kind}: error: {err}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    skipped = result["skipped"]
    reasons = ", ".join(f"{reason} {n}" for reason, n in skipped.items())
    summary = f"; skipped {sum(skipped.values())} ({reasons})" if skipped else ""
    print(
        f"{result['train']} train, {result['val']} val samples from {read} at {args.out} "
        f"({seconds:.1f} s){summary}"
    )
    return 0 if result["train"] else 1


def _index(args: argparse.Namespace, start: float) -> int:
    directory = args.dir
    names = sorted(p.name for p in directory.glob(args.pattern) if p.is_file())
    try:
        if not names:
            raise FileNotFoundError(f"no files matching {args.pattern!r} in {directory}")
        listed = listed_counts(directory)
        if not any(listed) and not args.read:
            raise FileNotFoundError(
                f"{directory} has no _info.json, info.json or *_stats.json (img2dataset) to "
                "count the shards from; --read counts them by reading every tar"
            )
    except (FileNotFoundError, ValueError) as err:
        print(f"vlscale shards index: error: {err}", file=sys.stderr)
        return 2
    index = index_shards(directory, names, read=args.read, listed=listed)
    # merged into what sizes.json holds, less the shards that can no longer be counted
    existing = read_sizes(directory)
    stale = [name for name in existing if name in index.problems]
    sizes = {k: v for k, v in existing.items() if k not in stale} | index.sizes
    if sizes != existing:
        write_sizes(directory, sizes, merge=False)
    for name, problem in index.problems.items():
        print(f"{name}: {problem}", file=sys.stderr)
    sources = ", ".join(f"{n} from {source}" for source, n in sorted(index.sources.items()))
    seconds = time.perf_counter() - start
    print(
        (
            f"{sum(index.sizes.values())} samples in {len(index.sizes)} shards ({sources}) "
            f"written to {directory / 'sizes.json'}"
            if index.sizes
            else "no shard counted"
        )
        + f" ({seconds:.1f} s)"
        + (f"; not counted: {len(index.problems)} shards (above)" if index.problems else "")
        + (f"; {len(stale)} stale entries removed" if stale else "")
    )
    return 1 if index.problems else 0
