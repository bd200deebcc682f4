"""Hugging Face checkpoint directories: config.json + safetensors (single file or sharded index).

Only safetensors are read: they cannot execute code, unlike pickled `.bin` files.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file

from .. import lazy_tensors
from ..lazy_tensors import LazyTensors

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


def read_config(path: str | Path) -> dict:
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(
            f"{path} is not a Hugging Face checkpoint directory: no config.json"
        )
    return json.loads(cfg_file.read_text())


def _weight_files(path: Path) -> list[Path]:
    if (path / SINGLE).is_file():
        return [path / SINGLE]
    if (path / INDEX).is_file():
        weight_map = json.loads((path / INDEX).read_text())["weight_map"]
        return [path / shard for shard in sorted(set(weight_map.values()))]
    raise FileNotFoundError(
        f"{path} has no {SINGLE} or {INDEX} (only safetensors checkpoints are loaded)"
    )


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory, keys as stored. While stand-ins are active (a
    build that the engine loads into shards, core/engines/fsdp.py) they are stand-ins instead:
    nothing is read here."""
    stand_ins = lazy_tensors.active()
    if stand_ins is not None:
        return stand_ins.from_lazy(lazy_safetensors(_weight_files(Path(path))))
    state: dict[str, torch.Tensor] = {}
    for file in _weight_files(Path(path)):
        state.update(load_file(file))
    return state


SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip
DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


def lazy_safetensors(files: list[Path]) -> LazyTensors:
    """The tensors of safetensors files, each read when asked for, whole or a range of its rows
    (`read_rows`: a rank reads its shard alone). The headers give every name, shape and dtype
    without reading a weight; the data is read with plain reads, not memory-mapped, so what a
    process reads is in its memory only while it holds it."""
    metas, where = {}, {}
    for file in files:
        with open(file, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
        for name, info in header.items():
            if name != "__metadata__":
                metas[name] = torch.empty(info["shape"], dtype=SAFETENSORS_DTYPES[info["dtype"]],
                                          device="meta")  # fmt: skip
                where[name] = (file, 8 + size + info["data_offsets"][0])

    def read_rows(name: str, start: int, stop: int) -> torch.Tensor:
        meta, (file, at) = metas[name], where[name]
        row = math.prod(meta.shape[1:]) * meta.element_size()
        shape = (stop - start, *meta.shape[1:]) if meta.dim() else ()
        data = bytearray(row if meta.dim() == 0 else (stop - start) * row)
        if not data:
            return torch.empty(shape, dtype=meta.dtype)
        with open(file, "rb") as f:
            f.seek(at + start * row)
            if f.readinto(data) != len(data):
                raise OSError(f"{file}: {name} is cut short")
        return torch.frombuffer(data, dtype=meta.dtype).reshape(shape)

    def read(name: str) -> torch.Tensor:
        meta = metas[name]
        return read_rows(name, 0, meta.shape[0] if meta.dim() else 1)

    return LazyTensors(metas, read, read_rows)


def meta_state_dict(path: str | Path) -> dict[str, torch.Tensor] | None:
    """Every tensor of a checkpoint directory as a meta tensor of its dtype and shape, read from
    the safetensors headers alone (a few KB: no weight is read); None when the weight files are
    absent (a hub checkpoint resolved on the meta device downloads none)."""
    try:
        files = _weight_files(Path(path))
    except FileNotFoundError:
        return None
    if not all(f.is_file() for f in files):
        return None
    return dict(lazy_safetensors(files).metas)


def write_safetensors(tensors: dict[str, torch.Tensor], file: str | Path,
                      metadata: dict[str, str] | None = None) -> None:  # fmt: skip
    """One safetensors file, written one tensor at a time: the header comes from the shapes and
    dtypes alone, then each tensor's bytes (an export's stand-ins are read as they are written,
    core/lazy_tensors.py). Tensors that share memory (tied weights) are written once per name."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    end = 0
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [end, end + size]}  # fmt: skip
        end += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(file, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for name, tensor in tensors.items():
            data = lazy_tensors.value(tensor.detach()).cpu()
            if data.shape != tensor.shape or data.dtype != tensor.dtype:
                raise ValueError(f"{name}: read {tuple(data.shape)} {data.dtype} for "
                                 f"{tuple(tensor.shape)} {tensor.dtype}")  # fmt: skip
            f.write(data.contiguous().reshape(-1).view(torch.uint8).numpy().data)


MAX_SHARD_BYTES = 5 * 10**9  # transformers' "5GB"
_max_shard_bytes = MAX_SHARD_BYTES


@contextlib.contextmanager
def shards_of(max_bytes: int):
    """Checkpoints written inside (every tower of an export) are sharded at `max_bytes`."""
    global _max_shard_bytes
    previous, _max_shard_bytes = _max_shard_bytes, max_bytes
    try:
        yield
    finally:
        _max_shard_bytes = previous


def save_state_dict(
    state: dict[str, torch.Tensor], path: str | Path, max_shard_bytes: int | None = None
) -> None:
    """Write `state` as one safetensors file, or shards + index when larger than max_shard_bytes
    (default: 5GB, or what `shards_of` set), in transformers' layout, one tensor at a time."""
    max_shard_bytes = max_shard_bytes or _max_shard_bytes
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    # A previous export in the same place must not shadow this one (a stale single file would be
    # read before a new index).
    for old in [*path.glob("model*.safetensors"), path / INDEX]:
        old.unlink(missing_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = total = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
        total += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        write_safetensors(shards[0], path / SINGLE, metadata=meta)
        return
    weight_map = {}
    n = len(shards)
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{n:05d}.safetensors"
        write_safetensors(shard, path / name, metadata=meta)
        weight_map.update(dict.fromkeys(shard, name))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / INDEX).write_text(json.dumps(index, indent=2))


def write_config(config: dict, path: str | Path) -> None:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))


