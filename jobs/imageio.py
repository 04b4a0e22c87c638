"""Decoding training images: RGB uint8 HWC numpy arrays, nothing else.

Training only needs 8-bit RGB; alpha is dropped, grayscale is repeated to three
channels and 16-bit images are reduced to 8 bits by rounding (not clipped).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm"})


def decode_rgb(data: bytes) -> np.ndarray:
    """Decode image bytes to an ``(H, W, 3)`` uint8 array. Raises on anything that is
    not a complete, readable image (the caller names the file)."""
    try:
        img = Image.open(io.BytesIO(data))
    except Image.UnidentifiedImageError:
        raise ValueError("not an image in a format Pillow reads (unknown type or corrupt header)") from None
    with img:
        img.load()
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            wide = np.asarray(img, dtype=np.float64)
            scale = 257.0 if img.mode.startswith("I;16") or wide.max() > 255 else 1.0
            gray = np.clip(np.round(wide / scale), 0, 255).astype(np.uint8)
            return np.repeat(gray[:, :, None], 3, axis=2)
        if img.mode != "RGB":
            img = img.convert("RGB")
        return np.asarray(img, dtype=np.uint8).copy()


def encode_png(array: np.ndarray, compress_level: int = 3) -> bytes:
    """Lossless PNG of an RGB uint8 array; level 3 is BasicSR's choice for sub-images
    (most of the size win of level 9 at a fraction of the time)."""
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG", compress_level=compress_level)
    return out.getvalue()
