"""`linear_probe`: what the image tower's own features know about the synthetic shapes. A linear
classifier is fitted on the features (`ImageEncoder.image_features`: the tower's output tokens
mean-pooled, no projection) of `train_samples` one-shape images and scored on `val_samples`
others, for the shape's colour (8 classes), shape (4) and position (its cell of the 3x3 grid,
9): `probe_colour_acc`, `probe_shape_acc`, `probe_position_acc` and their mean
`probe_acc`. Only one-shape images are labelled: with several shapes none of the three has one
answer (as in the `zeroshot` class problems).

    - linear_probe: {train: data/shapes/train-000000.tar, val: data/shapes/val-000000.tar}

The images are read from the shards directly (image + json members, as `vlscale shards
synthetic` writes them), the first labelled samples in shard order, and preprocessed as the
task's validation images (`preprocess_image`). `train` / `val` default to the recipe's data.train
/ data.val: right for SigLIP on shapes shards; a VLM's conversations carry no shapes metadata, so
there both must be set (an error says so).

The fit is deterministic, in float64 on one CPU thread, on features standardised with the
training set's mean and standard deviation; the bias is never penalised. `method`:

    ridge     (default) least squares to the one-hot labels + l2 * |W|^2 per sample, in closed
              form (big_vision's few-shot probes regress on the labels in closed form too):
              scikit-learn's RidgeClassifier(alpha = l2 * n); milliseconds.
    logistic  mean cross-entropy + l2 / 2 * |W|^2 by full-batch L-BFGS (the CLIP paper's
              probe): scikit-learn's LogisticRegression(C = 1 / (l2 * n)). Converging to a
              gradient of 1e-9 takes hundreds of iterations: ~3 s for tiny_siglip's three
              probes of 512 images on 2 busy cores.

(tests/test_probe_caption_evaluators.py checks both against scikit-learn.) Every rank embeds a
contiguous share of the samples; rank 0 fits, so the numbers do not depend on the number of
ranks.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tarfile
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from .. import distributed
from ..config import ConfigError
from ..data.errors import BadSample
from ..data.preprocess import first_member, member_keys
from ..data.shards import open_shard
from ..data.stream import expand_urls
from ..data.synthetic import COLOURS, POSITIONS, SHAPES
from ..tasks.base import ImageEncoder
from .base import EvalContext, Evaluator, Options

log = logging.getLogger(__name__)

# probe name -> the attribute of the one shape it predicts, and its classes in label order
PROBES = {
    "colour": ("colour", tuple(COLOURS)),
    "shape": ("shape", SHAPES),
    "position": ("position", POSITIONS),
}


@dataclass
class LinearProbeOptions(Options):
    train: str = ""  # shard pattern of shapes samples (image + json); "": data.train
    val: str = ""  # "": data.val
    train_samples: int = 2048  # labelled (one-shape) images the probe is fitted on
    val_samples: int = 512  # labelled images it is scored on
    method: Literal["ridge", "logistic"] = "ridge"  # closed form, or L-BFGS (module docstring)
    # L2 strength on the weights, per training image (module docstring). Ridge on tiny_siglip,
    # 512 or 2048 images: 1e-4 is within 0.01 of the best mean accuracy of 1e-1 ... 1e-6.
    l2: float = 1e-4
    max_iter: int = 1000  # logistic: L-BFGS iterations at most (fewer when converged)
    image_keys: str = "jpg;png;webp"  # members that may hold the image: the first one present

    def __post_init__(self):  # checked when the recipe loads
        for name in ("train_samples", "val_samples", "max_iter"):
            if getattr(self, name) < 1:
                raise ConfigError(f"linear_probe.{name}={getattr(self, name)}: at least 1")
        if not self.l2 > 0:
            raise ConfigError(f"linear_probe.l2={self.l2}: a positive regularisation strength")
        if not member_keys(self.image_keys):
            raise ConfigError(f"linear_probe.image_keys={self.image_keys!r} names no member")
        for name in ("train", "val"):
            if "{subset}" in getattr(self, name):
                raise ConfigError(f"linear_probe.{name}: shards of synthetic shapes, not a "
                                  "{subset} pattern")  # fmt: skip


def probe_labels(attributes) -> dict[str, int] | None:
    """A sample's class for each probe (PROBES) from its shapes attributes, or None when it is
    not a one-shape image of the synthetic shapes."""
    shapes = attributes.get("shapes") if isinstance(attributes, dict) else None
    if not isinstance(shapes, list) or len(shapes) != 1 or not isinstance(shapes[0], dict):
        return None
    labels = {}
    for name, (field, classes) in PROBES.items():
        if shapes[0].get(field) not in classes:
            return None
        labels[name] = classes.index(shapes[0][field])
    return labels


def labelled_samples(urls: list[str], wanted: int, image_keys: tuple[str, ...], what: str):
    """(url, index in the shard, labels) of the first `wanted` labelled samples of the shards,
    in shard order. ConfigError when the shards hold none."""
    found, shapes_seen = [], 0
    for url in urls:
        try:
            shard = open_shard(url)
        except (OSError, EOFError, tarfile.TarError, ValueError) as err:
            log.warning("linear_probe: %s unreadable, skipped (%s)", url, err)  # as in training
            continue
        try:
            for index in range(len(shard)):
                try:
                    sample = shard.read(index)
                except BadSample:  # a truncated member: the training stream skips it too
                    continue
                try:
                    attributes = json.loads(sample["json"])
                except (KeyError, ValueError):  # no metadata, or not JSON (or not UTF-8)
                    continue
                shapes_seen += isinstance(attributes, dict) and "shapes" in attributes
                labels = probe_labels(attributes)
                if labels is None or first_member(sample, image_keys) is None:
                    continue
                found.append((url, index, labels))
                if len(found) == wanted:
                    return found
        finally:
            shard.close()
    if not found:
        raise ConfigError(
            f"linear_probe: {what} has no one-shape image with shapes metadata (image + json "
            + ("members" if shapes_seen else "members: its samples carry no shapes JSON")
            + "); set the evaluator's train / val options to synthetic shapes shards "
            "(`vlscale shards synthetic`)"
        )
    log.warning("linear_probe: %s has %d labelled images, fewer than the %d asked for", what,
                len(found), wanted)  # fmt: skip
    return found


def standardise(train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """Each tensor minus the training features' mean, over their standard deviation (a constant
    feature is divided by 1, as scikit-learn's StandardScaler does)."""
    mean, std = train.mean(dim=0), train.std(dim=0, unbiased=False)
    std = torch.where(std > 0, std, torch.ones_like(std))
    return [(x - mean) / std for x in (train, *others)]


