"""`sr batch` throughput against `sr upscale` and the bare Upscaler loop, on the same
inputs and model in one run, and the per-image CPU cost of decoding, encoding and
metrics that sizes the CPUs of a GPU cluster.

    .venv/bin/python bench/bench_batch.py [--images 48] [--side 128] [--rounds 3] [--quick]

Variants (each on the same PNG inputs, x4 model, tile, 1 torch thread for the model):
- ``upscaler loop``: ``Upscaler`` over the decoded images in memory (the model alone);
- ``sr upscale``: the command, in this process (decode, model, 2 encode threads);
- ``sr batch, 1 actor``: the pipeline on a local Ray already up (decode tasks on the
  second core, the actor's 2 encode threads);
- ``sr batch, 2 actors``: two actors of half a CPU each (1 torch thread each);
- ``sr batch, encode stage``: 1 actor returning its outputs through the object store
  to separate encode + write tasks (what the pipeline does not do; measured to say why).

A second table runs `sr batch` (1 actor) with each generator at its published size
(RRDBNet as RealESRGAN_x4plus, the compact generator as realesr-general-x4v3 and
realesr-animevideov3) on fewer, smaller inputs: the steady output Mpx/s on this CPU and
the FLOP model's figure per output pixel; from those, what a V100 would produce with
each under the stated assumption, and how many CPU cores its decoding, encoding and
metrics need.

``--today`` runs only the before/after table: `sr batch` (1 actor, 1 torch thread) over
crops of the sample photographs with the compact generator at realesr-general-x4v3's
size, PNG output, with the settings of before this change (``--precision fp32``, zlib
level 1) against the new PNG writer alone (fp32 forced) and against the defaults (auto
precision, fast PNG writer), interleaved rounds; the outputs of the first two must decode
to the same pixels.

Plain rates include the actor pool's start (a new worker process: torch import, model
load); "steady" rates are those between the first and the last output written. Ray's
own start is timed separately. "outside the model": the share of the steady time per
image not spent in the Upscaler (decode, encode, metrics, write, Ray; for `sr upscale`
measured against the bare loop's model time).
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from batch import localray  # noqa: E402
from batch.run import BatchConfig, run_batch  # noqa: E402
from infra.gpucheck.workloads import conv_flops_per_input_pixel, make_inputs  # noqa: E402
from sr_core import build_generator, codecs, metrics, save_generator  # noqa: E402
from sr_cli.main import main as sr_main  # noqa: E402
from sr_core.resize import imresize  # noqa: E402
from sr_core.outputs import OutputSettings  # noqa: E402
from sr_core.upscaler import Upscaler  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

IMAGES = REPO / "assets" / "images"
MODEL = dict(num_feat=32, num_block=4, num_grow_ch=16)  # 2.15 MFLOP per input pixel at x4
TILE = 128
# The generators side by side through sr batch, at their published sizes:
# (label, registry name, variant); all x4.
GENERATOR_ROWS = [
    ("RRDBNet esrgan (RealESRGAN_x4plus)", "rrdbnet", "esrgan"),
    ("compact realesr_general (realesr-general-x4v3)", "srvgg_compact", "realesr_general"),
    ("compact animevideo (realesr-animevideov3)", "srvgg_compact", "animevideo"),
]
V100_FP16_PEAK = 125e12
# ASSUMPTION, not measured here (no GPU): the share of the V100's fp16 tensor-core peak
# that ESRGAN's 3x3 convolutions reach end to end.
V100_ASSUMED_EFFICIENCY = 0.25


def bare_loop(model_path: str, files: list[Path]) -> tuple[float, float]:
    up = Upscaler.from_file(model_path, tile=TILE)
    images = [codecs.read_image(str(f)) for f in files]
    up(images[0][:32, :32])  # warm-up
    start = time.perf_counter()
    pixels = sum(out.shape[0] * out.shape[1] for out in (up(im) for im in images))
    return time.perf_counter() - start, pixels


def run_sr_upscale(model_path: str, src: Path, dst: Path) -> float:
    start = time.perf_counter()
    code = sr_main(["upscale", str(src), "-o", str(dst), "--model", model_path, "--tile", str(TILE), "--overwrite"])
    assert code == 0
    return time.perf_counter() - start


def run_sr_batch(model_path: str, src: Path, dst: Path, run_id: str, actors: int, cpus_per_actor: float,
                 encode_in_actor: bool = True, precision: str = "auto", png_level: int | None = 1) -> dict:
    settings = OutputSettings(tile=TILE, precision=precision,
                              encode=codecs.EncodeOptions("png", png_compress_level=png_level))
    config = BatchConfig(input=str(src), output=str(dst), model=model_path, output_settings=settings,
                         overwrite=True, actors=(actors, actors), cpus_per_actor=cpus_per_actor, run_id=run_id,
                         progress=False, encode_in_actor=encode_in_actor)
    start = time.perf_counter()
    summary = run_batch(config)
    summary["call_seconds"] = time.perf_counter() - start
    assert summary["failed"] == 0
    return summary


def cpu_costs(side_in: int = 480, repeats: int = 3) -> list[tuple[str, float, float]]:
    """(step, seconds per image, seconds per output Mpx) for a side_in x (2/3 side_in)
    photograph upscaled x4; the output is a bicubic x4 upscale standing in for a
    model's (same size and photographic content, which is what the encoders see)."""
    photo = np.asarray(Image.open(IMAGES / "astronaut.png").convert("RGB"))
    lr = imresize(photo, size=(side_in * 2 // 3, side_in))
    out = imresize(lr, scale=4)
    out_mpx = out.shape[0] * out.shape[1] / 1e6
    png_in, jpg_in = codecs.encode_image(lr), codecs.encode_image(lr, codecs.EncodeOptions("jpeg"))

    def lr_consistency():
        down = imresize(out, size=lr.shape[:2])
        metrics.psnr(down, lr, y_channel=True)
        metrics.ssim(down, lr, y_channel=True)

    steps = [
        ("decode input PNG", lambda: codecs.decode_image(png_in)),
        ("decode input JPEG", lambda: codecs.decode_image(jpg_in)),
        ("encode output PNG (before: Pillow, level 1)", lambda: Image.fromarray(out).save(io.BytesIO(), "PNG",
                                                                                          compress_level=1)),
        ("encode output PNG (default: fpng)", lambda: codecs.encode_image(out)),
        ("encode output PNG (level 1: libpng)",
         lambda: codecs.encode_image(out, codecs.EncodeOptions(png_compress_level=1))),
        ("encode output PNG (level 6)", lambda: codecs.encode_image(out, codecs.EncodeOptions(png_compress_level=6))),
        ("encode output JPEG (q95, default)", lambda: codecs.encode_image(out, codecs.EncodeOptions("jpeg"))),
        ("LR-consistency metrics", lr_consistency),
    ]
    results = []
    for name, fn in steps:
        best = min(_timed(fn) for _ in range(repeats))
        results.append((name, best, best / out_mpx))
    return results, out.shape


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--side", type=int, default=128, help="input side in pixels (output is 4x)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; each variant keeps its best")
    parser.add_argument("--quick", action="store_true", help="8 images of 64 px, 1 round: a smoke run")
    parser.add_argument("--today", action="store_true",
                        help="only the before/after table (fp32 + zlib level 1 vs the defaults)")
    parser.add_argument("--generators-only", action="store_true",
                        help="only the generators through sr batch, and the per-image CPU costs")
    args = parser.parse_args()
    if args.quick:
        args.images, args.side, args.rounds = 8, 64, 1
    torch.set_num_threads(1)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}, torch {torch.__version__}")
    work = Path(tempfile.mkdtemp(prefix="bench-batch-"))
    try:
        import ray

        start = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _system_config=localray.SYSTEM_CONFIG)
        ray_start = time.perf_counter() - start
        if args.today:
            compare_today(work, args.quick, args.rounds)
            ray.shutdown()
            return
        if not args.generators_only:
            compare_variants(args, work)
            print(f"\nRay start (ray.init, local, 2 CPUs): {ray_start:.1f} s. \"first result\": seconds from the "
                  "pipeline's start (Ray up) to the first output, i.e. the actor's start (new worker, torch import, "
                  "model load) and one batch")
        generators = compare_generators(work, args.quick)
        ray.shutdown()
        print_cpu_costs(generators)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def compare_variants(args: argparse.Namespace, work: Path) -> None:
    """The same RRDBNet through the Upscaler loop, sr upscale and sr batch, interleaved."""
    src = work / "in"
    files = make_inputs(src, args.images, args.side)
    torch.manual_seed(0)
    model_path = str(work / "x4.safetensors")
    save_generator(build_generator("rrdbnet", scale=4, **MODEL), model_path)
    print(f"# {args.images} PNG inputs {args.side}x{args.side}, RRDBNet x4 {MODEL}, tile {TILE}, PNG level 1 out")
    variants = [("sr batch, 1 actor", 1, 1.0, True), ("sr batch, 2 actors", 2, 0.5, True),
                ("sr batch, encode stage", 1, 1.0, False)]
    # The machine is shared and noisy: the variants run interleaved, round after
    # round, and each keeps its best round.
    best: dict[str, dict] = {}

    def keep(name: str, seconds: float, steady: float, model_per_image: float, first=None) -> None:
        """The best round of each measure (they may come from different rounds)."""
        b = best.setdefault(name, {"seconds": seconds, "steady": steady, "model": model_per_image, "first": first})
        b["seconds"] = min(b["seconds"], seconds)
        if steady <= b["steady"]:
            b.update(steady=steady, model=model_per_image)
        if first is not None:
            b["first"] = min(b["first"], first)

    for round_index in range(args.rounds):
        seconds, pixels = bare_loop(model_path, files)
        keep("upscaler loop", seconds, seconds, seconds / args.images)
        seconds = run_sr_upscale(model_path, src, work / "out-upscale")
        keep("sr upscale", seconds, seconds, best["upscaler loop"]["model"])
        for name, actors, cpus, here in variants:
            s = run_sr_batch(model_path, src, work / "out-batch", f"{name}-{round_index}".replace(" ", "_")
                             .replace(",", ""), actors, cpus, here)
            keep(name, s["call_seconds"], args.images / s["steady_images_per_second"],
                 s["metrics"]["model_s"]["mean"] / actors, s["first_result_seconds"])

    mpx = pixels / 1e6
    upscale_s = best["sr upscale"]["steady"]
    print()
    print("| variant | seconds | img/s | out Mpx/s | img/s (steady) | out Mpx/s (steady) "
          "| steady vs sr upscale | outside the model | first result s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, b in best.items():
        outside = 1 - b["model"] * args.images / b["steady"]
        first = f"{b['first']:.1f}" if b["first"] is not None else "-"
        print(f"| {name} | {b['seconds']:.2f} | {args.images / b['seconds']:.2f} | {mpx / b['seconds']:.3f} | "
              f"{args.images / b['steady']:.2f} | {mpx / b['steady']:.3f} | {upscale_s / b['steady']:.2f} | "
              f"{max(outside, 0):.0%} | {first} |")


def compare_today(work: Path, quick: bool, rounds: int) -> None:
    """sr batch with the settings of before (fp32, zlib level 1) vs the new PNG writer vs
    the defaults, interleaved; the encoder alone must not change a pixel."""
    count, side = (4, 32) if quick else (8, 128)
    src = work / "in-today"
    make_inputs(src, count, side)
    torch.manual_seed(0)
    model_path = str(work / "compact-general.safetensors")
    save_generator(build_generator("srvgg_compact", "realesr_general", scale=4), model_path)
    variants = [("before: --precision fp32, PNG zlib level 1", "fp32", 1),
                ("new PNG writer only (fp32 forced)", "fp32", None),
                ("now: the defaults (auto precision, fast PNG writer)", "auto", None)]
    best: dict[str, dict] = {}
    for r in range(rounds):
        for i, (name, precision, level) in enumerate(variants):
            s = run_sr_batch(model_path, src, work / f"out-today-{i}", f"today-{r}-{i}", 1, 1.0,
                             precision=precision, png_level=level)
            b = best.setdefault(name, {"steady": float("inf"), "seconds": float("inf")})
            b["steady"] = min(b["steady"], count / s["steady_images_per_second"])
            b["seconds"] = min(b["seconds"], s["call_seconds"])
            b["precision"] = s["model"]["precision_cpu"]
            b["encode"] = s["metrics"].get("encode_s", {}).get("mean", float("nan"))
    same = all(np.array_equal(codecs.read_image(str(work / "out-today-0" / p.relative_to(work / "out-today-1"))),
                              codecs.read_image(str(p)))
               for p in (work / "out-today-1").rglob("*.png"))
    out_mpx = count * (side * 4) ** 2 / 1e6
    print(f"\n# sr batch before and after (1 actor, 1 torch thread): {count} PNG crops of the sample photos "
          f"{side}x{side}, compact realesr_general x4 (seeded), tile {TILE}, PNG out; best of {rounds} rounds")
    print("| settings | precision | encode s / image (mean) | out Mpx/s (steady) | vs before | seconds (call) |")
    print("|---|---|---|---|---|---|")
    before = best[variants[0][0]]["steady"]
    for name, b in best.items():
        print(f"| {name} | {b['precision']} | {b['encode']:.3f} | {out_mpx / b['steady']:.3f} | "
              f"{before / b['steady']:.2f}x | {b['seconds']:.1f} |")
    print(f"\nnew PNG writer's outputs decode to the same pixels as zlib level 1's: {'yes' if same else 'NO'}")


def compare_generators(work: Path, quick: bool) -> list[dict]:
    """Each generator at its published size through `sr batch` (1 actor, 1 torch
    thread) on the same inputs: steady output Mpx/s, seconds in the model per output
    Mpx, and the FLOP model's figure per output pixel."""
    count, side = (4, 32) if quick else (8, 64)
    src = work / "in-generators"
    make_inputs(src, count, side)
    rows = []
    for label, arch, variant in GENERATOR_ROWS:
        torch.manual_seed(0)
        model = build_generator(arch, variant, scale=4)
        flop_per_output_px = conv_flops_per_input_pixel(model) / 16
        model_path = str(work / f"{arch}-{variant}.safetensors")
        save_generator(model, model_path)
        out_mpx = count * (side * 4) ** 2 / 1e6
        row = dict(label=label, flop=flop_per_output_px)
        for precision in ("fp32", "bf16", "auto"):
            s = run_sr_batch(model_path, src, work / f"out-{arch}-{variant}", f"gen-{arch}-{variant}-{precision}", 1,
                             1.0, precision=precision, png_level=None)
            row[precision] = s["metrics"]["model_s"]["mean"] * count / out_mpx
            if precision == "auto":
                row.update(steady=out_mpx * s["steady_images_per_second"] / count, model_s_per_mpx=row["auto"],
                           chosen=s["model"]["precision_cpu"])
        rows.append(row)
    print(f"\n# Generators through sr batch (1 actor, 1 torch thread, PNG out, default writer): {count} PNG inputs "
          f"{side}x{side}, x4, tile {TILE}; the model's CPU seconds per output Mpx in fp32 and bf16 forced, and "
          "with the default precision")
    print("| generator (x4) | MFLOP / output px | FLOP vs RRDBNet | model s / output Mpx fp32 | bf16 | "
          "auto chooses | out Mpx/s (steady, auto) | speed vs RRDBNet |")
    print("|---|---|---|---|---|---|---|---|")
    reference = rows[0]
    for r in rows:
        ratio = "1" if r is reference else f"1/{reference['flop'] / r['flop']:.1f}"
        print(f"| {r['label']} | {r['flop'] / 1e6:.3f} | {ratio} | {r['fp32']:.2f} | {r['bf16']:.2f} | "
              f"{r['chosen']} | {r['steady']:.3f} | {reference['model_s_per_mpx'] / r['model_s_per_mpx']:.1f}x |")
    return rows


def print_cpu_costs(generators: list[dict]) -> None:
    """Per-image CPU costs of decoding, encoding and metrics, and what they mean for the
    cores a V100 needs beside it with each generator."""
    costs, shape = cpu_costs()
    print(f"\nCPU cost per image, one core, for a {shape[1] // 4}x{shape[0] // 4} input -> "
          f"{shape[1]}x{shape[0]} output ({shape[0] * shape[1] / 1e6:.2f} Mpx), best of 3:\n")
    print("| step | ms per image | s per output Mpx |")
    print("|---|---|---|")
    for name, sec, per_mpx in costs:
        print(f"| {name} | {sec * 1e3:.1f} | {per_mpx:.4f} |")
    per = {name: per_mpx for name, _, per_mpx in costs}
    sustained = V100_FP16_PEAK * V100_ASSUMED_EFFICIENCY
    print(f"\nV100 (ASSUMED {V100_ASSUMED_EFFICIENCY:.0%} of {V100_FP16_PEAK / 1e12:.0f} TFLOP/s fp16 = "
          f"{sustained / 1e12:.1f} TFLOP/s on every generator's 3x3 convolutions)")
    outputs = [("PNG in, PNG out (fpng, default)", "decode input PNG", "encode output PNG (default: fpng)"),
               ("PNG in, PNG out (before: Pillow level 1)", "decode input PNG",
                "encode output PNG (before: Pillow, level 1)"),
               ("JPEG in, JPEG out (q95)", "decode input JPEG", "encode output JPEG (q95, default)"),
               ("JPEG in, PNG out (fpng)", "decode input JPEG", "encode output PNG (default: fpng)")]
    print("\n| generator (x4) | V100 output Mpx/s | " + " | ".join(f"cores per V100: {o[0]}" for o in outputs) + " |")
    print("|---|---|" + "---|" * len(outputs))
    for g in generators:
        gpu_rate = sustained / g["flop"] / 1e6
        cores = [(per[decode] + per[encode] + per["LR-consistency metrics"]) * gpu_rate for _, decode, encode in outputs]
        print(f"| {g['label']} | {gpu_rate:.0f} | " + " | ".join(f"{c:.1f}" for c in cores) + " |")
    print("\n| output | CPU s per output Mpx (decode + encode + metrics) |")
    print("|---|---|")
    for label, decode, encode in outputs:
        print(f"| {label} | {per[decode] + per[encode] + per['LR-consistency metrics']:.4f} |")


if __name__ == "__main__":
    main()
