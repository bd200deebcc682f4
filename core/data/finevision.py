"""FineVision (or FineVision-format parquet) -> WebDataset tar shards for the staged VLM.

Source: a hub dataset id (default HuggingFaceM4/FineVision, one config per subset, streamed with
`datasets`), or a local directory in the layout `write_finevision_parquet` writes:
`<source>/<subset>/train-*.parquet` (+ optional `val-*.parquet`, + optional `tokenizer/`).

Output per subset: `<out>/<subset>/{train,val}-%06d.tar` and `<out>/<subset>/sizes.json`.

Validation split. FineVision has only a train split, so a row goes to val when a number drawn
from its *content* is below the val fraction (`val_draw`: a hash of its images' bytes and its
texts, mapped to [0, 1)). Val is a uniform sample of the rows, no row is in both splits, and a
row's side depends on nothing but itself and the fraction: not on its position, so at a given
fraction re-downloading a source whose rows were re-ordered, appended to or re-uploaded,
converting with `max_samples`, or filtering with `min_rating` never moves a row between val and
train (a row index would: one row inserted upstream shifts every later one); exact duplicate
rows land on the same side, so a duplicate cannot leak val into train. `val_fraction` sets the
fraction; otherwise `val_samples` is the target count, fraction = val_samples / the subset's
rows (parquet metadata, or the hub card's num_examples; capped by `max_samples`; the rows a
filter drops still count), so the count is val_samples up to binomial noise, and a source that
grows lowers the fraction (pin it with `val_fraction` across conversions of a growing source).
A local subset with `val-*.parquet` files takes its val samples from those instead (the first
`val_samples` usable rows), and all its train rows go to train.

Quality filter. FineVision rates every turn 1-5 on four criteria, columns
`{relevance,image_correspondence,visual_dependency,formatting}_ratings` (one int per turn) and
their minimum `*_min`. `min_rating` N drops a whole row when, for any of `rating_columns`, the
lowest rating of its turns is below N (the row's `*_min` < N), counted as `low_<column>` (the
first such column); a row without that rating is dropped as `unrated_<column>`. Rows, not turns:
later turns build on earlier ones, so a conversation with a turn cut out is one nobody rated.

Workers. With `workers` > 1, rows are converted (images decoded, checked) in that many spawned
processes, in chunks whose results are taken back in order: the shards are byte for byte those
of `workers=1`. Reading the source stays in this process.

Each sample is `{key}.{i}.{ext}` per image (its original bytes; ext from the image format,
e.g. jpg, png) and `{key}.json`: {"texts": [{"user", "assistant"}], "source", "num_images", and
FineVision's rating columns when present}. Keys are `<subset>-<split>-<source row:09d>`, unique
across subsets. Rows that cannot be used (no turns, no non-blank answer, malformed texts, missing
or undecodable images) are skipped and counted by reason, and reported.
"""

from __future__ import annotations

import functools
import hashlib
import io
import itertools
import json
import logging
import multiprocessing
import re
import shutil
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from PIL import Image

from core.data.chat import clean_texts, has_answer
from core.data.errors import BadSample
from core.data.shards import TarShard, write_sizes

log = logging.getLogger(__name__)

FINEVISION_REPO = "HuggingFaceM4/FineVision"
# Image formats whose usual file extension is not the lower-case format name.
EXTENSIONS = {"JPEG": "jpg", "MPO": "jpg", "TIFF": "tif"}
SHARD_PATTERN = re.compile(r"^(train|val)-\d{6}\.tar$")
LOG_SKIPPED = 5  # skipped rows logged one by one per subset; the rest only counted
LOG_EVERY = 10_000
# FineVision's per-turn quality ratings (1-5): columns <name>_ratings (a list) and <name>_min.
RATINGS = ("relevance", "image_correspondence", "visual_dependency", "formatting")
CHUNK_ROWS = 16  # rows per task handed to a conversion worker
VAL_HASH_PERSON = b"vlscale-val-1"  # changes every row's val draw if ever changed


