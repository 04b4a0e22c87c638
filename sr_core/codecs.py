"""Image codecs: bytes (from any fsspec URL) to numpy arrays and back.

Array convention, used by the Upscaler and everything that calls it:

- ``(H, W)``      grayscale, uint8 (mode L) or uint16 (mode I;16)
- ``(H, W, 2)``   grayscale + alpha, uint8 (LA)
- ``(H, W, 3)``   RGB, uint8
- ``(H, W, 4)``   RGBA, uint8

Decoding reads PNG, JPEG (and camera MPO JPEGs), WebP, TIFF and BMP in modes 1, L, LA,
RGB, RGBA, P (palette, with or without transparency), CMYK, YCbCr, I;16 (any byte
order) and I, and applies the EXIF orientation. Pillow decodes 16-bit *colour* PNG/TIFF
to 8 bits per channel (it has no 16-bit RGB mode); 16-bit grayscale stays 16-bit. A PNG
colour marked transparent (tRNS) becomes an alpha channel (16-bit gray with it: 8-bit LA,
like 16-bit LA/RGBA PNGs). Animated PNG/WebP are refused rather than cut to one frame.

Encoding writes PNG (8-bit, or 16-bit grayscale), JPEG and WebP. JPEG has no alpha, so
transparent images are composited over white; JPEG and WebP have no 16-bit, so 16-bit
images are rounded to 8 bits for them.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from sr_core import storage

# 100 Mpx (e.g. 10000 x 10000): anything larger is far more likely a decompression bomb
# than a photograph someone wants upscaled x4 (the output would be 1.6 Gpx).
DEFAULT_MAX_PIXELS = 100_000_000

# Formats we decode. Pillow is restricted to these so that formats with risky decoders
# (EPS runs Ghostscript) are never tried on untrusted bytes.
DECODE_FORMATS = ("PNG", "JPEG", "WEBP", "TIFF", "BMP")  # JPEG includes camera MPO files
ENCODE_FORMATS = ("png", "jpeg", "webp")
_FORMAT_ALIASES = {"png": "png", "jpg": "jpeg", "jpeg": "jpeg", "webp": "webp"}
EXTENSIONS = {"png": ".png", "jpeg": ".jpg", "webp": ".webp"}
INPUT_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp")

# Pillow's own bomb check (a warning above 89 Mpx, an error above 179 Mpx) would make
# our configurable limit impossible to raise; ``decode_image`` checks the header size
# against ``max_pixels`` before any pixel is decoded instead.
Image.MAX_IMAGE_PIXELS = None

_MAGIC = [
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"BM", "BMP"),
]


class ImageDecodeError(ValueError):
    """Bytes that are not a decodable image (the message names the input and why)."""


class ImageTooLargeError(ImageDecodeError):
    """An image above the configured pixel limit (a likely decompression bomb)."""


def sniff_format(data: bytes) -> str | None:
    """The format a file's first bytes claim to be, or None."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    for magic, name in _MAGIC:
        if data.startswith(magic):
            return name
    return None


