"""Host memory an upscale needs, checked before an image is decoded: a 16K x 16K input at
x4 is 12 GiB of output alone, and a command should refuse it with the figure rather than
be killed by the kernel halfway through a folder."""

from __future__ import annotations

import os

from sr_core import codecs


def available_memory() -> int | None:
    """Bytes of memory the kernel says can be used without swapping (None if unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


WORKING_MEMORY = 256 * 2**20


def memory_needed(height: int, width: int, bands: int, sample_bytes: int, scale: int,
                  outscale: float | None) -> int:
    """Peak host bytes to upscale one image (docs/PERFORMANCE.md has the measurements):
    the decoded input and 256 MiB of working memory (tiles, buffers), plus

    - at the network's scale: three times its output (the Upscaler's assembly peaks
      under twice it, the encoder holds one more copy);
    - with another ``outscale``: the network's output beside the resized one while the
      banded resize runs (it peaks at about 1.55 times the resized output), or twice the
      network's output during assembly, whichever is larger; then the resized output
      and the encoder's copy of it.
    """
    sample = bands * sample_bytes
    network = height * width * scale * scale * sample
    need = height * width * sample + WORKING_MEMORY
    if outscale is None or outscale == scale:
        return need + 3 * network
    final = round(height * outscale) * round(width * outscale) * sample
    return need + max(2 * network, network + int(1.55 * final)) + final


def read_within_memory(url: str, max_pixels: int | None, limit: int | None, scale: int,
                        outscale: float | None):
    """Read and decode an image, refusing first, from its header, one that would need
    more memory than ``limit`` (a 16K x 16K at x4 is 12 GiB of output alone)."""
    data = codecs.read_image_bytes(url)
    if limit is not None:
        try:
            header = codecs.open_image(data, url, max_pixels)
            (width, height), mode = header.size, header.mode
        except ValueError:  # not an image, or too large: decode_image says why
            width = height = 0
        if width and height:
            bands = 4 if mode in ("P", "PA", "LA", "RGBA", "La", "RGBa") else 1 if mode in ("1", "L") or mode.startswith("I") else 3
            sixteen = mode.startswith("I") or (data[:4] == b"\x89PNG" and len(data) > 24 and data[24] == 16)
            need = memory_needed(height, width, bands, 2 if sixteen else 1, scale, outscale)
            if need > limit:
                raise ValueError(
                    f"{url}: {width}x{height} at x{outscale or scale} would need about {need / 2**30:.1f} GiB of "
                    f"host memory (input and assembled output), more than the {limit / 2**30:.1f} GiB "
                    "available; split it into parts (e.g. 4096x4096), use a machine with more memory, or "
                    "raise --memory-limit")
    return codecs.decode_image(data, name=url, max_pixels=max_pixels)
