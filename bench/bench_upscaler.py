"""Upscaler throughput and memory, side by side in one run (prints tables; not a test).

Variants, on the same images, model and tile settings:

- ``floor``: the bare model forward over exactly the Upscaler's batches of tiles,
  prepared in memory beforehand: the compute floor, no I/O, no conversion, no assembly.
- ``upscaler``: ``sr_core.Upscaler`` end to end, uint8 array in, uint8 array out, with
  its default batching for the device (1 tile per forward pass on CPU).
- ``upscaler-b4``: the same with 4 tiles per forward pass (the GPU default), to show
  what batching costs or gains on this device.
- ``reference``: the straightforward loop popular upscalers use: pad the frame, one
  tile at a time (NCHW, fp32), each tile's centre copied into a full-frame float32
  output, converted to uint8 at the end.

Each variant runs in its own subprocess so its peak RSS (``ru_maxrss``) is its own.
A second table upscales one 3840x2160 frame x4 with the ``tiny`` variant and reports
peak RSS against the uint8 output size. A third puts the generators side by side
(RRDBNet at ESRGAN's published size, the compact generator at Real-ESRGAN's
``realesr-general-x4v3`` and ``realesr-animevideov3`` sizes, and the two x2 models the
demo and the learning-curve benchmark train): the FLOP model's figure per output pixel
and the ``Upscaler``'s measured output Mpx/s on this CPU, same images, same settings.

A fourth (``--precision-only`` runs it alone) times ``sr upscale`` end to end (the
command in this process: decode, model, encode, write) with the default precision
(``auto``) against ``--precision fp32`` forced (today's CPU default) and ``bf16`` forced,
interleaved rounds in one run, for RRDBNet esrgan x4 and the compact generator at its two
published sizes; each output's PSNR against the fp32 output says how far it moved. A
fifth (``--compile-only``) measures ``torch.compile`` on the Upscaler's model: compile
time (first call) and steady time per window against eager, fp32 and bf16.

FLOP model: 2 x multiply-accumulates of every Conv2d, counted from the model's layers
on a probe input (per input pixel); activations, upsampling and concatenations are
not counted. The counter reproduces the full ESRGAN generator's 35.85 MFLOP per input pixel
(16.7M parameters, 2.24 MFLOP per output pixel at x4) (printed as a check).

Run: ``.venv/bin/python bench/bench_upscaler.py`` (a few minutes on 2 CPU cores);
``--quick`` for a smaller run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from infra.gpucheck.workloads import IMAGES, PHOTOS, conv_flops_per_input_pixel, load_photos, reference_loop

REPO = Path(__file__).resolve().parent.parent
# A small-ish RRDBNet that finishes on a CPU in minutes but has the real layer mix.
BENCH_MODEL = dict(num_feat=32, num_block=4, num_grow_ch=16, scale=4)
TILE, OVERLAP = 128, 16
REPEATS = {"photos": 3, "4k": 1, "generators": 3}
# The generators compared per output pixel: (label, registry name, variant, scale).
GENERATOR_ROWS = [
    ("RRDBNet esrgan x4 (RealESRGAN_x4plus)", "rrdbnet", "esrgan", 4),
    ("compact realesr_general x4 (realesr-general-x4v3)", "srvgg_compact", "realesr_general", 4),
    ("compact animevideo x4 (realesr-animevideov3)", "srvgg_compact", "animevideo", 4),
    ("RRDBNet small x2", "rrdbnet", "small", 2),
    ("compact small x2 (demo_x2)", "srvgg_compact", "small", 2),
]
# A generator's timed runs stop after this many seconds (the full RRDBNet is slow here).
GENERATOR_TIME_BUDGET_S = 60.0


# ---------------------------------------------------------------- helpers run in workers


def frame_4k() -> np.ndarray:
    """A 3840x2160 RGB frame tiled from a real photograph (no large temporaries)."""
    from PIL import Image

    tile = np.asarray(Image.open(IMAGES / "coffee.png").convert("RGB"))  # 600x400
    reps = (-(-2160 // tile.shape[0]), -(-3840 // tile.shape[1]), 1)
    return np.ascontiguousarray(np.tile(tile, reps)[:2160, :3840])


def build_model(spec: dict):
    import torch

    from sr_core import build_generator

    torch.manual_seed(0)
    if "variant" in spec:
        return build_generator(spec.get("arch", "rrdbnet"), spec["variant"], scale=spec["scale"])
    return build_generator("rrdbnet", **spec)


def reference_work_pixels(model, image_shape, tile: int, overlap: int) -> int:
    multiple = model.size_multiple
    ph, pw = (-(-s // multiple) * multiple for s in image_shape[:2])
    total = 0
    for y0 in range(0, ph, tile):
        for x0 in range(0, pw, tile):
            h = min(min(y0 + tile, ph) + overlap, ph) - max(y0 - overlap, 0)
            w = min(min(x0 + tile, pw) + overlap, pw) - max(x0 - overlap, 0)
            total += (-(-h // multiple) * multiple) * (-(-w // multiple) * multiple)
    return total


def rss_now_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def worker(variant: str, case: str, quick: bool, threads: int) -> dict:
    import torch

    from sr_core.upscaler import Upscaler, plan_axis

    torch.set_num_threads(threads)
    if case == "photos":
        spec, images, tile = BENCH_MODEL, load_photos(96 if quick else 256), TILE
    elif case == "generators":
        _, arch, name, scale = GENERATOR_ROWS[int(variant)]
        spec, images, tile = dict(arch=arch, variant=name, scale=scale), load_photos(32 if quick else 64), TILE
        variant = "upscaler"
    else:
        spec, images, tile = dict(variant="tiny", scale=4), [frame_4k()], None  # automatic tile
    model = build_model(spec)
    flop_per_px = conv_flops_per_input_pixel(model)
    up = Upscaler(build_model(spec), device="cpu", precision="fp32", tile=tile, overlap=OVERLAP,
                  tiles_per_batch=4 if variant == "upscaler-b4" else None)
    tiles_per_batch = up.tiles_per_batch
    up.forward(torch.zeros(1, 3, 32, 32))  # warm up oneDNN's kernels
    chosen_tile = up.tile_for(*images[0].shape[:2])
    if variant == "floor":
        model = up.model  # channels_last, as the Upscaler runs it
    out_px = sum(img.shape[0] * img.shape[1] * model.scale**2 for img in images)
    baseline = rss_now_mb()
    work_px = 0
    if variant == "floor":
        batches = []
        for img in images:
            rows = plan_axis(img.shape[0], chosen_tile, OVERLAP, model.size_multiple)
            cols = plan_axis(img.shape[1], chosen_tile, OVERLAP, model.size_multiple)
            windows = [(wy, wx) for wy in rows for wx in cols]
            for i in range(0, len(windows), tiles_per_batch):
                group = windows[i:i + tiles_per_batch]
                h, w = group[0][0].length, group[0][1].length
                batches.append(torch.rand(len(group), 3, h, w).contiguous(memory_format=torch.channels_last))
                work_px += len(group) * h * w
        def run():
            with torch.inference_mode():
                for x in batches:
                    model(x)
    elif variant in ("upscaler", "upscaler-b4"):
        for img in images:
            rows = plan_axis(img.shape[0], up.tile_for(*img.shape[:2]), OVERLAP, model.size_multiple)
            cols = plan_axis(img.shape[1], up.tile_for(*img.shape[:2]), OVERLAP, model.size_multiple)
            work_px += len(rows) * len(cols) * rows[0].length * cols[0].length
        def run():
            for img in images:
                out = up(img)
                assert out.shape[0] == img.shape[0] * model.scale
                del out
    elif variant == "reference":
        # A model of its own, untouched by the Upscaler (plain NCHW, as those tools run it).
        ref_tile = chosen_tile or max(images[0].shape[:2])
        work_px = sum(reference_work_pixels(model, img.shape, ref_tile, OVERLAP) for img in images)
        def run():
            for img in images:
                out = reference_loop(model, img, ref_tile, OVERLAP)
                del out
    else:
        raise ValueError(variant)
    # Best of a few runs: the machine is shared, and the best run is the one least
    # disturbed by other processes.
    seconds, began = float("inf"), time.perf_counter()
    for _ in range(REPEATS[case]):
        start = time.perf_counter()
        run()
        seconds = min(seconds, time.perf_counter() - start)
        if case == "generators" and time.perf_counter() - began > GENERATOR_TIME_BUDGET_S:
            break
    params = sum(p.numel() for p in model.parameters())
    return dict(variant=variant, case=case, seconds=seconds, out_px=out_px, work_px=work_px, params=params,
                flop_per_px=flop_per_px, peak_rss_mb=peak_rss_mb(), baseline_rss_mb=baseline,
                tile=chosen_tile, tiles_per_batch=tiles_per_batch, images=len(images),
                in_size=f"{images[0].shape[1]}x{images[0].shape[0]}", model=spec)


# ---------------------------------------------------------------- driver


def run_worker(variant: str, case: str, quick: bool, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", variant, "--case", case, "--threads", str(threads)]
    cmd += ["--quick"] if quick else []
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                          env=dict(os.environ))
    if proc.returncode != 0:
        raise RuntimeError(f"{variant}/{case} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine() -> str:
    import torch

    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, no GPU; Python {platform.python_version()}, "
            f"torch {torch.__version__}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller images (a smoke run)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--case", default="photos", help=argparse.SUPPRESS)
    parser.add_argument("--skip-4k", action="store_true", help="skip the 3840x2160 memory case")
    parser.add_argument("--generators-only", action="store_true",
                        help="only the generators side by side (RRDBNet and compact per output pixel)")
    parser.add_argument("--precision-only", action="store_true",
                        help="only sr upscale with the default precision vs fp32 and bf16 forced")
    parser.add_argument("--compile-only", action="store_true", help="only torch.compile vs eager")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of the precision table")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per worker (default 1: on a shared machine, OpenMP threads "
                             "waiting for a descheduled sibling make 2 threads up to 10x slower than 1)")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.case, args.quick, args.threads)))
        return

    print(f"machine: {machine()}; workers use {args.threads} torch thread(s)")
    if args.precision_only or args.compile_only:
        import torch

        torch.set_num_threads(args.threads)
        if args.precision_only:
            compare_precision(args.quick, args.rounds)
        if args.compile_only:
            compare_compile(args.quick)
        return
    from sr_core.archs import build_generator

    full = build_generator("rrdbnet", "esrgan", scale=4)
    print(f"FLOP model check: full ESRGAN x4 = {conv_flops_per_input_pixel(full) / 1e6:.2f} MFLOP/input px "
          "(expected: 35.85)")
    del full

    if args.generators_only:
        compare_generators(args.quick, args.threads)
        return
    variants = ("floor", "upscaler", "upscaler-b4", "reference")
    rows = [run_worker(v, "photos", args.quick, args.threads) for v in variants]
    first = rows[0]
    print(f"\nThroughput: RRDBNet {first['model']} (conv {first['flop_per_px'] / 1e6:.2f} MFLOP/input px), "
          f"{first['images']} photos cropped to {first['in_size']}, tile {first['tile']}, overlap {OVERLAP}, "
          f"floor at {first['tiles_per_batch']} tile(s)/batch, fp32, CPU")
    print_table(rows, floor=rows[0])

    if not args.skip_4k:
        big = [run_worker(v, "4k", args.quick, args.threads) for v in ("upscaler", "reference")]
        out_mb = big[0]["out_px"] * 3 / 2**20
        print(f"\nMemory: one 3840x2160 RGB frame x4 (uint8 output {out_mb:.0f} MiB), RRDBNet tiny, "
              f"automatic tile ({big[0]['tile']}, {big[0]['tiles_per_batch']} per batch), overlap {OVERLAP}; "
              "each variant in its own process")
        print_table(big, floor=None, output_mb=out_mb)
    compare_generators(args.quick, args.threads)


def compare_generators(quick: bool, threads: int) -> None:
    """FLOP model per output pixel and measured Upscaler output Mpx/s of each generator,
    every one in its own process on the same images and tiles."""
    rows = [run_worker(str(i), "generators", quick, threads) for i in range(len(GENERATOR_ROWS))]
    first = rows[0]
    print(f"\nGenerators: Upscaler end to end (uint8 in and out), {first['images']} photos cropped to "
          f"{first['in_size']}, tile {first['tile']}, overlap {OVERLAP}, fp32, CPU, {threads} torch thread(s); "
          f"best of up to {REPEATS['generators']} runs (fewer past {GENERATOR_TIME_BUDGET_S:.0f} s)")
    reference = rows[0]
    ref_flop = reference["flop_per_px"] / reference["model"]["scale"] ** 2
    ref_rate = reference["out_px"] / reference["seconds"]
    print("| generator | parameters | MFLOP / output px | FLOP vs RRDBNet esrgan | out Mpx/s | "
          "speed vs RRDBNet esrgan | GFLOP/s |")
    print("|---|---|---|---|---|---|---|")
    for (label, *_), r in zip(GENERATOR_ROWS, rows):
        flop_out = r["flop_per_px"] / r["model"]["scale"] ** 2
        rate = r["out_px"] / r["seconds"]
        gflops = r["work_px"] * r["flop_per_px"] / r["seconds"] / 1e9
        ratio = "1" if r is reference else f"1/{ref_flop / flop_out:.1f}"
        print(f"| {label} | {r['params']:,} | {flop_out / 1e6:.3f} | {ratio} | "
              f"{rate / 1e6:.3f} | {rate / ref_rate:.1f}x | {gflops:.1f} |")


# sr upscale per precision: (label, registry name, variant, input crop side).
PRECISION_ROWS = [
    ("compact realesr_general x4", "srvgg_compact", "realesr_general", 192),
    ("compact animevideo x4", "srvgg_compact", "animevideo", 192),
    ("RRDBNet esrgan x4", "rrdbnet", "esrgan", 64),
]


def _psnr_u8(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


def compare_precision(quick: bool, rounds: int) -> None:
    """``sr upscale`` (in this process) with auto, fp32 and bf16, interleaved rounds."""
    import tempfile

    import torch
    from PIL import Image

    from sr_cli.main import main as sr_main
    from sr_core import build_generator, codecs, save_generator
    from sr_core.precision import cpu_bf16_flag
    from sr_core.upscaler import Upscaler

    print(f"\nsr upscale by precision (CPU bf16 hardware: {cpu_bf16_flag() or 'none'}); the four sample photos "
          f"centre-cropped, seeded weights, best of {rounds} interleaved rounds")
    print("| generator | input | auto chooses | fp32 s | auto s | auto speed-up | bf16 s | bf16 speed-up | "
          "auto vs fp32 dB (min) | bf16 vs fp32 dB (min) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for label, name, variant, side in PRECISION_ROWS:
            side = min(side, 48) if quick else side
            src = work / f"in-{name}-{variant}"
            src.mkdir()
            for photo in PHOTOS:
                img = Image.open(IMAGES / photo).convert("RGB")
                left, top = (img.width - side) // 2, (img.height - side) // 2
                img.crop((left, top, left + side, top + side)).save(src / photo)
            torch.manual_seed(0)
            model_path = str(work / f"{name}-{variant}.safetensors")
            save_generator(build_generator(name, variant, scale=4), model_path)
            chosen = Upscaler.from_file(model_path, device="cpu").precision
            best = {}
            for _ in range(rounds):
                for prec in ("fp32", "auto", "bf16"):
                    out = work / f"out-{name}-{variant}-{prec}"
                    start = time.perf_counter()
                    code = sr_main(["upscale", str(src), "-o", str(out), "-m", model_path, "--device", "cpu",
                                    "--precision", prec, "--overwrite"])
                    seconds = time.perf_counter() - start
                    assert code == 0, f"sr upscale exited {code}"
                    best[prec] = min(best.get(prec, float("inf")), seconds)
            agree = {}
            for prec in ("auto", "bf16"):
                agree[prec] = min(
                    _psnr_u8(codecs.read_image(str(work / f"out-{name}-{variant}-fp32" / p.name)),
                             codecs.read_image(str(work / f"out-{name}-{variant}-{prec}" / p.name)))
                    for p in (work / f"out-{name}-{variant}-fp32").iterdir())
            print(f"| {label} | 4 x {side} px | {chosen} | {best['fp32']:.2f} | {best['auto']:.2f} | "
                  f"{best['fp32'] / best['auto']:.2f}x | {best['bf16']:.2f} | {best['fp32'] / best['bf16']:.2f}x | "
                  f"{agree['auto']:.1f} | {agree['bf16']:.1f} |", flush=True)


def compare_compile(quick: bool) -> None:
    """torch.compile (inductor) of the compact realesr_general model against eager, on the
    Upscaler's CPU windows (one 160 px window = a 128 px tile with 16 px overlap): the
    compile time, the steady time per window, and how many windows pay for the compile."""
    import torch
    import torch._inductor.config

    from sr_core import build_generator

    # A cold compile, as a fresh worker pays it: no graphs cached by an earlier run.
    torch._inductor.config.fx_graph_cache = False
    torch.manual_seed(0)
    side = 64 if quick else TILE + 2 * OVERLAP
    model = build_generator("srvgg_compact", "realesr_general", scale=4)
    model = model.eval().requires_grad_(False).to(memory_format=torch.channels_last)
    x = torch.rand(1, 3, side, side).contiguous(memory_format=torch.channels_last)
    repeats = 2 if quick else 5
    print(f"\ntorch.compile (inductor, default mode) vs eager, compact realesr_general x4, one {side} px window, "
          f"mean of {repeats} steady calls")
    print("| precision | eager ms/window | compile s (first call) | compiled ms/window | speed-up | "
          "windows to pay back |")
    print("|---|---|---|---|---|---|")
    for prec in ("fp32", "bf16"):
        compiled = torch.compile(model)
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=prec == "bf16"):
            model(x)
            start = time.perf_counter()
            for _ in range(repeats):
                model(x)
            eager = (time.perf_counter() - start) / repeats
            start = time.perf_counter()
            compiled(x)
            first = time.perf_counter() - start
            start = time.perf_counter()
            for _ in range(repeats):
                compiled(x)
            steady = (time.perf_counter() - start) / repeats
        saved = eager - steady
        payback = f"{(first - steady) / saved:,.0f}" if saved > 0 else "never"
        print(f"| {prec} | {eager * 1e3:.0f} | {first:.1f} | {steady * 1e3:.0f} | {eager / steady:.2f}x | "
              f"{payback} |", flush=True)
        torch._dynamo.reset()


def print_table(rows: list[dict], floor: dict | None, output_mb: float | None = None) -> None:
    header = ["variant", "seconds", "out Mpx/s", "vs floor", "GFLOP/s", "peak RSS MiB", "RSS before MiB"]
    if output_mb:
        header += ["(peak-before)/output"]
    lines = [header]
    for r in rows:
        rate = r["out_px"] / r["seconds"] / 1e6
        gflops = r["work_px"] * r["flop_per_px"] / r["seconds"] / 1e9
        ratio = f"{(r['out_px'] / r['seconds']) / (floor['out_px'] / floor['seconds']):.2f}" if floor else "-"
        line = [r["variant"], f"{r['seconds']:.2f}", f"{rate:.3f}", ratio, f"{gflops:.1f}",
                f"{r['peak_rss_mb']:.0f}", f"{r['baseline_rss_mb']:.0f}"]
        if output_mb:
            line.append(f"{(r['peak_rss_mb'] - r['baseline_rss_mb']) / output_mb:.2f}x")
        lines.append(line)
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for line in lines[1:]:
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(line, widths)) + " |")


if __name__ == "__main__":
    main()
