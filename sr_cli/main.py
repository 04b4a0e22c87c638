"""The ``sr`` entry point: the table of commands and the exit-code policy.

Every command module imports only argparse and light helpers at the top; heavy imports
(torch, ray, deepspeed) happen inside the handler that runs, so ``sr --help`` is instant.
"""

from __future__ import annotations

import argparse
import contextlib
import sys

from sr_cli import batch, cloud, evaluate, models, tensorboard, train, upscale
from sr_core.errors import EXIT_INTERRUPTED, run_command, sigterm_interrupts

# Every command, in the order `sr --help` lists them: name -> the function that adds its
# parser (with its handler as ``func``) to the subcommand table.
COMMANDS = {
    "upscale": upscale.add_parser,
    "batch": batch.add_parser,
    "eval": evaluate.add_parser,
    "convert": models.add_convert_parser,
    "interpolate": models.add_interpolate_parser,
    "prepare": train.add_prepare_parser,
    "train": train.add_train_parser,
    "cloud": cloud.add_cloud_parser,
    "tensorboard": tensorboard.add_tensorboard_parser,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sr",
        description="sr-cloud: ESRGAN super-resolution — models, training, batch upscaling.",
        epilog="exit codes: 0 done, 1 some inputs failed (the rest done), 2 usage or input error, "
               "75 storage unreachable (rerun to resume), 130 interrupted",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add_parser in COMMANDS.values():
        add_parser(sub)
    # `sr cloud batch` checks the `sr batch` options it will submit with this same parser
    # (handed over here: infra imports nothing of sr_cli).
    parser.set_defaults(sr_parser=parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except KeyboardInterrupt:  # Ctrl-C before the command started: the same one line
        print("sr: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    # Commands that set `interrupt_on_sigterm` treat SIGTERM as Ctrl-C from here on,
    # before their heavy imports: one line and exit code 130 instead of a silent 143.
    with sigterm_interrupts() if getattr(args, "interrupt_on_sigterm", False) else contextlib.nullcontext():
        return run_command(f"sr {args.command}", lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
