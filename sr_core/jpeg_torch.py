"""Baseline JPEG on batches of tensors, on any device: encode and decode in one step.

What libjpeg does for a baseline 4:2:0 JPEG (Pillow's default), step by step, in
plain PyTorch so it runs on the training device (Real-ESRGAN's ``DiffJPEG`` is the same
idea; this is our own implementation):

1. the image is taken to 8 bits (JPEG codes 8-bit samples) and converted to YCbCr
   with the JFIF (full-range BT.601) matrix;
2. Cb and Cr are averaged over 2x2 blocks (4:2:0 subsampling);
3. each plane, padded to whole 8x8 blocks by repeating its last row/column (as libjpeg
   does) and shifted by -128, goes through the orthonormal 8x8 DCT-II;
4. coefficients are divided by the quantisation table of the quality and rounded: the
   standard tables of ITU-T T.81 Annex K, scaled as libjpeg's ``jpeg_quality_scaling``
   (``5000 / q`` below 50, ``200 - 2 q`` above; entries ``floor((t * s + 50) / 100)``
   clamped to 1..255);
5. decode: dequantise, inverse DCT, +128, chroma upsampled by libjpeg's "fancy" triangle
   filter (weights 3/4 and 1/4: bilinear interpolation at half-pixel centres, edges
   replicated), YCbCr back to RGB, rounded to 8 bits and clamped.

What differs from libjpeg: floating-point DCTs instead of its integer ones, and no
rounding between the steps that libjpeg rounds; the entropy coding is lossless and is
not done. Measured against Pillow at the same quality (docs/TRAINING.md, "How close the
JPEG step is to Pillow's"). ``differentiable=True`` replaces the rounding of step 4 by
``round(x) + (x - round(x))^3`` (Shin and Song, 2017), which has a useful gradient,
and skips the 8-bit roundings of the input and output.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

# ITU-T T.81 Annex K, tables K.1 (luminance) and K.2 (chrominance), row = vertical frequency.
LUMA_TABLE = (
    (16, 11, 10, 16, 24, 40, 51, 61),
    (12, 12, 14, 19, 26, 58, 60, 55),
    (14, 13, 16, 24, 40, 57, 69, 56),
    (14, 17, 22, 29, 51, 87, 80, 62),
    (18, 22, 37, 56, 68, 109, 103, 77),
    (24, 35, 55, 64, 81, 104, 113, 92),
    (49, 64, 78, 87, 103, 121, 120, 101),
    (72, 92, 95, 98, 112, 100, 103, 99),
)
CHROMA_TABLE = (
    (17, 18, 24, 47, 99, 99, 99, 99),
    (18, 21, 26, 66, 99, 99, 99, 99),
    (24, 26, 56, 99, 99, 99, 99, 99),
    (47, 66, 99, 99, 99, 99, 99, 99),
    (99, 99, 99, 99, 99, 99, 99, 99),
    (99, 99, 99, 99, 99, 99, 99, 99),
    (99, 99, 99, 99, 99, 99, 99, 99),
    (99, 99, 99, 99, 99, 99, 99, 99),
)


def dct_matrix(size: int = 8, dtype=torch.float32, device=None) -> torch.Tensor:
    """The orthonormal DCT-II matrix ``D``: coefficients of a block ``X`` are ``D X D^T``."""
    k = torch.arange(size, dtype=torch.float64).unsqueeze(1)
    n = torch.arange(size, dtype=torch.float64).unsqueeze(0)
    d = torch.cos(math.pi * (2 * n + 1) * k / (2 * size)) * math.sqrt(2 / size)
    d[0] /= math.sqrt(2)
    return d.to(dtype=dtype, device=device)


def quality_scaled_tables(quality: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """libjpeg's quantisation tables for integer qualities ``quality`` (B,): (B, 8, 8) each."""
    q = quality.to(torch.float64).clamp(1, 100).round()
    scale = torch.where(q < 50, 5000 / q, 200 - 2 * q).view(-1, 1, 1)
    tables = []
    for base in (LUMA_TABLE, CHROMA_TABLE):
        t = torch.tensor(base, dtype=torch.float64, device=quality.device)
        tables.append(torch.floor((t * scale + 50) / 100).clamp(1, 255).float())
    return tables[0], tables[1]


