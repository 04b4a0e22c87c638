"""``sr upscale``: upscale files, folders (recursive), globs and fsspec URLs with one model.

Each output goes to OUT/<path of the input below the folder (or glob prefix) it was
found under>, with the new extension and a suffix. Existing outputs are skipped unless
--overwrite, so a rerun finishes only what is missing. A bad input is reported with its
reason and the run goes on; the exit code is 1 when anything failed.

Folder and glob listings never pick up this run's outputs (OUT may lie inside or be an
input folder) and do not follow symbolic links out of the folder; a file named on the
command line is always taken as it is, glob characters and links included.
"""

from __future__ import annotations

import argparse
import math
import os
import posixpath
import sys
import time
import warnings
from dataclasses import dataclass, field

_GLOB_CHARS = "*?["


def add_upscale_parser(sub) -> None:
    p = sub.add_parser(
        "upscale",
        help="upscale image files, folders, globs or fsspec URLs with a model",
        description=(
            "Upscale images with a generator file (ours or a foreign ESRGAN/Real-ESRGAN .pth). "
            "INPUT may be a file, a folder (searched recursively; the relative structure is kept "
            "under OUT), a glob (quote it) or an fsspec URL (gs://, s3://, memory://). Existing "
            "outputs are skipped unless --overwrite. Bad inputs are reported and skipped; the "
            "exit code is 1 if any input failed."
        ),
    )
    p.add_argument("inputs", metavar="INPUT", nargs="+", help="image file, folder, glob or URL")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output folder (path or fsspec URL)")
    p.add_argument("-m", "--model", required=True, help="generator file (.safetensors or .pth; path or URL)")
    p.add_argument("--device", default="auto", help="auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:1, mps")
    add_output_options(p)
    p.add_argument("--overwrite", action="store_true", help="replace outputs that exist")
    p.add_argument("--memory-limit", type=float, default=None, metavar="GIB",
                   help="refuse, before decoding, an image whose input and assembled output would need more "
                        "host memory than this (default: the memory available when the run starts)")
    p.set_defaults(func=run_upscale)


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
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="auto: fp16 on V100-class GPUs, bf16 on A100 and newer, fp32 on CPU")
    p.add_argument("--alpha", default="model", choices=["model", "bicubic"],
                   help="how the alpha channel is upscaled (default: model)")
    p.add_argument("-f", "--format", default="png", choices=["png", "jpg", "jpeg", "webp"],
                   help="output format (default: png)")
    p.add_argument("--suffix", default="_sr", help="added to output file names (default: _sr)")
    p.add_argument("--png-compress-level", type=int, default=1,
                   help="PNG zlib level 0-9 (default 1: fast, slightly larger files)")
    p.add_argument("--jpeg-quality", type=int, default=95, help="JPEG quality (default: 95)")
    p.add_argument("--webp-quality", type=int, default=90, help="WebP quality (default: 90)")
    p.add_argument("--webp-lossless", action="store_true", help="lossless WebP")
    p.add_argument("--max-pixels", type=int, default=None,
                   help="refuse inputs with more pixels (decompression-bomb guard; default: 100,000,000)")


@dataclass(frozen=True)
class OutputSettings:
    """What the options of ``add_output_options`` ask for, checked."""

    encode: "codecs.EncodeOptions"
    """Output format and its quality settings."""
    outscale: float | None
    """Final scale factor (None: the model's own)."""
    max_pixels: int
    """Inputs with more pixels are refused (decompression-bomb guard)."""
    upscaler: dict
    """Keyword arguments for ``Upscaler`` (tile, overlap, tiles_per_batch, precision, alpha)."""


def output_settings(args: argparse.Namespace) -> OutputSettings:
    """Check the options of ``add_output_options``; ValueError names the wrong one."""
    from sr_core import codecs

    options = codecs.EncodeOptions(format=args.format, png_compress_level=args.png_compress_level,
                                   jpeg_quality=args.jpeg_quality, webp_quality=args.webp_quality,
                                   webp_lossless=args.webp_lossless)
    if args.outscale is not None and not (math.isfinite(args.outscale) and args.outscale > 0):
        raise ValueError(f"--outscale must be a positive number, got {args.outscale}")
    max_pixels = args.max_pixels if args.max_pixels is not None else codecs.DEFAULT_MAX_PIXELS
    upscaler = {"tile": args.tile, "precision": args.precision, "alpha": args.alpha}
    upscaler.update({k: v for k, v in (("overlap", args.overlap), ("tiles_per_batch", args.tiles_per_batch))
                     if v is not None})
    return OutputSettings(options, args.outscale, max_pixels, upscaler)


