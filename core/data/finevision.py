"""FineVision (or FineVision-format parquet) -> WebDataset tar shards for the staged VLM.

Source: a hub dataset id (default HuggingFaceM4/FineVision, one config per subset, streamed with
`datasets`), or a local directory in the layout `write_finevision_parquet` writes:
`<source>/<subset>/train-*.parquet` (+ optional `val-*.parquet`, + optional `tokenizer/`).

Output per subset: `<out>/<subset>/{train,val}-%06d.tar` and `<out>/<subset>/sizes.json`. The
first `val_samples` converted rows of a subset's train split go to val (FineVision has only a
train split); a local subset with `val-*.parquet` files takes its val samples from those instead.
Each sample is `{key}.{i}.{ext}` per image (its original bytes; ext from the image format,
e.g. jpg, png) and `{key}.json`: {"texts": [{"user", "assistant"}], "source", "num_images", and
FineVision's rating columns when present}. Keys are `<subset>-<split>-<source row:09d>`, unique
across subsets. Rows that cannot be used (no turns, no non-blank answer, malformed texts, missing
or undecodable images) are skipped and counted by reason, and reported.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import re
import shutil
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

from PIL import Image

from core.data.chat import clean_texts, has_answer
from core.data.errors import BadSample
from core.data.shards import write_sizes, write_tar

log = logging.getLogger(__name__)

FINEVISION_REPO = "HuggingFaceM4/FineVision"
# Image formats whose usual file extension is not the lower-case format name.
EXTENSIONS = {"JPEG": "jpg", "MPO": "jpg", "TIFF": "tif"}
SHARD_PATTERN = re.compile(r"^(train|val)-\d{6}\.tar$")
LOG_SKIPPED = 5  # skipped rows logged one by one per subset; the rest only counted
LOG_EVERY = 10_000


def convert_finevision(
    source: str | Path,
    subsets: Iterable[str],
    out_dir: str | Path,
    val_samples: int,
    shard_size: int,
    max_samples: int | None = None,
) -> dict[str, dict]:
    """Convert each subset; returns {subset: {"train": samples, "val": samples,
    "skipped": {reason: rows}}}. `max_samples` caps the rows read from a subset's train split
    (val rows taken from it included). The source's tokenizer/ directory, if any, is copied."""
    if shard_size < 1 or val_samples < 0:
        raise ValueError("shard_size must be >= 1 and val_samples >= 0")
    source, local = _resolve_source(source)
    out_dir = Path(out_dir)
    results = {}
    for subset in subsets:
        train_rows = _rows(source, subset, "train", local)
        if max_samples is not None:
            train_rows = itertools.islice(train_rows, max_samples)
        val_rows = None
        if local and any((source / subset).glob("val-*.parquet")):
            val_rows = _rows(source, subset, "val", local)
        results[subset] = _convert_subset(
            subset, train_rows, val_rows, out_dir / subset, val_samples, shard_size
        )
    if local and (source / "tokenizer").is_dir():
        shutil.copytree(source / "tokenizer", out_dir / "tokenizer", dirs_exist_ok=True)
    return results


def _resolve_source(source: str | Path) -> tuple[Path | str, bool]:
    """(local directory, True) or (hub dataset id, False)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path, True
    text = str(source)
    if text.startswith(("/", ".", "~")) or text.count("/") != 1:
        raise FileNotFoundError(
            f"{text!r} is neither a directory nor a hub dataset id (owner/name)"
        )
    return text, False


def _rows(source: Path | str, subset: str, split: str, local: bool) -> Iterator[dict]:
    """Rows of a subset's split with images undecoded ({"bytes", "path"} dicts)."""
    from datasets import load_dataset

    if not local:
        dataset = load_dataset(source, subset, split="train", streaming=True)
        return iter(dataset.decode(False))
    directory = source / subset
    files = sorted(directory.glob(f"{split}-*.parquet"))
    if not files:
        present = sorted(p.name for p in source.iterdir() if any(p.glob("train-*.parquet")))
        raise FileNotFoundError(
            f"no {split}-*.parquet in {directory}; subsets in {source}: {', '.join(present)}"
        )
    dataset = load_dataset(
        "parquet", data_files={split: [str(f) for f in files]}, split=split, streaming=True
    )
    return iter(dataset.decode(False))