def decode_image(data: bytes, name: str = "<bytes>", max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode image bytes to an array (see the module docstring for shapes and dtypes).

    ``name`` is only used in error messages. ``max_pixels=None`` disables the
    decompression-bomb guard. Raises ``ImageDecodeError`` (a ValueError) for empty,
    truncated, corrupt or non-image bytes and ``ImageTooLargeError`` above the limit.
    """
    if not data:
        raise ImageDecodeError(f"{name}: empty file (0 bytes), not an image")
    claimed = sniff_format(data)
    try:
        img = Image.open(io.BytesIO(data), formats=DECODE_FORMATS)
    except UnidentifiedImageError:
        if claimed:
            raise ImageDecodeError(f"{name}: truncated or corrupt {claimed} file ({len(data)} bytes)") from None
        raise ImageDecodeError(
            f"{name}: not an image in a supported format (PNG, JPEG, WebP, TIFF, BMP); "
            f"first bytes {data[:8]!r}"
        ) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError(f"{name}: truncated or corrupt {claimed or 'image'} header ({exc})") from None
    width, height = img.size
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLargeError(
            f"{name}: {width}x{height} = {width * height:,} pixels exceeds the limit of {max_pixels:,} "
            "(a guard against decompression bombs); raise max_pixels if the image is genuine"
        )
    if width == 0 or height == 0:
        raise ImageDecodeError(f"{name}: image has zero size ({width}x{height})")
    # Camera MPO JPEGs hold extra frames (previews, depth) behind the main image; an
    # animation's first frame alone would silently lose the rest, so those are refused.
    frames = getattr(img, "n_frames", 1) if img.format in ("PNG", "WEBP") else 1
    if frames > 1:
        raise ImageDecodeError(
            f"{name}: animated {img.format} with {frames} frames; only still images are supported "
            "(extract the frames, e.g. with ffmpeg, and upscale those)"
        )
    if img.format == "PNG" and img.mode == "RGB" and "transparency" in img.info and data[24:25] == b"\x10":
        # Pillow reads 16-bit RGB as 8 bits, so the 16-bit transparent colour (tRNS) can
        # no longer be matched exactly: refuse rather than make it opaque or fuzzy.
        raise ImageDecodeError(f"{name}: 16-bit RGB PNG with a transparent colour (tRNS), which cannot be "
                               "decoded exactly; convert it to RGBA (or 8 bits) first")
    try:
        img.load()
        img = ImageOps.exif_transpose(img)
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageDecodeError(f"{name}: truncated or corrupt {img.format} data ({exc})") from None
    return _to_array(img, name)


def _to_array(img: Image.Image, name: str) -> np.ndarray:
    mode = img.mode
    if "transparency" in img.info and (mode.startswith("I;16") or mode == "I"):
        # One 16-bit gray level marked transparent (PNG tRNS). 16-bit with alpha comes
        # out as 8 bits with alpha, as Pillow decodes 16-bit LA/RGBA PNGs.
        values = np.asarray(img)
        alpha = np.where(values == img.info["transparency"], 0, 255).astype(np.uint8)
        gray = _to_8bit(np.clip(values, 0, 65535).astype(np.uint16))
        return np.dstack([gray, alpha])
    if "transparency" in img.info and mode in ("1", "L", "RGB"):
        # One colour marked transparent (PNG tRNS): make it a real alpha channel.
        img = img.convert("RGBA" if mode == "RGB" else "LA")
        mode = img.mode
    if mode == "1":
        img = img.convert("L")
    elif mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info or img.palette.mode == "RGBA" else "RGB")
    elif mode in ("PA", "RGBa"):
        img = img.convert("RGBA")
    elif mode == "La":
        img = img.convert("LA")
    elif mode in ("CMYK", "YCbCr", "LAB", "HSV", "RGBX"):
        img = img.convert("RGB")
    elif mode.startswith("I;16"):
        # I;16B arrives as big-endian; give callers native uint16.
        return np.asarray(img).astype(np.uint16)
    elif mode == "I":
        # 32-bit integer images (some TIFFs) hold 16-bit data in practice.
        return np.clip(np.asarray(img), 0, 65535).astype(np.uint16)
    elif mode == "F":
        raise ImageDecodeError(f"{name}: 32-bit floating-point images are not supported; convert to 8 or 16 bit")
    elif mode not in ("L", "LA", "RGB", "RGBA"):
        raise ImageDecodeError(f"{name}: unsupported image mode {mode!r}")
    return np.asarray(img)


def read_image(url: str, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read and decode an image from any fsspec URL; errors name the URL."""
    try:
        data = storage.read_bytes(url)
    except FileNotFoundError:
        raise FileNotFoundError(f"{url}: no such image file") from None
    except IsADirectoryError:
        raise ImageDecodeError(f"{url}: is a folder, not an image") from None
    return decode_image(data, name=url, max_pixels=max_pixels)


@dataclass(frozen=True)
class EncodeOptions:
    """How ``encode_image`` writes an array."""

    format: str = "png"
    """Output format: ``png``, ``jpeg`` (or ``jpg``) or ``webp``."""
    png_compress_level: int = 1
    """zlib level 0-9. 1 is several times faster than Pillow's default 6 for files
    ~10-20% larger: PNG encoding is the slow stage of a batch run (NOTES.md)."""
    jpeg_quality: int = 95
    """JPEG quality 1-95 (Pillow's scale; above 95 only grows the file)."""
    webp_lossless: bool = False
    """Lossless WebP (exact pixels, slower, larger) instead of lossy."""
    webp_quality: int = 90
    """Lossy WebP quality 0-100 (for lossless: compression effort)."""

    def __post_init__(self):
        fmt = _FORMAT_ALIASES.get(self.format.lower())
        if fmt is None:
            raise ValueError(f"unknown output format {self.format!r}; choose one of png, jpg, webp")
        object.__setattr__(self, "format", fmt)
        if not 0 <= self.png_compress_level <= 9:
            raise ValueError(f"png_compress_level must be 0-9, got {self.png_compress_level}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be 1-100, got {self.jpeg_quality}")
        if not 0 <= self.webp_quality <= 100:
            raise ValueError(f"webp_quality must be 0-100, got {self.webp_quality}")

    @property
    def extension(self) -> str:
        return EXTENSIONS[self.format]


def format_for_path(path: str) -> str:
    """The encode format named by a file extension (``.jpg`` -> ``jpeg``)."""
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    if ext not in _FORMAT_ALIASES:
        raise ValueError(f"{path}: cannot tell the output format from the extension; use .png, .jpg or .webp")
    return _FORMAT_ALIASES[ext]


def _to_8bit(image: np.ndarray) -> np.ndarray:
    if image.dtype == np.uint8:
        return image
    # 65535 / 255 = 257 exactly: rounding division maps 16-bit onto 8-bit levels.
    return ((image.astype(np.uint32) + 128) // 257).astype(np.uint8)


def to_rgb8(image: np.ndarray, keep_gray: bool = False) -> np.ndarray:
    """The 8-bit colour content of a decoded image, for training and scoring: alpha is
    dropped (not composited: the colour channels are the content), 16-bit is rounded to
    8 bits, and grayscale becomes 3 equal channels unless ``keep_gray`` (then ``(H, W)``)."""
    image = _to_8bit(image)
    if image.ndim == 3 and image.shape[2] in (2, 4):
        image = image[..., :-1]
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    if image.ndim == 2 and not keep_gray:
        image = np.repeat(image[..., None], 3, axis=2)
    return np.ascontiguousarray(image)


def _over_white(image: np.ndarray) -> np.ndarray:
    """Composite colour+alpha (last channel) over white, dropping alpha."""
    color = image[..., :-1].astype(np.float32)
    alpha = image[..., -1:].astype(np.float32) / 255.0
    out = color * alpha + 255.0 * (1.0 - alpha)
    out = np.rint(out).astype(np.uint8)
    return out[..., 0] if out.shape[-1] == 1 else out


def to_pil(image: np.ndarray) -> Image.Image:
    """An array in our convention as a Pillow image (uint16 (H, W) becomes I;16)."""
    image = _normalize_shape(image)
    if image.dtype == np.uint16 and image.ndim != 2:
        raise ValueError("16-bit images must be grayscale (H, W): Pillow has no 16-bit colour modes")
    return Image.fromarray(np.ascontiguousarray(image))


def _normalize_shape(image: np.ndarray) -> np.ndarray:
    if not isinstance(image, np.ndarray):
        raise ValueError(f"expected a numpy array, got {type(image).__name__}")
    if image.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"expected a uint8 or uint16 image, got {image.dtype}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (2, 3, 4)):
        raise ValueError(f"expected an (H, W) or (H, W, 2|3|4) image, got shape {image.shape}")
    return image


def encode_image(image: np.ndarray, options: EncodeOptions = EncodeOptions()) -> bytes:
    """Encode an array (module-docstring convention) to PNG, JPEG or WebP bytes."""
    image = _normalize_shape(image)
    buf = io.BytesIO()
    if options.format == "png":
        if image.dtype == np.uint16 and image.ndim != 2:
            raise ValueError("16-bit PNG output is supported for grayscale (H, W) images only")
        to_pil(image).save(buf, "PNG", compress_level=options.png_compress_level)
    elif options.format == "jpeg":
        image = _to_8bit(image)
        if image.ndim == 3 and image.shape[2] in (2, 4):
            image = _over_white(image)
        to_pil(image).save(buf, "JPEG", quality=options.jpeg_quality)
    else:
        image = _to_8bit(image)
        if options.webp_lossless:
            to_pil(image).save(buf, "WEBP", lossless=True, quality=options.webp_quality, exact=True)
        else:
            to_pil(image).save(buf, "WEBP", quality=options.webp_quality)
    return buf.getvalue()


def write_image(url: str, image: np.ndarray, options: EncodeOptions | None = None) -> None:
    """Encode and write atomically; the format comes from ``options`` or the extension."""
    if options is None:
        options = EncodeOptions(format=format_for_path(url))
    storage.write_bytes(url, encode_image(image, options))
