"""Listing a folder or prefix as a stream, one folder (or one page of a folder) at a
time, so that planning ``sr batch`` over millions of inputs holds one folder's names,
never the whole listing.

- Local folders: ``os.scandir``, one directory at a time, its names sorted (a sorted
  order keeps runs reproducible); symbolic links are followed as before, each file
  reached through a link is checked for leaving the folder (``storage.link_out_of``),
  and a linked folder is entered once (a link to an ancestor would loop).
- Cloud Storage: the JSON API's ``objects.list`` with ``delimiter=/``, 1,000 names per
  page, ``NUM_LIST_THREADS`` requests in flight: folders are listed at the same time,
  and a folder whose first page is full is cut there into lexicographic ranges
  (``startOffset``/``endOffset``, points chosen by ``split_points`` from that page)
  listed at the same time too, each range cut again after its own first full page.
  Each range's pages come in name order; folders and ranges interleave in the order
  their requests finish, so the order of the chunks (and of a run's tasks, and which
  images ``--limit`` picks) is not fixed from one run to the next; what is planned is.
- Any other fsspec store: ``fs.walk``, one folder at a time.

A listing yields ``Chunk``s: some names of one folder. Names with one stem (``a.jpg``,
``a.png``) share a chunk, so the checks that compare them (two inputs with one output)
see them together: object stores list a folder in name order, and all names that start
with ``a.`` are contiguous in that order, so a page's last names that may share a stem
with the next page are held back for the next chunk, and no range is cut inside them.
"""

from __future__ import annotations

import itertools
import os
import posixpath
import queue
import stat
import threading
from dataclasses import dataclass, field
from typing import Iterator

from sr_core import storage

PAGE_SIZE = 1000
"""Names per listing request (Cloud Storage's maximum)."""
NUM_LIST_THREADS = 16
"""Requests of an object store's listing in flight at once (folders and ranges)."""
MAX_SPLITS = 64
"""Points at most where the rest of a folder's range is cut after a full page."""


@dataclass
class Chunk:
    """Some files of one folder."""

    folder: str
    """The folder's path below the listed root, '/'-separated ('' for the root)."""
    names: list[str] = field(default_factory=list)
    """Regular files (and, locally, broken links, whose read then fails), sorted."""
    linked: list[str] = field(default_factory=list)
    """Of ``names``, those reached through a symbolic link (locally): each must be
    checked for leading out of the listed folder."""
    special: list[tuple[str, str]] = field(default_factory=list)
    """(name, kind) of named pipes, sockets and devices (locally): never opened."""


def walk(url: str, skip: str | None = None, whole_folders: bool = False) -> Iterator[Chunk]:
    """The files below ``url`` (a folder or prefix), folder by folder. ``skip``: a
    folder (a URL of the same store) not to enter, e.g. OUTPUT inside INPUT.
    ``whole_folders``: one chunk per folder even on paged stores (when the checks must
    see a folder whole)."""
    fs, root = storage.get_fs(url)
    if storage.is_local(url):
        yield from _walk_local(storage.local_path(url), skip and storage.local_path(skip))
    elif storage.is_gcs(url):
        skip_path = storage.get_fs(skip)[1].rstrip("/") if skip else None
        # Checks that need each folder whole need it in one stream: no ranges then.
        yield from _merge_pages(_walk_gcs(fs, root.rstrip("/"), skip_path, ranges=not whole_folders), whole_folders)
    else:
        skip_path = storage.get_fs(skip)[1].rstrip("/") if skip else None
        yield from _walk_fsspec(fs, root.rstrip("/"), skip_path)


def _walk_local(root: str, skip: str | None) -> Iterator[Chunk]:
    root = os.path.abspath(root)
    skip = os.path.abspath(skip) if skip else None
    entered = {os.path.realpath(root)}
    stack: list[tuple[str, str, bool]] = [("", root, False)]
    while stack:
        rel, path, via_link = stack.pop()
        chunk = Chunk(rel)
        dirs = []
        try:
            entries = list(os.scandir(path))
        except OSError:
            continue  # unreadable or vanished while listed: as fsspec's find, nothing below it
        for entry in entries:
            try:
                is_dir = entry.is_dir()
            except OSError:
                is_dir = False
            if is_dir:
                if entry.path == skip:
                    continue
                if entry.is_symlink():
                    real = os.path.realpath(entry.path)
                    if real in entered:
                        continue
                    entered.add(real)
                dirs.append((entry.name, entry.is_symlink()))
                continue
            name = entry.name
            try:
                is_file = entry.is_file()
            except OSError:
                is_file = False
            if not is_file and (kind := _special(entry.path)):
                chunk.special.append((name, kind))
                continue
            chunk.names.append(name)
            if via_link or entry.is_symlink():
                chunk.linked.append(name)
        chunk.names.sort()
        chunk.special.sort()
        yield chunk
        for name, is_link in sorted(dirs, reverse=True):
            stack.append((f"{rel}/{name}" if rel else name, os.path.join(path, name), via_link or is_link))


