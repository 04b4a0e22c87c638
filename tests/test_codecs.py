"""Image codecs: every mode and bit depth round-trips (size, mode, depth, alpha; 16-bit
colour stays 16-bit), EXIF orientation is applied, the bomb guard and every kind of bad input give clear errors
naming the input, and encoding options do what they say."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from sr_core import codecs, png
from sr_core.codecs import EncodeOptions, ImageDecodeError, ImageTooLargeError, decode_image, encode_image

IMAGES = Path(__file__).resolve().parent.parent / "assets" / "images"


def photo(mode: str = "RGB", size=(37, 23)) -> Image.Image:
    """A real photograph at an odd size, in a given Pillow mode."""
    return Image.open(IMAGES / "coffee.png").convert("RGB").resize(size, Image.Resampling.BICUBIC).convert(mode)


def pillow_bytes(img: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def with_alpha(img: Image.Image) -> np.ndarray:
    """The photo's pixels plus an alpha gradient (so alpha is not trivially 255)."""
    arr = np.asarray(img)
    arr = arr[..., None] if arr.ndim == 2 else arr
    alpha = np.linspace(0, 255, arr.shape[0] * arr.shape[1]).reshape(arr.shape[:2] + (1,)).astype(np.uint8)
    return np.concatenate([arr, alpha], axis=2)


# ---------------------------------------------------------------- decoding every mode

LOSSLESS = ["PNG", "TIFF", "BMP"]


MODES = [("L", ()), ("RGB", (3,)), ("LA", (2,)), ("RGBA", (4,))]


# BMP cannot store LA (Pillow refuses to write it), so that pair is not generated.
@pytest.mark.parametrize("fmt,mode,shape_tail", [
    (fmt, mode, tail) for fmt in LOSSLESS + ["WEBP"] for mode, tail in MODES if (fmt, mode) != ("BMP", "LA")
])
def test_decode_modes_exactly(fmt, mode, shape_tail):
    img = photo(mode)
    if mode in ("LA", "RGBA"):
        # A varying alpha: encoders may drop an all-opaque one.
        img = Image.fromarray(with_alpha(photo(mode[:-1])))
    data = pillow_bytes(img, fmt, **({"lossless": True, "exact": True} if fmt == "WEBP" else {}))
    arr = decode_image(data, "x")
    expected = np.asarray(img)
    if fmt == "WEBP" and mode in ("L", "LA"):
        # WebP has no gray: it stores gray as RGB(A) with equal channels.
        assert arr.shape == (23, 37, len(shape_tail) and 4 or 3)
        np.testing.assert_array_equal(arr[..., 0], expected if mode == "L" else expected[..., 0])
        return
    if fmt == "BMP" and mode == "RGBA":
        # Pillow writes BMP without alpha.
        expected = expected[..., :3]
    assert arr.dtype == np.uint8
    np.testing.assert_array_equal(arr, expected)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_decode_16_bit_grayscale(fmt):
    values = ((np.asarray(photo("L")).astype(np.uint32) * 257 + np.arange(37)) % 65536).astype(np.uint16)
    data = pillow_bytes(Image.fromarray(values.astype(np.uint16)), fmt)
    arr = decode_image(data, "x")
    assert arr.dtype == np.uint16 and arr.shape == (23, 37)
    np.testing.assert_array_equal(arr, values)


def test_decode_16_bit_big_endian_and_32_bit_int_modes():
    values = np.arange(23 * 37, dtype=np.uint16).reshape(23, 37) * 60
    big = Image.frombytes("I;16B", (37, 23), values.astype(">u2").tobytes())
    arr = decode_image(pillow_bytes(big, "TIFF"), "x")
    assert arr.dtype == np.uint16 and arr.dtype.byteorder in ("=", "|", "<")
    np.testing.assert_array_equal(arr, values)
    as_int = Image.fromarray(values.astype(np.int32), mode="I")
    np.testing.assert_array_equal(decode_image(pillow_bytes(as_int, "TIFF"), "x"), values)