def convert_finevision(
    source: str | Path,
    subsets: Iterable[str],
    out_dir: str | Path,
    val_samples: int,
    shard_size: int,
    max_samples: int | None = None,
    *,
    val_fraction: float | None = None,
    min_rating: int | None = None,
    rating_columns: Iterable[str] = RATINGS,
    workers: int = 1,
) -> dict[str, dict]:
    """Convert each subset; returns {subset: {"train": samples, "val": samples,
    "skipped": {reason: rows}}}. `max_samples` caps the rows read from a subset's train split
    (val rows drawn from it included). Val, `min_rating` and `workers`: see the module
    docstring. The source's tokenizer/ directory, if any, is copied."""
    rating_columns = tuple(rating_columns)
    if shard_size < 1 or val_samples < 0 or workers < 1:
        raise ValueError("shard_size and workers must be >= 1 and val_samples >= 0")
    if val_fraction is not None and not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), not {val_fraction}")
    unknown = [name for name in rating_columns if name not in RATINGS]
    if unknown or not rating_columns:
        named = ", ".join(unknown) or "none"
        raise ValueError(f"rating columns: {named}? FineVision has {', '.join(RATINGS)}")
    if min_rating is not None and not 1 <= min_rating <= 5:
        raise ValueError(f"min_rating must be 1-5 (FineVision's scale), not {min_rating}")
    source, local = _resolve_source(source)
    out_dir = Path(out_dir)
    results = {}
    # spawn, not fork: the parent may hold threads (datasets streaming, torch) a fork would copy
    pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else None
    try:
        for subset in subsets:
            train_rows, num_rows = _rows(source, subset, "train", local)
            if max_samples is not None:
                train_rows = itertools.islice(train_rows, max_samples)
                num_rows = max_samples if num_rows is None else min(num_rows, max_samples)
            val_rows, fraction = None, 0.0
            if local and any((source / subset).glob("val-*.parquet")):
                val_rows, _ = _rows(source, subset, "val", local)
            else:
                fraction = _fraction(subset, val_samples, val_fraction, num_rows)
            chunk = functools.partial(
                _convert_chunk, subset=subset, min_rating=min_rating, columns=rating_columns
            )
            convert = functools.partial(_map_chunks, chunk, pool=pool, depth=4 * workers)
            results[subset] = _convert_subset(
                subset, train_rows, val_rows, out_dir / subset, val_samples, fraction,
                shard_size, convert,
            )  # fmt: skip
    finally:
        if pool is not None:
            pool.terminate()
    if local and (source / "tokenizer").is_dir():
        shutil.copytree(source / "tokenizer", out_dir / "tokenizer", dirs_exist_ok=True)
    return results


def _fraction(
    subset: str, val_samples: int, val_fraction: float | None, num_rows: int | None
) -> float:
    """The val fraction of a subset drawn from its train split."""
    if val_fraction is not None:
        return val_fraction
    if val_samples == 0:
        return 0.0
    if num_rows is None:
        raise ValueError(
            f"{subset}: the source does not say how many rows it has, so --val-samples cannot "
            "be made a fraction; give --val-fraction (or --max-samples)"
        )
    return min(1.0, val_samples / num_rows) if num_rows else 0.0


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


def _rows(
    source: Path | str, subset: str, split: str, local: bool
) -> tuple[Iterator[dict], int | None]:
    """(rows of a subset's split with images undecoded ({"bytes", "path"} dicts), how many
    there are: from the parquet footers, or the hub card's num_examples; None if unknown)."""
    from datasets import load_dataset

    if not local:
        dataset = load_dataset(source, subset, split="train", streaming=True)
        splits = getattr(dataset.info, "splits", None) or {}
        num_rows = splits["train"].num_examples if "train" in splits else None
        return iter(dataset.decode(False)), num_rows or None
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
    import pyarrow.parquet as pq

    num_rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    return iter(dataset.decode(False)), num_rows


def _convert_subset(
    subset: str,
    train_rows: Iterator[dict],
    val_rows: Iterator[dict] | None,
    out: Path,
    val_samples: int,
    fraction: float,
    shard_size: int,
    convert: Callable[[Iterator], Iterator],
) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    skipped: Counter = Counter()
    stem = subset.replace(".", "_")  # a dot would end the webdataset key
    writers = {split: SplitWriter(out, stem, split, shard_size) for split in ("val", "train")}
    train = _samples(train_rows, subset, "train", skipped, convert)
    try:
        if val_rows is None:  # FineVision: val is drawn from train by content (module docstring)
            for index, fields, draw in train:
                writers["val" if draw < fraction else "train"].add(index, fields)
        else:
            val = _samples(val_rows, subset, "val", skipped, convert)
            for index, fields, _ in itertools.islice(val, val_samples):
                writers["val"].add(index, fields)
            for index, fields, _ in train:
                writers["train"].add(index, fields)
        sizes = writers["val"].close() | writers["train"].close()
    finally:
        for writer in writers.values():
            writer.abort()  # what an error left unfinished
    counts = finish_conversion(out, sizes, skipped, subset)
    if not counts["train"]:
        log.warning("%s: no train samples were written", subset)
    return {**counts, "skipped": dict(sorted(skipped.items()))}


def _samples(
    rows, subset: str, split: str, skipped: Counter, convert: Callable[[Iterator], Iterator]
) -> Iterator[tuple[int, dict, float]]:
    """(row index, {member: bytes}, val draw) of every usable row in order; unusable ones
    counted in `skipped`."""
    for index, result in convert(_numbered(rows, subset, split)):
        if isinstance(result, str):  # why the row was skipped
            skipped[result] += 1
            if sum(skipped.values()) <= LOG_SKIPPED:
                log.warning("%s %s row %d skipped: %s", subset, split, index, result)
            continue
        yield index, *result