def fit_ridge(x: torch.Tensor, targets: torch.Tensor, num_classes: int,
              l2: float) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(weight [d, K], bias [K]) minimising |one_hot(targets) - x @ weight - bias|^2 / n +
    l2 * |weight|^2 over x [n, d], in closed form (float64): the bias fits the centred data."""
    x = x.double()
    y = F.one_hot(targets, num_classes).double()
    x_mean, y_mean = x.mean(dim=0), y.mean(dim=0)
    xc = x - x_mean
    gram = xc.T @ xc + len(x) * l2 * torch.eye(x.shape[1], dtype=torch.float64)
    weight = torch.cholesky_solve(xc.T @ (y - y_mean), torch.linalg.cholesky(gram))
    return weight, y_mean - x_mean @ weight


def fit_logistic(x: torch.Tensor, targets: torch.Tensor, num_classes: int, l2: float,
                 max_iter: int) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(weight [d, K], bias [K]) minimising mean cross-entropy + l2 / 2 * |weight|^2 over
    x [n, d] and targets in [0, K), by full-batch L-BFGS in float64 from zero."""
    x = x.double()
    weight = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-9, tolerance_change=1e-16,
                            line_search_fn="strong_wolfe")  # fmt: skip

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, targets) + 0.5 * l2 * weight.square().sum()
        loss.backward()
        return loss

    # Evaluators run under no_grad (and maybe bf16 autocast, which leaves float64 alone anyway).
    with torch.enable_grad(), torch.autocast("cpu", enabled=False), _one_thread():
        opt.step(closure)
    return weight.detach(), bias.detach()


