"""Option groups that several commands share, so that a flag means the same everywhere."""

from __future__ import annotations

import argparse

from sr_core.precision import PRECISIONS


def add_output_options(p: argparse.ArgumentParser) -> None:
    """The model, naming and encoding options, shared with ``sr batch`` so that one image
    gives the same output file through either command."""
    p.add_argument("-s", "--outscale", "--scale", dest="outscale", type=float, default=None,
                   help="final scale factor; the network's output is resized with MATLAB bicubic "
                        "(default: the model's own scale)")
    p.add_argument("--tile", type=int, default=None,
                   help="tile side in input pixels; 0 disables tiling (default: chosen from memory)")
    p.add_argument("--overlap", type=int, default=None, help="context pixels around each tile (default: 16)")
    p.add_argument("--tiles-per-batch", type=int, default=None, help="tiles per forward pass (default: 4 on GPUs, 1 on CPU)")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="auto: fp16 on V100-class GPUs, bf16 on A100 and newer; on CPUs with AMX or "
                        "AVX512-BF16 bf16 for the compact generator; fp32 otherwise")
    p.add_argument("--alpha", default="model", choices=["model", "bicubic"],
                   help="how the alpha channel is upscaled (default: model)")
    p.add_argument("-f", "--format", default="png", choices=["png", "jpg", "jpeg", "webp"],
                   help="output format (default: png)")
    p.add_argument("--suffix", default="_sr", help="added to output file names (default: _sr)")
    p.add_argument("--png-compress-level", type=int, default=None,
                   help="PNG zlib level 0-9 through libpng (default: the fastest writer, fpng for 8-bit "
                        "RGB/RGBA, files ~10%% larger than level 1)")
    p.add_argument("--jpeg-quality", type=int, default=95, help="JPEG quality (default: 95)")
    p.add_argument("--webp-quality", type=int, default=90, help="WebP quality (default: 90)")
    p.add_argument("--webp-lossless", action="store_true", help="lossless WebP")
    p.add_argument("--max-pixels", type=int, default=None,
                   help="refuse inputs with more pixels (decompression-bomb guard; default: 100,000,000)")


def output_settings(args: argparse.Namespace):
    """The checked settings of ``add_output_options`` (ValueError names the wrong option)."""
    from sr_core import codecs
    from sr_core.outputs import OutputSettings

    encode = codecs.EncodeOptions(format=args.format, png_compress_level=args.png_compress_level,
                                  jpeg_quality=args.jpeg_quality, webp_quality=args.webp_quality,
                                  webp_lossless=args.webp_lossless)
    optional = {name: getattr(args, name) for name in ("max_pixels", "overlap") if getattr(args, name) is not None}
    return OutputSettings(encode=encode, outscale=args.outscale, suffix=args.suffix, tile=args.tile,
                          tiles_per_batch=args.tiles_per_batch, precision=args.precision, alpha=args.alpha,
                          **optional)


def add_include_exclude(p: argparse.ArgumentParser, below: str) -> None:
    """--include / --exclude globs matched against the path below the input folder."""
    p.add_argument("--include", action="append", default=[], metavar="GLOB",
                   help=f"only inputs whose path below {below} matches (repeatable)")
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                   help=f"leave out inputs whose path below {below} matches (repeatable)")