@dataclass
class Job:
    """One input image and where its output goes."""

    input: str
    output: str


@dataclass
class Plan:
    jobs: list[Job] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)
    hidden: list[str] = field(default_factory=list)
    """Hidden images found by listing (names starting with '.'): reported, not upscaled."""


def _has_glob(url: str) -> bool:
    return any(c in url for c in _GLOB_CHARS)


def _glob_root(url: str) -> str:
    """The folder part of a glob before its first wildcard component."""
    scheme, rest = (url.split("://", 1) if "://" in url else ("", url))
    parts = rest.split("/")
    fixed = []
    for part in parts:
        if _has_glob(part):
            break
        fixed.append(part)
    root = "/".join(fixed) or "."
    return f"{scheme}://{root}" if scheme else root


def _find_inputs(url: str, hidden: list[str] | None = None) -> list[tuple[str, str, bool]]:
    """(root, file URL, found by listing a folder or glob) for one INPUT argument;
    raises FileNotFoundError. Hidden files a listing finds are appended to ``hidden``."""
    from sr_core import codecs, storage

    fs, path = storage.get_fs(url)
    prefix = storage.protocol_prefix(url)

    def full(p: str) -> str:
        return p if not prefix or p.startswith(prefix) else prefix + p

    # A name that exists is taken literally, so files and folders whose names hold
    # glob characters ("x[1].png") can be named.
    if _has_glob(url) and not fs.exists(path):
        matches = [p for p in fs.glob(path) if fs.isfile(p)]
        if hidden is not None:
            hidden.extend(full(p) for p in matches if posixpath.basename(p).startswith(".")
                          and not posixpath.basename(p).startswith(storage.TMP_PREFIX))
        matches = [p for p in matches if not posixpath.basename(p).startswith(".")]
        if not matches:
            raise FileNotFoundError(f"{url}: the pattern matches no files")
        return [(_glob_root(url), full(p), True) for p in sorted(matches)]
    if not fs.exists(path):
        raise FileNotFoundError(f"{url}: no such file or folder")
    if fs.isdir(path):
        files = storage.list_files(url, suffixes=codecs.INPUT_EXTENSIONS, hidden=hidden)
        return [(url, f, True) for f in files]
    return [(full(posixpath.dirname(path)) if prefix else posixpath.dirname(path), url, False)]


def _is_below(path: str, folder: str) -> bool:
    return path.startswith(folder.rstrip("/") + "/")


def plan_outputs(inputs: list[str], out: str, suffix: str, extension: str) -> Plan:
    """Map every input file to its output URL; inputs that cannot be found, and outputs
    that would collide or replace an input, become failures."""
    from sr_core import storage

    plan = Plan()
    found = []
    for url in inputs:
        try:
            found.extend(_find_inputs(url, plan.hidden))
        except storage.StorageError:
            raise  # storage unreachable: nothing else would work either
        except (FileNotFoundError, ValueError, OSError) as exc:
            plan.failures.append((url, _reason(exc, url)))
    return assign_outputs(found, out, suffix, extension, plan)


