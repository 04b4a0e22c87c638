"""PSNR / SSIM / MSE with the super-resolution literature's conventions, so our numbers
can be put next to published tables.

Conventions (those of BasicSR's ``calculate_psnr``/``calculate_ssim`` and the MATLAB
scripts before it):

- Inputs are integer images, HW or HWC: uint8 (peak 255) or uint16 (peak 65535). All
  arithmetic is float64.
- ``crop_border=k`` drops ``k`` pixels on every side before measuring (papers use
  k = scale: the outermost pixels depend on the padding rule of the resize).
- ``y_channel=True`` measures only luma Y of MATLAB's BT.601 ``rgb2ycbcr`` ("studio
  swing": Y in [16, 235] for 8 bits): ``Y = 16 + (65.481 R + 128.553 G + 24.966 B)``
  with R, G, B in [0, 1], on the 0..255 scale (0..65535 for uint16: the same formula
  times 257). Like BasicSR, Y is not rounded to integers (MATLAB's uint8 ``rgb2ycbcr``
  does round; the difference is ~0.01 dB). A one-channel image is taken as already
  being Y, as the MATLAB scripts and BasicSR do.
- SSIM: 11x11 Gaussian window, sigma 1.5, "valid" filtering (no padding: the map is
  5 pixels smaller on each side), K1 = 0.01, K2 = 0.03, L = the dtype's peak; per
  channel, then the mean over channels.
- PSNR of identical images is ``inf``.

``psnr_torch``/``ssim_torch`` measure BCHW float batches in [0, 1] (validation during
training). They first quantize to the 8-bit grid (clamp, ``round(x * 255)``), because
the published numbers are measured on saved 8-bit images; they then apply exactly the
formulas above in float64 and return one value per image (shape ``(B,)``, float64).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.nn import functional as F

# MATLAB rgb2ycbcr (BT.601), for R, G, B in [0, 1] -> Y on the 0..255 scale.
Y_COEFFS = (65.481, 128.553, 24.966)
Y_OFFSET = 16.0

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03

PEAK_FOR_DTYPE = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}


def _prepare(a: np.ndarray, b: np.ndarray, crop_border: int, y_channel: bool, what: str) -> tuple[np.ndarray, np.ndarray, float]:
    """Validate a pair of images; return float64 HWC arrays (Y if asked, cropped) and the peak."""
    a = np.asarray(a)
    b = np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"{what}: images have different shapes {a.shape} and {b.shape}; compare images of the same size")
    if a.dtype != b.dtype:
        raise ValueError(f"{what}: images have different dtypes {a.dtype} and {b.dtype}; convert one of them")
    if a.dtype not in PEAK_FOR_DTYPE:
        raise ValueError(
            f"{what}: expected uint8 or uint16 images, got {a.dtype}; "
            "quantize first, e.g. (x * 255).round().clip(0, 255).astype(np.uint8)"
        )
    if a.ndim not in (2, 3):
        raise ValueError(f"{what}: expected HW or HWC images, got shape {a.shape}")
    if int(crop_border) != crop_border or crop_border < 0:
        raise ValueError(f"{what}: crop_border must be a non-negative integer, got {crop_border!r}")
    peak = PEAK_FOR_DTYPE[a.dtype]
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    if a.ndim == 2:
        a, b = a[..., None], b[..., None]
    if y_channel:
        a, b = rgb_to_y(a, peak), rgb_to_y(b, peak)
    if crop_border:
        h, w = a.shape[:2]
        if 2 * crop_border >= min(h, w):
            raise ValueError(f"{what}: crop_border={crop_border} leaves nothing of a {h}x{w} image")
        a = a[crop_border:-crop_border, crop_border:-crop_border]
        b = b[crop_border:-crop_border, crop_border:-crop_border]
    return a, b, peak


def rgb_to_y(img: np.ndarray, peak: float = 255.0) -> np.ndarray:
    """MATLAB BT.601 luma of a float HWC RGB image on the 0..peak scale, as HW1 float64.

    A one-channel image is returned unchanged (taken as already being Y).
    """
    if img.shape[-1] == 1:
        return img.astype(np.float64)
    if img.shape[-1] != 3:
        raise ValueError(f"y_channel needs RGB (3 channels) or gray (1 channel) images, got shape {img.shape}")
    rgb = img.astype(np.float64) / peak
    y = Y_OFFSET + rgb @ np.array(Y_COEFFS)
    return (y * (peak / 255.0))[..., None]


def mse(a: np.ndarray, b: np.ndarray, crop_border: int = 0, y_channel: bool = False) -> float:
    """Mean squared error on the dtype's scale (0..255 for uint8), float64."""
    a, b, _ = _prepare(a, b, crop_border, y_channel, "mse")
    return float(np.mean((a - b) ** 2))


def psnr(a: np.ndarray, b: np.ndarray, crop_border: int = 0, y_channel: bool = False) -> float:
    """Peak signal-to-noise ratio in dB; ``inf`` for identical images."""
    a, b, peak = _prepare(a, b, crop_border, y_channel, "psnr")
    error = float(np.mean((a - b) ** 2))
    if error == 0:
        return math.inf
    return 10.0 * math.log10(peak * peak / error)


