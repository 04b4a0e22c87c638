"""The parsers of the training package's commands, ``sr prepare`` and ``sr train`` (named
by the table in ``sr_cli.main``). Heavy imports stay inside the handlers so
``sr --help`` is instant."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys

from jobs.config import PRESETS
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
            "RUN/model.safetensors and RUN/model_ema.safetensors from a checkpoint. Several machines: run "
            "`accelerate launch --config_file jobs/launch/X.yaml -m jobs.train ...` on each."
        ),
        epilog="example: sr train --preset tiny data.train_shards=shards/ train.run_dir=runs/tiny --resume auto",
    )
    add_train_arguments(p)
    # Overrides and options may be intermixed (`sr train a=1 --resume auto b=2`):
    # the handler parses what follows the first override itself.
    p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    p.add_argument("--processes", type=int, default=1, metavar="N",
                   help="start N local processes through Accelerate's launcher (one per GPU; gloo on CPU) "
                        "(default: 1, in this process)")
    p.add_argument("--step", type=int, default=None,
                   help="with `export`: the checkpoint step to export (default: the newest)")
    p.set_defaults(func=run_train)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The training job's arguments, shared by ``sr train`` and ``python -m jobs.train``
    (defined here, not in jobs.train, so that ``sr --help`` imports no torch)."""
    parser.add_argument("args", nargs="*", metavar="[CONFIG] [section.field=value ...]",
                        help="an optional YAML or JSON config file, then dotted overrides applied over it "
                             "(e.g. train.run_dir=gs://bucket/runs/x4 data.batch_size=8)")
    parser.add_argument("--preset", default="default",
                        help=f"starting values: {', '.join(PRESETS)} (default: default)")
    parser.add_argument("--resume", default="", metavar="auto|CHECKPOINT",
                        help="'auto': continue from the run's newest complete checkpoint, or start fresh "
                             "when there is none; or a checkpoint folder URL (default: start fresh)")


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


def _intermixed(args: argparse.Namespace) -> argparse.Namespace:
    """Parse the arguments that followed the first override (options included)."""
    if not args.rest:
        return args
    parser = argparse.ArgumentParser(prog="sr train")
    parser.add_argument("args", nargs="*")
    for option, default in (("--preset", args.preset), ("--resume", args.resume), ("--processes", args.processes),
                            ("--step", args.step)):
        parser.add_argument(option, default=default, type=type(default) if default is not None else int)
    rest = parser.parse_intermixed_args(args.rest)
    rest.args = args.args + rest.args
    return rest


def run_train(args: argparse.Namespace) -> int:
    args = _intermixed(args)
    if args.args[:1] == ["export"]:
        if len(args.args) != 2:
            raise ValueError("usage: sr train export RUN [--step N]")
        from jobs.export import export_checkpoint

        for url in export_checkpoint(args.args[1], args.step):
            print(url)
        return 0
    if args.step is not None:
        raise ValueError("--step is for `sr train export RUN --step N`")
    if args.processes < 1:
        raise ValueError(f"--processes must be >= 1, got {args.processes}")
    if args.processes > 1:
        return launch_local(args)
    from jobs import preemption

    # Before torch is imported (seconds): a SIGTERM from now on is answered with a
    # checkpoint and exit 0, start-up included.
    previous_handler = preemption.install()
    try:
        from jobs import train

        return train.run(train.load_job_config(args.args, args.preset), args.resume)
    finally:
        preemption.restore(previous_handler)


def launch_local(args: argparse.Namespace) -> int:
    """``--processes N``: the same job on N processes of this machine through Accelerate's
    launcher. This process takes the run directory's lease, so a refusal is one line
    before any process starts, then hands it to rank 0: it lives as long as the ranks
    write, even if this process is killed. SIGTERM and SIGINT are passed on to the ranks
    as SIGTERM (each checkpoints and exits) and this process waits for them: one line,
    then exit 0 after SIGTERM (a preemption), 130 after SIGINT."""
    from jobs import checkpoint as ckpt
    from jobs import train

    config = train.load_job_config(args.args, args.preset)  # a bad config fails here, before any process starts
    run_dir = config.train.run_dir
    with ckpt.run_lease(run_dir) as lease:
        if not args.resume:
            ckpt.refuse_to_replace(run_dir)
        os.environ[ckpt.LEASE_HELD_ENV] = run_dir
        if lease is not None:
            lease.hand_over()
            os.environ[ckpt.LEASE_TOKEN_ENV] = lease.token
        try:
            return _launch(args)
        finally:
            os.environ.pop(ckpt.LEASE_HELD_ENV, None)
            os.environ.pop(ckpt.LEASE_TOKEN_ENV, None)


def _launch(args: argparse.Namespace) -> int:
    import torch

    from sr_core.net import free_port

    port = free_port()
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
               "--num_processes", str(args.processes), "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
               "-m", "jobs.train", "--preset", args.preset, *args.args]
    if args.resume:
        command += ["--resume", args.resume]
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "true"  # gloo; without it Accelerate looks for GPUs
    # A session of its own: Ctrl-C at a terminal (SIGINT to the whole foreground group)
    # reaches this process only, which stops the ranks the one way that checkpoints.
    child = subprocess.Popen(command, env=env, start_new_session=True)
    received: list[int] = []

    def forward(signum, frame):
        received.append(signum)
        _stop_ranks(child.pid)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not received:
        return code
    name = signal.Signals(received[0]).name
    outcome = ("the ranks wrote a checkpoint and stopped; --resume auto continues" if code == 0 else
               f"the ranks stopped (launcher exit {code}); --resume auto continues from the last complete checkpoint")
    if received[0] == signal.SIGTERM:
        print(f"sr train: SIGTERM: {outcome}", file=sys.stderr)
        return 0  # a preemption: the work so far is saved, as with one process
    raise KeyboardInterrupt(f"interrupted by {name}: {outcome}")


def _stop_ranks(launcher_pid: int) -> None:
    """SIGTERM to the ranks (the launcher's children), which checkpoint and exit 0, so
    that Accelerate's launcher ends quietly. Signalled itself, it would stop them with
    the signal, kill them 30 s later whatever they were writing, and print its error
    report. Before the ranks exist, the launcher is all there is to stop."""
    ranks = _children(launcher_pid)
    for pid in ranks or [launcher_pid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)


def _children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (from /proc: Linux, like the training VMs)."""
    found = []
    with contextlib.suppress(OSError):
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found
