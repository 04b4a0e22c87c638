"""The one place that opens, lists, checks and atomically writes fsspec URLs.

Every path in sr-cloud is an fsspec URL: ``gs://``, ``s3://``, ``file://``, ``memory://``
or a plain local path. Readers must never see half-written objects: local writes go
to a temporary name in the same folder and are published with ``os.replace``; object
stores publish an object only when its upload completes, so a direct write is atomic.
"""

from __future__ import annotations

import errno
import fcntl
import fnmatch
import hashlib
import logging
import os
import posixpath
import re
import shutil
import socket
import stat
import tempfile
import time
from typing import Iterable

from fsspec.core import url_to_fs

from sr_core.errors import StorageError, short_reason
from sr_core.retry import RetryPolicy

# fsspec's read-ahead logs each failed fetch at ERROR level (three lines, no names)
# before it re-raises the error; ours names the object, so those lines are noise.
logging.getLogger("fsspec.prefetcher").setLevel(logging.CRITICAL)


def get_fs(url: str):
    """Return ``(filesystem, path)`` for a URL. gs:// uses anonymous access against an
    emulator (``STORAGE_EMULATOR_HOST``), Google's default credentials otherwise; it is
    refused in seconds, with one line saying what to set, when there are none or the
    endpoint cannot be reached."""
    if not is_gcs(url):
        return url_to_fs(url)
    _gcs_environment()
    from sr_core.gcs import RetryingRequests, gcs_options

    try:
        options = gcs_options(os.environ.get("STORAGE_EMULATOR_HOST", ""), os.environ.get("SR_GCS_ANON", ""))
    except StorageError as exc:
        raise StorageError(f"{url}: {exc}") from None
    # gcsfs sends every request through this aiohttp session: our middleware retries it
    # (bounded, one log line per retry, a one-line StorageError at the end) and stops
    # gcsfs's own retry loop from trying it again.
    fs, path = url_to_fs(url, **options, session_kwargs={"middlewares": (RetryingRequests(RetryPolicy.from_env()),)})
    return fs, path


def _gcs_environment() -> None:
    """Settings gcsfs and google-auth read once, when they are imported (here, on the
    first gs:// URL; a value the user set is kept)."""
    # gcsfs 2026.x probes each bucket over gRPC for hierarchical-namespace support unless
    # told not to, which hangs for a minute per operation against the emulator and on
    # networks without gRPC egress.
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    # google-auth asks the GCE metadata server whether it runs on GCE: 3 attempts of 3 s
    # each by default. On GCE the server answers in milliseconds; elsewhere those
    # seconds are pure waiting.
    os.environ.setdefault("GCE_METADATA_TIMEOUT", "2")
    os.environ.setdefault("GCE_METADATA_DETECT_RETRIES", "2")


