"""Step ``jpeg-gpu``: the batch actors' GPU JPEG path (``sr_core.codecs.encode_image(...,
device="cuda")``, nvJPEG through torchvision.io or nvImageCodec) against the CPU encoder,
and its CPU fallback."""

from __future__ import annotations

from typing import Iterator

from infra.gpucheck.context import Context, photos
from infra.gpucheck.measure import best_seconds
from infra.gpucheck.table import SUCCESS, UNAVAILABLE, Row, failed

JPEG_QUALITY = 95
JPEG_MAX_DB_BELOW_CPU = 1.0
"""The GPU encoder quantizes differently from libjpeg; more than this many dB worse than
the CPU's file at the same quality is a wrong setting, not a different encoder."""


def jpeg_verdict(gpu_db: float, cpu_db: float) -> str:
    """The status of the GPU encoder's files by their PSNR against the originals."""
    if gpu_db >= cpu_db - JPEG_MAX_DB_BELOW_CPU:
        return SUCCESS
    return failed(f"GPU JPEG {gpu_db:.1f} dB vs CPU {cpu_db:.1f} dB at q{JPEG_QUALITY} "
                  f"(more than {JPEG_MAX_DB_BELOW_CPU:g} dB worse)")


def step_jpeg_gpu(ctx: Context) -> Iterator[Row]:
    """x4 bicubic upscales of the photographs (what a batch actor encodes) as JPEG q95:
    on the GPU (ms per output Mpx, quality against the original, bytes) and on the CPU.
    Without a GPU encoder (and in the CPU rehearsal) the GPU call must give the CPU's
    bytes. Untested on a GPU: none was available where this was written."""
    import numpy as np

    from sr_core import codecs
    from sr_core.metrics import psnr
    from sr_core.resize import imresize

    step = "jpeg-gpu"
    outputs = [np.ascontiguousarray(imresize(im, scale=4)) for im in photos(ctx)]
    mpx = sum(o.shape[0] * o.shape[1] for o in outputs) / 1e6
    options = codecs.EncodeOptions("jpeg", jpeg_quality=JPEG_QUALITY)
    cpu = [codecs.encode_image(o, options) for o in outputs]
    cpu_s = best_seconds(lambda: [codecs.encode_image(o, options) for o in outputs], ctx.sizes.repeats, "cpu")
    encoder = None if ctx.rehearsal else codecs.gpu_jpeg_encoder()
    if encoder is None:
        # What a GPU worker without a GPU encoder runs (and this CPU rehearsal): the CPU's bytes.
        same = all(codecs.encode_image(o, options, device="cuda") == c for o, c in zip(outputs, cpu))
        yield Row(step, "CPU fallback (no GPU JPEG encoder)",
                  {"CPU ms/output Mpx": cpu_s * 1e3 / mpx, "same bytes as CPU": same},
                  SUCCESS if same else failed("the fallback wrote other bytes than the CPU encoder"))
        if not ctx.rehearsal:
            yield Row(step, "GPU JPEG encode", {}, UNAVAILABLE + " (neither torchvision.io nor nvidia.nvimgcodec)")
        return
    gpu = [codecs.encode_image(o, options, device="cuda") for o in outputs]  # warm-up, and the files
    gpu_s = best_seconds(lambda: [codecs.encode_image(o, options, device="cuda") for o in outputs],
                         ctx.sizes.repeats, "cuda")
    gpu_db = min(psnr(codecs.decode_image(g), o) for g, o in zip(gpu, outputs))
    cpu_db = min(psnr(codecs.decode_image(c), o) for c, o in zip(cpu, outputs))
    figures = {"encoder": encoder, "GPU ms/output Mpx": gpu_s * 1e3 / mpx, "CPU ms/output Mpx": cpu_s * 1e3 / mpx,
               "dB vs original GPU / CPU": f"{gpu_db:.1f} / {cpu_db:.1f}",
               "bytes GPU / CPU": sum(map(len, gpu)) / sum(map(len, cpu))}
    yield Row(step, f"q{JPEG_QUALITY}, {len(outputs)} photos x4 (bicubic), {mpx:.1f} Mpx", figures,
              jpeg_verdict(gpu_db, cpu_db))
