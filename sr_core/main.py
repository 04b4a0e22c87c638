"""The ``sr`` command. Subcommands come from the ``sr.commands`` entry-point group, so
each package (sr_core, jobs, batch, infra) owns its own and can be left out of an
install. Heavy imports (torch, ray, deepspeed) happen inside the subcommands, which
keeps ``sr --help`` instant."""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import entry_points

EXIT_TEMPFAIL = 75


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sr",
        description="sr-cloud: ESRGAN super-resolution — models, training, batch upscaling.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for ep in sorted(entry_points(group="sr.commands"), key=lambda e: e.name):
        try:
            register = ep.load()
        except ImportError as exc:  # a package left out of this install
            print(f"sr: commands from {ep.name!r} unavailable: {exc}", file=sys.stderr)
            continue
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("sr: interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, FileExistsError, PermissionError) as exc:
        # Users' mistakes: a clear one-line message naming the input, no traceback.
        print(f"sr {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except ConnectionError as exc:
        # Storage unreachable or still failing after bounded retries (the message names
        # the object). 75 is sysexits' EX_TEMPFAIL: try again later; reruns resume.
        print(f"sr {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_TEMPFAIL


if __name__ == "__main__":
    sys.exit(main())
