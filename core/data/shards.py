"""Webdataset tar shards: atomic writing, indexed/streamed reading, sizes.json, fetching CC3M.

Layout (webdataset, as pixparse/cc3m-wds and open_clip use it): consecutive members
`{key}.{ext}` with the same key form one sample; `sizes.json` maps shard file name to its
sample count.

`index_shards` writes those counts without reading the tars, from what the tool that wrote them
left beside them:
- img2dataset: `{shard}_stats.json` per `{shard}.tar` (`img2dataset/logger.py:write_stats`,
  written after the tar is closed). Its `successes` counts the samples written to the tar: the
  webdataset writer writes a sample only for a successful image; failed downloads and resizes
  (`failed_to_download`, `failed_to_resize`; `count` is all of them) go to the parquet only.
- `_info.json` (or `info.json`) as pixparse/cc3m-wds ships it and timm's ReaderWds reads it
  (`timm/data/readers/reader_wds.py:_parse_split_info`): {"splits": {split: {"name",
  "num_samples", "filenames": [...], "shard_lengths": [...]}}}, a length per file name.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import tarfile
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from webdataset.gopen import gopen

from core.data.errors import BadSample

log = logging.getLogger(__name__)

SIZES_FILE = "sizes.json"
STATS_SUFFIX = "_stats.json"  # img2dataset: 00000_stats.json beside 00000.tar
INFO_FILES = ("_info.json", "info.json")  # pixparse/timm split info, in the order timm tries
CC3M_REPO = "pixparse/cc3m-wds"
BLOCK = tarfile.BLOCKSIZE
# A member name splits into key and extension at the first dot of its base name (webdataset rule).
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")

Members = list[tuple[str, int, int]]  # (extension, data offset, size) of one sample's files


def write_tar(path: str | Path, samples: Iterable[tuple[str, dict[str, bytes]]]) -> int:
    """Write `(key, {ext: bytes})` samples to `path`; returns how many were written.

    Written under a temporary name and renamed when complete, so a crash never leaves a
    valid-looking shard. Headers carry no time or owner: the same samples give the same bytes.
    """
    with TarShard(path) as tar:
        for key, fields in samples:
            tar.add(key, fields)
    return tar.count


class TarShard:
    """One shard written sample by sample, as write_tar writes it: under `path`.tmp, renamed to
    `path` by `commit()` (or on leaving a `with` block normally); `abort()` (or an exception in
    the block) removes it. Headers carry no time or owner: the same samples give the same bytes.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.count = 0
        self._file = open(self.tmp, "wb")  # noqa: SIM115 (closed by commit or abort)
        self._tar = tarfile.open(  # noqa: SIM115 (closed by commit)
            fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT
        )

    def add(self, key: str, fields: dict[str, bytes]) -> None:
        for ext, data in fields.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            self._tar.addfile(info, io.BytesIO(data))
        self.count += 1

    def commit(self) -> int:
        try:
            self._tar.close()
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            os.replace(self.tmp, self.path)
        finally:
            self.abort()
        return self.count

    def abort(self) -> None:
        self._file.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> TarShard:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def write_sizes(out_dir: str | Path, sizes: dict[str, int], merge: bool = True) -> Path:
    """Write `sizes` to `out_dir/sizes.json` atomically, merged into what it holds if `merge`."""
    path = Path(out_dir) / SIZES_FILE
    merged = json.loads(path.read_text()) if merge and path.exists() else {}
    merged.update(sizes)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(dict(sorted(merged.items())), indent=1) + "\n")
    os.replace(tmp, path)
    return path


def read_sizes(directory: str | Path) -> dict[str, int]:
    """{shard file name: samples} from `directory/sizes.json`; empty when there is none."""
    path = Path(directory) / SIZES_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def listed_samples(urls: list[str]) -> int | None:
    """Samples in these shards from the sizes.json beside them; None when a shard is remote or
    not listed."""
    total, sizes = 0, {}
    for url in urls:
        parsed = urlparse(url)
        if parsed.scheme not in ("", "file"):
            return None
        path = Path(parsed.path if parsed.scheme else url)
        if path.parent not in sizes:
            sizes[path.parent] = read_sizes(path.parent)
        if path.name not in sizes[path.parent]:
            return None
        total += sizes[path.parent][path.name]
    return total


def split_name(name: str) -> tuple[str, str] | None:
    """(key, lower-case extension) of a member name, or None when it has no extension."""
    match = _KEY_EXT.match(name)
    return (match.group(1), match.group(2).lower()) if match else None