def _convert_subset(
    subset: str,
    train_rows: Iterator[dict],
    val_rows: Iterator[dict] | None,
    out: Path,
    val_samples: int,
    shard_size: int,
) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    skipped: Counter = Counter()
    train = _samples(train_rows, subset, "train", skipped)
    # Without val files, the first converted train rows are the val split.
    val = train if val_rows is None else _samples(val_rows, subset, "val", skipped)
    stem = subset.replace(".", "_")  # a dot would end the webdataset key
    sizes = _write_shards(out, stem, "val", itertools.islice(val, val_samples), shard_size)
    sizes |= _write_shards(out, stem, "train", train, shard_size)
    for path in out.glob("*.tar"):  # shards of an earlier, larger conversion
        if SHARD_PATTERN.match(path.name) and path.name not in sizes:
            path.unlink()
    write_sizes(out, sizes, merge=False)
    counts = {
        split: sum(n for name, n in sizes.items() if name.startswith(split))
        for split in ("train", "val")
    }
    if skipped:
        summary = ", ".join(f"{reason}: {n}" for reason, n in sorted(skipped.items()))
        log.warning("%s: skipped %d rows (%s)", subset, sum(skipped.values()), summary)
    if not counts["train"]:
        log.warning("%s: no train samples were written", subset)
    return {**counts, "skipped": dict(sorted(skipped.items()))}


def _samples(rows, subset: str, split: str, skipped: Counter) -> Iterator[tuple[int, dict]]:
    """(row index, {member: bytes}) of every usable row; unusable ones counted in `skipped`."""
    for index, row in enumerate(rows):
        if index and index % LOG_EVERY == 0:
            log.info("%s %s: %d rows read", subset, split, index)
        try:
            fields = convert_row(row, subset)
        except BadSample as bad:
            skipped[bad.reason] += 1
            if sum(skipped.values()) <= LOG_SKIPPED:
                log.warning("%s %s row %d skipped: %s", subset, split, index, bad.reason)
            continue
        yield index, fields


def convert_row(row: dict, subset: str) -> dict[str, bytes]:
    """One FineVision row (images undecoded) -> tar members; BadSample when unusable."""
    texts = clean_texts(row.get("texts"))
    if not has_answer(texts):
        raise BadSample("empty_texts")
    images = row.get("images") or []
    fields = {}
    for i, image in enumerate(images):
        data = image.get("bytes") if isinstance(image, dict) else None
        if not data:
            raise BadSample("missing_image")
        fields[f"{i}.{image_extension(data)}"] = data
    source = row.get("source")
    record = {
        "texts": texts,
        "source": source if isinstance(source, str) and source else subset,
        "num_images": len(images),
    }
    for name, value in row.items():  # the rating columns
        if name not in ("images", "texts", "source") and _is_plain(value):
            record[name] = value
    fields["json"] = json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode()
    return fields


def image_extension(data: bytes) -> str:
    """File extension of encoded image bytes after decoding them fully (at the cheapest JPEG
    scale); BadSample("bad_image") when they do not decode."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image_format = image.format
            image.draft(image.mode, (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()
    except Exception:  # PIL raises many types for broken or non-image data
        raise BadSample("bad_image") from None
    if not image_format:
        raise BadSample("bad_image")
    return EXTENSIONS.get(image_format, image_format.lower())


def _is_plain(value) -> bool:
    if isinstance(value, list):
        return all(_is_plain(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


def _write_shards(
    out: Path, stem: str, split: str, samples: Iterator[tuple[int, dict]], shard_size: int
) -> dict[str, int]:
    """`out/{split}-%06d.tar` of at most shard_size samples each, keyed stem-split-row."""
    keyed = ((f"{stem}-{split}-{index:09d}", fields) for index, fields in samples)
    sizes = {}
    for shard in itertools.count():
        first = next(keyed, None)
        if first is None:
            break
        name = f"{split}-{shard:06d}.tar"
        chunk = itertools.chain([first], itertools.islice(keyed, shard_size - 1))
        sizes[name] = write_tar(out / name, chunk)
        log.info("wrote %s (%d samples)", out / name, sizes[name])
    return sizes