def test_decode_palette_with_and_without_transparency():
    rgb = photo("RGB")
    pal = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    arr = decode_image(pillow_bytes(pal, "PNG"), "x")
    assert arr.shape == (23, 37, 3)
    np.testing.assert_array_equal(arr, np.asarray(pal.convert("RGB")))
    pal.info["transparency"] = 0
    data = pillow_bytes(pal, "PNG", transparency=0)
    arr = decode_image(data, "x")
    assert arr.shape == (23, 37, 4)
    index = np.asarray(pal)
    assert (arr[..., 3][index == 0] == 0).all() and (arr[..., 3][index != 0] == 255).all()


def test_decode_cmyk_jpeg_and_tiff_to_rgb():
    rgb = photo("RGB")
    cmyk = rgb.convert("CMYK")
    for fmt in ("JPEG", "TIFF"):
        arr = decode_image(pillow_bytes(cmyk, fmt, **({"quality": 95} if fmt == "JPEG" else {})), "x")
        assert arr.shape == (23, 37, 3) and arr.dtype == np.uint8
        error = np.abs(arr.astype(int) - np.asarray(rgb).astype(int)).mean()
        assert error < 6 if fmt == "JPEG" else error == 0


def test_decode_jpeg_gray_and_colour():
    for mode, tail in (("L", ()), ("RGB", (3,))):
        img = photo(mode, size=(64, 48))
        arr = decode_image(pillow_bytes(img, "JPEG", quality=95), "x")
        assert arr.shape == (48, 64) + tail
        assert np.abs(arr.astype(int) - np.asarray(img).astype(int)).mean() < 6


# ---------------------------------------------------------------- EXIF orientation


@pytest.mark.parametrize("orientation,transform", [
    (1, lambda a: a),
    (3, lambda a: np.rot90(a, 2)),
    (6, lambda a: np.rot90(a, -1)),  # stored rotated: display turns it 90° clockwise
    (8, lambda a: np.rot90(a, 1)),
    (2, lambda a: a[:, ::-1]),
])
def test_exif_orientation_is_applied(orientation, transform):
    img = photo("RGB")
    exif = Image.Exif()
    exif[0x0112] = orientation
    arr = decode_image(pillow_bytes(img, "PNG", exif=exif), "x")
    np.testing.assert_array_equal(arr, transform(np.asarray(img)))
    jpeg = decode_image(pillow_bytes(img, "JPEG", exif=exif, quality=95), "x")
    assert jpeg.shape == transform(np.asarray(img)).shape


def test_exif_orientation_on_16_bit():
    values = np.arange(6 * 10, dtype=np.uint16).reshape(6, 10) * 1000
    exif = Image.Exif()
    exif[0x0112] = 6
    arr = decode_image(pillow_bytes(Image.fromarray(values), "PNG", exif=exif), "x")
    assert arr.dtype == np.uint16
    np.testing.assert_array_equal(arr, np.rot90(values, -1))


# ---------------------------------------------------------------- bad input


def png_claiming_size(width: int, height: int) -> bytes:
    """A small PNG whose header claims another size (a decompression bomb's header:
    a real 20000 x 20000 black PNG is only ~400 kB)."""
    data = bytearray(pillow_bytes(Image.new("L", (10, 10)), "PNG"))
    ihdr = 8 + 8  # signature, then length + b"IHDR"
    data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4:ihdr + 13])))
    return bytes(data)


def test_bomb_guard_checks_the_header_before_decoding():
    big = png_claiming_size(20000, 20000)
    with pytest.raises(ImageTooLargeError, match=r"bomb\.png: 20000x20000 = 400,000,000 pixels exceeds the limit"):
        decode_image(big, "bomb.png")
    small = pillow_bytes(photo("RGB"), "PNG")
    with pytest.raises(ImageTooLargeError, match="limit of 100"):
        decode_image(small, "p.png", max_pixels=100)
    assert decode_image(small, "p.png", max_pixels=37 * 23).shape == (23, 37, 3)
    assert decode_image(small, "p.png", max_pixels=None).shape == (23, 37, 3)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "TIFF", "BMP"])
