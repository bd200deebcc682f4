"""Hugging Face checkpoint directories: config.json + safetensors (single file or sharded index).

Only safetensors are read: they cannot execute code, unlike pickled `.bin` files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

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
    """All tensors of a checkpoint directory, keys as stored."""
    state: dict[str, torch.Tensor] = {}
    for file in _weight_files(Path(path)):
        state.update(load_file(file))
    return state


SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


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
    state = {}
    for file in files:
        with open(file, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
        for name, info in header.items():
            if name != "__metadata__":
                state[name] = torch.empty(info["shape"], dtype=SAFETENSORS_DTYPES[info["dtype"]],
                                          device="meta")  # fmt: skip
    return state


def save_state_dict(
    state: dict[str, torch.Tensor], path: str | Path, max_shard_bytes: int = 5 * 2**30
) -> None:
    """Write `state` as one safetensors file, or shards + index when larger than max_shard_bytes."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    # A previous export in the same place must not shadow this one (a stale single file would be
    # read before a new index).
    for old in [*path.glob("model*.safetensors"), path / INDEX]:
        old.unlink(missing_ok=True)
    # safetensors refuses shared storage (tied weights) and non-contiguous views: copy out.
    state = {k: v.detach().contiguous().clone() for k, v in state.items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], path / SINGLE, metadata=meta)
        return
    weight_map = {}
    n = len(shards)
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{n:05d}.safetensors"
        save_file(shard, path / name, metadata=meta)
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in state.values())
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
