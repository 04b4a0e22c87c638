"""Scoring a model (or plain bicubic) on HR images the way SR papers do.

Each HR image is cropped to a multiple of the scale, downscaled with MATLAB-bicubic
``imresize`` to make the LR input, upscaled back, and compared with PSNR/SSIM on the
Y channel (or RGB) with ``crop_border`` = scale, so the numbers line up with
published tables (ESRGAN paper: bicubic x4 on Set5 = 28.42 dB PSNR-Y).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from sr_core import metrics
from sr_core.codecs import to_rgb8
from sr_core.resize import imresize


@dataclass
class ImageScore:
    name: str
    height: int
    width: int
    psnr: float
    ssim: float


def mod_crop(image: np.ndarray, scale: int) -> np.ndarray:
    """Crop the bottom/right so both sides are multiples of ``scale`` (the SR convention)."""
    h, w = image.shape[:2]
    return image[: h - h % scale, : w - w % scale]


def bicubic_upscaler(scale: int) -> Callable[[np.ndarray], np.ndarray]:
    return lambda lr: imresize(lr, scale=scale)


def score_image(name: str, hr: np.ndarray, scale: int, upscale: Callable[[np.ndarray], np.ndarray],
                crop_border: int | None = None, y_channel: bool = True) -> ImageScore:
    hr = mod_crop(to_rgb8(hr, keep_gray=True), scale)
    if min(hr.shape[:2]) < scale:
        raise ValueError(f"{name}: {hr.shape[1]}x{hr.shape[0]} is too small to score at x{scale}")
    lr = imresize(hr, scale=1 / scale)
    sr = upscale(lr)
    if sr.shape != hr.shape:
        raise ValueError(f"{name}: upscaled shape {sr.shape} differs from the HR shape {hr.shape}; wrong scale?")
    border = scale if crop_border is None else crop_border
    # The Y channel only exists for colour images; gray images are their own luminance.
    use_y = y_channel and hr.ndim == 3
    return ImageScore(
        name=name, height=hr.shape[0], width=hr.shape[1],
        psnr=metrics.psnr(sr, hr, crop_border=border, y_channel=use_y),
        ssim=metrics.ssim(sr, hr, crop_border=border, y_channel=use_y),
    )
