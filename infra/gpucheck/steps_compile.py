"""Step ``compile``: ``torch.compile`` (inductor) of the Upscaler's model against eager on
the same windows: compile time, speed, the passes that pay the compile back, and the
output against eager's."""

from __future__ import annotations

import copy
import time
from typing import Iterator

from infra.gpucheck.context import COMPACT, OVERLAP, PSNR_FLOOR_DB, Context, available, build_model, model_label, photos
from infra.gpucheck.measure import best_seconds, synchronize
from infra.gpucheck.steps_upscale import psnr_against
from infra.gpucheck.table import SUCCESS, Row, failed


def compile_figures(first_s: float, eager_s: float, compiled_s: float) -> dict:
    """Speed-up of a compiled pass over an eager one, and how many passes pay for the
    compile (the first compiled pass less one steady pass); "never" without a gain."""
    saved = eager_s - compiled_s
    return {"speed-up": eager_s / compiled_s,
            "passes to pay back": max(0.0, first_s - compiled_s) / saved if saved > 0 else "never"}


def step_compile(ctx: Context) -> Iterator[Row]:
    """The compact generator (RRDBNet where this install lacks it) at the default
    precision, one window per forward pass so every pass has the same shape (a new shape
    would compile again). Untested on a GPU: none was available where this was written."""
    import torch

    from sr_core.upscaler import Upscaler

    step = "compile"
    arch = COMPACT if available(COMPACT) else "rrdbnet"
    images = photos(ctx)
    eager = Upscaler(build_model(ctx, arch), device=ctx.device, tile=ctx.sizes.tile, overlap=OVERLAP,
                     tiles_per_batch=1, owns_model=True)
    out_px = sum(im.shape[0] * im.shape[1] for im in images) * eager.scale**2
    reference = [eager(im) for im in images]  # also the warm-up
    eager_s = best_seconds(lambda: [eager(im) for im in images], ctx.sizes.repeats, ctx.device)
    # The same settings with the model compiled (an Upscaler holds only settings and the model).
    compiled = copy.copy(eager)
    compiled.model = torch.compile(eager.model)
    start = time.perf_counter()
    outputs = [compiled(im) for im in images]
    synchronize(ctx.device)
    first_s = time.perf_counter() - start
    compiled_s = best_seconds(lambda: [compiled(im) for im in images], ctx.sizes.repeats, ctx.device)
    db = psnr_against(outputs, reference)
    figures = {"model": model_label(ctx, arch), "precision": eager.precision, "first pass s (compile)": first_s,
               "eager out Mpx/s": out_px / eager_s / 1e6, "compiled out Mpx/s": out_px / compiled_s / 1e6,
               **compile_figures(first_s, eager_s, compiled_s), "dB vs eager": db}
    status = SUCCESS
    if isinstance(db, float) and db < PSNR_FLOOR_DB:
        status = failed(f"compiled output {db:.1f} dB from eager (< {PSNR_FLOOR_DB:g} dB)")
    yield Row(step, f"tile {ctx.sizes.tile}, 1/forward, {len(images)} photos, one pass = all of them", figures, status)
