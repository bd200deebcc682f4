"""`vlscale config RECIPE [key.sub=value ...]`: print the fully resolved config as YAML.

The recipe with its `base:` chain, the overrides and every default, checked as `vlscale train`
checks it: what the run's config.yaml will hold. `vlscale train --help` lists every key.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="a recipe YAML path, or a name in recipes/")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. optim.lr=1e-4")


def main(args) -> int:
    from core.recipe import load_config

    print(load_config(args.recipe, args.overrides).to_yaml(), end="")
    return 0
