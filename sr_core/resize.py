"""MATLAB-compatible bicubic ``imresize``.

The SR literature makes its low-resolution images with MATLAB's ``imresize(img, 1/s,
'bicubic')`` and publishes numbers measured on them, so our LR images must come from
the same operator or the numbers are not comparable:

- cubic convolution kernel with a = -0.5 (Keys);
- when downscaling with antialiasing, the kernel is stretched by 1/scale (a low-pass
  filter as wide as the footprint of one output pixel) and its height scaled down;
- output pixel ``i`` (1-based) samples the input at ``i / scale + 0.5 * (1 - 1 / scale)``
  (pixel centres aligned), weights normalized to sum to 1;
- borders by symmetric padding (``... 2 1 | 1 2 3 ... n | n n-1 ...``);
- output size ``ceil(in * scale)``; with an explicit ``size`` the per-axis scale is
  ``out / in``, as MATLAB does.

Each axis uses precomputed "contributions" as MATLAB does: for every output pixel a
few weights (4 taps at scale >= 1, about 4 / scale when antialiasing a downscale) and
their mirrored input indices. The resize is a weighted sum of gathered rows (then
columns): memory stays proportional to the output, unlike a dense (out, in) matrix
that would take hundreds of MB for an 8K output. The axis with the larger reduction
goes first, as in MATLAB; in exact arithmetic the order does not matter (the two
passes commute), it only saves work.

Away from the borders this agrees with Pillow's ``Image.resize(..., BICUBIC)`` on float
("F" mode) images; within ~4 pixels of an edge they differ (Pillow renormalizes the
truncated kernel instead of mirroring).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch

# Keys' cubic convolution parameter used by MATLAB (and Pillow's BICUBIC).
CUBIC_A = -0.5
# Support of the cubic kernel (it is zero for |x| >= 2): 4 input pixels at scale 1.
KERNEL_WIDTH = 4.0
# Values (pixels x channels) per band of the numpy path: 1M float64 = 8 MB at a time.
NUMPY_BAND_VALUES = 2**20


def cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel with a = -0.5."""
    a = CUBIC_A
    ax = np.abs(x)
    ax2 = ax * ax
    ax3 = ax2 * ax
    inner = (a + 2) * ax3 - (a + 3) * ax2 + 1
    outer = a * ax3 - 5 * a * ax2 + 8 * a * ax - 4 * a
    return np.where(ax <= 1, inner, np.where(ax < 2, outer, 0.0))


def contributions(in_length: int, out_length: int, scale: float, antialiasing: bool) -> tuple[np.ndarray, np.ndarray]:
    """MATLAB's per-output-pixel weights and (0-based, already mirrored) input indices.

    Returns ``(weights, indices)``, both of shape ``(out_length, taps)``.
    """
    widen = antialiasing and scale < 1
    kernel_width = KERNEL_WIDTH / scale if widen else KERNEL_WIDTH
    out_pos = np.arange(1, out_length + 1, dtype=np.float64)
    # Input coordinate (1-based) that output pixel centre maps to.
    centre = out_pos / scale + 0.5 * (1 - 1 / scale)
    left = np.floor(centre - kernel_width / 2)
    taps = int(math.ceil(kernel_width)) + 2
    indices = left[:, None] + np.arange(taps)[None, :]
    distance = centre[:, None] - indices
    if widen:
        weights = scale * cubic(distance * scale)
    else:
        weights = cubic(distance)
    weights = weights / weights.sum(axis=1, keepdims=True)
    # Symmetric padding: reflect 1-based index k into 1..n with the edge pixel repeated.
    period = 2 * in_length
    k = np.mod(indices - 1, period).astype(np.int64)
    mirrored = np.where(k < in_length, k, period - 1 - k)
    return weights, mirrored


@lru_cache(maxsize=32)
def trimmed_contributions(in_length: int, out_length: int, scale: float, antialiasing: bool) -> tuple[np.ndarray, np.ndarray]:
    """``contributions`` without the taps that are zero for every output pixel (MATLAB
    trims them too); cached, read-only."""
    weights, indices = contributions(in_length, out_length, scale, antialiasing)
    used = np.any(weights != 0, axis=0)
    weights, indices = np.ascontiguousarray(weights[:, used]), np.ascontiguousarray(indices[:, used])
    weights.setflags(write=False)
    indices.setflags(write=False)
    return weights, indices


def _plan(in_h: int, in_w: int, scale: float | None, size: tuple[int, int] | None) -> tuple[int, int, float, float]:
    """Output size and per-axis scale, by MATLAB's rules."""
    if size is not None:
        if len(size) != 2 or any(int(s) != s or s < 1 for s in size):
            raise ValueError(f"imresize: size must be (height, width) positive integers, got {size!r}")
        out_h, out_w = int(size[0]), int(size[1])
        return out_h, out_w, out_h / in_h, out_w / in_w
    if scale is None:
        raise ValueError("imresize: give scale (e.g. 0.25) or size=(height, width)")
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"imresize: scale must be a positive number, got {scale!r}")
    scale = float(scale)
    return math.ceil(in_h * scale), math.ceil(in_w * scale), scale, scale


def _axis_order(scale_h: float, scale_w: float) -> tuple[str, str]:
    # MATLAB resizes the axis with the smallest scale (largest reduction) first, so the
    # second pass runs on the smaller intermediate image.
    return ("h", "w") if scale_h <= scale_w else ("w", "h")


