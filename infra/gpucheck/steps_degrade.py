"""The degradation step: Real-ESRGAN's second-order degradation (``sr_core.realdegrade``)
on the device, as the training step runs it when ``degradation.enabled``, and the
device's JPEG (``sr_core.jpeg_torch``) against the same code on the CPU."""

from __future__ import annotations

import math
from typing import Iterator

from infra.gpucheck.context import Context, photos
from infra.gpucheck.measure import best_seconds, peak_memory
from infra.gpucheck.table import Row

DEGRADE_BATCH = {False: (12, 256), True: (2, 64)}
"""(batch, GT side) on the GPU (Real-ESRGAN x4plus's per-GPU batch) and in the CPU rehearsal."""


def gt_batch(ctx: Context, batch: int, side: int):
    """``batch`` GT crops of ``side`` px from the photographs (noise if none is big enough)."""
    import torch

    crops = [torch.from_numpy(im[:side, :side].copy()).permute(2, 0, 1).float() / 255
             for im in photos(ctx) if min(im.shape[:2]) >= side]
    if not crops:
        crops = [torch.rand(3, side, side, generator=torch.Generator().manual_seed(0))]
    return torch.stack([crops[i % len(crops)] for i in range(batch)]).to(ctx.device)


def step_degradation(ctx: Context) -> Iterator[Row]:
    """Degraded pairs/s of the whole pipeline at x4 on the device (what the training step
    adds per batch), its peak memory, and how far the device's JPEG is from the CPU's.
    Untested on a GPU: the machines this was written on have none (the CPU rehearsal runs
    the same code)."""
    import torch

    from sr_core import jpeg_torch
    from sr_core.realdegrade import RealDegradation, RealDegradationOptions

    batch, side = DEGRADE_BATCH[ctx.rehearsal]
    gt = gt_batch(ctx, batch, side)
    pipeline = RealDegradation(RealDegradationOptions(scale=4))
    seeds = iter(range(10**6))

    def run():
        return pipeline(gt, torch.Generator(device=ctx.device).manual_seed(next(seeds)))

    run()  # warm-up: kernels compiled, caches filled
    memory: dict = {}
    with peak_memory(ctx.device, memory):
        seconds = best_seconds(run, max(3, ctx.sizes.repeats), ctx.device)
    peak = memory["peak_gib"]
    yield Row("degradation", f"second-order pipeline, {batch} x {side} px, x4", {
        "pairs/s": batch / seconds, "ms/batch": 1000 * seconds,
        "peak GiB": peak if peak is not None else "n/a (CPU)"})
    on_device = jpeg_torch.jpeg(gt, 60).cpu().double()
    on_cpu = jpeg_torch.jpeg(gt.cpu(), 60).double()
    mse = float(((on_device - on_cpu) ** 2).mean())
    yield Row("degradation", "JPEG q60 on the device vs on the CPU", {
        "dB": "identical" if mse == 0 else 10 * math.log10(1 / mse),
        "differing 8-bit values": float((on_device != on_cpu).float().mean())})