def test_truncated_files_are_named_and_explained(fmt):
    data = pillow_bytes(photo("RGB", size=(200, 150)), fmt)
    for cut in (len(data) // 2, 40):
        with pytest.raises(ImageDecodeError, match=rf"^cut\.{fmt.lower()}: .*(truncated|corrupt)"):
            decode_image(data[:cut], f"cut.{fmt.lower()}")


def test_empty_and_non_image_bytes():
    with pytest.raises(ImageDecodeError, match=r"^e\.png: empty file"):
        decode_image(b"", "e.png")
    with pytest.raises(ImageDecodeError, match=r"^notes\.png: not an image in a supported format"):
        decode_image(b"these are my notes, not a picture", "notes.png")
    # Formats outside the list are refused too (GIF here), never handed to other decoders.
    gif = pillow_bytes(photo("P"), "GIF")
    with pytest.raises(ImageDecodeError, match="not an image in a supported format"):
        decode_image(gif, "anim.gif")


def test_read_image_names_the_url(tmp_path):
    path = tmp_path / "half.png"
    path.write_bytes(pillow_bytes(photo("RGB", size=(200, 150)), "PNG")[:3000])
    with pytest.raises(ImageDecodeError, match=str(path)):
        codecs.read_image(str(path))
    with pytest.raises(FileNotFoundError, match="missing.png"):
        codecs.read_image(str(tmp_path / "missing.png"))
    good = tmp_path / "good.png"
    good.write_bytes(pillow_bytes(photo("RGB"), "PNG"))
    assert codecs.read_image(f"file://{good}").shape == (23, 37, 3)


# ---------------------------------------------------------------- encoding round trips


@pytest.mark.parametrize("kind", ["L", "L16", "LA", "RGB", "RGBA"])
def test_png_round_trip_keeps_size_mode_depth_and_alpha(kind):
    base = photo("L" if kind.startswith("L") else "RGB")
    if kind == "L16":
        arr = np.asarray(base).astype(np.uint16) * 257 + 3
    elif kind in ("LA", "RGBA"):
        arr = with_alpha(base)
    else:
        arr = np.asarray(base)
    data = encode_image(arr, EncodeOptions("png"))
    assert data.startswith(b"\x89PNG")
    back = decode_image(data, "x")
    assert back.dtype == arr.dtype and back.shape == arr.shape
    np.testing.assert_array_equal(back, arr)


@pytest.mark.parametrize("kind", ["L", "RGB", "RGBA", "LA"])
def test_webp_lossless_round_trip(kind):
    base = photo("L" if kind.startswith("L") else "RGB")
    arr = with_alpha(base) if kind.endswith("A") else np.asarray(base)
    back = decode_image(encode_image(arr, EncodeOptions("webp", webp_lossless=True)), "x")
    if kind.startswith("L"):  # WebP stores gray as RGB(A)
        np.testing.assert_array_equal(back[..., 0], arr if arr.ndim == 2 else arr[..., 0])
        if kind == "LA":
            np.testing.assert_array_equal(back[..., 3], arr[..., 1])
    else:
        np.testing.assert_array_equal(back, arr)


def test_jpeg_and_lossy_webp_quality_settings_matter():
    arr = np.asarray(photo("RGB", size=(160, 120)))
    high = encode_image(arr, EncodeOptions("jpg", jpeg_quality=95))
    low = encode_image(arr, EncodeOptions("jpeg", jpeg_quality=20))
    assert len(low) < len(high)
    assert np.abs(decode_image(high, "x").astype(int) - arr).mean() < np.abs(decode_image(low, "x").astype(int) - arr).mean()
    webp_high = encode_image(arr, EncodeOptions("webp", webp_quality=95))
    webp_low = encode_image(arr, EncodeOptions("webp", webp_quality=10))
    assert len(webp_low) < len(webp_high)


def test_jpeg_flattens_alpha_over_white_and_16_bit_to_8_bit():
    arr = np.zeros((8, 8, 4), np.uint8)
    arr[..., 0] = 255  # red...
    arr[:4, :, 3] = 255  # ...opaque on top, transparent below
    back = decode_image(encode_image(arr, EncodeOptions("jpeg", jpeg_quality=95)), "x")
    assert back.shape == (8, 8, 3)
    assert np.abs(back[1, :].astype(int) - [255, 0, 0]).max() < 10
    assert np.abs(back[6, :].astype(int) - [255, 255, 255]).max() < 10
    gray16 = np.full((8, 8), 257 * 200, np.uint16)
    back16 = decode_image(encode_image(gray16, EncodeOptions("jpeg")), "x")
    assert back16.dtype == np.uint8 and np.abs(back16.astype(int) - 200).max() <= 1


def test_png_compression_level_is_configurable_and_fast_by_default():
    arr = np.asarray(photo("RGB", size=(200, 150)))
    fast = encode_image(arr)
    small = encode_image(arr, EncodeOptions("png", png_compress_level=9))
    assert EncodeOptions().png_compress_level is None
    assert len(small) < len(fast)
    np.testing.assert_array_equal(decode_image(small, "x"), decode_image(fast, "x"))


def test_encode_rejects_what_it_cannot_write():
    with pytest.raises(ValueError, match="format"):
        EncodeOptions("gif")
    with pytest.raises(ValueError, match="16-bit gray \\+ alpha"):
        encode_image(np.zeros((4, 4, 2), np.uint16))
    with pytest.raises(ValueError, match="uint8 or uint16"):
        encode_image(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="jpeg_quality"):
        EncodeOptions("jpeg", jpeg_quality=0)


def test_write_image_picks_the_format_from_the_extension(tmp_path):
    arr = np.asarray(photo("RGB"))
    for name, magic in (("a.png", b"\x89PNG"), ("b.jpg", b"\xff\xd8\xff"), ("c.webp", b"RIFF")):
        codecs.write_image(str(tmp_path / name), arr)
        assert (tmp_path / name).read_bytes().startswith(magic)
    with pytest.raises(ValueError, match="extension"):
        codecs.write_image(str(tmp_path / "d.xyz"), arr)


# ---------------------------------------------------------------- transparency and animation


def test_single_colour_transparency_becomes_an_alpha_channel():
    """PNG's tRNS chunk on gray, RGB and 16-bit gray images marks one colour as
    transparent; dropping it would turn transparent pixels opaque in the output."""
    gray = np.asarray(photo("L"))
    key = int(gray[5, 7])
    arr = decode_image(pillow_bytes(Image.fromarray(gray), "PNG", transparency=key), "x")
    assert arr.shape == (23, 37, 2) and arr.dtype == np.uint8
    np.testing.assert_array_equal(arr[..., 0], gray)
    np.testing.assert_array_equal(arr[..., 1], np.where(gray == key, 0, 255))
    rgb = np.asarray(photo("RGB"))
    key_rgb = tuple(int(v) for v in rgb[5, 7])
    arr = decode_image(pillow_bytes(Image.fromarray(rgb), "PNG", transparency=key_rgb), "x")
    assert arr.shape == (23, 37, 4)
    np.testing.assert_array_equal(arr[..., :3], rgb)
    np.testing.assert_array_equal(arr[..., 3], np.where((rgb == key_rgb).all(axis=2), 0, 255))
    # 16-bit with alpha: like 16-bit RGBA/LA PNGs, it comes out as 8 bits with alpha.
    gray16 = np.asarray(photo("L")).astype(np.uint16) * 257 + 1
    key16 = int(gray16[5, 7])
    arr = decode_image(pillow_bytes(Image.fromarray(gray16), "PNG", transparency=key16), "x")
    assert arr.shape == (23, 37, 2) and arr.dtype == np.uint8
    np.testing.assert_array_equal(arr[..., 0], ((gray16.astype(np.uint32) + 128) // 257).astype(np.uint8))
    np.testing.assert_array_equal(arr[..., 1], np.where(gray16 == key16, 0, 255))


def test_transparency_survives_exif_rotation():
    gray = np.asarray(photo("L"))
    exif = Image.Exif()
    exif[0x0112] = 6
    arr = decode_image(pillow_bytes(Image.fromarray(gray), "PNG", transparency=int(gray[0, 0]), exif=exif), "x")
    assert arr.shape == (37, 23, 2)
    np.testing.assert_array_equal(arr[..., 0], np.rot90(gray, -1))
    assert arr[0, -1, 1] == 0  # the top-left pixel, now top-right, stays transparent


@pytest.mark.parametrize("fmt,params", [("PNG", {}), ("WEBP", {"lossless": True})])
def test_animations_are_refused_not_cut_to_one_frame(fmt, params):
    frames = [photo("RGB"), photo("RGB").transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    data = pillow_bytes(frames[0], fmt, save_all=True, append_images=frames[1:], **params)
    with pytest.raises(ImageDecodeError, match=rf"^anim\.x: animated {fmt} with 2 frames.*still images"):
        decode_image(data, "anim.x")
    # A still image saved the same way still decodes.
    still = pillow_bytes(frames[0], fmt, save_all=True, **params)
    assert decode_image(still, "still.x").shape == (23, 37, 3)


# ---------------------------------------------------------------- 16-bit colour


def colour16(channels: int, size=(37, 23)) -> np.ndarray:
    """A 16-bit photo using the full 0..65535 range with low bits that 8-bit data
    cannot have (not multiples of 257), plus a varying alpha for 4 channels."""
    rgb = np.asarray(photo("RGB", size)).astype(np.uint32) * 257
    rgb = ((rgb + np.arange(size[0])[None, :, None] * 97 + np.arange(3) * 31) % 65536).astype(np.uint16)
    rgb[0, 0], rgb[0, 1] = 0, 65535  # both ends of the range
    if channels == 3:
        return rgb
    alpha = np.linspace(0, 65535, size[0] * size[1]).reshape(size[1], size[0]).astype(np.uint16)
    return np.dstack([rgb, alpha])


def round_to_8(values: np.ndarray) -> np.ndarray:
    return ((values.astype(np.uint32) + 128) // 257).astype(np.uint8)


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png16(pixels: np.ndarray, extra_chunks: bytes = b"", trailing_chunks: bytes = b"") -> bytes:
    """A 16-bit RGB(A) PNG built by hand (independent of the encoder under test);
    ``extra_chunks`` go before the image data, ``trailing_chunks`` after it."""
    height, width, channels = pixels.shape
    colour_type = {3: 2, 4: 6}[channels]
    big_endian = pixels.astype(">u2")
    rows = b"".join(b"\x00" + big_endian[y].tobytes() for y in range(height))
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0))
            + extra_chunks + png_chunk(b"IDAT", zlib.compress(rows)) + trailing_chunks + png_chunk(b"IEND", b""))


def tiff_bytes(pixels: np.ndarray, **params) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, pixels, photometric="rgb", **params)
    return buf.getvalue()


@pytest.mark.parametrize("channels", [3, 4])
def test_16_bit_colour_png_decodes_and_round_trips_exactly(channels):
    values = colour16(channels)
    assert (values % 257 != 0).mean() > 0.9
    decoded = decode_image(png16(values), "x.png")
    assert decoded.dtype == np.uint16 and decoded.shape == values.shape
    np.testing.assert_array_equal(decoded, values)
    encoded = encode_image(values, EncodeOptions("png"))
    # A real 16-bit PNG: IHDR bit depth 16, colour type RGB (2) or RGBA (6).
    assert encoded[24] == 16 and encoded[25] == {3: 2, 4: 6}[channels]
    back = decode_image(encoded, "y.png")
    assert back.dtype == np.uint16
    np.testing.assert_array_equal(back, values)
    # Pillow, an independent decoder, sees the same picture in 8 bits (its high bytes).
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(encoded))), (values >> 8).astype(np.uint8))


