"""``sr upscale``: upscale files, folders (recursive), globs and fsspec URLs with one model
(the loop is ``sr_core.folder.upscale_folder``; this module parses and prints).

Outputs are named by ``sr_core.outputs`` (as ``sr batch`` names them). Existing outputs
are skipped unless --overwrite, so a rerun finishes only what is missing. A bad input
is reported with its reason and the run goes on; the exit code is 1 when anything
failed.
"""

from __future__ import annotations

import argparse
import sys

from sr_cli.options import add_output_options, output_settings


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "upscale",
        help="upscale image files, folders, globs or fsspec URLs with a model",
        description=(
            "Upscale images with a generator file (ours or a foreign ESRGAN/Real-ESRGAN .pth). "
            "INPUT may be a file, a folder (searched recursively; the relative structure is kept "
            "under OUT), a glob (quote it) or an fsspec URL (gs://, s3://, memory://). Existing "
            "outputs are skipped unless --overwrite. Bad inputs are reported and skipped; the "
            "exit code is 1 if any input failed."
        ),
    )
    p.add_argument("inputs", metavar="INPUT", nargs="+", help="image file, folder, glob or URL")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output folder (path or fsspec URL)")
    p.add_argument("-m", "--model", required=True, help="generator file (.safetensors or .pth; path or URL)")
    p.add_argument("--device", default="auto", help="auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:1, mps")
    add_output_options(p)
    p.add_argument("--overwrite", action="store_true", help="replace outputs that exist")
    p.add_argument("--memory-limit", type=float, default=None, metavar="GIB",
                   help="refuse, before decoding, an image whose input and assembled output would need more "
                        "host memory than this (default: the memory available when the run starts)")
    p.set_defaults(func=run_upscale, interrupt_on_sigterm=True)


def run_upscale(args: argparse.Namespace) -> int:
    from sr_core.folder import upscale_folder

    report = upscale_folder(args.inputs, args.output, args.model, output_settings(args), device=args.device,
                            overwrite=args.overwrite, memory_limit_gib=args.memory_limit)
    return print_report(report)


def print_report(report) -> int:
    """The summary line, one line per warning, skipped and failed input, and what is left;
    returns the exit code (1 some failed or stopped, 130 interrupted)."""
    from sr_core.storage import printable as show

    plan = report.plan
    hidden = f", {len(plan.hidden)} hidden file(s) not read" if plan.hidden else ""
    hidden += f", {len(plan.special)} non-regular file(s) not read" if plan.special else ""
    print(f"sr upscale: written {report.written}, skipped {report.skipped} (output exists), "
          f"failed {len(report.failures)}{hidden}{report.ran_on}")
    for url, message in report.notes:
        print(f"  WARNING {show(url)}: {show(message)}", file=sys.stderr)
    for url in plan.hidden:
        print(f"  SKIPPED {show(url)}: hidden file (its name starts with '.'); name it as an INPUT to upscale it",
              file=sys.stderr)
    for url, reason in plan.special:
        print(f"  SKIPPED {show(url)}: {reason}", file=sys.stderr)
    for url, reason in report.failures:
        print(f"  FAILED {show(url)}: {show(reason)}", file=sys.stderr)
    if report.stopped:
        print(f"sr upscale: stopped ({report.stopped}); {report.left} image(s) not done; run the same command "
              "again to finish them (outputs that exist are skipped)", file=sys.stderr)
        return 1
    if report.interrupted:
        print(f"sr upscale: interrupted with {report.left} image(s) not done; run the same command again to finish "
              "them (outputs that exist are skipped)", file=sys.stderr)
        return 130
    return 1 if report.failures else 0
