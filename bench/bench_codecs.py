"""Image encoders for the outputs, side by side in one run (prints tables; not a test).

    .venv/bin/python bench/bench_codecs.py [--scale 4] [--repeats 3] [--quick]

Inputs: the four sample photographs (assets/images) upscaled x4 with Pillow's bicubic (a
512x512 photo becomes 2048x2048, what an x4 model writes), in one thread (OpenCV told so;
libpng, zlib, libjpeg and fpng encode on the calling thread). For each encoder: ms per
output megapixel (best of ``--repeats``, summed over the photos), output bytes against
Pillow PNG level 1, and for PNG encoders whether the file decodes (Pillow) to exactly the
input's pixels for every kind of output we write: 8-bit RGB, RGBA, gray (L), gray +
alpha (LA), 16-bit gray and 16-bit RGB. ``n/a``: the encoder has no such mode.

Candidates: Pillow (zlib levels 1 and 6, the old default), libpng through ``imagecodecs``
(level 1; and with OpenCV's fast settings: RLE strategy, SUB filter), libspng through
``imagecodecs``, OpenCV (level 1), fpng (the ``fpng`` package, if installed: 8-bit RGB and
RGBA only), and, for reference, formats that are not PNG: QOI, JPEG q95 (Pillow and
libjpeg-turbo through ``imagecodecs``), WebP q90 (Pillow, method 0) and what
``sr_core.codecs.encode_image`` does today for PNG and JPEG.
"""

from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]

from sr_core import codecs

IMAGES = REPO / "assets" / "images"


def _pillow(fmt: str, **kw):
    def encode(a: np.ndarray) -> bytes:
        buf = io.BytesIO()
        img = Image.fromarray(a)
        img.save(buf, fmt, **kw)
        return buf.getvalue()
    return encode


def _opencv_png(a: np.ndarray) -> bytes:
    import cv2

    if a.ndim == 3 and a.shape[2] >= 3:
        a = cv2.cvtColor(a, cv2.COLOR_RGB2BGR if a.shape[2] == 3 else cv2.COLOR_RGBA2BGRA)
    ok, out = cv2.imencode(".png", a, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    assert ok
    return out.tobytes()


def candidates() -> list[tuple[str, bool, object]]:
    """(name, writes PNG, encode function) for every encoder importable here."""
    rows = [
        ("Pillow PNG level 1", True, _pillow("PNG", compress_level=1)),
        ("Pillow PNG level 6", True, _pillow("PNG", compress_level=6)),
        ("sr_core encode_image png (default: fpng / libpng RLE)", True,
         lambda a: codecs.encode_image(a, codecs.EncodeOptions(format="png"))),
        ("sr_core encode_image png (level 1: libpng)", True,
         lambda a: codecs.encode_image(a, codecs.EncodeOptions(format="png", png_compress_level=1))),
    ]
    try:
        import imagecodecs

        rows += [
            ("imagecodecs libpng level 1", True, lambda a: imagecodecs.png_encode(a, level=1)),
            ("imagecodecs libpng level 1, RLE + SUB", True,
             lambda a: imagecodecs.png_encode(a, level=1, strategy=3, filter=16)),
            ("imagecodecs libspng level 1", True, lambda a: imagecodecs.spng_encode(a, level=1)),
        ]
    except ImportError:
        imagecodecs = None
    rows.append(("OpenCV PNG level 1", True, _opencv_png))
    try:
        import fpng

        rows.append(("fpng", True, lambda a: fpng.from_ndarray(a if a.ndim == 3 else a[..., None])))
    except ImportError:
        pass
    if imagecodecs is not None:
        rows.append(("QOI (imagecodecs; not PNG)", False, lambda a: imagecodecs.qoi_encode(a)))
        rows.append(("JPEG q95 libjpeg-turbo (imagecodecs)", False,
                     lambda a: imagecodecs.jpeg8_encode(a, level=95)))
    rows += [
        ("JPEG q95 Pillow", False, _pillow("JPEG", quality=95)),
        ("sr_core encode_image jpeg (q95)", False,
         lambda a: codecs.encode_image(a, codecs.EncodeOptions(format="jpeg", jpeg_quality=95))),
        ("WebP q90 method 0 (Pillow)", False, _pillow("WEBP", quality=90, method=0)),
    ]
    return rows


def photographs(scale: int, quick: bool) -> list[np.ndarray]:
    out = []
    for path in sorted(IMAGES.glob("*.png")):
        img = Image.open(path).convert("RGB")
        if quick:
            img = img.crop((0, 0, 128, 128))
        out.append(np.asarray(img.resize((img.width * scale, img.height * scale), Image.BICUBIC)))
    return out


def kinds(rgb: np.ndarray) -> dict[str, np.ndarray]:
    """One photo as every output kind the encoders must write exactly."""
    rng = np.random.default_rng(0)
    alpha = rng.integers(0, 256, rgb.shape[:2], dtype=np.uint8)
    gray = np.asarray(Image.fromarray(rgb).convert("L"))
    return {
        "RGB": rgb,
        "RGBA": np.dstack([rgb, alpha]),
        "L": gray,
        "LA": np.dstack([gray, alpha]),
        "I;16": gray.astype(np.uint16) * 257 + rng.integers(0, 257, gray.shape, dtype=np.uint16),
        "RGB16": rgb.astype(np.uint16) * 257 + rng.integers(0, 257, rgb.shape, dtype=np.uint16),
    }


def decodes_exactly(encode, image: np.ndarray) -> str:
    try:
        data = encode(image)
    except Exception as exc:  # an encoder without the mode: reported, not fatal
        return f"n/a ({type(exc).__name__})"
    try:
        decoded = codecs.decode_image(data)
    except Exception as exc:
        return f"NO ({type(exc).__name__})"
    squeeze = image if image.ndim == 3 else image
    return "yes" if decoded.shape == squeeze.shape and decoded.dtype == image.dtype and np.array_equal(
        decoded, squeeze) else "NO"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="128 px crops (a smoke run)")
    args = parser.parse_args()
    try:
        import cv2

        cv2.setNumThreads(1)
    except ImportError:
        pass
    photos = photographs(args.scale, args.quick)
    mpx = sum(p.shape[0] * p.shape[1] for p in photos) / 1e6
    print(f"{len(photos)} photos upscaled x{args.scale} (bicubic), {mpx:.2f} output Mpx in all, one thread, "
          f"best of {args.repeats}")
    rows = []
    for name, is_png, encode in candidates():
        best, size = float("inf"), 0
        for _ in range(args.repeats):
            start = time.perf_counter()
            size = sum(len(encode(p)) for p in photos)
            best = min(best, time.perf_counter() - start)
        rows.append((name, is_png, encode, best, size))
    base = next(r for r in rows if r[0] == "Pillow PNG level 1")
    sample = kinds(photos[0][:256, :256])
    print("| encoder | ms / output Mpx | Mpx/s per core | bytes vs Pillow PNG 1 | vs Pillow PNG 1 speed | "
          + " | ".join(f"exact {k}" for k in sample) + " |")
    print("|---|---|---|---|---|" + "---|" * len(sample))
    for name, is_png, encode, seconds, size in rows:
        exact = [decodes_exactly(encode, a) if is_png else "-" for a in sample.values()]
        print(f"| {name} | {seconds * 1e3 / mpx:.1f} | {mpx / seconds:.1f} | {size / base[4]:.2f} | "
              f"{base[3] / seconds:.1f}x | " + " | ".join(exact) + " |", flush=True)


if __name__ == "__main__":
    main()
