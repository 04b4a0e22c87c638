"""The parser of ``sr tensorboard``: TensorBoard on a run directory, a runs prefix or a
batch output prefix (gs:// included)."""

from __future__ import annotations

import argparse
import time


def add_tensorboard_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tensorboard",
        help="TensorBoard on a run directory, a runs prefix or a batch output prefix (gs:// included)",
        description="Serve TensorBoard on a training run directory (gs://B/runs/NAME), a runs prefix "
                    "(gs://B/runs: every run side by side) or a batch OUTPUT prefix (its _sr_batch/ "
                    "folder), and print the URL. Ctrl-C stops it.",
    )
    p.add_argument("target", metavar="RUN_OR_PREFIX", help="run directory or prefix (local or any fsspec URL)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=6006, help="port (default: 6006; 0 picks a free one)")
    p.add_argument("--reload-interval", type=float, default=30.0,
                   help="seconds between rescans of the event files (default: 30)")
    p.set_defaults(func=run_tensorboard)


def run_tensorboard(args: argparse.Namespace) -> int:
    from infra.tensorboard import serve

    logdir, url = serve(args.target, host=args.host, port=args.port, reload_interval=args.reload_interval)
    print(f"TensorBoard on {logdir}: {url} (Ctrl-C stops it)", flush=True)
    while True:  # TensorBoard serves from its threads until Ctrl-C
        time.sleep(3600)