def imresize(x, scale: float | None = None, size: tuple[int, int] | None = None, antialiasing: bool = True):
    """Resize like MATLAB's ``imresize(x, scale, 'bicubic')``.

    ``x`` is a numpy array HW or HWC (uint8 → uint8, uint16 → uint16, both rounded half
    up and clipped; float → float32, not clipped) or a float torch tensor CHW or BCHW
    (returns the same rank, dtype and device; computed in float32 at least).
    ``size`` is (height, width) and overrides ``scale``.
    """
    if isinstance(x, torch.Tensor):
        return _imresize_torch(x, scale, size, antialiasing)
    if isinstance(x, np.ndarray):
        return _imresize_numpy(x, scale, size, antialiasing)
    raise ValueError(f"imresize: expected a numpy array or torch tensor, got {type(x).__name__}")


def _imresize_numpy(x: np.ndarray, scale, size, antialiasing: bool) -> np.ndarray:
    if x.ndim not in (2, 3):
        raise ValueError(f"imresize: numpy input must be HW or HWC, got shape {x.shape}")
    if x.dtype == np.uint8:
        max_value = 255
    elif x.dtype == np.uint16:
        max_value = 65535
    elif np.issubdtype(x.dtype, np.floating):
        max_value = None
    else:
        raise ValueError(f"imresize: unsupported dtype {x.dtype}; use uint8, uint16 or float")
    in_h, in_w = x.shape[:2]
    out_h, out_w, scale_h, scale_w = _plan(in_h, in_w, scale, size)
    rows_w, rows_i = trimmed_contributions(in_h, out_h, scale_h, antialiasing)
    cols_w, cols_i = trimmed_contributions(in_w, out_w, scale_w, antialiasing)
    order = _axis_order(scale_h, scale_w)
    channels = x.shape[2] if x.ndim == 3 else 1
    out = np.empty((out_h, out_w) + x.shape[2:], dtype=np.float32 if max_value is None else x.dtype)
    # Bands of output rows, each computed from just the input rows it needs: the float64
    # intermediates stay at a few MB however large the image (a 4K frame x4
    # would otherwise need several GB). Every output value is computed by the same
    # operations in the same order as without bands.
    band = max(1, NUMPY_BAND_VALUES // (max(out_w, in_w) * channels))
    for r0 in range(0, out_h, band):
        r1 = min(out_h, r0 + band)
        band_rows = rows_i[r0:r1]
        first, last = int(band_rows.min()), int(band_rows.max()) + 1
        part = x[first:last].astype(np.float64)
        for axis in order:
            if axis == "h":
                part = _resize_axis0_numpy(part, rows_w[r0:r1], band_rows - first)
            else:
                part = _resize_axis0_numpy(part.swapaxes(0, 1), cols_w, cols_i).swapaxes(0, 1)
        if max_value is None:
            out[r0:r1] = part
        else:
            # MATLAB rounds half away from zero; values are clipped non-negative first,
            # so floor(v + 0.5) is the same thing (numpy's round is half-to-even).
            out[r0:r1] = np.floor(np.clip(part, 0, max_value) + 0.5)
    return out


def _resize_axis0_numpy(x: np.ndarray, weights: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Resize along axis 0: ``out[i] = sum_k weights[i, k] * x[indices[i, k]]``."""
    broadcast = (-1,) + (1,) * (x.ndim - 1)
    out = np.zeros((weights.shape[0],) + x.shape[1:], dtype=np.float64)
    for tap in range(weights.shape[1]):
        out += weights[:, tap].reshape(broadcast) * x[indices[:, tap]]
    return out


def _imresize_torch(x: torch.Tensor, scale, size, antialiasing: bool) -> torch.Tensor:
    if x.ndim not in (3, 4):
        raise ValueError(f"imresize: tensor input must be CHW or BCHW, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"imresize: tensor input must be floating point, got {x.dtype}")
    in_h, in_w = x.shape[-2:]
    out_h, out_w, scale_h, scale_w = _plan(in_h, in_w, scale, size)
    # Half precision would lose the small kernel lobes; compute in at least float32.
    compute_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    out = x.to(compute_dtype)
    for axis in _axis_order(scale_h, scale_w):
        if axis == "h":
            out = _resize_dim_torch(out, -2, *trimmed_contributions(in_h, out_h, scale_h, antialiasing))
        else:
            out = _resize_dim_torch(out, -1, *trimmed_contributions(in_w, out_w, scale_w, antialiasing))
    return out.to(x.dtype)


def _resize_dim_torch(x: torch.Tensor, dim: int, weights: np.ndarray, indices: np.ndarray) -> torch.Tensor:
    """Resize along ``dim`` (-2 or -1) with gathered taps, like ``_resize_axis0_numpy``."""
    weights_t = torch.tensor(weights, dtype=x.dtype, device=x.device)
    indices_t = torch.tensor(indices, dtype=torch.long, device=x.device)
    shape = (-1, 1) if dim == -2 else (-1,)
    out = None
    for tap in range(weights.shape[1]):
        term = weights_t[:, tap].view(shape) * x.index_select(dim, indices_t[:, tap])
        out = term if out is None else out + term
    return out


def mod_crop(image: np.ndarray, scale: int) -> np.ndarray:
    """Crop the bottom/right so both sides are multiples of ``scale`` (the SR convention:
    an HR image whose LR image is exactly 1/scale of it)."""
    h, w = image.shape[:2]
    return image[: h - h % scale, : w - w % scale]
