"""`zeroshot_retrieval`: clip_benchmark's image-text retrieval (its metrics/zeroshot_retrieval.py)
on a captions dataset in its WebDataset layout, e.g. COCO or Flickr30k (5 captions an image):

    - zeroshot_retrieval: {root: clip-benchmark/wds_mscoco_captions, ks: [1, 5, 10]}

Every image against every caption of the split. Reports, for each k in `ks`,
`<tag>/image_retrieval_recall@k` (a caption's image among the k best images for it) and
`<tag>/text_retrieval_recall@k` (any of an image's captions among the k best captions for it),
clip_benchmark's names and definitions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .. import distributed
from ..config import ConfigError
from ..data.wds_benchmark import BenchmarkData
from ..metrics import multi_caption_retrieval
from ..tasks.base import ImageTextEmbedder
from .base import Evaluator
from .benchmark import BenchmarkOptions, check_ks, encode_in_shares, image_encoder, text_encoder


@dataclass
class RetrievalOptions(BenchmarkOptions):
    ks: list[int] = field(default_factory=lambda: [1, 5, 10])

    def __post_init__(self):
        super().__post_init__()
        check_ks(self.ks)


class ZeroshotRetrievalEvaluator(Evaluator):
    name = "zeroshot_retrieval"
    Options = RetrievalOptions
    requires = (ImageTextEmbedder,)

    def __call__(self, task, ctx) -> dict[str, float]:
        o = self.options
        with BenchmarkData(o.root, o.split, o.max_samples) as data:
            if data.kind != "retrieval":
                raise ConfigError(f"{o.root} is a {data.kind} dataset, not a captions one "
                                  "(its dataset_type.txt is not 'retrieval')")  # fmt: skip
            images = encode_in_shares(list(range(len(data))), image_encoder(task, data, ctx), ctx)
            # Every rank needs the captions (read with the images, on rank 0) to encode its share.
            captions = distributed.broadcast_object(None if images is None else images[1])
        texts = [text for image_captions in captions for text in image_captions]
        encoded = encode_in_shares(texts, text_encoder(task, ctx), ctx)
        if images is None:  # not rank 0
            return {}
        text_image = torch.tensor([i for i, c in enumerate(captions) for _ in c], dtype=torch.long)
        image, text = F.normalize(images[0], dim=-1), F.normalize(encoded[0], dim=-1)
        metrics = multi_caption_retrieval(image, text, text_image, ks=o.ks)
        return {f"{o.tag}/{k}": v for k, v in metrics.items()} | {
            f"{o.tag}/num_images": len(captions),
            f"{o.tag}/num_texts": len(texts),
        }