@contextlib.contextmanager
def _one_thread():
    """torch on one CPU thread: the same bits whatever its thread count (a parallel reduction's
    order depends on it), and on matrices this small the thread pool only costs (30x slower on
    2 busy cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def probe_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor,
                   val_y: torch.Tensor, l2: float, method: str = "ridge",
                   max_iter: int = 1000) -> float:  # fmt: skip
    """Held-out accuracy of a linear classifier (`method`: ridge or logistic) fitted on
    standardised training features. Its classes are the labels seen in training (a validation
    label never seen counts wrong)."""
    with _one_thread():
        train_x, val_x = standardise(train_x.double(), val_x.double())
        classes, targets = torch.unique(train_y, return_inverse=True)
        if method == "ridge":
            weight, bias = fit_ridge(train_x, targets, len(classes), l2)
        else:
            weight, bias = fit_logistic(train_x, targets, len(classes), l2, max_iter)
        predicted = classes[(val_x @ weight + bias).argmax(dim=1)]
        return (predicted == val_y).double().mean().item()


class LinearProbeEvaluator(Evaluator):
    name = "linear_probe"
    Options = LinearProbeOptions
    requires = (ImageEncoder,)

    def __init__(self, options: LinearProbeOptions):
        super().__init__(options)
        self.selection: list | None = None  # (split, url, index, labels); the shards stay put

    def __call__(self, task, ctx: EvalContext) -> dict[str, float]:
        o = self.options
        if self.selection is None:  # read once (rank 0) and shared: every rank needs the list
            self.selection = distributed.decided_on_rank0(
                lambda: self.select(ctx), ConfigError, "find the linear probe's samples"
            )
        features, records = self.embed_share(task, ctx)
        gathered = distributed.all_gather_object((features, records))
        if not ctx.dist.is_main:
            return {}
        features = torch.cat([f for rank_features, _ in gathered for f in rank_features])
        records = [r for _, rank_records in gathered for r in rank_records]
        train = torch.tensor([split == "train" for split, _ in records])
        if train.all() or not train.any():
            log.warning("linear_probe: every image of a split failed to decode; skipped")
            return {}
        out = {}
        for name in PROBES:
            y = torch.tensor([labels[name] for _, labels in records])
            out[f"probe_{name}_acc"] = probe_accuracy(
                features[train], y[train], features[~train], y[~train], o.l2, o.method, o.max_iter
            )
        out["probe_acc"] = sum(out.values()) / len(out)
        return out

    def select(self, ctx: EvalContext) -> list[tuple[str, str, int, dict]]:
        o, keys = self.options, member_keys(self.options.image_keys)
        patterns = {"train": o.train or ctx.cfg.data.train, "val": o.val or ctx.cfg.data.val}
        for split, pattern in patterns.items():
            if not pattern or "{subset}" in pattern:
                raise ConfigError(
                    f"linear_probe: data.{split} is {pattern!r}; set the evaluator's {split} "
                    "option to synthetic shapes shards (image + json members)"
                )
        urls = {split: expand_urls(p) for split, p in patterns.items()}
        if urls["train"] == urls["val"]:  # one set of shards: validate on the images after
            found = labelled_samples(urls["train"], o.train_samples + o.val_samples, keys,
                                     patterns["train"])  # fmt: skip
            if len(found) <= o.train_samples:
                raise ConfigError(
                    f"linear_probe: train and val are the same shards ({patterns['train']}) "
                    f"and hold {len(found)} labelled images: none left after the "
                    f"{o.train_samples} training ones; lower train_samples or set val"
                )
            split = [("train", *s) for s in found[: o.train_samples]]
            return split + [("val", *s) for s in found[o.train_samples :]]
        train = labelled_samples(urls["train"], o.train_samples, keys, f"train={patterns['train']}")
        val = labelled_samples(urls["val"], o.val_samples, keys, f"val={patterns['val']}")
        return [("train", *s) for s in train] + [("val", *s) for s in val]

    def embed_share(self, task, ctx: EvalContext) -> tuple[list[torch.Tensor], list[tuple]]:
        """This rank's contiguous share of the selection: image features (float32, CPU) in
        batches of eval.batch_size and (split, labels) of each image embedded."""
        keys = member_keys(self.options.image_keys)
        share = -(-len(self.selection) // ctx.dist.world_size)
        mine = self.selection[ctx.dist.rank * share : (ctx.dist.rank + 1) * share]
        shards = {}  # url -> open shard, for this call

        def read(chunk: list) -> tuple[torch.Tensor, list] | None:
            pixels, labelled = [], []
            for split, url, index, labels in chunk:
                if url not in shards:
                    shards[url] = open_shard(url)
                try:
                    image = first_member(shards[url].read(index), keys)
                    pixels.append(task.preprocess_image(image))
                except BadSample as err:
                    log.warning("linear_probe: %s sample %d skipped (%s)", url, index, err)
                    continue
                labelled.append((split, labels))
            return (torch.stack(pixels), labelled) if pixels else None

        features, records = [], []
        try:
            chunks = (read(mine[start : start + ctx.batch_size])
                      for start in range(0, len(mine), ctx.batch_size))  # fmt: skip
            readable = (chunk for chunk in chunks if chunk is not None)  # not one image decoded
            for (pixels, labelled), real in ctx.steps(readable, on_device=False):
                encoded = task.image_features(pixels.to(ctx.dist.device)).float().cpu()
                if real:
                    features.append(encoded)
                    records += labelled
        finally:
            for shard in shards.values():
                shard.close()
        return features, records
