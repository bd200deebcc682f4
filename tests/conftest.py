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


VQA_SUBSETS = [
    "shapes_colour",
    "shapes_shape",
    "shapes_text",
    "shapes_two_images",
    "shapes_caption",
]


@pytest.fixture(scope="session")
def vqa(tmp_path_factory) -> Path:
    """FineVision-layout shards of synthetic VQA subsets (+ tokenizer): <subset>/train-00000{0..2}
    .tar (32 rows each) and val-000000.tar (16 rows)."""
    from core.data.finevision import convert_finevision
    from core.data.synthetic import write_finevision_parquet

    root = tmp_path_factory.mktemp("vqa")
    write_finevision_parquet(
        root / "parquet", n_train=96, n_val=16, seed=0, image_size=32, subsets=VQA_SUBSETS
    )
    convert_finevision(root / "parquet", VQA_SUBSETS, root / "shards", val_samples=16,
                       shard_size=32)  # fmt: skip
    return root / "shards"
