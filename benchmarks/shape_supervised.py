"""How fast a vision tower learns the shapes' kinds when told them directly.

    python benchmarks/shape_supervised.py runs/tiny_siglip_export/vision            # its init
    python benchmarks/shape_supervised.py runs/tiny_siglip_export/vision --scratch \\
        --image-size 96 --patch-size 16                                           # random, 96 px

The upper bound on what the staged VLM can teach a tower about shape in a few hundred steps:
the tower (loaded, or built from its config with --scratch and a new geometry) plus a linear
head on all its patch features is trained on fresh multi-shape scenes to name the kind of shape
in each of the 9 grid cells (or "empty"), batch 64, AdamW, 50 warm-up steps. Every 50 steps it
prints the accuracy on the occupied cells of 512 held-out scenes, overall and by shape size.
"""

from __future__ import annotations

import argparse
import io
import random
import time

import torch
import torch.nn.functional as F

from core.data.preprocess import ImageLoader
from core.data.synthetic import JPEG_QUALITY, POSITIONS, SHAPES, SIZES, render, sample_attributes
from core.models import from_pretrained, hub, model_class

CLASSES = 1 + len(SHAPES)  # 0: empty cell


def scenes(rng: random.Random, n: int, load: ImageLoader, image_size: int):
    """(images, per-cell kind labels, per-cell size index or -1) of n fresh scenes."""
    images, kinds, sizes = [], [], []
    for _ in range(n):
        attributes = sample_attributes(rng)
        buffer = io.BytesIO()
        render(attributes, image_size).save(buffer, format="JPEG", quality=JPEG_QUALITY)
        images.append(load(buffer.getvalue()))
        kind, size = [0] * len(POSITIONS), [-1] * len(POSITIONS)
        for shape in attributes["shapes"]:
            cell = POSITIONS.index(shape["position"])
            kind[cell] = 1 + SHAPES.index(shape["shape"])
            size[cell] = list(SIZES).index(shape["size"])
        kinds.append(kind)
        sizes.append(size)
    return torch.stack(images), torch.tensor(kinds), torch.tensor(sizes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tower", help="an HF-layout vision tower directory")
    parser.add_argument("--scratch", action="store_true", help="random init from its config")
    parser.add_argument("--image-size", type=int, help="with --scratch: a new image size")
    parser.add_argument("--patch-size", type=int, help="with --scratch: a new patch size")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.scratch:
        cfg = hub.read_config(args.tower)
        cfg["image_size"] = args.image_size or cfg["image_size"]
        cfg["patch_size"] = args.patch_size or cfg["patch_size"]
        tower = model_class(cfg["model_type"]).from_hf_config(cfg)
    elif args.image_size or args.patch_size:
        parser.error("--image-size and --patch-size need --scratch")
    else:
        tower = from_pretrained(args.tower)
    tower.train()
    size = tower.image_size
    load = ImageLoader(size, tower.image_mean, tower.image_std, 10**8, crop=False)
    tokens = (size // tower.patch_size) ** 2 + int(getattr(tower, "has_cls_token", False))
    head = torch.nn.Linear(tokens * tower.hidden_size, len(POSITIONS) * CLASSES)
    params = list(tower.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)

    def logits(images):
        return head(tower(images).flatten(1)).view(len(images), len(POSITIONS), CLASSES)

    val_images, val_kinds, val_sizes = scenes(random.Random(999), 512, load, size)
    rng, start = random.Random(0), time.perf_counter()
    print(f"{'step':>5} {'loss':>6} {'shape acc':>9}  by size ({', '.join(SIZES)})  seconds")
    for step in range(1, args.steps + 1):
        images, kinds, _ = scenes(rng, 64, load, size)
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, step / 50)
        loss = F.cross_entropy(logits(images).reshape(-1, CLASSES), kinds.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0:
            with torch.no_grad():
                right = logits(val_images).argmax(-1) == val_kinds
            occupied = right[val_kinds > 0].float().mean().item()
            by_size = [right[val_sizes == k].float().mean().item() for k in range(len(SIZES))]
            sizes = " ".join(f"{a:.2f}" for a in by_size)
            seconds = time.perf_counter() - start
            print(f"{step:>5} {loss.item():>6.3f} {occupied:>9.3f}  {sizes:>24}  {seconds:>7.0f}")


if __name__ == "__main__":
    main()