def is_gcs(url: str) -> bool:
    return url.startswith(("gs://", "gcs://"))


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def local_path(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def protocol_prefix(url: str) -> str:
    """``gs://`` for gs URLs, ``''`` for local paths: prepend to paths fsspec returns."""
    return url.split("://", 1)[0] + "://" if "://" in url and not url.startswith("file://") else ""


def join(base: str, *parts: str) -> str:
    """Join URL parts with '/', keeping the scheme of ``base``."""
    if is_local(base):
        return os.path.join(local_path(base), *parts)
    return posixpath.join(base.rstrip("/"), *parts)


def _read_umask() -> int:
    # os.umask can only be read by setting it; do it once at import, not per write,
    # because a momentary umask of 0 would leak into files other threads create.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


_SPECIAL_KINDS = ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"),
                  (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def special_kind(url: str) -> str | None:
    """What a local path is when it is neither a regular file nor a folder (``"a named
    pipe (FIFO)"``, ``"a socket"``, a device), following symbolic links; None otherwise,
    for paths that do not exist and for object stores (which hold only objects).
    Found with ``stat``, which never opens the file: opening a FIFO for reading blocks
    until something writes to it, and a device can be endless."""
    if not is_local(url):
        return None
    try:
        mode = os.stat(local_path(url)).st_mode
    except (OSError, ValueError):
        return None  # missing, a broken link or a loop: the read that follows says so
    return next((kind for test, kind in _SPECIAL_KINDS if test(mode)), None)


def read_bytes(url: str) -> bytes:
    kind = special_kind(url)
    if kind:  # refused before it is opened: opening a FIFO blocks forever
        raise ValueError(f"{url}: {kind}, not a regular file; only files can be read")
    fs, path = get_fs(url)
    try:
        with fs.open(path, "rb") as f:
            return f.read()
    except StorageError as exc:
        raise StorageError(f"reading {url}: {exc}") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # a broken input like any other, not a failing disk
            raise ValueError(f"{url}: a loop of symbolic links, not a file") from None
        raise


def exists(url: str) -> bool:
    fs, path = get_fs(url)
    return fs.exists(path)


def size(url: str) -> int:
    fs, path = get_fs(url)
    return int(fs.size(path))


def _local_temporary(path: str, data: bytes) -> str:
    """``data`` in a temporary file beside ``path`` (named for remove_stale_temporaries),
    with the permissions a plain open() would give (mkstemp makes owner-only files).

    The temporary name is short and of fixed length (``.tmp-HOST-PID-RANDOM``, at most
    30 bytes), so any name the folder's file system accepts can be written; a name it
    does not accept is refused here, naming it, before anything is written. Errors name
    ``path``, the file asked for, not the temporary."""
    folder = os.path.dirname(os.path.abspath(path))
    name = os.path.basename(path)
    try:
        os.makedirs(folder, exist_ok=True)
        limit = os.pathconf(folder, "PC_NAME_MAX")
        if len(os.fsencode(name)) > limit:
            raise ValueError(f"{path}: the name is {len(os.fsencode(name))} bytes long; the file system takes "
                             f"names of at most {limit} bytes: choose a shorter name")
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=_tmp_prefix())
    except OSError as exc:
        raise _naming(exc, path) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_UMASK)
    except BaseException as exc:
        os.remove(tmp)
        if isinstance(exc, OSError):
            raise _naming(exc, path) from None
        raise
    return tmp


def _naming(exc: OSError, path: str) -> Exception:
    """``exc`` about ``path`` (the file asked for) rather than our temporary; a folder
    name in ``path`` longer than the file system takes is the user's input to fix."""
    if exc.errno == errno.ENAMETOOLONG:
        return ValueError(f"{path}: a folder name in this path is longer than the file system takes: "
                          "choose shorter names")
    return type(exc)(exc.errno, exc.strerror, path)


def write_bytes(url: str, data: bytes) -> None:
    """Write ``data`` so that no reader ever sees a partial object."""
    if is_local(url):
        path = local_path(url)
        tmp = _local_temporary(path, data)
        try:
            os.replace(tmp, path)
        except BaseException as exc:
            if os.path.exists(tmp):
                os.remove(tmp)
            if isinstance(exc, OSError):
                raise _naming(exc, path) from None
            raise
        return
    fs, path = get_fs(url)
    # Object stores publish an object when its upload completes: one pipe_file call
    # uploads it whole or not at all. (Writing through fs.open would commit whatever
    # was uploaded if an exception interrupted the write: close() still runs.)
    try:
        fs.pipe_file(path, data)
    except StorageError as exc:
        raise StorageError(f"writing {url}: {exc}") from None


def create_bytes(url: str, data: bytes) -> bool:
    """Write ``data`` only if ``url`` does not exist yet, atomically; False if it did.

    Two runs racing to create the same file: exactly one wins. Local folders use a
    hard link (fails if the name exists); GCS uses the ``ifGenerationMatch=0``
    precondition (the gcp-storage-emulator ignores preconditions, so there the race
    is narrowed to the moment between a check and a write, not closed)."""
    if is_local(url):
        path = local_path(url)
        tmp = _local_temporary(path, data)
        try:
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            return True
        finally:
            os.remove(tmp)
    fs, path = get_fs(url)
    if fs.exists(path):
        return False
    try:
        if is_gcs(url):
            fs.pipe_file(path, data, mode="create")
        else:
            fs.pipe_file(path, data)
    except FileExistsError:
        return False
    except StorageError as exc:
        raise StorageError(f"writing {url}: {exc}") from None
    return True