def assign_outputs(found: list[tuple[str, str, bool]], out: str, suffix: str, extension: str,
                   plan: Plan | None = None) -> Plan:
    """Map found inputs ``(root, file URL, found by listing a folder)`` to output URLs
    (OUT/<path below root, new suffix and extension>) in ``plan``; outputs that would
    escape OUT, collide or replace an input become failures."""
    from sr_core import storage

    plan = Plan() if plan is None else plan
    taken: dict[str, str] = {}
    out_prefix, out_path = storage.protocol_prefix(out), storage.get_fs(out)[1].rstrip("/")
    candidates = []  # (input URL, its path, output URL, found by listing)
    for root, url, listed in found:
        path = storage.get_fs(url)[1]
        if listed and storage.protocol_prefix(root) == out_prefix:
            # OUT inside a listed folder: what is below it is output, not input (a rerun
            # must not upscale its own outputs).
            if _is_below(out_path, storage.get_fs(root)[1]) and _is_below(path, out_path):
                continue
        if listed and (target := storage.link_out_of(root, url)):
            plan.failures.append((url, f"a symbolic link to {target}, outside the folder {root}; not followed "
                                       "(name the file as an INPUT, or copy it into the folder)"))
            continue
        try:
            rel = storage.relative_key(root, url)
            stem = posixpath.splitext(rel)[0]
            output = storage.join(out, storage.safe_key(stem + suffix + extension))
        except ValueError as exc:
            plan.failures.append((url, str(exc)))
            continue
        candidates.append((url, path, output, listed))
    output_of = {storage.get_fs(output)[1]: url for url, _, output, _ in candidates}
    if suffix:
        # OUT = a listed folder: a file there that is the output of another input is
        # that input's output from an earlier run, not a new input. (With no suffix an
        # output is named like an input, so it stays an input and the check below
        # refuses to replace it.)
        candidates = [(url, path, output, listed) for url, path, output, listed in candidates
                      if not (listed and output_of.get(path, url) != url)]
    input_paths = {path for _, path, _, _ in candidates}
    for url, _path, output, _listed in candidates:
        output_path = storage.get_fs(output)[1]
        if output_path in input_paths:
            plan.failures.append((url, f"the output {output} would replace an input; choose another OUT or --suffix"))
        elif output in taken:
            if taken[output] != url:
                plan.failures.append((url, f"the output {output} is also the output of {taken[output]}"))
        else:
            taken[output] = url
            plan.jobs.append(Job(url, output))
    return plan


