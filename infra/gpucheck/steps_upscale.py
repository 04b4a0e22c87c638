"""Steps ``upscaler-rrdbnet``, ``upscaler-compact`` (the Upscaler's precisions, tiles and
layouts) and ``upscale-e2e`` (``sr upscale`` against the bare model and the reference loop)."""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Iterator

from infra.gpucheck.context import (COMPACT, FLAT_STD, OVERLAP, PSNR_FLOOR_DB, Context, available, build_model,
                                    model_file, model_label, photos)
from infra.gpucheck.measure import GpuSampler, autocast, best_seconds, peak_memory
from infra.gpucheck.processes import last_line, run_logged, sr_command
from infra.gpucheck.table import SUCCESS, UNAVAILABLE, Row, failed


def upscaler_configs(device: str, capability: tuple[int, int] | None, tile: int) -> list[tuple[str, dict, str]]:
    """(case, Upscaler options, skip reason or "") for one architecture on ``device``
    of CUDA compute ``capability``: the fp32 row first (the others are compared with it)."""
    from sr_core.precision import choose_precision

    default = choose_precision(device, capability)
    rows = []
    for precision in ("fp32", "fp16", "bf16"):
        skip = ""
        if precision == "fp16" and device == "cpu":
            skip = "fp16 is for GPUs (the Upscaler refuses it on CPU)"
        if precision == "bf16" and capability is not None and capability[0] < 8:
            skip = (f"sm_{capability[0]}{capability[1]} has no bf16 tensor cores (bf16 would be emulated; "
                    "the project never picks it there)")
        rows.append((f"{precision} · tile {tile} · 4/forward · channels_last",
                     dict(precision=precision, tile=tile, tiles_per_batch=4, channels_last=True), skip))
    rows.append((f"{default} · tile {tile} · 1/forward · channels_last",
                 dict(precision=default, tile=tile, tiles_per_batch=1, channels_last=True), ""))
    rows.append((f"{default} · automatic tile and tiles/forward · channels_last",
                 dict(precision=default, tile=None, tiles_per_batch=None, channels_last=True), ""))
    rows.append((f"{default} · tile {tile} · 4/forward · NCHW (channels_last off)",
                 dict(precision=default, tile=tile, tiles_per_batch=4, channels_last=False), ""))
    return rows


def make_upscaler(model, device: str, precision: str, tile, tiles_per_batch, channels_last: bool):
    """An Upscaler by its own options. channels_last off: the caller's model, already on
    the device in NCHW, which the Upscaler then runs as it is."""
    from sr_core.upscaler import Upscaler

    if channels_last:
        return Upscaler(copy.deepcopy(model), device=device, precision=precision, tile=tile, overlap=OVERLAP,
                        tiles_per_batch=tiles_per_batch, owns_model=True)
    plain = copy.deepcopy(model).to(device).eval().requires_grad_(False)
    return Upscaler(plain, device=device, precision=precision, tile=tile, overlap=OVERLAP,
                    tiles_per_batch=tiles_per_batch)


def psnr_against(outputs: list, reference: list) -> float | str:
    """Lowest PSNR (dB, RGB) of ``outputs`` against ``reference``, image by image; a
    string when the reference is flat (nothing to compare)."""
    import numpy as np

    from sr_core.metrics import psnr

    if max(float(np.std(r)) for r in reference) < FLAT_STD:
        return "n/a (flat fp32 output: random weights)"
    return min(psnr(o, r) for o, r in zip(outputs, reference))