def _special(path: str) -> str | None:
    """What a local non-regular, non-folder entry is ('a named pipe (FIFO)', ...), or
    None for a broken link (listed: its read fails and says so)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    return storage.special_kind(path)


def _walk_fsspec(fs, root: str, skip: str | None) -> Iterator[Chunk]:
    if fs.isfile(root):
        yield Chunk("", [posixpath.basename(root)])
        return
    for folder, dirs, files in fs.walk(root):
        folder = folder.rstrip("/")
        if skip is not None:
            dirs[:] = [d for d in dirs if f"{folder}/{d}" != skip]
        rel = folder[len(root) + 1:] if folder != root else ""
        yield Chunk(rel, sorted(files))


def _gcs_page(fs, bucket: str, prefix: str, span: "_Span", token: str | None) -> dict:
    """One ``objects.list`` page of a folder's range (``delimiter=/``)."""
    from fsspec.asyn import sync

    offsets = {}
    if span.start is not None:
        offsets["startOffset"] = span.start
    if span.end is not None:
        offsets["endOffset"] = span.end
    return sync(fs.loop, fs._call_list_objects, bucket, prefix=prefix, delimiter="/", maxResults=PAGE_SIZE,
                pageToken=token, **offsets)


@dataclass
class _Span:
    """A lexicographic range of one folder's object names (full names in the bucket)."""

    folder: str
    """The folder below the listed root ('' for the root)."""
    start: str | None = None
    """``startOffset``: the first name it may hold (None: the folder's first)."""
    end: str | None = None
    """``endOffset``: names below it (None: to the folder's end)."""
    after: str | None = None
    """A name already listed by the range this one was split from: it and the names
    before it are dropped (``startOffset`` is inclusive)."""


def split_points(entries: list[str], base: int, end: str | None, most: int = MAX_SPLITS) -> list[str]:
    """Where to cut the rest of a folder's range after a full page: ``entries`` are the
    page's names and prefixes (sorted, full names), ``base`` the length of the folder's
    prefix, ``end`` the range's own end. The page's last name L is where the rest
    starts; its names vary from position v on (the length of the prefix common to the
    page's first and last names). Each position j from v down to the folder's prefix
    gives the points L[:j] + c for every character c after L[j] among those the page's
    names hold from position v on (the guess of what the rest's names are made of, e.g.
    digits or hex; a few letters of the extension cost a few empty ranges): a page of
    img_000000.jpg..img_000999.jpg gives img_001..img_009,
    img_01..img_09, img_1..img_9, so the rest is cut into ranges that grow tenfold, each
    split again after its own first full page. Points never hold '/' or '.' below the
    folder, so no range cuts a sub-folder or the names of one stem (a.jpg, a.png) in
    two. At most ``most`` points, evenly kept; none when the page tells nothing."""
    if not entries:
        return []
    first, last = entries[0], entries[-1]
    vary = len(posixpath.commonprefix([first, last]))
    alphabet = sorted({c for e in entries for c in e[vary:]} - {"/", "."})
    points = set()
    for j in range(min(vary, len(last) - 1), base - 1, -1):
        head = last[:j]
        if "/" in head[base:] or "." in head[base:]:
            continue
        for c in alphabet:
            p = head + c
            if c > last[j] and (end is None or p < end):
                points.add(p)
    ordered = sorted(points)
    if len(ordered) > most:
        step = len(ordered) / most
        ordered = [ordered[int(i * step)] for i in range(most)]
    return ordered


def _split(span: _Span, last: str, points: list[str]) -> list[_Span]:
    """``span``'s rest after ``last``, cut at ``points`` (sorted, all after ``last``)."""
    bounds = [last, *points]
    spans = [_Span(span.folder, start=lo, end=hi) for lo, hi in zip(bounds, [*points, span.end])]
    spans[0].after = last
    return spans


