"""Image codecs: bytes (from any fsspec URL) to numpy arrays and back.

Array convention, used by the Upscaler and everything that calls it:

- ``(H, W)``      grayscale, uint8 (mode L) or uint16 (mode I;16)
- ``(H, W, 2)``   grayscale + alpha, uint8 (LA)
- ``(H, W, 3)``   RGB, uint8 or uint16
- ``(H, W, 4)``   RGBA, uint8 or uint16

Decoding reads PNG, JPEG (and camera MPO JPEGs), WebP, TIFF and BMP in modes 1, L, LA,
RGB, RGBA, P (palette, with or without transparency), CMYK, YCbCr, I;16 (any byte
order) and I, and applies the EXIF orientation. Pillow parses every header (format
check, size for the bomb guard, EXIF) and decodes the pixels, except for 16-bit
*colour*, which Pillow would cut to 8 bits (it has no 16-bit RGB mode): 16-bit RGB/RGBA
PNG and 16-bit RGB/RGBA TIFF are decoded by OpenCV into uint16 arrays (a 16-bit TIFF
with separate colour planes is refused: Pillow and OpenCV both scramble it).
A PNG colour marked transparent (tRNS) becomes an alpha channel: exactly, in 16 bits,
for 16-bit RGB; 16-bit gray with one comes out as 8-bit LA, like 16-bit LA PNGs (there
is no 16-bit gray + alpha in the convention). Animated PNG/WebP are refused rather than
cut to one frame.

Encoding writes PNG (8-bit, 16-bit grayscale, 16-bit RGB/RGBA), JPEG and WebP. JPEG has
no alpha, so transparent images are composited over white; JPEG and WebP have no 16-bit,
so 16-bit images are rounded to 8 bits for them.

PNG is written by ``sr_core.png`` (fpng for 8-bit colour at the default level, libpng
through ``imagecodecs`` otherwise; Pillow and OpenCV without those packages).
"""

from __future__ import annotations

import io
import os
import struct
import threading
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from sr_core import storage
from sr_core.png import encode_png, png_encoder  # noqa: F401  (png_encoder: part of this module's API)

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


# Guards Pillow's process-wide limit while open_image changes it.
_PILLOW_LIMIT = threading.Lock()


