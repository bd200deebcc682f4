"""`vlscale train RECIPE [key.sub=value ...]`: train (or resume) a recipe.

Works as one process, under `torchrun --nproc_per_node=N -m launch.cli train ...`, under the
`deepspeed` launcher, or as a SLURM task: ranks come from whichever launcher started it.
"""

from __future__ import annotations

import argparse
import json

from core.recipe import load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from core.recipe import config_reference

    parser.add_argument("recipe", help="a recipe YAML path, or a name in recipes/")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. optim.lr=1e-4")
    # Generated from the config dataclasses (and every registered task kind's): never stale.
    # Built when help is asked for: reading the fields' comments from the source takes ~0.4 s,
    # which every rank of every job would pay at startup.
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    format_without_reference = parser.format_help

    def format_help() -> str:
        parser.epilog = config_reference()
        return format_without_reference()

    parser.format_help = format_help


def main(args) -> int:
    from core.loop import train

    cfg = load_config(args.recipe, args.overrides)
    metrics = train(cfg)
    if metrics:
        print(json.dumps(metrics, indent=2))
    return 0