def test_16_bit_colour_png_compression_level_is_used():
    values = colour16(3, size=(120, 90))
    fast = encode_image(values, EncodeOptions("png", png_compress_level=0))
    small = encode_image(values, EncodeOptions("png", png_compress_level=9))
    assert len(small) < len(fast)
    np.testing.assert_array_equal(decode_image(small, "x"), decode_image(fast, "x"))


@pytest.mark.parametrize("params", [{}, {"compression": "zlib", "predictor": True}, {"tile": (16, 16)},
                                    {"byteorder": ">"}])
def test_16_bit_rgb_tiff_decodes_exactly(params):
    values = colour16(3, size=(40, 32))
    decoded = decode_image(tiff_bytes(values, **params), "x.tif")
    assert decoded.dtype == np.uint16
    np.testing.assert_array_equal(decoded, values)


def test_16_bit_rgba_tiff_straight_premultiplied_and_unused_extra_sample():
    values = colour16(4, size=(40, 32))
    straight = decode_image(tiff_bytes(values, extrasamples=[2]), "x.tif")  # unassociated alpha
    np.testing.assert_array_equal(straight, values)
    # Associated (premultiplied) alpha comes out straight, to within rounding.
    alpha = values[..., 3:].astype(np.float64)
    premultiplied = np.dstack([np.rint(values[..., :3] * alpha / 65535).astype(np.uint16), values[..., 3]])
    unpremultiplied = decode_image(tiff_bytes(premultiplied, extrasamples=[1]), "x.tif")
    assert unpremultiplied.dtype == np.uint16 and unpremultiplied.shape == values.shape
    np.testing.assert_array_equal(unpremultiplied[..., 3], values[..., 3])
    visible = values[..., 3] >= 4096  # fainter pixels keep too few colour bits to compare
    error = np.abs(unpremultiplied[..., :3].astype(int) - values[..., :3])[visible]
    assert error.max() <= 65535 / 4096
    assert (unpremultiplied[..., :3][values[..., 3] == 0] == 0).all()
    # An extra sample that is not alpha is dropped, as Pillow does (mode RGB).
    unused = decode_image(tiff_bytes(values, extrasamples=[0]), "x.tif")
    np.testing.assert_array_equal(unused, values[..., :3])


