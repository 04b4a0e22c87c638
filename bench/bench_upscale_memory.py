"""Peak memory of `sr upscale` on one large image against the estimate it refuses
images by (``sr_core.memory.memory_needed``): a real process, its RSS sampled
every 10 ms, minus the peak of the same command on a 16x16 image (torch, the model,
the interpreter).

    .venv/bin/python bench/bench_upscale_memory.py [--sizes 512 1024] [--scale 4] [--format jpg]
    .venv/bin/python bench/bench_upscale_memory.py --sizes 1024 --scale 4 --outscale 8   # a resized output

The tiny preset keeps the compute short; memory depends on the image and output sizes,
not on the network's width.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import torch
from PIL import Image


from sr_core import build_generator, save_generator
from sr_core.memory import memory_needed

REPO = Path(__file__).resolve().parents[1]

SR = os.path.join(os.path.dirname(sys.executable), "sr")


def peak_rss(cmd: list[str]) -> tuple[int, float]:
    start = time.perf_counter()
    proc = psutil.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak = 0
    while proc.poll() is None:
        try:
            peak = max(peak, proc.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.01)
    assert proc.returncode == 0, cmd
    return peak, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--scale", type=int, default=4)
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--format", default="jpg", choices=["jpg", "png"])
    parser.add_argument("--outscale", type=float, default=None,
                        help="final scale (the network's output resized to it), as `sr upscale --outscale`")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        model = os.path.join(tmp, "m.safetensors")
        save_generator(build_generator("rrdbnet", "tiny", scale=args.scale), model)

        def run(n: int) -> tuple[int, float]:
            path = os.path.join(tmp, f"in{n}.png")
            Image.fromarray(rng.integers(0, 256, (n, n, 3), dtype=np.uint8)).save(path)
            outscale = ["--outscale", str(args.outscale)] if args.outscale else []
            return peak_rss([SR, "upscale", path, "-o", os.path.join(tmp, "out"), "-m", model, "--tile",
                             str(args.tile), "--format", args.format, "--overwrite", *outscale])

        base, _ = run(16)
        resized = f" --outscale {args.outscale:g}" if args.outscale else ""
        print(f"sr upscale x{args.scale}{resized} --tile {args.tile} --format {args.format}, tiny model; "
              f"baseline (16x16) peak RSS {base / 2**20:.0f} MiB")
        print(f"{'input':>11} {'output MiB':>10} {'peak - base MiB':>15} {'x output':>8} {'estimate MiB':>12} "
              f"{'seconds':>8}")
        for n in args.sizes:
            peak, seconds = run(n)
            final = round(n * (args.outscale or args.scale))
            out = final * final * 3
            est = memory_needed(n, n, 3, 1, args.scale, args.outscale)
            print(f"{n:>5}x{n:<5} {out / 2**20:>10.0f} {(peak - base) / 2**20:>15.0f} {(peak - base) / out:>8.2f} "
                  f"{est / 2**20:>12.0f} {seconds:>8.1f}")


if __name__ == "__main__":
    main()