def step_upscaler(ctx: Context, arch: str) -> Iterator[Row]:
    from infra.gpucheck.workloads import conv_flops_per_input_pixel

    step = "upscaler-rrdbnet" if arch == "rrdbnet" else "upscaler-compact"
    if not available(arch):
        yield Row(step, f"{arch} {ctx.sizes.variants[arch]}", {}, UNAVAILABLE)
        return
    model = build_model(ctx, arch)
    images = photos(ctx)
    in_px = sum(im.shape[0] * im.shape[1] for im in images)
    out_px = in_px * model.scale**2
    flop = conv_flops_per_input_pixel(model)
    yield Row(step, "model and inputs", {"model": model_label(ctx, arch), "conv MFLOP/input px": flop / 1e6,
                                         "inputs": f"{len(images)} photos ≤ {ctx.sizes.photo_crop} px",
                                         "output Mpx": out_px / 1e6})
    reference = None
    for case, options, skip in upscaler_configs(ctx.device, ctx.capability(), ctx.sizes.tile):
        if skip:
            yield Row(step, case, {}, f"skipped: {skip}")
            continue
        figures, status, up = {}, SUCCESS, None
        try:
            up = make_upscaler(model, ctx.device, **options)
            outputs = [up(im) for im in images]  # warm-up (kernels, cuDNN's choices) and the outputs
            memory: dict = {}
            with peak_memory(ctx.device, memory):
                seconds = best_seconds(lambda: [up(im) for im in images], ctx.sizes.repeats, ctx.device)
            figures["out Mpx/s"] = out_px / seconds / 1e6
            figures["useful TFLOP/s"] = in_px * flop / seconds / 1e12
            figures["peak GiB"] = memory["peak_gib"] if memory["peak_gib"] is not None else "n/a (CPU)"
            if options["tile"] is None:
                figures["chosen tile"] = up.tile_for(*images[0].shape[:2]) or "whole image"
                figures["tiles/forward"] = up.tiles_per_batch
            if reference is None:
                if options["precision"] != "fp32":
                    raise AssertionError("the fp32 row comes first")
                reference = outputs
                figures["output std (8-bit)"] = float(max(o.std() for o in outputs))
            elif not reference:
                figures["dB vs fp32"] = "n/a (the fp32 row failed)"
            else:
                db = psnr_against(outputs, reference)
                figures["dB vs fp32"] = db
                if isinstance(db, float) and db < PSNR_FLOOR_DB:
                    status = failed(f"output {db:.1f} dB from fp32 (< {PSNR_FLOOR_DB:g} dB)")
        except Exception as exc:  # this configuration fails; the others still run
            status = failed(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300])
            if options["precision"] == "fp32" and reference is None:
                reference = []  # the fp32 row failed: the others have nothing to compare with
        up = outputs = None  # free its GPU memory before the next configuration is measured
        yield Row(step, case, figures, status)


def step_upscaler_rrdbnet(ctx: Context) -> Iterator[Row]:
    yield from step_upscaler(ctx, "rrdbnet")


def step_upscaler_compact(ctx: Context) -> Iterator[Row]:
    yield from step_upscaler(ctx, COMPACT)


def floor_batches(up, images, device: str):
    """The Upscaler's batches of windows, made up in device memory beforehand."""
    import torch

    from sr_core.upscaler import plan_axis

    batches = []
    for img in images:
        tile = up.tile_for(*img.shape[:2])
        rows = plan_axis(img.shape[0], tile, up.overlap, up.size_multiple)
        cols = plan_axis(img.shape[1], tile, up.overlap, up.size_multiple)
        windows = [(wy, wx) for wy in rows for wx in cols]
        for i in range(0, len(windows), up.tiles_per_batch):
            group = windows[i:i + up.tiles_per_batch]
            h, w = group[0][0].length, group[0][1].length
            batch = torch.rand(len(group), up.num_channels, h, w, device=device)
            batches.append(batch.contiguous(memory_format=up.memory_format))
    return batches


def startup_input(ctx: Context) -> Path:
    """A folder with one 16x16 image: ``sr upscale`` on it times the command's start-up."""
    folder = ctx.workdir / "startup-input"
    if not folder.exists():
        import numpy as np

        from sr_core.codecs import write_image

        folder.mkdir(parents=True)
        write_image(str(folder / "dot.png"), np.full((16, 16, 3), 128, np.uint8))
    return folder


def timed_sr_upscale(ctx: Context, inputs: Path, out: Path, model: str, sampler: GpuSampler | None = None) -> dict:
    """``sr upscale`` on ``inputs``, and on one 16x16 image (its start-up: interpreter,
    torch, CUDA context, model load). Raises if either fails."""
    base = [*sr_command(), "upscale", "--model", model, "--device", ctx.device, "--overwrite"]
    env = ctx.env()
    code, startup, text = run_logged([*base, str(startup_input(ctx)), "-o", str(out) + "-startup"],
                                     Path(str(out) + "-startup.log"), env, ctx.remaining())
    if code != 0:
        raise RuntimeError(f"sr upscale (start-up run) exit {code}: {last_line(text)}")
    with sampler or contextlib.nullcontext():
        code, seconds, text = run_logged([*base, str(inputs), "-o", str(out)], Path(str(out) + ".log"), env,
                                         ctx.remaining())
    if code != 0:
        raise RuntimeError(f"sr upscale exit {code}: {last_line(text)} (log: {out}.log)")
    # The work is the difference; when it is smaller than the start-up's own jitter
    # (tiny inputs), there is no rate to report.
    work = seconds - startup if seconds - startup > 0.25 * seconds else None
    return {"seconds": seconds, "startup": startup, "work": work}