def building_on_meta() -> bool:
    """Whether models are being built on the meta device (`with torch.device("meta")`: `vlscale
    plan`, export's consolidation): shapes only, so no weights are read or downloaded."""
    return torch.get_default_device().type == "meta"


def resolve(
    path_or_id: str, allow_patterns: list[str] | None = None, repo_type: str = "model"
) -> Path:
    """A local checkpoint directory as is, or a hub id (e.g. `Qwen/Qwen3-0.6B`) downloaded once
    into the Hugging Face cache (safetensors, configs and tokenizer files only; while building on
    the meta device, no safetensors: planning a 7B run must not download its 15 GB). `repo_type`
    "dataset" for a dataset repository (e.g. `clip-benchmark/wds_imagenet1k`)."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    if path_or_id.startswith((".", "/", "~")) or path_or_id.count("/") != 1:
        raise FileNotFoundError(f"{path_or_id}: no such directory, and not a hub id (owner/name)")
    from huggingface_hub import snapshot_download

    patterns = allow_patterns or ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]
    if building_on_meta():
        patterns = [p for p in patterns if not p.endswith(".safetensors")]
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return Path(snapshot_download(path_or_id, allow_patterns=patterns, repo_type=repo_type))
    # Once per node: local rank 0 downloads while the node's other ranks wait, then they find
    # the files in the cache (instead of 8 ranks racing for the same 15 GB). Every rank builds
    # the task, so every rank reaches the collective below.
    first = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))) == 0
    path, error = None, None
    if first:
        try:
            path = snapshot_download(path_or_id, allow_patterns=patterns, repo_type=repo_type)
        except Exception as err:  # noqa: BLE001 - every rank must hear of it, not wait forever
            error = f"{type(err).__name__}: {err}"
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)  # also the barrier the other ranks wait at
    failed = [e for e in errors if e]
    if failed:
        raise OSError(f"downloading {path_or_id} failed: {failed[0]}")
    if not first:
        path = snapshot_download(
            path_or_id, allow_patterns=patterns, repo_type=repo_type, local_files_only=True
        )
    return Path(path)
