"""Data layer: webdataset tar shards, the resumable ShardStream, decoding, synthetic shapes."""

from core.data.errors import BadSample, DataError
from core.data.preprocess import ImageTextDecoder, collate, with_attributes
from core.data.stream import ShardStream
from core.data.synthetic import class_problems as shapes_class_problems

# Zero-shot class sets by dataset name (the zeroshot evaluator's `classes` option): a function of
# the validation samples' JSON metadata -> [(problem, class prompts, label per sample or -1)].
CLASS_PROBLEMS = {"shapes": shapes_class_problems}

__all__ = [
    "CLASS_PROBLEMS",
    "BadSample",
    "DataError",
    "ImageTextDecoder",
    "ShardStream",
    "collate",
    "with_attributes",
]