def _walk_gcs(fs, root: str, skip: str | None, ranges: bool = True) -> Iterator[tuple[tuple, str, list[str], bool]]:
    """(stream, folder below root, names, last page of the stream) from
    ``NUM_LIST_THREADS`` threads. A stream is one folder, or one range of a folder's
    names: a folder whose first page is full is cut into ranges there (``split_points``,
    unless ``ranges`` is False) listed at the same time as the other folders and ranges,
    each page by page. Pages queue up to a bound, so the listing runs ahead of the plan
    by at most that much. Pages of one stream come in name order; streams interleave in
    the order their requests finish."""
    bucket, _, key = root.partition("/")
    if key and fs.isfile(root):  # INPUT names one object
        yield ("", 0), "", [posixpath.basename(key)], True
        return
    base = f"{key}/" if key else ""
    spans: queue.Queue = queue.Queue()
    pages: queue.Queue = queue.Queue(maxsize=4 * NUM_LIST_THREADS)
    pending = [1]  # spans queued or being listed
    ids = itertools.count(1)
    lock = threading.Lock()
    stop = threading.Event()
    spans.put((0, _Span("")))

    def queue_span(span: _Span, sid: int | None = None) -> None:
        with lock:
            pending[0] += 1
        spans.put((next(ids) if sid is None else sid, span))

    def list_span(sid: int, span: _Span) -> None:
        prefix = base + (span.folder + "/" if span.folder else "")
        token = None
        while not stop.is_set():
            page = _gcs_page(fs, bucket, prefix, span, token)
            entries = sorted([item["name"] for item in page.get("items", [])] + page.get("prefixes", []))
            if span.after is not None:
                entries = [e for e in entries if e > span.after]
            for sub in (e[len(prefix):-1] for e in entries if e.endswith("/") and e.startswith(prefix)):
                child = f"{span.folder}/{sub}" if span.folder else sub
                if sub and (skip is None or f"{bucket}/{base}{child}" != skip):
                    queue_span(_Span(child))
            names = [e[len(prefix):] for e in entries if e.startswith(prefix) and not e.endswith("/")]
            token = page.get("nextPageToken")
            points = split_points(entries, len(prefix), span.end) if (token and ranges and entries) else []
            pages.put(((span.folder, sid), span.folder, names, not token))
            if points:
                # The first range goes on with this stream (a stem cut by this page's end
                # continues there); the page is queued before it, so the stream's pages
                # stay in name order.
                children = _split(span, entries[-1], points)
                queue_span(children[0], sid)
                for child in children[1:]:
                    queue_span(child)
                return
            if not token:
                return

    def worker() -> None:
        while not stop.is_set():
            item = spans.get()
            if item is None:
                return
            try:
                list_span(*item)
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer
                pages.put(exc)
            finally:
                with lock:
                    pending[0] -= 1
                    if pending[0] == 0:
                        pages.put(None)

    for _ in range(NUM_LIST_THREADS):
        threading.Thread(target=worker, daemon=True, name="sr batch: list").start()
    yield from _consume(pages, spans, stop)


def _consume(pages: queue.Queue, spans: queue.Queue, stop: threading.Event) -> Iterator:
    """The workers' pages until the last (None), re-raising a worker's error; at the end
    (or when the consumer stops early) the workers are told to stop."""
    try:
        while True:
            item = pages.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        for _ in range(NUM_LIST_THREADS):
            spans.put(None)
        while True:  # unblock workers waiting on a full queue
            try:
                pages.get_nowait()
            except queue.Empty:
                break


def _stem(name: str) -> str:
    return posixpath.splitext(name)[0]


def _merge_pages(pages: Iterator[tuple[tuple, str, list[str], bool]], whole_folders: bool) -> Iterator[Chunk]:
    """Chunks from streams' pages (which may interleave between folders and ranges): a
    page's trailing names whose stem may continue on the stream's next page wait for it."""
    held: dict[tuple, list[str]] = {}
    for stream, folder, names, last in pages:
        names = held.pop(stream, []) + names
        if not last:
            if whole_folders:
                held[stream] = names
                continue
            # A later name shares a stem with this one only if the page's last name
            # does too (the names that start with "<stem>." are contiguous).
            tail = names[-1] if names else ""
            later = [tail.startswith(_stem(n) + ".") for n in names]
            held[stream] = [n for n, wait in zip(names, later) if wait]
            names = [n for n, wait in zip(names, later) if not wait]
        if names or last:
            yield Chunk(folder, names)


def names_between(url: str, first: str, last: str) -> set[str]:
    """The names of the files directly in the folder ``url`` (an object store's) from
    ``first`` to ``last``, both included: on Cloud Storage only that range is listed
    (``startOffset``/``endOffset``, a request per 1,000 names), elsewhere the folder."""
    fs, path = storage.get_fs(url)
    path = path.rstrip("/")
    if not storage.is_gcs(url):
        try:
            return {posixpath.basename(p) for p in fs.ls(path, detail=False) if fs.isfile(p)}
        except (FileNotFoundError, NotADirectoryError):
            return set()
    bucket, _, key = path.partition("/")
    prefix = f"{key}/" if key else ""
    # endOffset is exclusive: the smallest name after ``last`` that is not one of its
    # extensions by a printable character ends the range.
    span = _Span("", start=prefix + first, end=prefix + last + " ")
    found, token = set(), None
    while True:
        page = _gcs_page(fs, bucket, prefix, span, token)
        found.update(item["name"][len(prefix):] for item in page.get("items", [])
                     if item["name"].startswith(prefix) and first <= item["name"][len(prefix):] <= last)
        token = page.get("nextPageToken")
        if not token:
            return found
