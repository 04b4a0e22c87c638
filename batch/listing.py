"""Listing a folder or prefix as a stream, one folder (or one page of a folder) at a
time, so that planning ``sr batch`` over millions of inputs holds one folder's names,
never the whole listing.

- Local folders: ``os.scandir``, one directory at a time, its names sorted (a sorted
  order keeps runs reproducible); symbolic links are followed as before, each file
  reached through a link is checked for leaving the folder (``storage.link_out_of``),
  and a linked folder is entered once (a link to an ancestor would loop).
- Cloud Storage: the JSON API's ``objects.list`` with ``delimiter=/``, 1,000 names per
  page, page after page, several folders listed at once (``num_threads``). Each folder's
  pages come in name order.
- Any other fsspec store: ``fs.walk``, one folder at a time.

A listing yields ``Chunk``s: some names of one folder. Names with one stem (``a.jpg``,
``a.png``) share a chunk, so the checks that compare them (two inputs with one output)
see them together: object stores list a folder in name order, and all names that start
with ``a.`` are contiguous in that order, so a page's last names that may share a stem
with the next page are held back for the next chunk.
"""

from __future__ import annotations

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
"""Folders of an object store listed at the same time."""


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
        yield from _merge_pages(_walk_gcs(fs, root.rstrip("/"), skip_path), whole_folders)
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


def _gcs_pages(fs, bucket: str, prefix: str) -> Iterator[tuple[list[str], list[str]]]:
    """(object names, sub-prefixes) of one folder, page by page (names relative to it)."""
    from fsspec.asyn import sync

    token = None
    while True:
        page = sync(fs.loop, fs._call_list_objects, bucket, prefix=prefix, delimiter="/", maxResults=PAGE_SIZE,
                    pageToken=token)
        names = [item["name"][len(prefix):] for item in page.get("items", [])
                 if item["name"].startswith(prefix) and not item["name"].endswith("/")]
        subs = [p[len(prefix):-1] for p in page.get("prefixes", []) if p.startswith(prefix) and p.endswith("/")]
        yield names, subs
        token = page.get("nextPageToken")
        if not token:
            return


def _walk_gcs(fs, root: str, skip: str | None) -> Iterator[tuple[str, list[str], bool]]:
    """(folder below root, names, last page of the folder) from ``NUM_LIST_THREADS``
    threads, each listing whole folders page by page; pages queue up to a bound, so the
    listing runs ahead of the plan by at most that much."""
    bucket, _, key = root.partition("/")
    if key and fs.isfile(root):  # INPUT names one object
        yield "", [posixpath.basename(key)], True
        return
    base = f"{key}/" if key else ""
    folders: queue.Queue = queue.Queue()
    pages: queue.Queue = queue.Queue(maxsize=4 * NUM_LIST_THREADS)
    pending = [1]  # folders queued or being listed
    lock = threading.Lock()
    stop = threading.Event()
    folders.put("")

    def worker() -> None:
        while not stop.is_set():
            rel = folders.get()
            if rel is None:
                return
            try:
                prefix = base + (rel + "/" if rel else "")
                for names, subs in _gcs_pages(fs, bucket, prefix):
                    for sub in subs:
                        child = f"{rel}/{sub}" if rel else sub
                        if skip is not None and f"{bucket}/{base}{child}" == skip:
                            continue
                        with lock:
                            pending[0] += 1
                        folders.put(child)
                    pages.put((rel, names, False))
                pages.put((rel, [], True))
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer
                pages.put(exc)
            finally:
                with lock:
                    pending[0] -= 1
                    if pending[0] == 0:
                        pages.put(None)

    threads = [threading.Thread(target=worker, daemon=True, name="sr batch: list") for _ in range(NUM_LIST_THREADS)]
    for t in threads:
        t.start()
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
        for _ in threads:
            folders.put(None)
        while True:  # unblock workers waiting on a full queue
            try:
                pages.get_nowait()
            except queue.Empty:
                break


def _stem(name: str) -> str:
    return posixpath.splitext(name)[0]


def _merge_pages(pages: Iterator[tuple[str, list[str], bool]], whole_folders: bool) -> Iterator[Chunk]:
    """Chunks from folders' pages (which may interleave between folders): a page's
    trailing names whose stem may continue on the next page wait for it."""
    held: dict[str, list[str]] = {}
    for folder, names, last in pages:
        names = held.pop(folder, []) + names
        if not last:
            if whole_folders:
                held[folder] = names
                continue
            # A later name shares a stem with this one only if the page's last name
            # does too (the names that start with "<stem>." are contiguous).
            tail = names[-1] if names else ""
            later = [tail.startswith(_stem(n) + ".") for n in names]
            held[folder] = [n for n, wait in zip(names, later) if wait]
            names = [n for n, wait in zip(names, later) if not wait]
        if names or last:
            yield Chunk(folder, names)