def test_16_bit_tiffs_opencv_cannot_read():
    """Separate colour planes (which Pillow and OpenCV both scramble) are refused with
    the fix; 16-bit CMYK stays on Pillow (converted to 8-bit RGB as before)."""
    values = colour16(3, size=(40, 32))
    planar = tiff_bytes(np.moveaxis(values, -1, 0).copy(), planarconfig="separate")
    with pytest.raises(ImageDecodeError, match=r"^p\.tif: 16-bit colour TIFF with separate colour planes.*interleaved"):
        decode_image(planar, "p.tif")
    buf = io.BytesIO()
    tifffile.imwrite(buf, colour16(4, size=(40, 32)), photometric="separated")
    cmyk = decode_image(buf.getvalue(), "cmyk.tif")
    assert cmyk.shape == (32, 40, 3) and cmyk.dtype == np.uint8


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_on_16_bit_colour_matches_the_8_bit_path(orientation):
    """All 8 orientations, PNG (eXIf before and after the image data) and TIFF: the
    16-bit result rounded to 8 bits equals Pillow's own decoding of the 8-bit image."""
    values = colour16(3)
    exif = Image.Exif()
    exif[0x0112] = orientation
    expected = decode_image(pillow_bytes(Image.fromarray(round_to_8(values)), "PNG", exif=exif), "x8.png")
    if orientation in (5, 6, 7, 8):
        assert expected.shape == (37, 23, 3)  # the reference did turn
    exif_chunk = png_chunk(b"eXIf", exif.tobytes()[6:] if exif.tobytes().startswith(b"Exif") else exif.tobytes())
    candidates = {
        "eXIf first": png16(values, extra_chunks=exif_chunk),
        "eXIf last": png16(values, trailing_chunks=exif_chunk),
        "tiff": tiff_bytes(values, extratags=[(0x0112, "H", 1, orientation, True)]),
    }
    for where, data in candidates.items():
        decoded = decode_image(data, "x16")
        assert decoded.dtype == np.uint16, where
        np.testing.assert_array_equal(round_to_8(decoded), expected, err_msg=where)


