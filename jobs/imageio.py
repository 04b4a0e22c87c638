"""Decoding training images: RGB uint8 HWC numpy arrays, nothing else.

Decoding goes through ``sr_core.codecs`` (restricted formats, EXIF orientation, the
decompression-bomb guard). Training only needs 8-bit RGB: alpha is dropped, grayscale
is repeated to three channels and 16-bit images are rounded to 8 bits.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from sr_core import codecs

IMAGE_SUFFIXES = frozenset(codecs.INPUT_EXTENSIONS)


def decode_rgb(data: bytes, name: str = "<bytes>", max_pixels: int | None = codecs.DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode image bytes to an ``(H, W, 3)`` uint8 array. Raises ``ValueError`` naming
    ``name`` for anything that is not a complete, readable image."""
    return codecs.to_rgb8(codecs.decode_image(data, name, max_pixels))


def encode_png(array: np.ndarray, compress_level: int = 3) -> bytes:
    """Lossless PNG of an RGB uint8 array; level 3 is BasicSR's choice for sub-images
    (most of the size win of level 9 at a fraction of the time)."""
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG", compress_level=compress_level)
    return out.getvalue()