def swap_if_unchanged(url: str, expected: bytes, data: bytes | None) -> bool:
    """Replace the object at ``url`` by ``data`` (remove it when ``data`` is None) only if
    it still holds ``expected``; False when it does not (changed, or gone).

    What a lease needs to take over a stale holder, renew itself or let go without
    undoing another's takeover. Local folders: under an ``flock`` of the folder (writers
    on this machine, or on a file system with working locks, are serialised). GCS: the
    delete carries an ``ifGenerationMatch`` precondition for the generation that was
    read, and the new object is created only if absent (the gcp-storage-emulator ignores
    preconditions). Other object stores: read, compare and write, with a race between
    the last two."""
    if is_local(url):
        path = local_path(url)
        folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            fcntl.flock(folder, fcntl.LOCK_EX)
            try:
                with open(path, "rb") as f:
                    if f.read() != expected:
                        return False
            except FileNotFoundError:
                return False
            if data is None:
                os.remove(path)
            else:
                write_bytes(url, data)
            return True
        finally:
            os.close(folder)  # and with it the lock
    fs, path = get_fs(url)
    try:
        fs.invalidate_cache(path)
        generation = fs.info(path).get("generation")
        if fs.cat_file(path) != expected:
            return False
        if is_gcs(url) and generation:
            bucket, key = path.split("/", 1)
            fs.call("DELETE", "b/{}/o/{}", bucket, key, ifGenerationMatch=str(generation), json_out=False)
        else:
            fs.rm_file(path)
    except (FileNotFoundError, FileExistsError):  # gone, or a 412: another generation now
        return False
    except StorageError as exc:
        raise StorageError(f"replacing {url}: {exc}") from None
    finally:
        fs.invalidate_cache(path)
    return True if data is None else create_bytes(url, data)


# Local temporary files are named .tmp-HOST-PID-RANDOM-NAME: a rerun can tell the
# leftovers of a killed writer (same host, process gone) from a live run's files.
TMP_PREFIX = ".tmp-"
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_TMP_NAME = re.compile(r"^\.tmp-([0-9a-f]{8})-(\d+)-")
# Temporaries we cannot attribute (another host, an older naming) are removed only when
# no write can still be going on.
_FOREIGN_TMP_AGE = 24 * 3600


def _tmp_prefix() -> str:
    return f"{TMP_PREFIX}{_HOST}-{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    try:
        # A killed process that nobody reaped yet (a zombie) writes nothing any more.
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def remove_stale_temporaries(url: str, recursive: bool = True) -> int:
    """Remove the temporary files that killed writers left below a local folder (a
    SIGKILL between writing and renaming), never those of a live run. Returns how
    many were removed. Object stores have no temporaries: nothing to do there."""
    if not is_local(url) or not os.path.isdir(local_path(url)):
        return 0
    removed, now = 0, time.time()
    for folder, dirs, names in os.walk(local_path(url)):
        if not recursive:
            dirs.clear()
        for name in names:
            if not name.startswith(TMP_PREFIX):
                continue
            path = os.path.join(folder, name)
            m = _TMP_NAME.match(name)
            if m and m[1] == _HOST:
                stale = not _pid_alive(int(m[2]))
            else:
                try:
                    stale = now - os.path.getmtime(path) > _FOREIGN_TMP_AGE
                except FileNotFoundError:
                    continue
            if stale:
                try:
                    os.remove(path)
                    removed += 1
                except FileNotFoundError:
                    pass
    return removed


