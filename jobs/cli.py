"""jobs' subcommands (prepare; a later issue adds train). Heavy imports stay inside
the handlers so ``sr --help`` is instant."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
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
    p.add_argument("--include", action="append", default=[], metavar="GLOB",
                   help="only images whose path below SRC matches (repeatable)")
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                   help="leave out images whose path below SRC matches (repeatable)")
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
    p.set_defaults(func=run_prepare)


def run_prepare(args: argparse.Namespace) -> int:
    import sys

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
