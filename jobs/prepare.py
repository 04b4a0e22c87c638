"""``sr prepare SRC DST``: cut HR images into overlapping sub-images, stored as tar
shards plus an index, so the training job reads small lossless crops instead of
decoding a whole 2K image per crop (BasicSR's ``extract_subimages``: 480 px, step 240).

Layout written under DST::

    plan.json               the settings and the sorted source list (written first)
    shards/UUUUU-PP.tar     sub-images of shard unit U, split into parts P of bounded size
    units/UUUUU.json        a finished unit's shards, checksums, members and bad images
    index.json              everything above merged; written LAST, so a DST without it
                            is unfinished and a re-run completes only the missing units

The sorted source list is split into units of ``images_per_shard`` images; a unit's
output depends only on its images and the settings (tar headers carry no times), so a
re-run after a crash writes byte-identical shards.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import signal
import sys
import tarfile
import time
import warnings
from dataclasses import asdict, dataclass

import numpy as np

from sr_core import codecs, storage
from sr_core.errors import is_unwritable
from sr_core.progress import bar as progress_bar

INDEX_FORMAT = "sr-cloud-subimages/1"
INDEX_NAME = "index.json"
# Member name suffix of each sub-image format; raw members are H*W*3 bytes, row-major RGB.
SUBIMAGE_FORMATS = {"png": ".png", "raw": ".rgb"}
PLAN_NAME = "plan.json"


@dataclass
class PrepareSettings:
    """What determines the output of ``sr prepare`` (recorded in plan and index)."""

    size: int = 480
    """Side of a sub-image in pixels."""

    step: int = 240
    """Distance between neighbouring sub-images (``size - step`` pixels overlap)."""

    min_size: int = 0
    """An edge strip narrower than this gets no sub-image of its own (it is only seen
    inside its neighbours' overlap); images smaller than this on a side are skipped."""

    images_per_shard: int = 16
    """Source images per shard unit: the granularity of resume and of rank assignment."""

    max_shard_mb: float = 256.0
    """A unit's tar is split into parts that stay below this size."""

    png_level: int = 3
    """zlib level of the lossless PNG sub-images."""

    format: str = "png"
    """``png`` (compressed, decoded whole per crop) or ``raw`` (uncompressed RGB bytes,
    about twice the size, but a crop reads just its rows and needs no decoding)."""

    include: tuple[str, ...] = ()
    """Glob patterns on the path below SRC; when given, only matching images are used."""

    exclude: tuple[str, ...] = ()
    """Glob patterns on the path below SRC of images to leave out."""

    def check(self) -> None:
        if self.size < 1 or self.step < 1:
            raise ValueError(f"--size ({self.size}) and --step ({self.step}) must be positive")
        if self.step > self.size:
            raise ValueError(f"--step ({self.step}) larger than --size ({self.size}) would skip pixels")
        if not 0 <= self.min_size <= self.size:
            raise ValueError(f"--min-size ({self.min_size}) must be between 0 and --size ({self.size})")
        if self.images_per_shard < 1:
            raise ValueError(f"--images-per-shard must be >= 1, got {self.images_per_shard}")
        if not 0 < self.max_shard_mb < float("inf"):  # NaN included: it compares false
            raise ValueError(f"--max-shard-mb must be a positive number, got {self.max_shard_mb}")
        if self.format not in SUBIMAGE_FORMATS:
            raise ValueError(f"--format must be one of {', '.join(SUBIMAGE_FORMATS)}, got {self.format!r}")
        if not 0 <= self.png_level <= 9:
            raise ValueError(f"--png-level must be 0..9, got {self.png_level}")

    def as_json(self) -> dict:
        d = asdict(self)
        d["include"], d["exclude"] = list(self.include), list(self.exclude)
        return d


def tile_starts(length: int, size: int, step: int, min_size: int) -> list[int]:
    """Start offsets of sub-images along one side of ``length`` pixels."""
    if length < size:
        return [0] if length >= max(min_size, 1) else []
    starts = list(range(0, length - size + 1, step))
    leftover = length - (starts[-1] + size)
    # The edge tile is flush with the border (full size, more overlap), as BasicSR does.
    if leftover > 0 and leftover >= min_size:
        starts.append(length - size)
    return starts


def list_sources(src: str, settings: PrepareSettings, unsafe: list[dict] | None = None,
                 hidden: list[dict] | None = None) -> list[str]:
    """Sorted paths below ``src`` of the images to prepare. Object names that would
    escape DST as member names (``..`` segments) and local symbolic links to files
    outside ``src`` are left out and, when ``unsafe`` is given, appended to it as
    bad-image entries; hidden images (names starting with '.') and named pipes, sockets
    and devices are left out and, when ``hidden`` is given, appended to it as skipped
    entries."""

    hidden_urls: list[str] = []
    special: list[tuple[str, str]] = []
    urls = storage.list_files(src, codecs.INPUT_EXTENSIONS, hidden=hidden_urls, special=special)
    keys = []
    root = storage.get_fs(src)[1].rstrip("/")
    src_is_folder = storage.is_local(src) and os.path.isdir(storage.local_path(src))

    def excluded(name: str) -> bool:
        return storage.matches_glob(name, settings.exclude)

    for url in hidden_urls:
        name = storage.get_fs(url)[1][len(root) + 1:]
        if hidden is not None and not excluded(name):
            hidden.append({"source": name, "reason": "hidden file (its name starts with '.'); rename it to "
                                                     "include it, or --exclude it"})
    for url, reason in special:  # named pipes, sockets, devices: never opened
        name = storage.get_fs(url)[1][len(root) + 1:]
        if hidden is not None and storage.selected(name, settings.include, settings.exclude):
            hidden.append({"source": name, "reason": reason})
    for url in urls:
        try:
            rel = storage.relative_key(src, url)
        except ValueError as exc:
            name = storage.get_fs(url)[1][len(root) + 1:]
            if unsafe is not None and not excluded(name):
                unsafe.append({"source": name, "reason": f"{exc}; rename the object or --exclude it"})
            continue
        if src_is_folder and (target := storage.link_out_of(src, url)):
            # Training data is what is below SRC: a link out of it could pull in any
            # file the user can read. Refused, as `sr upscale` does.
            if unsafe is not None and not excluded(rel):
                unsafe.append({"source": rel, "reason": f"a symbolic link to {target}, outside {src}; not "
                                                        "followed (copy the file into SRC, or --exclude it)"})
            continue
        if storage.selected(rel, settings.include, settings.exclude):
            keys.append(rel)
    return sorted(keys)




def _tar_member(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # no times in headers: a re-run writes identical bytes
    info.mode = 0o644
    return info, io.BytesIO(data)


class _PartWriter:
    """Collects sub-images into tar parts no larger than ``max_bytes`` (a single larger
    sub-image still gets a part of its own)."""

    def __init__(self, dst: str, unit: int, max_bytes: int):
        self.dst, self.unit, self.max_bytes = dst, unit, max_bytes
        self.shards: list[dict] = []
        self._start()

    def _start(self):
        self.buffer = io.BytesIO()
        self.tar = tarfile.open(fileobj=self.buffer, mode="w", format=tarfile.GNU_FORMAT)
        self.dims: dict[str, tuple[int, int]] = {}

    def add(self, name: str, png: bytes, height: int, width: int) -> None:
        # header + data padded to 512 + the two end blocks; tarfile's final record
        # padding (up to 10 KiB) is included in the margin.
        projected = self.tar.offset + 512 * (2 + (len(png) + 511) // 512) + 1024 + 10240
        if self.dims and projected > self.max_bytes:
            self.flush()
        self.tar.addfile(*_tar_member(name, png))
        self.dims[name] = (height, width)

    def flush(self) -> None:
        if not self.dims:
            return
        self.tar.close()
        data = self.buffer.getvalue()
        name = f"shards/{self.unit:05d}-{len(self.shards):02d}.tar"
        with tarfile.open(fileobj=io.BytesIO(data), mode="r") as reread:
            members = [[m.name, m.offset_data, m.size, *self.dims[m.name]] for m in reread.getmembers()]
        storage.write_bytes(storage.join(self.dst, name), data)
        self.shards.append({
            "name": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
            "num_subimages": len(members), "members": members,
        })
        self._start()


def prepare_unit(src: str, dst: str, unit: int, sources: list[str], settings: PrepareSettings) -> dict:
    """Cut one unit's images into sub-images, write its tar parts, then its manifest."""

    writer = _PartWriter(dst, unit, int(settings.max_shard_mb * 1024 * 1024))
    fs, root = storage.get_fs(src)
    src_is_one_file = fs.isfile(root)  # then its key is its basename
    bad, skipped, notes = [], [], []
    for rel in sources:
        try:
            # Decoder warnings (a corrupt EXIF block...) are kept as notes naming the file.
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                image = codecs.decode_rgb8(storage.read_bytes(src if src_is_one_file else storage.join(src, rel)), rel)
            notes.extend({"source": rel, "reason": str(w.message).strip()} for w in caught)
        except storage.StorageError:
            raise  # storage down past the retries: stop, a rerun resumes this unit
        except Exception as exc:  # any unreadable image is reported, the rest goes on
            # The entry names the file: drop the name our decode errors start with;
            # errors that are not ours keep their type.
            reason = str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"
            reason = reason[len(rel) + 2:] if reason.startswith(rel + ": ") else reason
            bad.append({"source": rel, "reason": reason})
            continue
        h, w = image.shape[:2]
        ys = tile_starts(h, settings.size, settings.step, settings.min_size)
        xs = tile_starts(w, settings.size, settings.step, settings.min_size)
        if not ys or not xs:
            skipped.append({"source": rel, "reason": f"{w}x{h} is smaller than --min-size {settings.min_size}"})
            continue
        # The member keeps the whole source name: a.png and a.jpg must not share members.
        k = 0
        for y in ys:
            for x in xs:
                tile = image[y:y + settings.size, x:x + settings.size]
                k += 1
                if settings.format == "raw":
                    data = np.ascontiguousarray(tile).tobytes()
                else:
                    data = codecs.encode_image(tile, codecs.EncodeOptions("png", png_compress_level=settings.png_level))
                writer.add(f"{rel}_s{k:03d}{SUBIMAGE_FORMATS[settings.format]}", data, *tile.shape[:2])
    writer.flush()
    manifest = {"unit": unit, "sources": sources, "shards": writer.shards, "bad": bad, "skipped": skipped,
                "warnings": notes}
    storage.write_bytes(storage.join(dst, "units", f"{unit:05d}.json"), json.dumps(manifest).encode())
    return manifest


def _prepare_unit_star(job):
    return prepare_unit(*job)


def _read_json(url: str, what: str, fix: str = "choose another DST for `sr prepare`") -> dict | None:
    """The JSON object at ``url``; None when there is none. A DST may hold files of
    another tool: anything that is not a JSON object is a ``ValueError`` naming it."""
    try:
        data = storage.read_bytes(url)
    except FileNotFoundError:
        return None
    try:
        value = json.loads(data)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise ValueError(f"{url}: not {what} (not a JSON object); {fix}")
    return value


def _worker_ignores_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def prepare(src: str, dst: str, settings: PrepareSettings, num_workers: int = 1,
            progress: bool = True) -> dict:
    """Prepare (or finish preparing) sub-image shards of ``src`` in ``dst``; returns the index."""
    settings.check()
    if num_workers < 1:
        raise ValueError(f"--workers must be >= 1, got {num_workers}")
    unsafe: list[dict] = []
    hidden: list[dict] = []
    sources = list_sources(src, settings, unsafe, hidden)
    if not sources:
        filtered = ", after --include/--exclude" if settings.include or settings.exclude else ""
        raise ValueError(f"{src}: no images found (looked for {', '.join(codecs.INPUT_EXTENSIONS)}{filtered})")
    plan = {"format": INDEX_FORMAT, "settings": settings.as_json(), "sources": sources}
    dst_fs, dst_path = storage.get_fs(dst)
    if dst_fs.isfile(dst_path):
        raise ValueError(f"{dst}: DST is a file; choose a folder (or prefix) for the shards and index")
    index = _finished_index(dst, plan)
    if index is not None:
        print(f"{dst}: already prepared ({index['num_subimages']} sub-images); nothing to do", file=sys.stderr)
        return index
    # A read-only, foreign or full DST is refused before any image is cut.
    storage.check_writable(dst)
    _claim_plan(dst, plan)
    # A killed local write leaves a temporary file behind; those of killed runs go,
    # those of a run still writing into the same DST stay.
    storage.remove_stale_temporaries(dst)

    per = settings.images_per_shard
    units = [sources[i:i + per] for i in range(0, len(sources), per)]
    manifests: dict[int, dict] = {}
    for u in range(len(units)):
        found = _read_json(storage.join(dst, "units", f"{u:05d}.json"), "an sr prepare unit manifest")
        if found is not None:
            manifests[u] = found
    pending = [(src, dst, u, units[u], settings) for u in range(len(units)) if u not in manifests]

    done_images = sum(len(units[u]) for u in manifests)
    bar = progress_bar(len(sources), "prepare", "img", initial=done_images, shown=progress)
    if manifests:
        bar.write(f"resuming: {len(manifests)} of {len(units)} shard units already done")
    start = time.monotonic()
    try:
        _run_units(pending, num_workers, manifests, bar)
    except OSError as exc:
        # a full (or quota-limited, or read-only) DST: the finished units are kept
        if is_unwritable(exc):
            raise ValueError(f"{dst}: cannot write ({exc.strerror}); free space there and re-run the same "
                             "command to finish the missing shards") from None
        raise
    finally:
        bar.close()

    ordered = [manifests[u] for u in range(len(units))]
    shards = [s for m in ordered for s in m["shards"]]
    index = {
        **plan,
        "source": src,
        "num_sources": len(sources),
        "num_subimages": sum(s["num_subimages"] for s in shards),
        "num_shards": len(shards),
        "total_bytes": sum(s["bytes"] for s in shards),
        "shards": shards,
        "bad": unsafe + [b for m in ordered for b in m["bad"]],
        "skipped": hidden + [s for m in ordered for s in m["skipped"]],
        "warnings": [w for m in ordered for w in m.get("warnings", [])],
        "seconds_last_run": round(time.monotonic() - start, 3),
    }
    storage.write_bytes(storage.join(dst, INDEX_NAME), json.dumps(index).encode())
    return index


def _finished_index(dst: str, plan: dict) -> dict | None:
    """The index already in ``dst`` when it was made from ``plan`` (None when there is
    none); an index of other images or settings, or of another tool, is refused."""
    index = _read_json(storage.join(dst, INDEX_NAME), "an sr prepare index")
    if index is None:
        return None
    if index.get("format") != INDEX_FORMAT:
        raise ValueError(f"{storage.join(dst, INDEX_NAME)}: not an sr prepare index (format "
                         f"{index.get('format')!r}); choose another DST")
    if index.get("settings") != plan["settings"] or index.get("sources") != plan["sources"]:
        raise FileExistsError(f"{dst} already holds a prepared data set made from other images or "
                              "settings; choose another DST (or delete it)")
    return index


def _claim_plan(dst: str, plan: dict) -> None:
    """Write ``plan.json`` into ``dst``, or check that the one there is ``plan``.

    Created only if absent: of two runs starting at once into one DST, one creates the
    plan and the other compares with it. Runs of the same plan may then work side by
    side (a unit's bytes depend only on the plan; temporaries are per process); a run
    of another plan is refused instead of interleaving its shards."""
    url = storage.join(dst, PLAN_NAME)
    old_plan = _read_json(url, "an sr prepare plan")
    if old_plan is None and not storage.create_bytes(url, json.dumps(plan, indent=1).encode()):
        old_plan = _read_json(url, "an sr prepare plan")
    if old_plan is not None and old_plan != plan:
        raise ValueError(f"{dst} holds an unfinished prepare of other images or settings; re-run it with "
                         "the same SRC and options to finish it, or choose another DST")


def _run_units(pending: list[tuple], num_workers: int, manifests: dict[int, dict], bar) -> None:
    """Cut the ``pending`` units (in this process, or in a pool of ``num_workers``),
    adding each finished unit's manifest to ``manifests`` as it arrives."""
    if num_workers == 1 or len(pending) <= 1:
        for job in pending:
            m = prepare_unit(*job)
            manifests[m["unit"]] = m
            bar.update(len(m["sources"]))
        return
    # spawn: gcsfs holds an event-loop thread and sockets that must not be forked
    ctx = multiprocessing.get_context("spawn")
    # Leaving the block (an error, Ctrl-C, SIGTERM as Terminated) terminates the
    # workers; they ignore SIGINT, so Ctrl-C at a terminal (sent to the whole group)
    # stops them through this process instead of a KeyboardInterrupt traceback each.
    with ctx.Pool(min(num_workers, len(pending)), initializer=_worker_ignores_sigint) as pool:
        for m in pool.imap_unordered(_prepare_unit_star, pending):
            manifests[m["unit"]] = m
            bar.update(len(m["sources"]))


def read_index(url: str) -> dict:
    """The index of a prepared data set, given its DST prefix or its ``index.json``."""
    index_url = url if url.endswith(".json") else storage.join(url, INDEX_NAME)
    index = _read_json(index_url, "an sr prepare index", "give the DST of `sr prepare` or its index.json")
    if index is None:
        hint = (" (it holds plan.json: the prepare did not finish; re-run `sr prepare` with the same arguments)"
                if not url.endswith(".json") and storage.exists(storage.join(url, PLAN_NAME)) else
                " (make it with `sr prepare SRC DST`)")
        raise FileNotFoundError(f"{index_url}: no index of prepared sub-images{hint}") from None
    if index.get("format") != INDEX_FORMAT:
        raise ValueError(f"{index_url}: not an sr prepare index (format {index.get('format')!r}, "
                         f"expected {INDEX_FORMAT!r})")
    check_index(index_url, index)
    return index


def check_index(index_url: str, index: dict) -> None:
    """An index the loader can trust: every shard and every member listed once, each
    member inside its shard. An index edited by hand (or by a tool gone wrong) that lists
    a member 30 times would train on it 30 times as often, silently."""
    fix = "the index was edited or is damaged: re-run `sr prepare`"
    try:
        shards = index["shards"]
        counts: dict[str, int] = {}
        members: dict[str, int] = {}
        for shard in shards:
            name, nbytes = shard["name"], int(shard["bytes"])
            counts[name] = counts.get(name, 0) + 1
            for member, offset, size, height, width in shard["members"]:
                members[member] = members.get(member, 0) + 1
                if not (0 <= int(offset) and 0 < int(size) and int(offset) + int(size) <= nbytes
                        and int(height) > 0 and int(width) > 0):
                    raise ValueError(f"{index_url}: member {member} of {name} lies outside the shard "
                                     f"({offset}+{size} of {nbytes} bytes) or has no pixels; {fix}")
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, ValueError) and str(exc).startswith(index_url):
            raise
        raise ValueError(f"{index_url}: malformed shard list ({type(exc).__name__}: {exc}); {fix}") from None
    for kind, seen in (("shard", counts), ("member", members)):
        repeated = [(name, n) for name, n in seen.items() if n > 1]
        if repeated:
            name, n = repeated[0]
            others = f" (and {len(repeated) - 1} more {kind}s)" if len(repeated) > 1 else ""
            raise ValueError(f"{index_url}: {kind} {name} is listed {n} times{others}; {fix}")