def check_writable(url: str, min_free_bytes: int = 1 << 20) -> None:
    """Refuse, before any work, an output folder that cannot take files: read-only,
    not ours, full. Writes and removes a small probe object (local folders are created)."""
    probe = join(url, f"{TMP_PREFIX}{_HOST}-{os.getpid()}-write-check")
    if is_local(url) and os.path.exists(local_path(url)) and not os.path.isdir(local_path(url)):
        raise ValueError(f"{url}: is a file, not a folder; choose a folder (it is created if missing)")
    try:
        if is_local(url):
            os.makedirs(local_path(url), exist_ok=True)
            free = shutil.disk_usage(local_path(url)).free
            if free < min_free_bytes:
                raise OSError(errno.ENOSPC, f"No space left on device: {free} bytes free")
        write_bytes(probe, b"sr write check")
    except StorageError:
        raise
    except OSError as exc:
        why = exc.strerror or short_reason(exc, 200)
        raise ValueError(f"{url}: cannot write there ({why}); choose another output folder or fix its "
                         "permissions or free space") from None
    try:
        fs, path = get_fs(probe)
        fs.rm(path)
    except (OSError, StorageError):
        # Allowed to create but not to delete (GCS's objectCreator role): writes work.
        # The probe keeps a temporary's name, which listings skip.
        pass


def local_files(local: str):
    """``(path, relative key)`` of every file below the local folder ``local``, in a
    stable order; the keys are safe (``safe_key``) to join under any prefix."""
    for folder, dirs, names in os.walk(local):
        dirs.sort()
        for name in sorted(names):
            path = os.path.join(folder, name)
            yield path, safe_key(os.path.relpath(path, local).replace(os.sep, "/"))


def upload_folder(local: str, url: str) -> None:
    """Copy every file below the local folder ``local`` to ``url`` (same relative keys),
    each written whole."""
    for path, rel in local_files(local):
        with open(path, "rb") as f:
            write_bytes(join(url, rel), f.read())


class UploadedFolder:
    """A local folder for files that grow by appending (TensorBoard's event files), kept
    at ``url``. Object stores cannot append: a writer pointed at ``gs://`` raises nothing
    but loses data, each flush replacing the object. So a remote ``url`` gets a local
    temporary folder whose files :meth:`upload` copies there whole (and :meth:`close`
    removes); a local ``url`` is written in place, and uploading is nothing to do."""

    def __init__(self, url: str, prefix: str = "sr-"):
        self.url = url
        self.remote = not is_local(url)
        self._temporary = tempfile.mkdtemp(prefix=prefix) if self.remote else None
        self.path = self._temporary or local_path(url)

    def upload(self) -> None:
        if self.remote:
            upload_folder(self.path, self.url)

    def close(self) -> None:
        """Upload, then remove the local temporary folder."""
        try:
            self.upload()
        finally:
            if self._temporary:
                shutil.rmtree(self._temporary, ignore_errors=True)


def list_files(url: str, suffixes: Iterable[str] | None = None, hidden: list[str] | None = None,
               special: list[tuple[str, str]] | None = None) -> list[str]:
    """All files below ``url`` (recursive), as full URLs in the same scheme, sorted.

    ``suffixes`` filters by lower-cased extension (e.g. ``{".png", ".jpg"}``).
    Hidden files and our temporary files (``.tmp-*``) are skipped; when ``hidden`` is
    given, the hidden files that pass the filter (not our temporaries) are appended to
    it, so callers can report them instead of skipping them silently. Local files that
    are not regular files (named pipes, sockets, devices: opening a FIFO blocks forever)
    are never listed; when ``special`` is given, those that pass the filter are appended
    to it as ``(url, reason)``. Nothing listed is opened. ``url`` itself being such a
    file is a ValueError.
    """
    fs, root = get_fs(url)
    if not fs.exists(root):
        raise FileNotFoundError(f"{url}: no such file or folder")
    kind = special_kind(url)
    if kind:
        raise ValueError(f"{url}: {kind}, not a folder or a regular file")
    if fs.isfile(root):
        paths = [root]
    else:
        paths = fs.find(root)
    wanted = {s.lower() for s in suffixes} if suffixes else None
    prefix = protocol_prefix(url)
    out = []
    for p in paths:
        name = posixpath.basename(p)
        if wanted is not None and os.path.splitext(name)[1].lower() not in wanted:
            continue
        full = prefix + p if prefix and not p.startswith(prefix) else p
        if name.startswith("."):
            if hidden is not None and not name.startswith(TMP_PREFIX):
                hidden.append(full)
            continue
        kind = special_kind(full)
        if kind:
            if special is not None:
                special.append((full, f"{kind}, not a regular file; not read"))
            continue
        out.append(full)
    if hidden is not None:
        hidden.sort()
    if special is not None:
        special.sort()
    return sorted(out)