def rgb_to_ycbcr(rgb: torch.Tensor) -> torch.Tensor:
    """JFIF YCbCr (0..255 scale) of RGB on the 0..255 scale, BCHW."""
    r, g, b = rgb.unbind(1)
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = -0.168736 * r - 0.331264 * g + 0.5 * b + 128
    cr = 0.5 * r - 0.418688 * g - 0.081312 * b + 128
    return torch.stack([y, cb, cr], 1)


def ycbcr_to_rgb(ycc: torch.Tensor) -> torch.Tensor:
    y, cb, cr = ycc.unbind(1)
    cb, cr = cb - 128, cr - 128
    return torch.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], 1)


def _round(x: torch.Tensor, differentiable: bool) -> torch.Tensor:
    rounded = torch.round(x)
    return rounded + (x - rounded) ** 3 if differentiable else rounded


def _pad_to(plane: torch.Tensor, multiple: int) -> torch.Tensor:
    h, w = plane.shape[-2:]
    return F.pad(plane, (0, -w % multiple, 0, -h % multiple), mode="replicate")


def _code_plane(plane: torch.Tensor, table: torch.Tensor, differentiable: bool) -> torch.Tensor:
    """Quantise one plane (B, 1, H, W), H and W multiples of 8, through the DCT with
    per-sample ``table`` (B, 8, 8); returns the decoded plane."""
    b, _, h, w = plane.shape
    d = dct_matrix(8, plane.dtype, plane.device)
    blocks = (plane - 128).reshape(b, h // 8, 8, w // 8, 8).permute(0, 1, 3, 2, 4)
    coeffs = d @ blocks @ d.T
    t = table.view(b, 1, 1, 8, 8)
    coeffs = _round(coeffs / t, differentiable) * t
    blocks = d.T @ coeffs @ d
    return blocks.permute(0, 1, 3, 2, 4).reshape(b, 1, h, w) + 128


def jpeg(img: torch.Tensor, quality: torch.Tensor | float, differentiable: bool = False) -> torch.Tensor:
    """JPEG-compress and decode RGB images ``img`` (B, 3, H, W) in [0, 1] at per-sample
    integer ``quality`` (B,) (or one number for all); returns (B, 3, H, W) in [0, 1] on
    the 8-bit grid (the same device and dtype)."""
    if img.ndim != 4 or img.shape[1] != 3:
        raise ValueError(f"jpeg: expected RGB images (B, 3, H, W), got shape {tuple(img.shape)}")
    b, _, h, w = img.shape
    quality = torch.as_tensor(quality, device=img.device).reshape(-1).expand(b)
    if bool(((quality < 1) | (quality > 100)).any()):
        raise ValueError(f"jpeg: quality must be in 1..100, got {quality.tolist()}")
    luma_table, chroma_table = quality_scaled_tables(quality)
    # The approximation's slope is 0 at integers: the 8-bit input and output roundings
    # would stop every gradient, so the differentiable path leaves them out.
    pixels = img.clamp(0, 1) * 255 if differentiable else torch.round(img.clamp(0, 1) * 255)
    ycc = rgb_to_ycbcr(_pad_to(pixels, 16))  # whole 16x16 MCUs: 8x8 blocks after subsampling
    luma = _code_plane(ycc[:, :1], luma_table, differentiable)
    chroma = F.avg_pool2d(ycc[:, 1:], 2)
    hc, wc = (h + 1) // 2, (w + 1) // 2  # chroma samples that cover the image
    chroma = _pad_to(chroma[..., :hc, :wc], 8)
    coded = [_code_plane(chroma[:, i:i + 1], chroma_table, differentiable) for i in range(2)]
    chroma = torch.cat(coded, 1)[..., :hc, :wc]
    # libjpeg's fancy upsampling: 3/4 nearer + 1/4 farther sample, replicated edges.
    chroma = F.interpolate(chroma, scale_factor=2, mode="bilinear", align_corners=False)
    ycc = torch.cat([luma[..., :h, :w], chroma[..., :h, :w]], 1)
    rgb = ycbcr_to_rgb(ycc)
    rgb = (rgb if differentiable else torch.round(rgb)).clamp(0, 255)
    return rgb / 255
