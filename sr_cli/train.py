"""The parsers of ``sr prepare``, ``sr train`` and ``sr train export``. Heavy imports stay
inside the handlers so ``sr --help`` is instant."""

from __future__ import annotations

import argparse
import sys

from jobs.arguments import CONFIG_ARGS_HELP, CONFIG_ARGS_METAVAR, PresetNamesFormatter, add_job_arguments, add_job_options
from sr_cli.options import add_include_exclude


def add_prepare_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prepare",
        help="cut HR training images into sub-image shards plus an index (local or gs://)",
        description=(
            "Cut every image below SRC into overlapping sub-images (lossless PNG) stored in tar "
            "shards under DST, with DST/index.json listing shards, sizes, checksums, bad images "
            "and the settings. The training loader reads random crops from these shards. "
            "index.json is written last: re-running the same command after an interruption "
            "finishes only the missing shards."
        ),
    )
    p.add_argument("src", metavar="SRC", help="folder or prefix of HR images (any fsspec URL, e.g. gs://bucket/DIV2K_train_HR)")
    p.add_argument("dst", metavar="DST", help="prefix that receives shards/ and index.json")
    p.add_argument("--size", type=int, default=480, help="sub-image side in pixels (default: 480)")
    p.add_argument("--step", type=int, default=240, help="distance between sub-images (default: 240)")
    p.add_argument("--min-size", type=int, default=0,
                   help="drop edge tiles narrower than this; skip images smaller than this (default: 0)")
    add_include_exclude(p, "SRC")
    p.add_argument("--images-per-shard", type=int, default=16,
                   help="source images per shard unit: the unit of resume and of rank assignment (default: 16)")
    p.add_argument("--max-shard-mb", type=float, default=256.0,
                   help="split a unit's tar into parts below this size (default: 256)")
    p.add_argument("--format", choices=["png", "raw"], default="png",
                   help="sub-image format: png (smaller) or raw RGB (about 2x larger; a crop reads only "
                        "its rows, no decoding: for when decoding is the bottleneck) (default: png)")
    p.add_argument("--png-level", type=int, default=3, help="PNG zlib level of the sub-images (default: 3)")
    p.add_argument("-j", "--workers", type=int, default=1, help="worker processes (default: 1)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_prepare, interrupt_on_sigterm=True)


def add_train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a generator (stage psnr, then gan) on Accelerate: DDP or DeepSpeed, resumable",
        description=(
            "Train an ESRGAN/SRGAN generator. Values come from --preset, then the optional config file "
            "(YAML or JSON), then section.field=value overrides. `sr train export RUN [--step N]` writes "
            "RUN/model.safetensors and RUN/model_ema.safetensors from a checkpoint (`sr train export "
            "--help`). Several machines: run `accelerate launch --config_file jobs/launch/X.yaml -m "
            "jobs.train ...` on each."
        ),
        epilog="example: sr train --preset tiny data.train_shards=shards/ train.run_dir=runs/tiny --resume auto",
        formatter_class=PresetNamesFormatter,
    )
    # Everything from the first positional on is parsed by the handler: `export ...` by
    # the export parser (its own --help and errors), anything else with the options
    # intermixed (`sr train a=1 --resume auto b=2`).
    p.add_argument("items", nargs=argparse.REMAINDER, metavar=CONFIG_ARGS_METAVAR, help=CONFIG_ARGS_HELP)
    add_job_options(p)
    p.add_argument("--processes", type=int, default=1, metavar="N",
                   help="start N local processes through Accelerate's launcher (one per GPU; gloo on CPU) "
                        "(default: 1, in this process)")
    p.set_defaults(func=run_train)


def export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sr train export",
        description="Write RUN/model.safetensors and RUN/model_ema.safetensors from a checkpoint of the run.",
    )
    p.add_argument("run_dir", metavar="RUN", help="the run directory (train.run_dir; local or any fsspec URL)")
    p.add_argument("--step", type=int, default=None, help="the checkpoint step to export (default: the newest intact)")
    return p


def _job_arguments(args: argparse.Namespace) -> argparse.Namespace:
    """The config items with the options that came between them, over those given first."""
    parser = argparse.ArgumentParser(prog="sr train")
    add_job_arguments(parser)
    parser.add_argument("--processes", type=int, default=1)
    parser.set_defaults(preset=args.preset, resume=args.resume, processes=args.processes)
    return parser.parse_intermixed_args(args.items)


def run_train(args: argparse.Namespace) -> int:
    if args.items[:1] == ["export"]:
        return run_export(export_parser().parse_args(args.items[1:]))
    from jobs.launcher import train

    job = _job_arguments(args)
    return train(job.args, preset=job.preset, resume=job.resume, processes=job.processes)


def run_export(args: argparse.Namespace) -> int:
    from jobs.export import export_checkpoint

    for url in export_checkpoint(args.run_dir, args.step):
        print(url)
    return 0


def run_prepare(args: argparse.Namespace) -> int:
    from jobs.prepare import PrepareSettings, prepare

    settings = PrepareSettings(
        size=args.size, step=args.step, min_size=args.min_size,
        images_per_shard=args.images_per_shard, max_shard_mb=args.max_shard_mb,
        png_level=args.png_level, format=args.format, include=tuple(args.include), exclude=tuple(args.exclude),
    )
    index = prepare(args.src, args.dst, settings, num_workers=args.workers, progress=not args.quiet)
    print(f"{args.dst}: {index['num_subimages']} sub-images from {index['num_sources']} images "
          f"in {index['num_shards']} shards ({index['total_bytes'] / 1e6:.1f} MB)")
    from sr_core.storage import printable

    for kind, entries in (("warning", index.get("warnings", [])), ("bad image", index["bad"]),
                          ("skipped", index["skipped"])):
        for entry in entries:
            print(f"  {kind} {printable(entry['source'])}: {printable(entry['reason'])}", file=sys.stderr)
    # Bad images make the exit code 1, as in `sr upscale` and `sr eval`: the shards are
    # complete without them, but someone should look.
    return 1 if index["bad"] else 0