def matches_glob(rel: str, globs: Iterable[str]) -> bool:
    """Whether a relative path matches one of ``globs`` (fnmatch, case-sensitive as
    object keys are; ``*`` also crosses ``/``)."""
    return any(fnmatch.fnmatchcase(rel, g) for g in globs)


def selected(rel: str, include: Iterable[str] = (), exclude: Iterable[str] = ()) -> bool:
    """``--include`` / ``--exclude``: kept when it matches an include glob (or none are
    given) and no exclude glob."""
    include = tuple(include)
    return (not include or matches_glob(rel, include)) and not matches_glob(rel, exclude)


def printable(text: str) -> str:
    """``text`` safe for one report line: newlines and other control characters, and
    the undecodable bytes of non-UTF-8 file names, are written as escapes."""
    out = []
    for c in text:
        if 0xDC80 <= ord(c) <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape)
            out.append(f"\\x{ord(c) - 0xDC00:02x}")
        elif c.isprintable():
            out.append(c)
        else:
            out.append(c.encode("unicode_escape").decode("ascii"))
    return "".join(out)


def relative_key(root: str, url: str) -> str:
    """The path of ``url`` below ``root``, with '/' separators, validated so it cannot
    escape a prefix it is later joined to (no '..', no absolute parts)."""
    fs_root = get_fs(root)[1].rstrip("/")
    fs_url = get_fs(url)[1]
    if fs_url == fs_root:
        rel = posixpath.basename(fs_url)
    elif fs_url.startswith(fs_root + "/"):
        rel = fs_url[len(fs_root) + 1:]
    else:
        raise ValueError(f"{url} is not below {root}")
    return safe_key(rel)


def safe_key(rel: str) -> str:
    """Reject relative keys that would escape the output prefix they are joined to."""
    # Backslashes are ordinary name characters on POSIX and in object stores, but count
    # them as separators here too, so "..\\x" is refused wherever the key ends up.
    parts = rel.replace("\\", "/").split("/")
    if not rel or rel.startswith(("/", "\\")) or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"unsafe relative path {rel!r}: it must stay below its prefix")
    return rel


def is_utf8(text: str) -> bool:
    """Whether a name is valid UTF-8 (a local file name that is not arrives with
    Python's surrogate escapes, which Parquet and object stores cannot hold)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def link_out_of(root: str, url: str) -> str | None:
    """Where a local file found below the folder ``root`` really is, if a symbolic link
    takes it outside ``root`` (listings must not follow links out of the folder they
    list); None for files inside it and for object stores (which have no links)."""
    if not is_local(url):
        return None
    target = os.path.realpath(local_path(url))
    real_root = os.path.realpath(local_path(root)).rstrip("/")
    return None if target.startswith(real_root + "/") else target


__all__ = [
    "StorageError", "RetryPolicy", "get_fs", "is_gcs", "is_local", "join", "read_bytes", "exists", "size",
    "write_bytes", "create_bytes", "swap_if_unchanged", "list_files", "special_kind", "relative_key", "safe_key",
    "remove_stale_temporaries", "check_writable", "printable", "is_utf8", "local_files", "upload_folder",
    "UploadedFolder",
]
