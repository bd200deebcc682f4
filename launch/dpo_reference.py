"""`vlscale dpo-reference RECIPE [key=value ...] [--out FILE]`: write the reference log-probs of
every preference pair of a `task.kind: vlm_dpo` recipe's data.train and data.val (images
included), from the model the run would start from, for `task.dpo.reference: precomputed`.

One process, on the GPU when there is one. The file holds the starting model's hash and each
pair's; a run whose model or pairs differ refuses it (core/tasks/vlm_dpo.py). Then train with
`task.dpo.reference=precomputed task.dpo.reference_logps=FILE`.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="a recipe YAML path, or a name in recipes/")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    parser.add_argument("--out", default="", help="the file (default: beside the first shard)")
    parser.add_argument("--batch-size", type=int, default=0, help="pairs per forward "
                        "(default: data.batch_size)")  # fmt: skip


def main(args: argparse.Namespace) -> int:
    import torch

    from core.config import ConfigError
    from core.recipe import load_config
    from core.tasks.vlm_dpo import VLMDPOTask, precompute_reference_logps

    cfg = load_config(args.recipe, args.overrides)
    if cfg.task.kind != "vlm_dpo":
        raise ConfigError(f"task.kind={cfg.task.kind}: dpo-reference needs a vlm_dpo recipe")
    torch.manual_seed(cfg.seed)  # the loop's seed: the same starting model as the run's
    task = VLMDPOTask(cfg, load_reference=False)
    if torch.cuda.is_available():
        task = task.cuda()
    with torch.no_grad():
        path = precompute_reference_logps(task, args.out or None, batch_size=args.batch_size)
    print(f"reference log-probs written to {path}")
    print(f"train with: task.dpo.reference=precomputed task.dpo.reference_logps={path}")
    return 0
