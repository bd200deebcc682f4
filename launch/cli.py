"""The `vlscale` command (also `python -m launch.cli`, so `torchrun -m launch.cli train ...` works).

Each subcommand lives in its own module with `add_arguments(parser)` and `main(args) -> int`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
SUBCOMMANDS = {
    "train": ("launch.train", "train (or resume) a recipe"),
    "config": ("launch.config", "print a recipe's fully resolved config (YAML)"),
    "shards": ("launch.shards", "write or index training shards (synthetic, CC3M, FineVision)"),
    "report": ("launch.report", "print a run's results and draw its curves"),
    "export": ("launch.export", "a run's checkpoint (any engine) as HF-layout safetensors"),
    "push": ("launch.push", "upload a run (exported first) or an export to the Hugging Face Hub"),
    "generate": ("launch.generate", "answer prompts (with images) using a trained VLM run"),
    "eval": ("launch.evaluate", "run an evaluator (or the declared ones) on a run's checkpoint"),
    "plan": ("launch.plan", "estimate per-GPU memory of every engine for a recipe"),
    "submit": ("launch.submit", "submit a recipe (or resume a run) as a SLURM job via submitit"),
    "status": ("launch.status", "a run's step, newest checkpoint, SLURM jobs and their states"),
    "dpo-reference": (
        "launch.dpo_reference",
        "write a DPO recipe's reference log-probs (task.dpo.reference=precomputed)",
    ),
    "doctor": ("launch.doctor", "check devices, matmul speed, flash-attn, all-reduce, a short run"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlscale", description="Scale-out training of vision-language models."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        mod = importlib.import_module(module)
        mod.add_arguments(sub_parser)
        sub_parser.set_defaults(_module=mod)
    return parser


def main(argv: list[str] | None = None) -> int:
    from core.config import ConfigError
    from core.preemption import EXIT_INTERRUPTED, Interrupted
    from core.runlock import RunLocked

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse takes a command's positionals in one run: in `vlscale doctor RECIPE --steps 20
    # key=value` the override after the option would be "unrecognized". Overrides may follow
    # options; anything else unknown is still an error.
    if extra:
        if not isinstance(getattr(args, "overrides", None), list) or any(
            a.startswith("-") or "=" not in a for a in extra
        ):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    try:
        return int(args._module.main(args) or 0)
    except (ConfigError, RunLocked) as err:  # bad config, or run dir in use: one line, no trace
        print(f"vlscale {args.command}: error: {err}", file=sys.stderr)
        # Every rank raised the same error: tear the process group down before exiting, or
        # gloo aborts at exit (SIGABRT) and torchrun reports that instead of this exit code.
        from core.distributed import cleanup

        cleanup()
        return 2
    except Interrupted as stop:  # preemption/timeout signal: checkpointed, rerun to continue
        print(f"vlscale {args.command}: {stop}; the same command resumes", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