def gaussian_window_1d(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
    offsets = np.arange(size, dtype=np.float64) - (size - 1) / 2
    g = np.exp(-(offsets**2) / (2 * sigma * sigma))
    return g / g.sum()


def _filter_valid(img: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Separable 'valid' filtering of an HWC float64 image with the 1-D window ``g``."""
    n = len(g)
    rows = np.lib.stride_tricks.sliding_window_view(img, n, axis=0) @ g
    return np.lib.stride_tricks.sliding_window_view(rows, n, axis=1) @ g


def ssim(a: np.ndarray, b: np.ndarray, crop_border: int = 0, y_channel: bool = False) -> float:
    """Structural similarity (Wang et al. 2004) with the conventions in the module docstring."""
    a, b, peak = _prepare(a, b, crop_border, y_channel, "ssim")
    if min(a.shape[:2]) < SSIM_WINDOW:
        raise ValueError(f"ssim: images must be at least {SSIM_WINDOW}x{SSIM_WINDOW} after cropping, got {a.shape[:2]}")
    g = gaussian_window_1d()
    c1 = (SSIM_K1 * peak) ** 2
    c2 = (SSIM_K2 * peak) ** 2
    mu_a = _filter_valid(a, g)
    mu_b = _filter_valid(b, g)
    var_a = _filter_valid(a * a, g) - mu_a**2
    var_b = _filter_valid(b * b, g) - mu_b**2
    cov = _filter_valid(a * b, g) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    # Mean per channel, then over channels (equal-sized channels: same as the global mean).
    return float(ssim_map.mean(axis=(0, 1)).mean())


# ---------------------------------------------------------------- batched torch versions


def _prepare_torch(sr: torch.Tensor, hr: torch.Tensor, crop_border: int, y_channel: bool, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize BCHW [0, 1] floats to the 8-bit grid, float64; Y and crop if asked. Returns (sr, hr)."""
    if sr.shape != hr.shape:
        raise ValueError(f"{what}: tensors have different shapes {tuple(sr.shape)} and {tuple(hr.shape)}")
    if sr.ndim != 4:
        raise ValueError(f"{what}: expected BCHW tensors, got shape {tuple(sr.shape)}")
    if int(crop_border) != crop_border or crop_border < 0:
        raise ValueError(f"{what}: crop_border must be a non-negative integer, got {crop_border!r}")
    out = []
    for x in (sr, hr):
        # Published numbers are measured on saved 8-bit images: measure the same thing.
        x = torch.round(x.detach().to(torch.float64).clamp(0, 1) * 255)
        if y_channel and x.shape[1] == 3:
            coeffs = torch.tensor(Y_COEFFS, dtype=torch.float64, device=x.device).view(1, 3, 1, 1)
            x = Y_OFFSET + (x / 255 * coeffs).sum(dim=1, keepdim=True)
        elif y_channel and x.shape[1] != 1:
            raise ValueError(f"{what}: y_channel needs RGB (3 channels) or gray (1 channel), got shape {tuple(x.shape)}")
        if crop_border:
            h, w = x.shape[-2:]
            if 2 * crop_border >= min(h, w):
                raise ValueError(f"{what}: crop_border={crop_border} leaves nothing of a {h}x{w} image")
            x = x[..., crop_border:-crop_border, crop_border:-crop_border]
        out.append(x)
    return out[0], out[1]


def mse_torch(sr: torch.Tensor, hr: torch.Tensor, crop_border: int = 0, y_channel: bool = False) -> torch.Tensor:
    """Per-image mean squared error (0..255 scale, shape ``(B,)``, float64) of BCHW tensors
    in [0, 1], 8-bit quantized."""
    sr, hr = _prepare_torch(sr, hr, crop_border, y_channel, "mse_torch")
    return ((sr - hr) ** 2).mean(dim=(1, 2, 3))


def psnr_torch(sr: torch.Tensor, hr: torch.Tensor, crop_border: int = 0, y_channel: bool = False) -> torch.Tensor:
    """Per-image PSNR (dB, shape ``(B,)``, float64) of BCHW tensors in [0, 1], 8-bit quantized."""
    error = mse_torch(sr, hr, crop_border, y_channel)
    return 10.0 * torch.log10(255.0**2 / error)  # error 0 -> inf, as in psnr()


def ssim_torch(sr: torch.Tensor, hr: torch.Tensor, crop_border: int = 0, y_channel: bool = False) -> torch.Tensor:
    """Per-image SSIM (shape ``(B,)``, float64) of BCHW tensors in [0, 1], 8-bit quantized."""
    sr, hr = _prepare_torch(sr, hr, crop_border, y_channel, "ssim_torch")
    if min(sr.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"ssim_torch: images must be at least {SSIM_WINDOW}x{SSIM_WINDOW} after cropping, got {tuple(sr.shape[-2:])}")
    channels = sr.shape[1]
    g = torch.tensor(gaussian_window_1d(), dtype=torch.float64, device=sr.device)
    window_h = g.view(1, 1, SSIM_WINDOW, 1).expand(channels, 1, SSIM_WINDOW, 1).contiguous()
    window_w = g.view(1, 1, 1, SSIM_WINDOW).expand(channels, 1, 1, SSIM_WINDOW).contiguous()

    def blur(x: torch.Tensor) -> torch.Tensor:
        # Separable Gaussian, no padding ("valid"), each channel on its own.
        return F.conv2d(F.conv2d(x, window_h, groups=channels), window_w, groups=channels)

    c1 = (SSIM_K1 * 255.0) ** 2
    c2 = (SSIM_K2 * 255.0) ** 2
    mu_a, mu_b = blur(sr), blur(hr)
    var_a = blur(sr * sr) - mu_a**2
    var_b = blur(hr * hr) - mu_b**2
    cov = blur(sr * hr) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return ssim_map.mean(dim=(2, 3)).mean(dim=1)
