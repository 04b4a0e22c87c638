"""The parser of ``sr batch``: upscale a folder,
prefix or manifest of images on Ray Data. Heavy imports (ray, torch) stay inside the
handler so ``sr --help`` is instant."""

from __future__ import annotations

import argparse

from sr_cli.options import add_include_exclude, add_output_options, output_settings

DESCRIPTION = """\
Upscale every image below INPUT (a folder or prefix, searched recursively) or named
by INPUT (a manifest: .txt with one URL per line, or .csv/.parquet with a 'path'
column) into OUTPUT, keeping relative paths, with the naming and encoding of
`sr upscale` (one image gives the same file through either command).

Runs on Ray Data: read+decode tasks, a pool of actors holding the model (one GPU
each on a cluster with GPUs, CPU locally) that encode and write their outputs.
Per-image metrics (sizes, timings, LR-consistency PSNR/SSIM on Y, and PSNR/SSIM/MSE
against --reference) and failures go to OUTPUT/_sr_batch/<run-id>/.
"""

EPILOG = """\
exit codes:
  0  every image was upscaled (or its output existed already)
  1  some inputs failed (bad files: see failures.parquet); all the others were written;
     or INPUT holds no images that --include/--exclude select (a warning says so)
  2  the job could not run: bad arguments, unreadable model, unreachable storage or Ray,
     or another `sr batch` is writing to OUTPUT (its lease, OUTPUT/.sr-lease.json)
130  interrupted (Ctrl-C or SIGTERM); rerun the same command to finish

results: OUTPUT/_sr_batch/<run-id>/ holds metrics.parquet (one row per image),
failures.parquet, summary.json (written last) and TensorBoard events
(tensorboard --logdir OUTPUT/_sr_batch). Rerun the same command to finish what a
killed or failed run left: outputs that exist are skipped, and those a killed
run wrote without recording their rows get them now (measured from the output, no
model run; column `recovered`), so the runs' tables hold one row per input.
"""


def _actors(text: str) -> tuple[int, int]:
    try:
        parts = [int(p) for p in text.split(",")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or parts[0] < 1 or parts[1] < parts[0]:
        raise argparse.ArgumentTypeError(f"expected N or MIN,MAX with 1 <= MIN <= MAX, got {text!r}")
    return parts[0], parts[1]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "batch",
        help="upscale a folder, bucket prefix or manifest on Ray Data (local Ray or a cluster), with metrics",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", metavar="INPUT", help="folder/prefix (any fsspec URL) or manifest (.txt/.csv/.parquet)")
    p.add_argument("output", metavar="OUTPUT", help="output folder/prefix")
    p.add_argument("-m", "--model", required=True, help="generator file (.safetensors or .pth; path or URL)")
    add_include_exclude(p, "INPUT")
    add_output_options(p)
    p.add_argument("--overwrite", action="store_true", help="redo outputs that exist (default: skip them)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="upscale at most N images in this run")
    p.add_argument("--reference", metavar="HR_PREFIX", default=None,
                   help="HR images with the inputs' relative paths (any extension): adds PSNR/SSIM/MSE on Y, "
                        "border = scale cropped")
    ray_group = p.add_argument_group("Ray")
    ray_group.add_argument("--address", default=None,
                           help="Ray cluster: auto, ray://HOST:10001 or HOST:6379 (default: $RAY_ADDRESS, "
                                "else a local Ray on this machine)")
    ray_group.add_argument("--num-cpus", type=int, default=None,
                           help="CPUs of the local Ray (default: all cores; ignored with --address)")
    ray_group.add_argument("--actors", type=_actors, default=None, metavar="MIN,MAX",
                           help="actor pool size, autoscaling between MIN and MAX (default: 1,GPUs in the "
                                "cluster; 1 without GPUs)")
    ray_group.add_argument("--num-gpus-per-actor", type=float, default=None,
                           help="GPUs per actor (default: 1 if the cluster has GPUs, else 0: CPU actors)")
    ray_group.add_argument("--cpus-per-actor", type=float, default=1.0,
                           help="CPUs reserved per actor: torch threads of CPU actors, encoding beside a GPU "
                                "(default: 1)")
    ray_group.add_argument("--encode-threads", type=int, default=2,
                           help="threads per actor that encode and write outputs (default: 2)")
    ray_group.add_argument("--batch-size", type=int, default=4, help="images per actor call (default: 4)")
    p.add_argument("--run-id", default=None, help="name of the results folder (default: UTC time + random)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_batch_command, interrupt_on_sigterm=True)


def run_batch_command(args: argparse.Namespace) -> int:
    from batch.run import BatchConfig, run_batch

    if args.limit is not None and args.limit < 0:
        raise ValueError(f"--limit must be >= 0, got {args.limit}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.encode_threads < 1:
        raise ValueError(f"--encode-threads must be >= 1, got {args.encode_threads}")
    if args.cpus_per_actor <= 0:
        raise ValueError(f"--cpus-per-actor must be > 0, got {args.cpus_per_actor}")
    if args.num_gpus_per_actor is not None and args.num_gpus_per_actor < 0:
        raise ValueError(f"--num-gpus-per-actor must be >= 0, got {args.num_gpus_per_actor}")
    config = BatchConfig(
        input=args.input, output=args.output, model=args.model, output_settings=output_settings(args),
        include=tuple(args.include), exclude=tuple(args.exclude), overwrite=args.overwrite, limit=args.limit,
        reference=args.reference, address=args.address, num_cpus=args.num_cpus, actors=args.actors,
        num_gpus_per_actor=args.num_gpus_per_actor, cpus_per_actor=args.cpus_per_actor,
        encode_threads=args.encode_threads, batch_size=args.batch_size, run_id=args.run_id,
        progress=not args.quiet, command={k: v for k, v in vars(args).items() if k not in ("func", "sr_parser")},
    )
    summary = run_batch(config)
    if summary["interrupted"]:
        return 130
    return 1 if summary["failed"] or not summary["found"] else 0
