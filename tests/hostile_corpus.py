"""A corpus of hostile and broken image files, generated (no files shipped).

``make_corpus(folder)`` writes every kind into ``folder`` and returns ``{file name:
Kind}``. A kind is either ``ok`` (a valid image the commands must process, with the
shape they must produce before scaling) or carries the words that the one line
reporting it must contain.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass
class Kind:
    what: str
    """What the file is, for the record."""

    reason: str | None = None
    """None: a valid image, processed. Else words of the one-line report."""

    size: tuple[int, int] | None = None
    """(height, width) an ok image decodes to (after its EXIF orientation)."""


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def png_bytes(width: int, height: int, bit_depth: int, colour_type: int, rows: bytes | None = None,
              extra: list[tuple[bytes, bytes]] = ()) -> bytes:
    """A PNG of any depth and colour type, written by hand (Pillow cannot write all)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    out = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr)
    for kind, body in extra:
        out += _chunk(kind, body)
    if rows is not None:
        out += _chunk(b"IDAT", zlib.compress(rows))
    return out + _chunk(b"IEND", b"")


def _encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _photo(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) % 256], -1)
    noise = rng.integers(0, 30, (h, w, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def make_corpus(folder, strip_width: int = 65535) -> dict[str, Kind]:
    os.makedirs(folder, exist_ok=True)
    photo = _photo(48, 40)
    png = _encode(photo, "PNG")
    jpeg = _encode(photo, "JPEG", quality=90)
    webp = _encode(photo, "WEBP", quality=90)
    kinds: dict[str, tuple[bytes, Kind]] = {}

    def add(name, data, kind):
        kinds[name] = (data, kind)

    add("good.png", png, Kind("an ordinary PNG", size=(40, 48)))
    add("empty.png", b"", Kind("zero bytes", "empty file"))
    add("trunc-png.png", png[: len(png) // 2], Kind("truncated PNG", "truncated"))
    add("trunc-jpeg.jpg", jpeg[: len(jpeg) // 2], Kind("truncated JPEG", "truncated"))
    add("trunc-webp.webp", webp[: len(webp) // 2], Kind("truncated WebP", "truncated"))
    add("jpeg-named.png", jpeg, Kind("a JPEG with a .png extension", size=(40, 48)))
    add("text.png", b"shopping list: milk, eggs\n", Kind("text saved as .png", "not an image"))
    add("page.png", b"<!doctype html><html><body>404</body></html>", Kind("HTML saved as .png", "not an image"))
    add("bomb.png", png_bytes(60000, 60000, 8, 2), Kind("decompression bomb (declares 60000x60000)",
                                                         "exceeds the limit"))
    add("one-pixel.png", _encode(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"), Kind("1x1", size=(1, 1)))
    strip = Image.fromarray(np.tile(np.arange(256, dtype=np.uint8), strip_width // 256 + 1)[:strip_width][None, :])
    add("strip.png", _encode(strip, "PNG"), Kind(f"a {strip_width}x1 strip", size=(1, strip_width)))
    add("cmyk.jpg", _encode(photo.convert("CMYK"), "JPEG", quality=90), Kind("CMYK JPEG", size=(40, 48)))
    gray16 = (np.arange(40 * 48, dtype=np.uint32).reshape(40, 48) * 30 % 65536).astype(">u2")
    add("gray16.png", png_bytes(48, 40, 16, 0, b"".join(b"\0" + r.tobytes() for r in gray16)),
        Kind("16-bit gray PNG", size=(40, 48)))
    la16 = np.dstack([gray16, np.full((40, 48), 40000, ">u2")])
    add("gray16-alpha.png", png_bytes(48, 40, 16, 4, b"".join(b"\0" + r.tobytes() for r in la16)),
        Kind("16-bit gray+alpha PNG", size=(40, 48)))
    pal = photo.convert("P", palette=Image.ADAPTIVE, colors=16)
    add("palette-trns.png", _encode(pal, "PNG", transparency=0), Kind("palette with transparency", size=(40, 48)))
    frames = [_photo(48, 40, s) for s in range(3)]
    add("anim-webp.webp", _encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], duration=100),
        Kind("animated WebP", "animated"))
    add("anim-png.png", _encode(frames[0], "PNG", save_all=True, append_images=frames[1:], duration=100),
        Kind("animated PNG", "animated"))
    add("anim-gif.png", _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100),
        Kind("animated GIF saved as .png", "not an image in a supported format"))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    add("exif-rotated.jpg", _encode(photo, "JPEG", exif=exif.tobytes()), Kind("EXIF-rotated JPEG", size=(48, 40)))
    bad_exif = jpeg[:2] + b"\xff\xe1" + struct.pack(">H", 20) + b"Exif\0\0MM\0*\xff\xff\xff\xff\0\0" + jpeg[2:]
    add("bad-exif.jpg", bad_exif, Kind("corrupt EXIF", size=(40, 48)))
    add("pages.tif", _encode(frames[0], "TIFF", save_all=True, append_images=frames[1:]),
        Kind("multi-page TIFF (the first page is the image)", size=(40, 48)))
    add("with space.png", png, Kind("a space in the name", size=(40, 48)))
    add("new\nline.png", png, Kind("a newline in the name", size=(40, 48)))
    add("glob[*?].png", png, Kind("glob characters in the name", size=(40, 48)))
    add("x\\..\\..\\escape.png", png, Kind("backslash '..' in the name", "unsafe relative path"))
    for name, (data, _) in kinds.items():
        with open(os.path.join(folder, name), "wb") as f:
            f.write(data)
    result = {name: kind for name, (_, kind) in kinds.items()}

    # a name that is not UTF-8
    raw = os.path.join(os.fsencode(folder), b"latin1-\xe9t\xe9.png")
    with open(raw, "wb") as f:
        f.write(png)
    result[os.fsdecode(b"latin1-\xe9t\xe9.png")] = Kind("non-UTF-8 bytes in the name", size=(40, 48))
    # a symlink loop (two links pointing at each other) and a folder link to its parent
    os.symlink("loop-b.png", os.path.join(folder, "loop-a.png"))
    os.symlink("loop-a.png", os.path.join(folder, "loop-b.png"))
    result["loop-a.png"] = Kind("symlink loop", "loop")
    result["loop-b.png"] = Kind("symlink loop", "loop")
    os.makedirs(os.path.join(folder, "sub"))
    os.symlink("..", os.path.join(folder, "sub", "up"))
    return result
