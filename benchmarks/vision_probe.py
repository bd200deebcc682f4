"""What a vision tower's features know: linear probes for the shapes attributes.

    python benchmarks/vision_probe.py runs/tiny_siglip_export/vision

Renders one-shape synthetic images, embeds them with the (frozen) tower and fits a logistic
regression on 2,500 of them for the shape and the colour of the shape, on the mean-pooled
features and on the patch under the shape, and for each patch's position from its features;
prints accuracy on held-out images (500; 100 for the position).
"""

from __future__ import annotations

import argparse
import random

import torch
import torch.nn.functional as F

from core.data.preprocess import ImageLoader
from core.data.synthetic import COLOURS, POSITIONS, SHAPES, encode, render, sample_attributes
from core.models import from_pretrained


def one_shape_images(tower, n: int, seed: int = 0):
    load = ImageLoader(tower.image_size, tower.image_mean, tower.image_std, 10**8, crop=False)
    images, shape, colour, patch = [], [], [], []
    rng, grid = random.Random(seed), tower.image_size // tower.patch_size
    while len(images) < n:
        attributes = sample_attributes(rng)
        if len(attributes["shapes"]) != 1:
            continue
        (item,) = attributes["shapes"]
        images.append(load(encode(render(attributes, tower.image_size))))
        shape.append(SHAPES.index(item["shape"]))
        colour.append(list(COLOURS).index(item["colour"]))
        row, col = divmod(POSITIONS.index(item["position"]), 3)
        patch.append(int((row + 0.5) * grid / 3) * grid + int((col + 0.5) * grid / 3))
    return torch.stack(images), torch.tensor(shape), torch.tensor(colour), torch.tensor(patch)


def probe(features: torch.Tensor, labels: torch.Tensor, train: int, steps: int = 300) -> float:
    mean, std = features[:train].mean(0), features[:train].std(0) + 1e-6
    z = (features - mean) / std
    weight = torch.zeros(z.shape[1], int(labels.max()) + 1, requires_grad=True)
    bias = torch.zeros(weight.shape[1], requires_grad=True)
    opt = torch.optim.Adam([weight, bias], lr=1e-2)
    for _ in range(steps):
        loss = F.cross_entropy(z[:train] @ weight + bias, labels[:train])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return ((z[train:] @ weight + bias).argmax(1) == labels[train:]).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tower", help="an HF-layout vision tower directory")
    parser.add_argument("--images", type=int, default=3000)
    args = parser.parse_args()
    tower = from_pretrained(args.tower).eval()
    images, shape, colour, patch = one_shape_images(tower, args.images)
    with torch.no_grad():
        hidden = torch.cat([tower(images[i : i + 256]) for i in range(0, len(images), 256)])
    if getattr(tower, "has_cls_token", False):
        hidden = hidden[:, 1:]
    train = int(0.83 * len(images))
    pooled, local = hidden.mean(1), hidden[torch.arange(len(hidden)), patch]
    print(f"{'features':<12} {'shape (chance 0.25)':>20} {'colour (chance 0.12)':>21}")
    for name, feats in (("mean-pooled", pooled), ("shape patch", local)):
        shape_acc, colour_acc = probe(feats, shape, train), probe(feats, colour, train)
        print(f"{name:<12} {shape_acc:>20.3f} {colour_acc:>21.3f}")
    # Where: can one patch's features tell which patch it is? (600 images' patches, 500 to fit)
    tokens = hidden.shape[1]
    where = probe(hidden[:600].flatten(0, 1), torch.arange(tokens).repeat(600), 500 * tokens)
    print(f"patch position from its own features: {where:.3f} (chance {1 / tokens:.3f})")


if __name__ == "__main__":
    main()
