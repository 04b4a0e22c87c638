"""The Upscaler's tiling plan: windows of one size covering an image along each axis, and
the tile size that fits a memory budget, estimated from one small forward pass."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

# Live activations at the peak, as a multiple of the largest single layer output
# (e.g. upsampled input + conv output + the previous feature map).
ACTIVATION_LIVE_FACTOR = 3
MIN_AUTO_TILE = 32


@dataclass(frozen=True)
class AxisWindow:
    """One window along one axis, in (padded) input pixels."""

    start: int
    """First input pixel the window reads."""
    length: int
    """Window length (the same for every window of an axis)."""
    core_start: int
    """First pixel this window writes."""
    core_end: int
    """One past the last pixel this window writes, clipped to the real image."""


def plan_axis(length: int, tile: int, overlap: int, multiple: int, minimum: int = 0) -> list[AxisWindow]:
    """Windows covering ``length`` pixels. ``tile <= 0`` means one window.

    The image is padded (bottom/right) to a multiple of ``multiple``, and to at least
    ``minimum`` pixels (the smallest input the model takes; windows are never shorter); ``tile`` and
    ``overlap`` are rounded up to multiples of it, so every window starts on the model's
    pixel grid. All windows have one length, at most ``tile + 2 * overlap``; inner
    windows write their centre, the first and last also write out to the border (they
    need no context there), so no work is spent on context that does not exist.
    """
    assert length >= 1 and multiple >= 1
    padded = -(-max(length, minimum) // multiple) * multiple
    overlap = -(-max(overlap, 0) // multiple) * multiple
    tile = -(-tile // multiple) * multiple
    if tile > 0 and tile + 2 * overlap < minimum:
        tile = -(-(minimum - 2 * overlap) // multiple) * multiple
    if tile <= 0 or padded <= tile + 2 * overlap:
        return [AxisWindow(0, padded, 0, length)]
    count = -(-(padded - 2 * overlap) // tile)
    # Inner core size: the smallest on the pixel grid with which `count` windows cover.
    core = -(-(padded - 2 * overlap) // (count * multiple)) * multiple
    window = core + 2 * overlap
    windows = []
    for i in range(count):
        start = min(i * core, padded - window)
        core_start = 0 if i == 0 else i * core + overlap
        core_end = length if i == count - 1 else (i + 1) * core + overlap
        assert start <= core_start < core_end <= start + window and start % multiple == 0
        windows.append(AxisWindow(start, window, core_start, min(core_end, length)))
    return windows


def choose_tile(bytes_per_pixel: float, budget_bytes: float, tiles_per_batch: int, overlap: int, multiple: int) -> int:
    """The largest tile (core side, input pixels) whose batch of windows fits the budget."""
    window_pixels = budget_bytes / (max(tiles_per_batch, 1) * bytes_per_pixel)
    tile = int(math.isqrt(int(window_pixels))) - 2 * overlap
    tile = tile // multiple * multiple
    return max(tile, -(-MIN_AUTO_TILE // multiple) * multiple)


def activation_bytes_per_pixel(model: nn.Module, num_channels: int, multiple: int, device: torch.device,
                               minimum: int = 0) -> float:
    """Peak activation bytes (fp32) per input pixel, estimated from one small forward:
    the largest layer output per input pixel times ``ACTIVATION_LIVE_FACTOR``."""
    side = max(4 * multiple * max(1, 8 // multiple), -(-minimum // multiple) * multiple)
    largest = 0

    def record(_module, _inputs, output):
        nonlocal largest
        if isinstance(output, torch.Tensor):
            largest = max(largest, output.numel())

    handles = [m.register_forward_hook(record) for m in model.modules() if not list(m.children())]
    try:
        with torch.inference_mode():
            out = model(torch.zeros(1, num_channels, side, side, device=device))
        largest = max(largest, out.numel())
    finally:
        for handle in handles:
            handle.remove()
    return ACTIVATION_LIVE_FACTOR * 4 * largest / (side * side)