NOISE = "n/a (within the start-up's noise)"


def step_upscale_e2e(ctx: Context) -> Iterator[Row]:
    import torch

    from infra.gpucheck.workloads import reference_loop
    from sr_core.codecs import read_image, write_image
    from sr_core.upscaler import Upscaler

    step, arch = "upscale-e2e", "rrdbnet"
    precision = ctx.default_precision()
    path = model_file(ctx, arch)
    images = photos(ctx)
    folder = ctx.workdir / "e2e" / "in"
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        write_image(str(folder / f"photo{i}.png"), im)
    up = Upscaler.from_file(path, device=ctx.device)  # what `sr upscale` builds: everything automatic
    out_px = sum(im.shape[0] * im.shape[1] for im in images) * up.scale**2
    yield Row(step, "setup", {"model": model_label(ctx, arch), "precision": precision, "tile": "automatic",
                              "inputs": f"{len(images)} photos ≤ {ctx.sizes.photo_crop} px"})
    ours = [up(im) for im in images]
    upscaler_s = best_seconds(lambda: [up(im) for im in images], ctx.sizes.repeats, ctx.device)
    batches = floor_batches(up, images, ctx.device)

    def floor():
        with torch.inference_mode(), autocast(ctx.device, precision):
            for x in batches:
                up.model(x)

    floor()
    floor_s = best_seconds(floor, ctx.sizes.repeats, ctx.device)
    rate = out_px / floor_s / 1e6
    yield Row(step, "floor: bare model over the Upscaler's batches", {"s": floor_s, "out Mpx/s": rate,
                                                                      "vs floor": 1.0})
    yield Row(step, "Upscaler (in process)", {"s": upscaler_s, "out Mpx/s": out_px / upscaler_s / 1e6,
                                              "vs floor": floor_s / upscaler_s})

    from sr_core import load_generator

    plain = load_generator(path).to(ctx.device)  # NCHW, as those loops run it
    ref_tile = up.tile_for(*images[0].shape[:2]) or max(images[0].shape[:2])

    def reference():
        with autocast(ctx.device, precision):
            for im in images:
                reference_loop(plain, im, ref_tile, OVERLAP, device=ctx.device)

    reference()
    ref_s = best_seconds(reference, ctx.sizes.repeats, ctx.device)
    yield Row(step, f"reference loop (1 tile at a time, NCHW, full-frame float output, {precision})",
              {"s": ref_s, "out Mpx/s": out_px / ref_s / 1e6, "vs floor": floor_s / ref_s})
    up = plain = batches = None  # freed before sr upscale runs on the same GPU (and plans its tiles)
    if ctx.device == "cuda":
        torch.cuda.empty_cache()

    figures, status = {}, SUCCESS
    try:
        timing = timed_sr_upscale(ctx, folder, ctx.workdir / "e2e" / "out", path)
        work = timing["work"]
        outputs = [read_image(str(ctx.workdir / "e2e" / "out" / f"photo{i}_sr.png")) for i in range(len(images))]
        db = psnr_against(outputs, ours)
        figures = {"s (whole command)": timing["seconds"], "start-up s": timing["startup"],
                   "out Mpx/s (start-up excluded)": out_px / work / 1e6 if work else NOISE,
                   "vs floor": floor_s / work if work else NOISE, "dB vs Upscaler": db}
        if isinstance(db, float) and db < PSNR_FLOOR_DB:
            status = failed(f"sr upscale's output is {db:.1f} dB from the Upscaler's")
    except Exception as exc:
        status = failed(str(exc)[:300])
    yield Row(step, "sr upscale (subprocess, PNG out)", figures, status)
