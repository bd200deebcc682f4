"""Data layer: webdataset tar shards, the resumable ShardStream, decoding, synthetic shapes."""

from core.data.errors import BadSample, DataError
from core.data.preprocess import ImageTextDecoder, collate, with_attributes
from core.data.stream import ShardStream

__all__ = [
    "BadSample",
    "DataError",
    "ImageTextDecoder",
    "ShardStream",
    "collate",
    "with_attributes",
]