def test_16_bit_colour_bomb_guard_runs_before_decoding():
    data = bytearray(png16(colour16(3)))
    data[16:24] = struct.pack(">II", 30000, 30000)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    with pytest.raises(ImageTooLargeError, match=r"^bomb16\.png: 30000x30000 = 900,000,000 pixels exceeds the limit"):
        decode_image(bytes(data), "bomb16.png")
    big_tiff = tiff_bytes(colour16(3, size=(40, 32)))
    with pytest.raises(ImageTooLargeError, match="limit of 1,000"):
        decode_image(big_tiff, "big.tif", max_pixels=1000)


@pytest.mark.parametrize("fmt", ["png", "tif"])
def test_truncated_or_corrupt_16_bit_colour_is_named_and_explained(fmt):
    values = colour16(3, size=(120, 90))
    data = png16(values) if fmt == "png" else tiff_bytes(values, compression="zlib")
    for cut in (len(data) // 2, len(data) - 20):
        with pytest.raises(ImageDecodeError, match=rf"^cut\.{fmt}: truncated or corrupt 16-bit colour"):
            decode_image(data[:cut], f"cut.{fmt}")
    if fmt == "png":
        flipped = bytearray(data)
        flipped[len(data) // 2] ^= 0xFF  # inside the image data: its CRC no longer matches
        with pytest.raises(ImageDecodeError, match=r"^bad\.png: truncated or corrupt 16-bit colour PNG"):
            decode_image(bytes(flipped), "bad.png")


def test_16_bit_rgb_png_with_a_transparent_colour_gets_an_exact_alpha():
    """tRNS on 16-bit RGB marks one exact 16-bit colour transparent: a colour that
    differs from it in the low byte only stays opaque."""
    values = colour16(3)
    key = values[5, 7].copy()
    values[6, 8] = key
    values[7, 9] = key ^ np.array([1, 0, 0], np.uint16)  # same 8-bit colour, other 16-bit one
    trns = png_chunk(b"tRNS", struct.pack(">HHH", *(int(v) for v in key)))
    decoded = decode_image(png16(values, extra_chunks=trns), "key.png")
    assert decoded.dtype == np.uint16 and decoded.shape == (23, 37, 4)
    np.testing.assert_array_equal(decoded[..., :3], values)
    np.testing.assert_array_equal(decoded[..., 3], np.where((values == key).all(axis=2), 0, 65535))
    assert decoded[5, 7, 3] == 0 and decoded[6, 8, 3] == 0 and decoded[7, 9, 3] == 65535


def test_16_bit_colour_to_jpeg_and_webp_rounds_to_8_bits():
    values = colour16(3, size=(48, 32))
    webp = decode_image(encode_image(values, EncodeOptions("webp", webp_lossless=True)), "x.webp")
    assert webp.dtype == np.uint8
    np.testing.assert_array_equal(webp, round_to_8(values))
    jpeg = decode_image(encode_image(colour16(4, size=(48, 32)), EncodeOptions("jpeg")), "x.jpg")
    assert jpeg.dtype == np.uint8 and jpeg.shape == (32, 48, 3)


def test_upscaler_keeps_16_bit_colour():
    """The Upscaler takes uint16 (H, W, 3|4) and gives uint16 back, with alpha kept."""
    import torch

    from sr_core import build_generator
    from sr_core.upscaler import Upscaler

    torch.manual_seed(0)
    # Bicubic alpha, so that the alpha check does not depend on an untrained network.
    upscaler = Upscaler(build_generator("rrdbnet", "tiny", scale=2), device="cpu", alpha="bicubic")
    for channels in (3, 4):
        values = colour16(channels, size=(20, 14))
        out = upscaler(values)
        assert out.dtype == np.uint16 and out.shape == (28, 40, channels)
        assert (out % 257 != 0).mean() > 0.5  # real 16-bit output, not 8-bit scaled up
        if channels == 4:
            assert np.abs(out[::2, ::2, 3].astype(int) - values[..., 3]).max() < 2048


def _every_png_kind() -> dict[str, np.ndarray]:
    """A photograph as each kind of output the Upscaler writes as PNG."""
    rgb = np.asarray(Image.open(IMAGES / "coffee.png").convert("RGB"))[:96, :128]
    rng = np.random.default_rng(0)
    alpha = rng.integers(0, 256, rgb.shape[:2], dtype=np.uint8)
    gray = np.asarray(Image.fromarray(rgb).convert("L"))
    return {
        "RGB": rgb, "RGBA": np.dstack([rgb, alpha]), "L": gray, "LA": np.dstack([gray, alpha]),
        "I;16": gray.astype(np.uint16) * 257 + rng.integers(0, 257, gray.shape, dtype=np.uint16),
        "RGB16": rgb.astype(np.uint16) * 257 + rng.integers(0, 257, rgb.shape, dtype=np.uint16),
        "RGBA16": np.dstack([rgb, alpha]).astype(np.uint16) * 257,
    }


@pytest.mark.parametrize("fast_writers", [True, False], ids=["fpng+imagecodecs", "pillow+opencv"])
@pytest.mark.parametrize("level", [None, 1, 9])
def test_png_writers_decode_to_the_same_pixels_for_every_kind(monkeypatch, fast_writers, level):
    if not fast_writers:  # what runs where fpng and imagecodecs are not installed
        monkeypatch.setattr(png, "_fpng", None)
        monkeypatch.setattr(png, "_imagecodecs", None)
    for kind, image in _every_png_kind().items():
        data = encode_image(image, EncodeOptions("png", png_compress_level=level))
        assert data[:8] == b"\x89PNG\r\n\x1a\n", kind
        back = decode_image(data, kind)
        assert back.dtype == image.dtype and back.shape == image.shape, kind
        np.testing.assert_array_equal(back, image, err_msg=kind)
        if image.dtype == np.uint8:  # Pillow, an independent decoder, reads the same pixels
            np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data))), image, err_msg=kind)


