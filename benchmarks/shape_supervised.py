"""How fast a vision tower learns the shapes' kinds when told them directly.

    python benchmarks/shape_supervised.py runs/tiny_siglip_export/vision            # its init
    python benchmarks/shape_supervised.py runs/tiny_siglip_export/vision --scratch \\
        --image-size 96 --patch-size 16                                           # random, 96 px
    python benchmarks/shape_supervised.py TOWER --steps 800 --save DIR    # keep the trained tower

The upper bound on what the staged VLM can teach a tower about shape in a few hundred steps:
the tower (loaded, or built from its config with --scratch and a new geometry) plus a linear
head on all its patch features is trained on fresh multi-shape scenes to name the kind of shape
in each of the 9 grid cells (or "empty"), batch 64, AdamW, 50 warm-up steps. Every 50 steps it
prints the accuracy on the occupied cells of 512 held-out scenes, overall and by shape size;
at the end, which kind each true kind was taken for. `--colour` also names each cell's colour
(and prints its accuracy). `--save DIR` writes the trained tower in Hugging Face layout, e.g. to
give the staged VLM a tower that has been taught shape. The VLM demos train such a tower as a
recipe, on shapes shards instead of fresh scenes: `vlscale train tiny_cells` (core/tasks/cells.py).
"""

from __future__ import annotations

import argparse
import random
import time

import torch
import torch.nn.functional as F

from core.data.preprocess import ImageLoader
from core.data.synthetic import (
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    encode,
    render,
    sample_attributes,
)
from core.models import from_pretrained, hub, model_class, save_pretrained

CLASSES = 1 + len(SHAPES)  # 0: empty cell
COLOUR_CLASSES = 1 + len(COLOURS)


def scenes(rng: random.Random, n: int, load: ImageLoader, image_size: int):
    """(images, per-cell kind, colour and size labels) of n fresh scenes: kind and colour are 0
    for an empty cell, the size index is -1."""
    images, kinds, colours, sizes = [], [], [], []
    for _ in range(n):
        attributes = sample_attributes(rng)
        images.append(load(encode(render(attributes, image_size))))
        kind, colour, size = [0] * len(POSITIONS), [0] * len(POSITIONS), [-1] * len(POSITIONS)
        for shape in attributes["shapes"]:
            cell = POSITIONS.index(shape["position"])
            kind[cell] = 1 + SHAPES.index(shape["shape"])
            colour[cell] = 1 + list(COLOURS).index(shape["colour"])
            size[cell] = list(SIZES).index(shape["size"])
        kinds.append(kind)
        colours.append(colour)
        sizes.append(size)
    return (torch.stack(images), *map(torch.tensor, (kinds, colours, sizes)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tower", help="an HF-layout vision tower directory")
    parser.add_argument("--scratch", action="store_true", help="random init from its config")
    parser.add_argument("--image-size", type=int, help="with --scratch: a new image size")
    parser.add_argument("--patch-size", type=int, help="with --scratch: a new patch size")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--colour", action="store_true", help="also name each cell's colour")
    parser.add_argument("--save", help="write the trained tower here (Hugging Face layout)")
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
    outputs = CLASSES + COLOUR_CLASSES * args.colour
    head = torch.nn.Linear(tokens * tower.hidden_size, len(POSITIONS) * outputs)
    params = list(tower.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)

    def logits(images):  # (kind logits, colour logits or None), each [n, cells, classes]
        out = head(tower(images).flatten(1)).view(len(images), len(POSITIONS), outputs)
        return out[..., :CLASSES], (out[..., CLASSES:] if args.colour else None)

    val_images, val_kinds, val_colours, val_sizes = scenes(random.Random(999), 512, load, size)
    rng, start = random.Random(0), time.perf_counter()
    header = f"{'step':>5} {'loss':>6} {'shape acc':>9}  by size ({', '.join(SIZES)})"
    print(header + (" colour acc" if args.colour else "") + "  seconds")
    for step in range(1, args.steps + 1):
        images, kinds, colours, _ = scenes(rng, 64, load, size)
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, step / 50)
        kind_logits, colour_logits = logits(images)
        loss = F.cross_entropy(kind_logits.reshape(-1, CLASSES), kinds.reshape(-1))
        if args.colour:
            loss = loss + F.cross_entropy(
                colour_logits.reshape(-1, COLOUR_CLASSES), colours.flatten()
            )
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0:
            with torch.no_grad():
                kind_logits, colour_logits = logits(val_images)
            right = kind_logits.argmax(-1) == val_kinds
            occupied = right[val_kinds > 0].float().mean().item()
            by_size = [right[val_sizes == k].float().mean().item() for k in range(len(SIZES))]
            sizes = " ".join(f"{a:.2f}" for a in by_size)
            colour = ""
            if args.colour:
                right = colour_logits.argmax(-1) == val_colours
                colour = f" {right[val_kinds > 0].float().mean().item():>10.3f}"
            seconds = time.perf_counter() - start
            row = f"{step:>5} {loss.item():>6.3f} {occupied:>9.3f}  {sizes:>24}{colour}"
            print(f"{row}  {seconds:>7.0f}")
    with torch.no_grad():
        predicted = logits(val_images)[0].argmax(-1)
    confusion = torch.zeros(CLASSES, CLASSES, dtype=torch.long)
    pairs = (val_kinds.flatten(), predicted.flatten())
    confusion.index_put_(pairs, torch.tensor(1), accumulate=True)
    names = ("empty", *SHAPES)
    print("\ntrue \\ predicted " + " ".join(f"{n:>8}" for n in names))
    for name, row in zip(names, confusion.tolist()):
        print(f"{name:>17} " + " ".join(f"{v:>8}" for v in row))
    if args.save:
        save_pretrained(tower, args.save)
        print(f"saved the tower to {args.save}")


if __name__ == "__main__":
    main()