def index_tar(path: str | Path) -> tuple[list[tuple[str, Members]], bool]:
    """Samples of a local tar as (key, members) in file order, and whether the file is truncated.

    Only headers are read (tarfile seeks over the data). A truncated file keeps the samples
    whose headers survive; members cut short are found when read. Raises tarfile.ReadError
    or OSError when the file is not a readable tar at all.
    """
    samples: list[tuple[str, Members]] = []
    truncated = False
    last = None
    with tarfile.open(path, "r:") as tar:
        try:
            while (info := tar.next()) is not None:
                last = info
                parts = split_name(info.name) if info.isreg() else None
                if parts is None:
                    continue
                key, ext = parts
                if not samples or samples[-1][0] != key:
                    samples.append((key, []))
                samples[-1][1].append((ext, info.offset_data, info.size))
        except tarfile.ReadError:
            truncated = True
    if last is not None and not truncated:
        data_end = last.offset_data + -(-last.size // BLOCK) * BLOCK
        # A complete archive ends with two zero blocks after the last member.
        truncated = os.path.getsize(path) < data_end + 2 * BLOCK
    return samples, truncated


def count_samples(path: str | Path) -> tuple[int, bool]:
    """(number of samples, truncated) of a local tar; raises when it is unreadable."""
    samples, truncated = index_tar(path)
    return len(samples), truncated


@dataclass
class ShardIndex:
    """Sample counts of a directory's shards: `sizes` {file name: samples}, `sources`
    {"_info.json" | "_stats.json" | "read": shards counted that way}, `problems` {file name:
    why it has no count}."""

    sizes: dict[str, int] = field(default_factory=dict)
    sources: Counter = field(default_factory=Counter)
    problems: dict[str, str] = field(default_factory=dict)


def listed_counts(directory: str | Path) -> tuple[dict[str, int], dict[str, int]]:
    """({file name: samples} from `_info.json` or `info.json`, the same from `*_stats.json`) in
    `directory`, read as the module docstring describes; ValueError names a malformed file."""
    directory = Path(directory)
    info: dict[str, int] = {}
    path = next((directory / n for n in INFO_FILES if (directory / n).is_file()), None)
    if path is not None:
        try:
            splits = json.loads(path.read_text()).get("splits") or {}
            for split in splits.values() if isinstance(splits, dict) else splits:
                names, lengths = split.get("filenames"), split.get("shard_lengths")
                if names is None and lengths is None:
                    continue  # a split described without its shards
                if len(names) != len(lengths):
                    raise ValueError("filenames and shard_lengths differ in length")
                for name, length in zip(names, lengths):
                    info[Path(name).name] = _count(length)
        except (ValueError, TypeError, AttributeError) as err:
            raise ValueError(f"{path}: not a split info file ({err})") from None
    stats: dict[str, int] = {}
    for path in sorted(directory.glob(f"*{STATS_SUFFIX}")):
        try:
            successes = _count(json.loads(path.read_text())["successes"])
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{path}: not an img2dataset stats file ({err!r})") from None
        stats[path.name.removesuffix(STATS_SUFFIX) + ".tar"] = successes
    return info, stats


def _count(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{value!r} is not a sample count")
    return value


def index_shards(
    directory: str | Path,
    names: Iterable[str],
    read: bool = False,
    metadata: bool = True,
    listed: tuple[dict[str, int], dict[str, int]] | None = None,
) -> ShardIndex:
    """Counts of the shards `names` (file names in `directory`) from the files their writer left
    beside them (`metadata`), without opening a tar; with `read`, shards that no such file
    lists, or whose listing looks wrong, are counted by reading them (as are all when not
    `metadata`). A listed count is checked against the file only cheaply: a tar is a whole
    number of 512-byte blocks with a header block per member, so a file that is not, or too
    small for its count, is a problem (truncated or mislisted) and is read (`read`) or left out.
    An `_info.json` and a `_stats.json` that disagree on a shard are a problem too.
    `listed`: what `listed_counts(directory)` returned, if the caller has it already."""
    directory = Path(directory)
    if listed is None:
        listed = listed_counts(directory) if metadata else ({}, {})
    info, stats = listed
    index = ShardIndex()
    for name in names:
        path = directory / name
        listed = {src: c[name] for src, c in (("_info.json", info), ("_stats.json", stats))
                  if name in c}  # fmt: skip
        problem = None
        if len(set(listed.values())) > 1:
            problem = "listed counts disagree: " + ", ".join(f"{k} {v}" for k, v in listed.items())
        elif listed:
            source, count = next(iter(listed.items()))
            size = path.stat().st_size
            if size == 0 or size % BLOCK or count * BLOCK > size:
                problem = f"{size} bytes cannot hold the {count} samples {source} lists"
            else:
                index.sizes[name] = count
                index.sources[source] += 1
                continue
        else:
            problem = "no _info.json or _stats.json lists it"
        if not read:
            index.problems[name] = problem
            continue
        try:
            count, truncated = count_samples(path)
        except (OSError, tarfile.TarError) as exc:
            index.problems[name] = f"unreadable: {exc}"
            continue
        if truncated:
            index.problems[name] = "truncated"
        else:
            index.sizes[name] = count
            index.sources["read"] += 1
    return index


class IndexedShard:
    """A local tar read in any order: its members' offsets are indexed once, then seeked."""

    def __init__(self, url: str, path: str):
        self.url = url
        self._samples, self.truncated = index_tar(path)
        self._file = open(path, "rb")  # noqa: SIM115 (held for random reads; see close)

    def __len__(self) -> int:
        return len(self._samples)

    def read(self, index: int) -> dict:
        key, members = self._samples[index]
        sample = {"__key__": key, "__url__": self.url}
        for ext, offset, size in members:
            self._file.seek(offset)
            data = self._file.read(size)
            if len(data) != size:
                raise BadSample("truncated")
            sample[ext] = data
        return sample

    def close(self) -> None:
        self._file.close()


class BufferedShard:
    """A streamed shard (`pipe:`, http, `hf://`, compressed): read whole into memory once."""

    def __init__(self, url: str):
        self.url = url
        self.truncated = False
        self._samples: list[dict | None] = []  # None: a sample whose data was cut off
        try:
            with gopen(url, "rb") as stream:
                self._read_all(stream)
        except (OSError, EOFError, tarfile.TarError, ValueError):
            if not self._samples:
                raise
            self.truncated = True

    def _read_all(self, stream) -> None:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for info in tar:
                parts = split_name(info.name) if info.isreg() else None
                if parts is None:
                    continue
                key, ext = parts
                if not self._samples or self._samples[-1]["__key__"] != key:
                    self._samples.append({"__key__": key, "__url__": self.url})
                try:
                    self._samples[-1][ext] = tar.extractfile(info).read()
                except tarfile.ReadError:
                    self._samples[-1] = None
                    raise

    def __len__(self) -> int:
        return len(self._samples)

    def read(self, index: int) -> dict:
        sample = self._samples[index]
        if sample is None:
            raise BadSample("truncated")
        return dict(sample)

    def close(self) -> None:
        self._samples = []


def open_shard(url: str) -> IndexedShard | BufferedShard:
    """Local uncompressed tars are indexed for random access; anything else is buffered."""
    parsed = urlparse(url)
    if parsed.scheme in ("", "file") and parsed.path.endswith(".tar"):
        return IndexedShard(url, parsed.path if parsed.scheme else url)
    return BufferedShard(url)


def fetch_cc3m(
    out_dir: str | Path,
    source: str = CC3M_REPO,
    splits: Iterable[str] = ("train", "validation"),
    verify: bool = False,
) -> tuple[dict[str, int], list[str]]:
    """Copy (local dir) or download (hub dataset id) CC3M shards into `out_dir` and count them.

    Shards follow pixparse/cc3m-wds names, `cc3m-{split}-0000.tar`. A shard listed in the
    source's `_info.json` (or img2dataset `_stats.json`) is counted from it (see index_shards:
    no tar is read, ~270 GB for CC3M); the others, and all with `verify`, are read back.
    Countable ones go into sizes.json. Returns (their sizes, unreadable or truncated names).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    patterns = [f"cc3m-{split}-*.tar" for split in splits]
    local = Path(source).is_dir()
    if local:
        _copy_matching(Path(source), out_dir, patterns)
    else:
        from huggingface_hub import snapshot_download

        snapshot_download(
            repo_id=source,
            repo_type="dataset",
            allow_patterns=[*patterns, *INFO_FILES],
            local_dir=out_dir,
        )
    paths = sorted({p for pattern in patterns for p in out_dir.glob(pattern)})
    if not paths:
        raise FileNotFoundError(f"no shards matching {patterns} in {source}")
    # Copies keep the source's names and bytes (same size): its listing counts them.
    listing = Path(source) if local else out_dir
    try:
        listed = index_shards(listing, [p.name for p in paths], metadata=not verify)
    except ValueError as err:
        log.warning("%s; reading every shard", err)
        listed = ShardIndex()
    unlisted = [p.name for p in paths if p.name not in listed.sizes]
    read = index_shards(out_dir, unlisted, read=True, metadata=False)
    for name, problem in read.problems.items():
        log.error("shard %s is %s", out_dir / name, problem)
    sizes = dict(sorted((listed.sizes | read.sizes).items()))
    if listed.sizes:
        log.info("%d shards counted from the source's listing, %d read", len(listed.sizes),
                 len(read.sizes))  # fmt: skip
    write_sizes(out_dir, sizes)
    return sizes, sorted(read.problems)


def _copy_matching(source: Path, out_dir: Path, patterns: list[str]) -> None:
    if source.resolve() == out_dir.resolve():
        return
    for pattern in patterns:
        for path in sorted(source.glob(pattern)):
            dest = out_dir / path.name
            if dest.exists() and dest.stat().st_size == path.stat().st_size:
                continue  # already copied by an earlier (interrupted) run
            tmp = dest.with_name(dest.name + ".tmp")
            shutil.copyfile(path, tmp)
            os.replace(tmp, dest)
