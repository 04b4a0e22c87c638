"""The output-naming contract shared by ``sr upscale`` and ``sr batch``: which input
files an argument names, where each one's output goes, and the settings that decide how
an image is upscaled and encoded, so that one image gives the same output file through
either command.

Each output goes to OUT/<path of the input below the folder (or glob prefix) it was
found under>, with the new extension and a suffix. Folder and glob listings never pick
up a run's own outputs (OUT may lie inside or be an input folder) and do not follow
symbolic links out of the folder; a file named on the command line is always taken as
it is, glob characters and links included. An output key that would escape OUT, collide
with another output or replace an input is refused with its reason.
"""

from __future__ import annotations

import math
import posixpath
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from sr_core import codecs, storage
from sr_core.errors import strip_url
from sr_core.precision import PRECISIONS
from sr_core.upscaler import DEFAULT_OVERLAP, Upscaler

_GLOB_CHARS = "*?["
# Outscale factors beyond this are refused as a usage error: x64 of a 64x64 icon is
# already 4096x4096; larger factors are typos (1000 for 1.000) that would ask for tens
# of GiB before the memory check of a single image could name it.
MAX_OUTSCALE = 64


@dataclass(frozen=True)
class OutputSettings:
    """How images are upscaled, named and encoded (the options `sr upscale` and `sr batch`
    share). Checked on construction: a ValueError names the wrong field."""

    encode: codecs.EncodeOptions = field(default_factory=codecs.EncodeOptions)
    """Output format and its quality settings."""
    outscale: float | None = None
    """Final scale factor; the network's output is resized with MATLAB bicubic (None: the
    model's own scale)."""
    max_pixels: int = codecs.DEFAULT_MAX_PIXELS
    """Inputs with more pixels are refused (decompression-bomb guard)."""
    suffix: str = "_sr"
    """Added to output file names before the extension."""
    tile: int | None = None
    """Tile side in input pixels; 0 disables tiling; None chooses from memory."""
    overlap: int = DEFAULT_OVERLAP
    """Context pixels around each tile."""
    tiles_per_batch: int | None = None
    """Tiles per forward pass (None: 4 on GPUs, 1 on CPU)."""
    precision: str = "auto"
    """``auto`` (fp16 on V100-class GPUs, bf16 on A100 and newer; on CPUs with AMX or
    AVX512-BF16 bf16 for the compact generator; fp32 otherwise), ``fp32``, ``fp16`` or
    ``bf16``."""
    alpha: str = "model"
    """How an alpha channel is upscaled: ``model`` or ``bicubic``."""

    def __post_init__(self):
        if self.outscale is not None and not (math.isfinite(self.outscale) and 0 < self.outscale <= MAX_OUTSCALE):
            raise ValueError(f"--outscale must be a number above 0 and at most {MAX_OUTSCALE}, got {self.outscale}")
        if self.max_pixels < 1:
            raise ValueError(f"--max-pixels must be >= 1, got {self.max_pixels}")
        if "/" in self.suffix or "\\" in self.suffix:
            raise ValueError(f"--suffix must not hold a path separator, got {self.suffix!r}")
        if self.tile is not None and self.tile < 0:
            raise ValueError(f"--tile must be >= 0 (0 disables tiling), got {self.tile}")
        if self.overlap < 0:
            raise ValueError(f"--overlap must be >= 0, got {self.overlap}")
        if self.tiles_per_batch is not None and self.tiles_per_batch < 1:
            raise ValueError(f"--tiles-per-batch must be >= 1, got {self.tiles_per_batch}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.alpha not in ("model", "bicubic"):
            raise ValueError(f"--alpha must be model or bicubic, got {self.alpha!r}")

    def load_upscaler(self, model_url: str, device: str = "auto") -> Upscaler:
        """The Upscaler these settings ask for, for the model file at ``model_url``."""
        return Upscaler.from_file(model_url, device=device, precision=self.precision, tile=self.tile,
                                  overlap=self.overlap, tiles_per_batch=self.tiles_per_batch, alpha=self.alpha)


@dataclass
class Task:
    """One input image and where its output goes."""

    input: str
    """Input URL."""
    output: str
    """Output URL (below OUT)."""


@dataclass
class Plan:
    """The tasks an argument list names, and what was refused while naming them."""

    tasks: list[Task] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)
    """(input, reason): inputs that cannot be found, or whose output would escape OUT,
    collide or replace an input."""
    hidden: list[str] = field(default_factory=list)
    """Hidden images found by listing (names starting with '.'): reported, not upscaled."""
    special: list[tuple[str, str]] = field(default_factory=list)
    """(URL, reason) of non-regular files with image names found by listing (named
    pipes, sockets, devices): reported, never opened."""


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


