"""The one place that opens, lists, checks and atomically writes fsspec URLs.

Every path in sr-cloud is an fsspec URL: ``gs://``, ``s3://``, ``file://``, ``memory://``
or a plain local path. Readers must never see half-written objects: local writes go
to a temporary name in the same folder and are published with ``os.replace``; object
stores publish an object only when its upload completes, so a direct write is atomic.
"""

from __future__ import annotations

import os
import posixpath
import tempfile
from typing import Iterable

from fsspec.core import url_to_fs

# gcsfs 2026.x probes each bucket over gRPC for hierarchical-namespace support unless
# told not to, which hangs for a minute per operation against the emulator and on
# networks without gRPC egress. It must be set before gcsfs is imported.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


def get_fs(url: str):
    """Return ``(filesystem, path)`` for a URL. gs:// uses anonymous access against an
    emulator (``STORAGE_EMULATOR_HOST``), default credentials otherwise."""
    options = {}
    if is_gcs(url) and os.environ.get("STORAGE_EMULATOR_HOST"):
        options["token"] = "anon"
    return url_to_fs(url, **options)


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


def read_bytes(url: str) -> bytes:
    fs, path = get_fs(url)
    with fs.open(path, "rb") as f:
        return f.read()


def exists(url: str) -> bool:
    fs, path = get_fs(url)
    return fs.exists(path)


def size(url: str) -> int:
    fs, path = get_fs(url)
    return int(fs.size(path))


def write_bytes(url: str, data: bytes) -> None:
    """Write ``data`` so that no reader ever sees a partial object."""
    if is_local(url):
        path = local_path(url)
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix="-" + os.path.basename(path))
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            # mkstemp makes owner-only files; give the published file the permissions a
            # plain open() would (0666 less the umask).
            os.chmod(tmp, 0o666 & ~_UMASK)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        return
    fs, path = get_fs(url)
    # Object stores publish an object when its upload completes: one pipe_file call
    # uploads it whole or not at all. (Writing through fs.open would commit whatever
    # was uploaded if an exception interrupted the write: close() still runs.)
    fs.pipe_file(path, data)


def list_files(url: str, suffixes: Iterable[str] | None = None, hidden: list[str] | None = None) -> list[str]:
    """All files below ``url`` (recursive), as full URLs in the same scheme, sorted.

    ``suffixes`` filters by lower-cased extension (e.g. ``{".png", ".jpg"}``).
    Hidden files and our temporary files (``.tmp-*``) are skipped; the hidden files
    that pass the filter (not our temporary files) are appended to ``hidden`` if it is
    given, so a caller can report them.
    """
    fs, root = get_fs(url)
    if not fs.exists(root):
        raise FileNotFoundError(f"{url}: no such file or folder")
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
            if hidden is not None and not name.startswith(".tmp-"):
                hidden.append(full)
            continue
        out.append(full)
    if hidden is not None:
        hidden.sort()
    return sorted(out)


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
    "get_fs", "is_gcs", "is_local", "join", "read_bytes", "exists", "size",
    "write_bytes", "list_files", "relative_key", "safe_key",
]
