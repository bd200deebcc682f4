"""Webdataset tar shards: atomic writing, indexed/streamed reading, sizes.json, fetching CC3M.

Layout (webdataset, as pixparse/cc3m-wds and open_clip use it): consecutive members
`{key}.{ext}` with the same key form one sample; `sizes.json` maps shard file name to its
sample count.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import tarfile
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import urlparse

from webdataset.gopen import gopen

from core.data.errors import BadSample

log = logging.getLogger(__name__)

SIZES_FILE = "sizes.json"
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
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    count = 0
    try:
        with open(tmp, "wb") as file:
            with tarfile.open(fileobj=file, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                for key, fields in samples:
                    for ext, data in fields.items():
                        info = tarfile.TarInfo(f"{key}.{ext}")
                        info.size, info.mode, info.mtime = len(data), 0o644, 0
                        tar.addfile(info, io.BytesIO(data))
                    count += 1
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return count


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
    out_dir: str | Path, source: str = CC3M_REPO, splits: Iterable[str] = ("train", "validation")
) -> tuple[dict[str, int], list[str]]:
    """Copy (local dir) or download (hub dataset id) CC3M shards into `out_dir`, then verify them.

    Shards follow pixparse/cc3m-wds names, `cc3m-{split}-0000.tar`. Every tar is read back;
    readable ones go into sizes.json. Returns (sizes of the readable shards, unreadable names).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    patterns = [f"cc3m-{split}-*.tar" for split in splits]
    if Path(source).is_dir():
        _copy_matching(Path(source), out_dir, patterns)
    else:
        from huggingface_hub import snapshot_download

        snapshot_download(
            repo_id=source, repo_type="dataset", allow_patterns=patterns, local_dir=out_dir
        )
    paths = sorted({p for pattern in patterns for p in out_dir.glob(pattern)})
    if not paths:
        raise FileNotFoundError(f"no shards matching {patterns} in {source}")
    sizes, bad = {}, []
    for path in paths:
        try:
            count, truncated = count_samples(path)
        except (OSError, tarfile.TarError) as exc:
            log.error("shard %s is unreadable: %s", path, exc)
            bad.append(path.name)
            continue
        if truncated:
            log.error("shard %s is truncated", path)
            bad.append(path.name)
        else:
            sizes[path.name] = count
    write_sizes(out_dir, sizes)
    return sizes, bad


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