def _find_inputs(url: str, plan: Plan) -> list[tuple[str, str, bool]]:
    """(root, file URL, found by listing a folder or glob) for one INPUT argument;
    raises FileNotFoundError, or ValueError for a named pipe, socket or device. Hidden
    and non-regular files a listing finds are recorded on ``plan``."""
    fs, path = storage.get_fs(url)
    prefix = storage.protocol_prefix(url)

    def full(p: str) -> str:
        return p if not prefix or p.startswith(prefix) else prefix + p

    # A name that exists is taken literally, so files and folders whose names hold
    # glob characters ("x[1].png") can be named.
    if _has_glob(url) and not fs.exists(path):
        matches = []
        for p in fs.glob(path):
            name = posixpath.basename(p)
            if name.startswith("."):
                if fs.isfile(p) and not name.startswith(storage.TMP_PREFIX):
                    plan.hidden.append(full(p))
            elif kind := storage.special_kind(full(p)):
                plan.special.append((full(p), f"{kind}, not a regular file; not read"))
            elif fs.isfile(p):
                matches.append(p)
        if not matches:
            raise FileNotFoundError(f"{url}: the pattern matches no files")
        return [(_glob_root(url), full(p), True) for p in sorted(matches)]
    if not fs.exists(path):
        raise FileNotFoundError(f"{url}: no such file or folder")
    if kind := storage.special_kind(url):
        raise ValueError(f"{url}: {kind}, not a regular file; only files can be read")
    if fs.isdir(path):
        files = storage.list_files(url, suffixes=codecs.INPUT_EXTENSIONS, hidden=plan.hidden, special=plan.special)
        return [(url, f, True) for f in files]
    return [(full(posixpath.dirname(path)) if prefix else posixpath.dirname(path), url, False)]


def _is_below(path: str, folder: str) -> bool:
    return path.startswith(folder.rstrip("/") + "/")


def plan_outputs(inputs: list[str], out: str, suffix: str, extension: str) -> Plan:
    """Map every input file to its output URL; inputs that cannot be found, and outputs
    that would collide or replace an input, become failures."""
    plan = Plan()
    found = []
    for url in inputs:
        try:
            found.extend(_find_inputs(url, plan))
        except storage.StorageError:
            raise  # storage unreachable: nothing else would work either
        except (FileNotFoundError, ValueError, OSError) as exc:
            plan.failures.append((url, strip_url(exc, url)))
    return assign_outputs(found, out, suffix, extension, plan)


def assign_outputs(found: list[tuple[str, str, bool]], out: str, suffix: str, extension: str,
                   plan: Plan | None = None) -> Plan:
    """Map found inputs ``(root, file URL, found by listing a folder)`` to output URLs
    (OUT/<path below root, new suffix and extension>) in ``plan``; outputs that would
    escape OUT, collide or replace an input become failures."""
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
            plan.tasks.append(Task(url, output))
    return plan


class BackgroundWork:
    """Encoding and writing outputs on a few threads while the caller computes the next
    one, with the number of outputs waiting bounded so that memory holds a few of them
    whatever the number of images (Pillow's encoders release the GIL).

    ``submit(key, fn, *args)`` waits while ``max_pending`` are pending and returns the
    ``(key, future)`` pairs that finished meanwhile; ``drain()`` returns the rest. The
    caller reads each future's result or exception."""

    def __init__(self, threads: int, max_pending: int | None = None):
        self.pool = ThreadPoolExecutor(max_workers=threads)
        self.max_pending = max_pending or threads
        self.pending: dict[Future, object] = {}

    def submit(self, key, fn, *args) -> list[tuple[object, Future]]:
        finished = []
        while len(self.pending) >= self.max_pending:
            finished += self._wait()
        self.pending[self.pool.submit(fn, *args)] = key
        return finished

    def drain(self) -> list[tuple[object, Future]]:
        finished = []
        while self.pending:
            finished += self._wait()
        return finished

    def close(self) -> None:
        self.pool.shutdown(wait=True)

    def _wait(self) -> list[tuple[object, Future]]:
        done, _ = wait(self.pending, return_when=FIRST_COMPLETED)
        return [(self.pending.pop(future), future) for future in done]
