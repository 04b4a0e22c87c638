"""Shards on local disk: a process-safe local cache of remote files (:class:`ShardCache`)
and the reader of byte ranges that the datasets of ``jobs.data`` use (local shards are
checked against the size and SHA-256 that ``index.json`` records)."""

from __future__ import annotations

import fcntl
import hashlib
import os

from sr_core import storage
from sr_core.errors import is_unwritable

DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "sr-cloud", "shards")


# --------------------------------------------------------------------------- cache

class ShardCache:
    """Local copies of remote files, shared safely by every process on the machine.

    The first reader of a file downloads it under an exclusive ``flock`` (others wait
    for it instead of downloading it again), checks its size and checksum, and
    publishes it with ``os.replace``; later readers just open it. Beyond ``max_bytes``
    the least recently used files are deleted (a reader that has one open keeps
    reading it: POSIX unlink semantics).
    """

    def __init__(self, folder: str = "", max_bytes: int = 50 * 1024**3):
        self.folder = folder or DEFAULT_CACHE_DIR
        self.max_bytes = int(max_bytes)
        self.downloads = 0  # by this process: how many files it fetched
        try:
            os.makedirs(self.folder, exist_ok=True)
        except OSError as exc:
            raise self._unusable(exc) from None

    def _unusable(self, exc: OSError, url: str = "") -> ValueError:
        what = f"cannot store {url}" if url else "cannot use it"
        return ValueError(f"shard cache {self.folder}: {what} ({exc.strerror or exc}); free space there, "
                          "lower data.cache_max_gb or set data.cache_dir to another writable local folder")

    def _entry(self, url: str, sha256: str | None) -> str:
        key = hashlib.sha256(f"{url}\n{sha256 or ''}".encode()).hexdigest()[:24]
        return os.path.join(self.folder, f"{key}-{os.path.basename(url.rstrip('/'))}")

    def local_path(self, url: str, size: int | None = None, sha256: str | None = None) -> str:
        """Path of a verified local copy of ``url`` (downloaded on first use)."""
        path = self._entry(url, sha256)
        if self._usable(path, size):
            return path
        try:
            lock = open(path + ".lock", "a")
        except OSError as exc:
            raise self._unusable(exc, url) from None
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                if self._usable(path, size):  # another process fetched it while we waited
                    return path
                # What a killed download or a crash left (we hold the entry's lock, so
                # no other process is writing these).
                for name in os.listdir(self.folder):
                    if name == os.path.basename(path) or name.startswith(os.path.basename(path) + ".part-"):
                        os.remove(os.path.join(self.folder, name))
                self._download(url, path, size, sha256)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        self._evict(keep=path)
        return path

    @staticmethod
    def _usable(path: str, size: int | None) -> bool:
        """The entry exists with the expected size (a copy cut short by a crash before
        its data reached the disk is not); its recency is refreshed for LRU eviction."""
        try:
            if size is not None and os.path.getsize(path) != size:
                return False
            os.utime(path)
            return True
        except FileNotFoundError:  # never fetched, or just evicted by another process
            return False

    def discard_if_corrupt(self, url: str, sha256: str) -> bool:
        """After a member failed to decode: delete the cached copy of ``url`` if its
        checksum is wrong (the next read fetches it again). True if it was deleted."""
        path = self._entry(url, sha256)
        with open(path + ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                digest = hashlib.sha256()
                with open(path, "rb") as f:
                    while chunk := f.read(8 * 1024 * 1024):
                        digest.update(chunk)
                if digest.hexdigest() == sha256:
                    return False
                os.remove(path)
                return True
            except FileNotFoundError:
                return False
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _download(self, url: str, path: str, size: int | None, sha256: str | None) -> None:
        tmp = f"{path}.part-{os.getpid()}"
        digest = hashlib.sha256()
        got = 0
        try:
            fs, remote = storage.get_fs(url)
            try:
                out = open(tmp, "wb")
            except OSError as exc:
                raise self._unusable(exc, url) from None
            with fs.open(remote, "rb", block_size=8 * 1024 * 1024) as src, out:
                try:
                    while chunk := src.read(8 * 1024 * 1024):
                        digest.update(chunk)
                        out.write(chunk)
                        got += len(chunk)
                    out.flush()
                except OSError as exc:
                    # a full (or quota-limited, or read-only) cache disk, not the remote
                    if is_unwritable(exc):
                        raise self._unusable(exc, url) from None
                    raise
            if size is not None and got != size:
                raise ValueError(f"{url}: read {got} bytes, the index says {size}; the data set changed "
                                 "after `sr prepare` (re-run it)")
            if sha256 is not None and digest.hexdigest() != sha256:
                raise ValueError(f"{url}: checksum differs from the index; the shard is corrupt or was "
                                 "replaced (re-run `sr prepare`)")
            os.replace(tmp, path)
            self.downloads += 1
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def entries(self) -> list[str]:
        return sorted(os.path.join(self.folder, n) for n in os.listdir(self.folder)
                      if not n.endswith(".lock") and ".part-" not in n)

    def total_bytes(self) -> int:
        return sum(os.path.getsize(p) for p in self.entries() if os.path.exists(p))

    def _evict(self, keep: str) -> None:
        with open(os.path.join(self.folder, ".evict.lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            files = []
            for p in self.entries():
                try:
                    st = os.stat(p)
                except FileNotFoundError:
                    continue
                files.append((st.st_mtime, p, st.st_size))
            total = sum(f[2] for f in files)
            for _, p, nbytes in sorted(files):
                if total <= self.max_bytes:
                    break
                if p == keep:
                    continue
                try:
                    os.remove(p)
                    total -= nbytes
                except FileNotFoundError:
                    pass


# --------------------------------------------------------------------------- reading

class _FileReader:
    """Reads byte ranges of shards (local files directly, remote ones via the cache).
    Uses ``os.pread`` so descriptors inherited by forked workers are safe to share.

    A local shard with a size and checksum in the index is verified when this process
    first opens it (remote ones are verified by the cache when fetched): a shard changed
    after ``sr prepare`` would otherwise train silently on other bytes."""

    def __init__(self, cache: ShardCache | None):
        self.cache = cache
        self._fds: dict[str, int] = {}
        self.verified: set[str] = set()  # local shards checked by this process

    def __getstate__(self):
        return {"cache": self.cache, "_fds": {}, "verified": set()}

    def close(self) -> None:
        while self._fds:
            os.close(self._fds.popitem()[1])

    def __del__(self):
        self.close()

    def discard_if_corrupt(self, url: str, sha256: str | None) -> bool:
        """Close ``url`` and delete its cached copy if that is damaged; True when a
        fresh copy will be fetched on the next read."""
        fd = self._fds.pop(url, None)
        if fd is not None:
            os.close(fd)
        if storage.is_local(url) or self.cache is None or sha256 is None:
            return False
        return self.cache.discard_if_corrupt(url, sha256)

    def _fd(self, url: str, size: int | None, sha256: str | None) -> int:
        fd = self._fds.get(url)
        if fd is None:
            if storage.is_local(url):
                fd = os.open(storage.local_path(url), os.O_RDONLY)
                if url not in self.verified and (size is not None or sha256 is not None):
                    try:
                        _verify_local(fd, url, size, sha256)
                    except BaseException:
                        os.close(fd)
                        raise
                    self.verified.add(url)
            else:
                assert self.cache is not None, "remote data needs a cache"
                fd = self._open_cached(url, size, sha256)
            if len(self._fds) >= 32:  # keep a bounded number of files open per process
                os.close(self._fds.pop(next(iter(self._fds))))
            self._fds[url] = fd
        return fd

    def _open_cached(self, url: str, size: int | None, sha256: str | None, attempts: int = 3) -> int:
        # Another process may evict the entry between local_path() and open() when the
        # cache limit is below the working set; fetching it again is the cure.
        for attempt in range(attempts):
            path = self.cache.local_path(url, size, sha256)
            try:
                return os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                if attempt == attempts - 1:
                    raise ValueError(f"{url}: its cached copy in {self.cache.folder} keeps being evicted before it "
                                     "can be opened; raise data.cache_max_gb above the shards one rank reads "
                                     "at a time") from None

    def read(self, url: str, offset: int = 0, length: int | None = None,
             size: int | None = None, sha256: str | None = None) -> bytes:
        fd = self._fd(url, size, sha256)
        if length is None:
            length = os.fstat(fd).st_size - offset
        data = os.pread(fd, length, offset)
        if len(data) != length:
            raise ValueError(f"{url}: short read at {offset} ({len(data)} of {length} bytes); "
                             "the file is truncated (re-run `sr prepare`)")
        return data


def _verify_local(fd: int, url: str, size: int | None, sha256: str | None) -> None:
    """The open local shard ``fd`` has the size and SHA-256 that index.json records."""
    got = os.fstat(fd).st_size
    if size is not None and got != size:
        raise ValueError(f"{url}: {got} bytes, but index.json records {size}: the shard was cut short or "
                         "replaced after `sr prepare`; re-run `sr prepare`")
    if sha256 is None:
        return
    digest, offset = hashlib.sha256(), 0
    while chunk := os.pread(fd, 8 * 1024 * 1024, offset):
        digest.update(chunk)
        offset += len(chunk)
    if digest.hexdigest() != sha256:
        raise ValueError(f"{url}: its checksum differs from the one index.json records: the shard changed "
                         "after `sr prepare`; re-run `sr prepare`")