def _numbered(rows, subset: str, split: str) -> Iterator[tuple[int, dict]]:
    for index, row in enumerate(rows):
        if index and index % LOG_EVERY == 0:
            log.info("%s %s: %d rows read", subset, split, index)
        yield index, row


def _map_chunks(convert, numbered: Iterator[tuple[int, dict]], pool, depth: int) -> Iterator[tuple]:
    """`convert` over chunks of CHUNK_ROWS rows, results in row order: in this process, or
    in `pool` with at most `depth` chunks in flight (Pool.imap would read ahead without
    limit)."""
    chunks = iter(lambda: list(itertools.islice(numbered, CHUNK_ROWS)), [])
    if pool is None:
        for chunk in chunks:
            yield from convert(chunk)
        return
    pending: deque = deque()
    for chunk in chunks:
        pending.append(pool.apply_async(convert, (chunk,)))
        if len(pending) >= depth:
            yield from pending.popleft().get()
    while pending:
        yield from pending.popleft().get()


def _convert_chunk(
    chunk: list[tuple[int, dict]], subset: str, min_rating: int | None, columns: tuple[str, ...]
) -> list[tuple[int, tuple[dict, float] | str]]:
    """[(row index, (members, val draw) or the reason it is skipped)] (runs in workers)."""
    out = []
    for index, row in chunk:
        try:
            if min_rating is not None:
                check_ratings(row, min_rating, columns)
            fields = convert_row(row, subset)
            out.append((index, (fields, val_draw(row))))
        except BadSample as bad:
            out.append((index, bad.reason))
    return out


def check_ratings(row: dict, min_rating: int, columns: Iterable[str] = RATINGS) -> None:
    """BadSample(low_<column>) when the lowest of the row's `<column>_ratings` (its
    `<column>_min` when the list is absent) is below `min_rating`, for the first such column;
    BadSample(unrated_<column>) when the row has no rating for it."""
    for name in columns:
        ratings = row.get(f"{name}_ratings")
        values = [r for r in ratings if _is_number(r)] if isinstance(ratings, list) else []
        if not values and _is_number(row.get(f"{name}_min")):
            values = [row[f"{name}_min"]]
        if not values:
            raise BadSample(f"unrated_{name}")
        if min(values) < min_rating:
            raise BadSample(f"low_{name}")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def val_draw(row: dict) -> float:
    """A number in [0, 1) fixed by the row's content alone: a hash of its images' bytes and its
    (cleaned) texts; ratings and source are left out (they may be re-computed upstream).
    The row goes to val when it is below the val fraction."""
    digest = hashlib.blake2b(digest_size=8, person=VAL_HASH_PERSON)
    for image in row.get("images") or []:
        data = image["bytes"]
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    texts = json.dumps(clean_texts(row.get("texts")), ensure_ascii=False, sort_keys=True)
    digest.update(texts.encode())
    return int.from_bytes(digest.digest(), "big") / 2**64


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


class SplitWriter:
    """`out/{split}-%06d.tar` of at most shard_size samples each, keyed stem-split-row; each
    tar is written as write_tar writes it (atomically, the same bytes for the same samples)."""

    def __init__(self, out: Path, stem: str, split: str, shard_size: int):
        self.out, self.stem, self.split, self.shard_size = out, stem, split, shard_size
        self.sizes: dict[str, int] = {}
        self._tar: TarShard | None = None

    def add(self, index: int, fields: dict[str, bytes]) -> None:
        if self._tar is None:
            self._tar = TarShard(self.out / f"{self.split}-{len(self.sizes):06d}.tar")
        self._tar.add(f"{self.stem}-{self.split}-{index:09d}", fields)
        if self._tar.count == self.shard_size:
            self._commit()

    def _commit(self) -> None:
        tar, self._tar = self._tar, None
        self.sizes[tar.path.name] = tar.commit()
        log.info("wrote %s (%d samples)", tar.path, tar.count)

    def close(self) -> dict[str, int]:
        if self._tar is not None:
            self._commit()
        return self.sizes

    def abort(self) -> None:
        if self._tar is not None:
            self._tar.abort()
            self._tar = None


def finish_conversion(out: Path, sizes: dict[str, int], skipped, name: str) -> dict[str, int]:
    """After a conversion wrote `sizes` ({shard: samples}) into `out`: remove the shards of an
    earlier, larger conversion, write sizes.json, log what was skipped (by reason) and return
    the samples per split."""
    for path in out.glob("*.tar"):
        if SHARD_PATTERN.match(path.name) and path.name not in sizes:
            path.unlink()
    write_sizes(out, sizes, merge=False)
    if skipped:
        summary = ", ".join(f"{reason}: {n}" for reason, n in sorted(skipped.items()))
        log.warning("%s: skipped %d (%s)", name, sum(skipped.values()), summary)
    return {split: sum(n for shard, n in sizes.items() if shard.startswith(split))
            for split in ("train", "val")}  # fmt: skip
