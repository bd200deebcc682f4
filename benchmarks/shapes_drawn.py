"""Run a vlscale command or a benchmark script with the synthetic shapes drawn at other sizes.

    python benchmarks/shapes_drawn.py --radii 0.28,0.35,0.42 --jitter 1 -- \\
        shards synthetic-vqa --out /tmp/vqa_big_parquet --train 10000 --val 300
    python benchmarks/shapes_drawn.py --radii 0.28,0.35,0.42 --jitter 1 -- \\
        benchmarks/shape_supervised.py TOWER --scratch --steps 500

For experiments on the demo data (BENCHMARKS.md, "Bigger shapes" and "A tower that knows shape"):
core/data/synthetic.py draws each shape with the radius its size names (SIZES: a fraction of a
grid cell) moved by up to JITTER/20 of a cell; this sets both for one process, then runs the
command after `--` (`vlscale ARGS`, or a script when the first argument ends in .py). The shards'
JSON still names the sizes small / medium / large, so every reader and evaluator is unchanged;
nothing records the radii: keep the shards of such a run apart from the demo's `data/`.
"""

from __future__ import annotations

import argparse
import runpy
import sys

from core.data import synthetic


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--radii", help="small,medium,large radii as fractions of a grid cell")
    parser.add_argument("--jitter", type=int, help="largest move, in twentieths of a cell")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command after --")
    if args.radii:
        radii = [float(r) for r in args.radii.split(",")]
        if len(radii) != len(synthetic.SIZES):
            names = ", ".join(synthetic.SIZES)
            parser.error(f"--radii needs {len(synthetic.SIZES)} values ({names})")
        # in place: modules that imported SIZES by name see the new radii too
        synthetic.SIZES.update(zip(synthetic.SIZES, radii))
    if args.jitter is not None:
        synthetic.JITTER = args.jitter
    largest = max(synthetic.SIZES.values()) + synthetic.JITTER / 20
    if largest > 0.5:
        parser.error(f"the largest radius plus jitter is {largest:.2f} of a cell: shapes would "
                     "cross into the next cell (at most 0.5)")  # fmt: skip
    if command[0].endswith(".py"):
        sys.argv = command
        runpy.run_path(command[0], run_name="__main__")
        return 0
    from launch.cli import main as vlscale

    return vlscale(command)


if __name__ == "__main__":
    sys.exit(main())
