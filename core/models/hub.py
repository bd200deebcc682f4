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


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory, keys as stored."""
    path = Path(path)
    if (path / SINGLE).is_file():
        return load_file(path / SINGLE)
    if (path / INDEX).is_file():
        weight_map = json.loads((path / INDEX).read_text())["weight_map"]
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            state.update(load_file(path / shard))
        return state
    raise FileNotFoundError(
        f"{path} has no {SINGLE} or {INDEX} (only safetensors checkpoints are loaded)"
    )


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


def resolve(
    path_or_id: str, allow_patterns: list[str] | None = None, repo_type: str = "model"
) -> Path:
    """A local checkpoint directory as is, or a hub id (e.g. `Qwen/Qwen3-0.6B`) downloaded once
    into the Hugging Face cache (safetensors, configs and tokenizer files only). `repo_type`
    "dataset" for a dataset repository (e.g. `clip-benchmark/wds_imagenet1k`)."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    if path_or_id.startswith((".", "/", "~")) or path_or_id.count("/") != 1:
        raise FileNotFoundError(f"{path_or_id}: no such directory, and not a hub id (owner/name)")
    from huggingface_hub import snapshot_download

    patterns = allow_patterns or ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]
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
