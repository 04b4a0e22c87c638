"""PNG writers. PNG encoding is the slow stage beside a GPU (Pillow at zlib level 1: ~140
ms per output megapixel on one core), so by default (no compression level asked for)
8-bit RGB/RGBA is written by fpng (the ``fpng`` package: ~10x faster, files ~10% larger)
and every other kind by libpng through ``imagecodecs`` with OpenCV's fast settings
(level 1, RLE, SUB filter: ~2x Pillow, ~18% larger); an explicit level goes to libpng at
that level. Both write standard PNG that Pillow decodes to the same pixels
(tests/test_codecs.py, bench/bench_codecs.py). Without those packages, Pillow (8-bit,
16-bit gray) and OpenCV (16-bit colour) write it."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

try:  # fast PNG writers; Pillow / OpenCV write PNG without them
    import fpng as _fpng
except ImportError:
    _fpng = None
try:
    import imagecodecs as _imagecodecs
except ImportError:
    _imagecodecs = None

# libpng settings of the default (no level asked for): zlib level 1 with the RLE strategy
# and the SUB filter, what OpenCV uses for its fastest PNG.
_LIBPNG_FAST = dict(level=1, strategy=3, filter=16)


def png_encoder(image: np.ndarray, compress_level: int | None) -> str:
    """Which library writes this (shape-normalized) array as PNG: ``fpng``,
    ``imagecodecs`` (libpng), ``pillow`` or ``opencv`` (16-bit colour without imagecodecs)."""
    if compress_level is None and _fpng is not None and image.dtype == np.uint8 and image.ndim == 3 \
            and image.shape[2] in (3, 4):
        return "fpng"  # fpng writes 8-bit RGB and RGBA only
    if _imagecodecs is not None:
        return "imagecodecs"
    return "opencv" if image.dtype == np.uint16 and image.ndim == 3 else "pillow"


def encode_png(image: np.ndarray, compress_level: int | None) -> bytes:
    """A shape-normalized array (``sr_core.codecs`` convention; 16-bit gray + alpha
    excluded) as PNG bytes, by the writer ``png_encoder`` names. ``compress_level``: a
    zlib level 0-9, or None for the fastest writer."""
    encoder = png_encoder(image, compress_level)
    if encoder == "fpng":
        return _fpng.from_ndarray(np.ascontiguousarray(image))
    if encoder == "imagecodecs":
        settings = _LIBPNG_FAST if compress_level is None else dict(level=compress_level)
        return bytes(_imagecodecs.png_encode(np.ascontiguousarray(image), **settings))
    level = 1 if compress_level is None else compress_level
    if encoder == "opencv":
        return _encode_png_16_bit_colour(image, level)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, "PNG", compress_level=level)
    return buf.getvalue()


def _encode_png_16_bit_colour(image: np.ndarray, compress_level: int) -> bytes:
    import cv2

    conversion = cv2.COLOR_RGB2BGR if image.shape[2] == 3 else cv2.COLOR_RGBA2BGRA
    bgr = cv2.cvtColor(np.ascontiguousarray(image), conversion)
    ok, encoded = cv2.imencode(".png", bgr, [cv2.IMWRITE_PNG_COMPRESSION, compress_level])
    if not ok:
        raise RuntimeError(f"OpenCV could not encode a {image.shape} uint16 image as PNG")
    return encoded.tobytes()
