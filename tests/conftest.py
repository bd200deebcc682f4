"""Shared fixtures: a small synthetic shapes dataset (shards, sizes.json, tokenizer)."""

from __future__ import annotations

from pathlib import Path

import pytest

SHAPES = {"n_train": 96, "n_val": 32, "seed": 0, "shard_size": 32, "image_size": 32}


@pytest.fixture(scope="session")
def shapes_spec() -> dict:
    return dict(SHAPES)


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory) -> Path:
    """train-000000..000002.tar (32 samples each), val-000000.tar, sizes.json, tokenizer/."""
    from core.data.synthetic import write_synthetic_shards

    out = tmp_path_factory.mktemp("shapes")
    write_synthetic_shards(out, **SHAPES)
    return out


@pytest.fixture(scope="session")
def shapes_tokenizer(shapes_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(shapes_dir / "tokenizer"))