def run_upscale(args: argparse.Namespace) -> int:
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    from tqdm import tqdm

    from sr_core import codecs, storage, upscaler

    settings = output_settings(args)
    options, max_pixels = settings.encode, settings.max_pixels
    out_fs, out_path = storage.get_fs(args.output)
    if out_fs.isfile(out_path):
        raise ValueError(f"{args.output} is a file; OUT must be a folder (new or existing) to hold the outputs")
    plan = plan_outputs(args.inputs, args.output, args.suffix, options.extension)
    failures = list(plan.failures)
    # Temporaries of earlier runs that were killed between writing and renaming; a
    # live run's own are kept (their writer's process still exists).
    storage.remove_stale_temporaries(args.output)
    todo, skipped = [], 0
    for job in plan.jobs:
        if not args.overwrite and storage.exists(job.output):
            skipped += 1
        else:
            todo.append(job)

    written, interrupted, stopped = 0, False, None
    notes: list[tuple[str, str]] = []  # (input, decoder warning) of images that were processed
    if todo:
        # A read-only, foreign or full OUT is refused before any image is computed.
        storage.check_writable(args.output)
        up = upscaler.Upscaler.from_file(args.model, device=args.device, **settings.upscaler)
        memory_limit = (args.memory_limit * 2**30 if args.memory_limit is not None else available_memory())
        out_pixels = 0
        start = time.perf_counter()
        bar = tqdm(total=len(todo), unit="img", desc="upscale", file=sys.stderr, dynamic_ncols=True)

        def save(job: Job, image) -> int:
            storage.write_bytes(job.output, codecs.encode_image(image, options))
            return image.shape[0] * image.shape[1]

        # Encoding (PNG above all) is as slow as a small model: it runs in the
        # background while the next image is upscaled. At most two results wait, so
        # memory stays at a few outputs.
        with ThreadPoolExecutor(max_workers=2) as pool:
            pending = {}

            def collect(done) -> None:
                nonlocal written, out_pixels, stopped
                for future in done:
                    job = pending.pop(future)
                    try:
                        out_pixels += future.result()
                        written += 1
                    except Exception as exc:  # a failed write is reported, the run goes on
                        failures.append((job.input, f"writing {job.output}: {_reason(exc, job.output)}"))
                        if _out_unusable(exc):  # ... unless no other write could succeed
                            stopped = stopped or f"writing {job.output}: {_reason(exc, job.output)}"
                    bar.update(1)
                    elapsed = max(time.perf_counter() - start, 1e-9)
                    bar.set_postfix_str(f"{out_pixels / elapsed / 1e6:.2f} Mpx/s out")

            try:
                for job in todo:
                    if stopped:
                        break
                    try:
                        # Decoder warnings (a corrupt EXIF block...) become one report
                        # line naming the file instead of Python's two anonymous lines.
                        with warnings.catch_warnings(record=True) as caught:
                            warnings.simplefilter("always")
                            image = _read_within_memory(job.input, max_pixels, memory_limit, up.scale,
                                                        args.outscale)
                        notes.extend((job.input, str(w.message).strip()) for w in caught)
                        result = up(image, outscale=args.outscale)
                    except storage.StorageError as exc:  # storage down past the retries: stop
                        stopped = str(exc)
                        break
                    except Exception as exc:  # a bad input is reported, the run goes on
                        failures.append((job.input, _reason(exc, job.input)))
                        bar.update(1)
                        continue
                    while len(pending) >= 2:
                        done, _ = wait(pending, return_when=FIRST_COMPLETED)
                        collect(done)
                    pending[pool.submit(save, job, result)] = job
                    del image, result
            except KeyboardInterrupt:
                # Ctrl-C: the outputs already handed to the writers are finished (each
                # is written atomically), then the summary says what is left.
                interrupted = True
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                collect(done)
        bar.close()

    hidden = f", {len(plan.hidden)} hidden file(s) not read" if plan.hidden else ""
    print(f"sr upscale: written {written}, skipped {skipped} (output exists), failed {len(failures)}{hidden}")
    show = storage.printable
    for url, message in notes:
        print(f"  WARNING {show(url)}: {show(message)}", file=sys.stderr)
    for url in plan.hidden:
        print(f"  SKIPPED {show(url)}: hidden file (its name starts with '.'); name it as an INPUT to upscale it",
              file=sys.stderr)
    for url, reason in failures:
        print(f"  FAILED {show(url)}: {show(reason)}", file=sys.stderr)
    if stopped:
        print(f"sr upscale: stopped ({stopped}); {len(todo) - bar.n} image(s) not done; run the same command "
              "again to finish them (outputs that exist are skipped)", file=sys.stderr)
        return 1
    if interrupted:
        left = len(todo) - bar.n
        print(f"sr upscale: interrupted with {left} image(s) not done; run the same command again to finish "
              "them (outputs that exist are skipped)", file=sys.stderr)
        return 130
    return 1 if failures else 0


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
    """Peak host bytes to upscale one image: the decoded input, three times the output
    at the network's scale (the Upscaler's assembly peaks under twice it, the encoder
    holds one more copy), 256 MiB of working memory (tiles, buffers), and, with another
    --outscale, the resized output (the banded resize peaks at about 1.55x). Measured
    by bench/bench_upscale_memory.py: a 2048x2048 input at x4 peaks 2.7x its output
    above an idle run."""
    sample = bands * sample_bytes
    need = height * width * sample + 3 * height * width * scale * scale * sample + WORKING_MEMORY
    if outscale is not None and outscale != scale:
        need += int(1.55 * round(height * outscale) * round(width * outscale) * sample)
    return need


def _read_within_memory(url: str, max_pixels: int | None, limit: int | None, scale: int,
                        outscale: float | None):
    """Read and decode an image, refusing first, from its header, one that would need
    more memory than ``limit`` (a 16K x 16K at x4 is 12 GiB of output alone)."""
    import io

    from PIL import Image

    from sr_core import codecs

    data = codecs.read_image_bytes(url)
    if limit is not None:
        try:
            header = Image.open(io.BytesIO(data), formats=codecs.DECODE_FORMATS)
            (width, height), mode = header.size, header.mode
        except Exception:  # not an image: decode_image says why
            width = height = 0
        if width and height and (max_pixels is None or width * height <= max_pixels):
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


def _out_unusable(exc: Exception) -> bool:
    """A write error that every later write would hit too: storage down past the
    retries, or a full / read-only / over-quota output."""
    import errno

    from sr_core import storage

    return isinstance(exc, storage.StorageError) or (
        isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS))


def _reason(exc: Exception, url: str) -> str:
    """The reason, without the URL our errors start with (the report names it)."""
    message = str(exc)
    if message.startswith(url + ": "):
        message = message[len(url) + 2:]
    if isinstance(exc, (ValueError, FileNotFoundError)):
        return message
    return f"{type(exc).__name__}: {message}"