def open_image(data: bytes, name: str = "<bytes>", max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open image bytes with Pillow (header parsed, no pixels decoded yet) and refuse an
    image above ``max_pixels`` (``ImageTooLargeError``) or one that is not an image in a
    supported format (``ImageDecodeError``).

    Pillow has a bomb check of its own, process-wide (``Image.MAX_IMAGE_PIXELS``: a
    warning above 89 Mpx, an error above twice that). Ours is per call and can be
    raised, so Pillow's is raised to the largest limit a caller has asked for — never
    lowered, left alone until a decode asks — its warning is not passed on (our check
    follows at once), and its error becomes ours."""
    with _PILLOW_LIMIT:
        if Image.MAX_IMAGE_PIXELS is not None and (max_pixels is None or max_pixels > Image.MAX_IMAGE_PIXELS):
            Image.MAX_IMAGE_PIXELS = max_pixels
    claimed = sniff_format(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=DECODE_FORMATS)
    except Image.DecompressionBombError:
        # Pillow refuses above twice its limit without saying the size; ours names it
        # (the header alone is read again, with Pillow's check off for that moment).
        with _PILLOW_LIMIT:
            saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
            try:
                img = Image.open(io.BytesIO(data), formats=DECODE_FORMATS)
            finally:
                Image.MAX_IMAGE_PIXELS = saved
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
    return img


def decode_image(data: bytes, name: str = "<bytes>", max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode image bytes to an array (see the module docstring for shapes and dtypes).

    ``name`` is only used in error messages. ``max_pixels=None`` disables the
    decompression-bomb guard. Raises ``ImageDecodeError`` (a ValueError) for empty,
    truncated, corrupt or non-image bytes and ``ImageTooLargeError`` above the limit.
    """
    if not data:
        raise ImageDecodeError(f"{name}: empty file (0 bytes), not an image")
    img = open_image(data, name, max_pixels)
    width, height = img.size
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
    alpha_kind = _sixteen_bit_colour_alpha(img, data, name)
    if alpha_kind is not None:
        return _decode_16_bit_colour(data, img, alpha_kind, name)
    try:
        img.load()
        img = ImageOps.exif_transpose(img)
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageDecodeError(f"{name}: truncated or corrupt {img.format} data ({exc})") from None
    return _to_array(img, name)


def _to_array(img: Image.Image, name: str) -> np.ndarray:
    mode = img.mode
    if "transparency" in img.info and (mode.startswith("I;16") or mode == "I"):
        # One 16-bit gray level marked transparent (PNG tRNS). The convention has no
        # 16-bit gray + alpha: it comes out as 8-bit LA, as Pillow decodes 16-bit LA PNGs.
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


# ---------------------------------------------------------------- 16-bit colour (OpenCV)

# What the fourth channel of a 16-bit colour image is (see _sixteen_bit_colour_alpha).
_NO_ALPHA, _ALPHA, _PREMULTIPLIED_ALPHA, _UNUSED_EXTRA, _COLOUR_KEY = (
    "none", "alpha", "premultiplied", "unused", "colour key")
# OpenCV refuses to decode more pixels than this (its CV_IO_MAX_IMAGE_PIXELS default).
_OPENCV_MAX_PIXELS = 1 << 30

_ORIENTATION_TAG = 0x0112


def _as_tuple(value) -> tuple:
    return value if isinstance(value, tuple) else (value,)


def _sixteen_bit_colour_alpha(img: Image.Image, data: bytes, name: str) -> str | None:
    """For a 16-bit RGB(A) image that OpenCV should decode, what its 4th channel is;
    None for everything Pillow decodes (without decoding a pixel: headers only)."""
    if img.format == "PNG":
        # IHDR is the first chunk (Pillow checked): bit depth at byte 24, colour type at 25.
        if data[24] != 16 or data[25] not in (2, 6):
            return None
        if data[25] == 6:
            return _ALPHA
        return _COLOUR_KEY if "transparency" in img.info else _NO_ALPHA
    if img.format != "TIFF":
        return None
    tags = img.tag_v2
    samples = tags.get(277, 1)
    bits = _as_tuple(tags.get(258, (1,)))
    if (samples not in (3, 4) or any(b != 16 for b in bits) or tags.get(262) != 2  # RGB photometric
            or any(f != 1 for f in _as_tuple(tags.get(339, (1,))))):  # unsigned integers
        return None
    if tags.get(284, 1) != 1:
        # Both Pillow and OpenCV scramble 16-bit colour stored as separate planes.
        raise ImageDecodeError(f"{name}: 16-bit colour TIFF with separate colour planes (PlanarConfiguration 2) "
                               "is not supported; save it with interleaved (contiguous) samples")
    if samples == 3:
        return _NO_ALPHA
    extra = _as_tuple(tags.get(338, (0,)))[0]
    return {1: _PREMULTIPLIED_ALPHA, 2: _ALPHA}.get(extra, _UNUSED_EXTRA)


def _decode_16_bit_colour(data: bytes, img: Image.Image, alpha_kind: str, name: str) -> np.ndarray:
    import cv2  # only 16-bit colour needs OpenCV: other images never pay for the import

    # The stored size: Pillow reports a TIFF's size already turned by its orientation.
    width, height = (img.tag_v2[256], img.tag_v2[257]) if img.format == "TIFF" else img.size
    if width * height > _OPENCV_MAX_PIXELS:
        raise ImageDecodeError(f"{name}: {width}x{height} 16-bit colour image is above OpenCV's decoding limit "
                               f"of {_OPENCV_MAX_PIXELS:,} pixels; split it into parts first")
    if img.format == "PNG":
        orientation = _png_orientation(img, data)
    else:
        orientation = img.getexif().get(_ORIENTATION_TAG, 1)  # TIFF: reads the IFD, no pixels
        # OpenCV 5 applies a TIFF's orientation itself even with IMREAD_UNCHANGED (older
        # versions do not): neutralize the tag so that the orientation is applied once,
        # here, the same way for every format and OpenCV version.
        data = _tiff_with_orientation_1(data)
    try:
        pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error:
        pixels = None
    if (pixels is None or pixels.dtype != np.uint16 or pixels.ndim != 3 or pixels.shape[:2] != (height, width)
            or pixels.shape[2] < (4 if alpha_kind in (_ALPHA, _PREMULTIPLIED_ALPHA) else 3)):
        raise ImageDecodeError(f"{name}: truncated or corrupt 16-bit colour {img.format} data "
                               "(the image data could not be decoded)")
    if alpha_kind in (_ALPHA, _PREMULTIPLIED_ALPHA):
        image = cv2.cvtColor(pixels[..., :4], cv2.COLOR_BGRA2RGBA)
        if alpha_kind == _PREMULTIPLIED_ALPHA:
            image = _unpremultiply(image)
    else:
        # A PNG colour key may come back from OpenCV as a 4th channel or not, by version:
        # the alpha is computed below from the key itself either way.
        image = cv2.cvtColor(np.ascontiguousarray(pixels[..., :3]), cv2.COLOR_BGR2RGB)
        if alpha_kind == _COLOUR_KEY:
            key = np.array(img.info["transparency"], dtype=np.uint16)
            alpha = np.where((image == key).all(axis=2), 0, 65535).astype(np.uint16)
            image = np.dstack([image, alpha])
    return np.ascontiguousarray(_apply_orientation(image, orientation))


def _unpremultiply(rgba: np.ndarray) -> np.ndarray:
    """Straight alpha from premultiplied (TIFF "associated alpha"), rounded; fully
    transparent pixels get colour 0, as their colour is lost."""
    alpha = rgba[..., 3:].astype(np.float64)
    colour = rgba[..., :3] * 65535.0 / np.maximum(alpha, 1.0)
    colour = np.where(alpha > 0, np.clip(np.rint(colour), 0, 65535), 0)
    return np.dstack([colour.astype(np.uint16), rgba[..., 3]])


def _png_orientation(img: Image.Image, data: bytes) -> int:
    """The EXIF orientation of a PNG, without decoding its pixels. Pillow's PNG
    ``getexif`` decodes the whole image to reach an eXIf chunk after the image data, so
    that chunk is found by walking the chunk list instead."""
    if "exif" not in img.info:
        exif = _png_chunk(data, b"eXIf")
        if exif is not None:
            img.info["exif"] = b"Exif\x00\x00" + exif  # as Pillow stores it
    # The base class reads EXIF (and XMP orientation) from what Pillow has parsed.
    return Image.Image.getexif(img).get(_ORIENTATION_TAG, 1)


def _png_chunk(data: bytes, kind: bytes) -> bytes | None:
    """The body of the first PNG chunk of a kind, or None (a damaged chunk list ends
    the search; the decoder reports the damage)."""
    pos = 8
    while pos + 8 <= len(data):
        length, chunk_kind = struct.unpack(">I4s", data[pos:pos + 8])
        if chunk_kind == kind:
            return data[pos + 8:pos + 8 + length]
        if chunk_kind == b"IEND":
            return None
        pos += 12 + length
    return None


def _tiff_with_orientation_1(data: bytes) -> bytes:
    """The TIFF bytes with the first image's Orientation tag set to 1 (top-left); the
    bytes themselves if it has none or the directory cannot be read (then the decoder
    reports the damage)."""
    endian = {b"II": "<", b"MM": ">"}.get(data[:2])
    if endian is None or len(data) < 16:
        return data
    version = struct.unpack(endian + "H", data[2:4])[0]
    if version == 42:  # classic TIFF: 2-byte entry count, 12-byte entries, 4-byte values
        ifd = struct.unpack(endian + "I", data[4:8])[0]
        count_format, entry_size, value_offset = "H", 12, 8
    elif version == 43:  # BigTIFF: 8-byte entry count, 20-byte entries, 8-byte values
        ifd = struct.unpack(endian + "Q", data[8:16])[0]
        count_format, entry_size, value_offset = "Q", 20, 12
    else:
        return data
    count_size = struct.calcsize(count_format)
    if ifd + count_size > len(data):
        return data
    entries = struct.unpack(endian + count_format, data[ifd:ifd + count_size])[0]
    for index in range(entries):
        entry = ifd + count_size + index * entry_size
        if entry + entry_size > len(data):
            return data
        tag, kind = struct.unpack(endian + "HH", data[entry:entry + 4])
        if tag == _ORIENTATION_TAG:
            value_format = {3: "H", 4: "I"}.get(kind)  # SHORT as the spec says; LONG seen too
            if value_format is None:
                return data
            patched = bytearray(data)
            struct.pack_into(endian + value_format, patched, entry + value_offset, 1)
            return bytes(patched)
    return data


def _apply_orientation(image: np.ndarray, orientation: int) -> np.ndarray:
    """Turn an (H, W, C) array stored with an EXIF orientation upright (the transforms
    of Pillow's ``exif_transpose``; other values are left alone like Pillow does)."""
    if orientation == 2:
        return image[:, ::-1]
    if orientation == 3:
        return image[::-1, ::-1]
    if orientation == 4:
        return image[::-1]
    if orientation == 5:
        return image.swapaxes(0, 1)
    if orientation == 6:
        return np.rot90(image, -1)
    if orientation == 7:
        return image[::-1, ::-1].swapaxes(0, 1)
    if orientation == 8:
        return np.rot90(image, 1)
    return image


def read_image_bytes(url: str) -> bytes:
    """The bytes of an image file at any fsspec URL; errors name the URL."""
    try:
        return storage.read_bytes(url)
    except FileNotFoundError:
        raise FileNotFoundError(f"{url}: no such image file") from None
    except IsADirectoryError:
        raise ImageDecodeError(f"{url}: is a folder, not an image") from None


def decode_rgb8(data: bytes, name: str = "<bytes>", max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode to ``(H, W, 3)`` uint8 RGB, what training uses: alpha dropped, gray repeated,
    16-bit rounded. ValueError naming ``name`` for anything that is not a readable image."""
    return to_rgb8(decode_image(data, name, max_pixels))


def read_image(url: str, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read and decode an image from any fsspec URL; errors name the URL."""
    return decode_image(read_image_bytes(url), name=url, max_pixels=max_pixels)


@dataclass(frozen=True)
class EncodeOptions:
    """How ``encode_image`` writes an array."""

    format: str = "png"
    """Output format: ``png``, ``jpeg`` (or ``jpg``) or ``webp``."""
    png_compress_level: int | None = None
    """zlib level 0-9 (libpng), or None: the fastest writer for the image (fpng for 8-bit
    RGB/RGBA, ~10x Pillow at level 1 for files ~10% larger; libpng level 1 with the RLE
    strategy for the rest). PNG encoding is the slow stage of a batch run beside a GPU."""
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
        if self.png_compress_level is not None and not 0 <= self.png_compress_level <= 9:
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
        raise ValueError("16-bit images must be grayscale (H, W) for Pillow (it has no 16-bit colour modes); "
                         "encode_image writes 16-bit colour PNG")
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


def gpu_jpeg_encoder() -> str | None:
    """The GPU JPEG encoder importable here with a CUDA device visible: ``torchvision``
    (nvJPEG through ``torchvision.io.encode_jpeg`` on CUDA tensors, torchvision >= 0.19) or
    ``nvimgcodec`` (NVIDIA nvImageCodec); None without either (then JPEG is encoded on the
    CPU). Untested here: the test machines have no GPU, and torchvision does not import
    beside their CPU torch build; ``./dev gpu-check`` runs it on a GPU."""
    import torch

    if not torch.cuda.is_available():
        return None
    try:
        import torchvision.io  # noqa: F401

        if hasattr(torchvision.io, "encode_jpeg"):
            return "torchvision"
    except Exception:  # torchvision built for another torch fails at import with various errors
        pass
    try:
        from nvidia import nvimgcodec  # noqa: F401

        return "nvimgcodec"
    except ImportError:
        return None


def _encode_jpeg_on_gpu(image: np.ndarray, quality: int, encoder: str) -> bytes:
    """8-bit gray (H, W) or RGB (H, W, 3) as JPEG, encoded on the current CUDA device."""
    import torch

    hwc = torch.from_numpy(np.ascontiguousarray(image if image.ndim == 3 else image[..., None])).cuda()
    if encoder == "torchvision":
        import torchvision.io

        data = torchvision.io.encode_jpeg(hwc.permute(2, 0, 1).contiguous(), quality=quality)
        return data.cpu().numpy().tobytes()
    from nvidia import nvimgcodec

    nv_image = nvimgcodec.as_image(hwc)
    return bytes(nvimgcodec.Encoder().encode(nv_image, "jpeg", params=nvimgcodec.EncodeParams(quality=quality)))


def encode_image(image: np.ndarray, options: EncodeOptions = EncodeOptions(), device: str = "cpu") -> bytes:
    """Encode an array (module-docstring convention) to PNG, JPEG or WebP bytes.

    uint16 colour is written as 16-bit PNG; JPEG and WebP round it to 8 bits. ``device``
    ``cuda``: 8-bit gray and RGB JPEG is encoded on the GPU where ``gpu_jpeg_encoder()``
    finds an encoder (the CPU's cores are what a GPU worker runs short of); everything
    else, and every case without one, on the CPU."""
    image = _normalize_shape(image)
    if options.format == "jpeg" and device.startswith("cuda") and (image.ndim == 2 or image.shape[2] == 3):
        encoder = gpu_jpeg_encoder()
        if encoder is not None:
            return _encode_jpeg_on_gpu(_to_8bit(image), min(options.jpeg_quality, 100), encoder)
    buf = io.BytesIO()
    if options.format == "png":
        if image.dtype == np.uint16 and image.ndim == 3 and image.shape[2] == 2:
            raise ValueError("16-bit gray + alpha (H, W, 2) cannot be written as PNG; write it as 16-bit "
                             "RGBA (repeat the gray channel) or round it to 8 bits")
        return encode_png(image, options.png_compress_level)
    if options.format == "jpeg":
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
