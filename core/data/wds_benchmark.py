"""Benchmark datasets in clip_benchmark's WebDataset layout: what `build_wds_dataset`
(clip_benchmark/datasets/builder.py) reads and clip_benchmark/webdataset_builder.py writes, and
what the Hub's clip-benchmark/wds_* dataset repositories hold:

    ROOT/SPLIT/nshards.txt                      N, the number of shards
    ROOT/SPLIT/0.tar ... ROOT/SPLIT/{N-1}.tar   samples, in order
    ROOT/classnames.txt                         classification: a class name a line, by label
    ROOT/zeroshot_classification_templates.txt  prompts, a line each, `{c}` for the class name
    ROOT/dataset_type.txt                       "retrieval" (captions); absent: classification

A sample is KEY.webp (or .png, .jpg, .jpeg: the first one present) and KEY.cls (its label, a
decimal integer) or, in a retrieval dataset, KEY.txt (its captions, a line each).
"""

from __future__ import annotations

from pathlib import Path

from core.config import ConfigError
from core.data.shards import IndexedShard

IMAGE_KEYS = ("webp", "png", "jpg", "jpeg")  # clip_benchmark's order of preference
KINDS = ("classification", "retrieval", "multilabel")


def _lines(path: Path) -> list[str] | None:
    """The stripped lines of a text file (clip_benchmark's reading), or None when absent."""
    return [line.strip() for line in path.read_text().splitlines()] if path.is_file() else None


def resolve_root(root: str, split: str) -> Path:
    """A local dataset directory as is, or a Hub dataset id (e.g. `clip-benchmark/wds_imagenet1k`)
    downloaded once into the Hugging Face cache: the split's shards and the root's text files."""
    from core.models import hub

    path = Path(root).expanduser()
    if not path.is_dir():
        path = hub.resolve(root, allow_patterns=[f"{split}/*", "*.txt"], repo_type="dataset")
    if not (path / split / "nshards.txt").is_file():
        splits = sorted(p.parent.name for p in path.glob("*/nshards.txt"))
        raise ConfigError(
            f"{root}: no {split}/nshards.txt, so not a clip_benchmark WebDataset split "
            f"(splits here: {', '.join(splits) or 'none'})"
        )
    return path


class BenchmarkData:
    """One split of a dataset: its kind, and its samples in clip_benchmark's order. Its shards
    stay open (indexed once) until `close()`; a `with` block closes them."""

    def __init__(self, root: str, split: str = "test", max_samples: int = 0):
        """Index (headers only) the split's shards; `max_samples` > 0 keeps the first ones."""
        self.root = resolve_root(root, split)
        self.split = split
        self.kind = (_lines(self.root / "dataset_type.txt") or ["classification"])[0].lower()
        if self.kind not in KINDS:
            raise ConfigError(
                f"{self.root}/dataset_type.txt says {self.kind!r}; known: {', '.join(KINDS)}"
            )
        nshards = int((self.root / split / "nshards.txt").read_text())
        shards = [self.root / split / f"{i}.tar" for i in range(nshards)]
        missing = [str(s) for s in shards if not s.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} shards of {nshards} missing, e.g. {missing[0]}"
            )
        self.readers: list[IndexedShard] = []
        self.samples: list[tuple[int, int]] = []  # (shard number, index in the shard)
        for shard in shards:
            if 0 < max_samples <= len(self.samples):
                break
            self.readers.append(IndexedShard(str(shard), str(shard)))
            self.samples += [(len(self.readers) - 1, i) for i in range(len(self.readers[-1]))]
        if max_samples > 0:
            self.samples = self.samples[:max_samples]

    def __len__(self) -> int:
        return len(self.samples)

    def classnames(self) -> list[str] | None:
        return _lines(self.root / "classnames.txt")

    def templates(self) -> list[str] | None:
        return _lines(self.root / "zeroshot_classification_templates.txt")

    def read(self, items: list[int]) -> list[tuple[bytes, int | list[str]]]:
        """(image file bytes, label or captions) of samples by position, clip_benchmark's
        decoding: the label `int(KEY.cls)`, the captions `KEY.txt` split into lines."""
        target = "txt" if self.kind == "retrieval" else "cls"
        out = []
        for item in items:
            number, index = self.samples[item]
            sample = self.readers[number].read(index)
            image = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
            if image is None or target not in sample:
                raise ValueError(
                    f"{self.readers[number].url}: sample {sample['__key__']!r} has no "
                    f"{'/'.join(IMAGE_KEYS) if image is None else target} member"
                )
            text = sample[target].decode("utf-8")
            out.append((image, text.splitlines() if target == "txt" else int(text)))
        return out

    def close(self) -> None:
        for reader in self.readers:
            reader.close()

    def __enter__(self) -> BenchmarkData:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
