"""Honest evaluation: retrieval over the whole validation split, never in-batch.

Every rank embeds its share of the split; features are gathered, de-duplicated by sample key and
ordered, and rank 0 ranks every image against every caption of the split (and vice versa).
"""

from __future__ import annotations

import json

import torch

from . import distributed
from .config import Config


def retrieval_metrics(
    image: torch.Tensor, text: torch.Tensor, ks=(1, 5, 10), chunk: int = 1024
) -> dict:
    """image[i] and text[i] are a pair; features L2-normalised. Ties count against the model."""
    n = image.shape[0]
    i2t_rank = torch.empty(n, dtype=torch.long)
    t2i_rank = torch.empty(n, dtype=torch.long)
    positive = (image * text).sum(dim=-1)
    for start in range(0, n, chunk):  # [chunk, n] blocks keep memory flat for large splits
        rows = slice(start, start + chunk)
        sim_i2t = image[rows] @ text.T
        i2t_rank[rows] = (sim_i2t >= positive[rows, None]).sum(dim=1) - 1
        sim_t2i = text[rows] @ image.T
        t2i_rank[rows] = (sim_t2i >= positive[rows, None]).sum(dim=1) - 1
    out = {}
    for k in ks:
        out[f"i2t_r{k}"] = (i2t_rank < k).float().mean().item()
        out[f"t2i_r{k}"] = (t2i_rank < k).float().mean().item()
    out["num_pairs"] = n
    return out


def zeroshot_problems(attrs: list[dict]) -> list[tuple[str, list[str], list[int]]]:
    """(name, class prompts, label per image or -1) for the synthetic shapes attributes."""
    from .data.synthetic import BACKGROUNDS, COLOURS, SHAPES

    if not all(isinstance(a, dict) and "shapes" in a for a in attrs):
        return []  # not shapes data (e.g. CC3M): no attribute labels to classify
    colours, backgrounds = list(COLOURS), list(BACKGROUNDS)

    def single(a, field, classes):  # only one-shape images have an unambiguous label
        return classes.index(a["shapes"][0][field]) if len(a["shapes"]) == 1 else -1

    return [
        (
            "colour",
            [f"a {c} shape" for c in colours],
            [single(a, "colour", colours) for a in attrs],
        ),
        ("shape", [f"a {s}" for s in SHAPES], [single(a, "shape", list(SHAPES)) for a in attrs]),
        (
            "background",
            [f"shapes on a {b} background" for b in backgrounds],
            [backgrounds.index(a["background"]) for a in attrs],
        ),
    ]


def zeroshot_accuracy(task, image: torch.Tensor, attrs: list[dict], device) -> dict:
    """Classify attributes from image features against text prompts, CLIP-style."""
    out, accs = {}, []
    for name, prompts, labels in zeroshot_problems(attrs):
        labels = torch.tensor(labels)
        keep = labels >= 0
        if not keep.any():
            continue
        ids, mask = task.tokenize(prompts)
        classes = task.encode_text(ids.to(device), mask.to(device)).float().cpu()
        pred = (image[keep] @ classes.T).argmax(dim=1)
        acc = (pred == labels[keep]).float().mean().item()
        out[f"zeroshot_{name}_acc"] = acc
        accs.append(acc)
    if accs:
        out["zeroshot_acc"] = sum(accs) / len(accs)
    return out


def evaluate_contrastive(task, cfg: Config, dist) -> dict:
    from .data.preprocess import with_attributes
    from .loop import to_device
    from .tasks.common import make_stream

    if not cfg.data.val:
        return {}
    decode = with_attributes(task.decoder)
    stream = make_stream(cfg, dist, cfg.data.val, decode, train=False)
    keys, images, texts, attrs = [], [], [], []
    for batch in stream:
        batch = to_device(batch, dist.device)
        images.append(task.encode_image(batch["pixel_values"]).float().cpu())
        texts.append(task.encode_text(batch["input_ids"], batch["attention_mask"]).float().cpu())
        keys += batch["key"]
        attrs += batch.get("attributes", [None] * len(batch["key"]))
    local = (
        keys,
        torch.cat(images) if images else torch.empty(0),
        torch.cat(texts) if texts else torch.empty(0),
        attrs,
    )
    gathered = distributed.all_gather_object(local)
    if not dist.is_main:
        return {}
    by_key: dict[str, tuple] = {}
    for k_list, img, txt, att in gathered:
        for i, key in enumerate(k_list):
            by_key[key] = (img[i], txt[i], att[i])
    order = sorted(by_key)
    image = torch.stack([by_key[k][0] for k in order])
    text = torch.stack([by_key[k][1] for k in order])
    metrics = retrieval_metrics(image, text)
    all_attrs = [by_key[k][2] for k in order]
    if cfg.eval.zeroshot and all(a is not None for a in all_attrs):
        metrics.update(zeroshot_accuracy(task, image, all_attrs, dist.device))
    return metrics


def load_eval(run_dir) -> dict:
    with open(f"{run_dir}/eval.json") as f:
        return json.load(f)