def test_the_default_png_writer_is_fpng_for_8_bit_colour_and_libpng_otherwise():
    kinds = _every_png_kind()
    assert codecs.png_encoder(kinds["RGB"], None) == "fpng"
    assert codecs.png_encoder(kinds["RGBA"], None) == "fpng"
    for kind in ("L", "LA", "I;16", "RGB16", "RGBA16"):
        assert codecs.png_encoder(kinds[kind], None) == "imagecodecs", kind
    # A compression level asked for is a zlib level: libpng, never fpng (which has none).
    assert codecs.png_encoder(kinds["RGB"], 6) == "imagecodecs"
    big = encode_image(kinds["RGB"], EncodeOptions("png", png_compress_level=0))
    small = encode_image(kinds["RGB"], EncodeOptions("png", png_compress_level=9))
    assert len(small) < len(big)


def test_jpeg_for_a_gpu_worker_falls_back_to_the_cpu_encoder_without_one():
    import torch

    # No CUDA here (and torchvision does not import beside this torch): the GPU path is
    # written for GPU workers and checked by ./dev gpu-check; here the CPU path must run.
    assert not torch.cuda.is_available() and codecs.gpu_jpeg_encoder() is None
    kinds = _every_png_kind()
    for kind in ("RGB", "L", "RGBA", "RGB16"):
        options = EncodeOptions("jpeg", jpeg_quality=90)
        assert encode_image(kinds[kind], options, device="cuda") == encode_image(kinds[kind], options), kind
