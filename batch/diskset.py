"""A set of strings kept on disk (SQLite in a temporary file), for what a plan must
remember about every input of a bucket without holding it in memory: the inputs an
earlier run recorded, the outputs an object store lists, the outputs a manifest has
taken. Memory stays at SQLite's page cache (``CACHE_KIB``) whatever the number of keys."""

from __future__ import annotations

import os
import sqlite3
import tempfile
from typing import Iterable

CACHE_KIB = 16 * 1024
"""SQLite's page cache per set."""
_QUERY_CHUNK = 500
"""Keys per ``IN (...)`` query (SQLite allows up to 32,766 parameters)."""


class DiskSet:
    """Strings, each with an optional value (e.g. the input that took an output)."""

    def __init__(self):
        self._dir = tempfile.TemporaryDirectory(prefix="sr-batch-set-")
        self._db = sqlite3.connect(os.path.join(self._dir.name, "set.sqlite"), check_same_thread=False)
        self._db.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
        self._db.execute("PRAGMA journal_mode=OFF")
        self._db.execute("PRAGMA synchronous=OFF")
        self._db.execute("CREATE TABLE keys (key TEXT PRIMARY KEY, value TEXT) WITHOUT ROWID")
        self.count = 0

    def add_many(self, keys: Iterable[str], value: str = "") -> None:
        cursor = self._db.executemany("INSERT OR IGNORE INTO keys VALUES (?, ?)", ((k, value) for k in keys))
        self.count += max(cursor.rowcount, 0)

    def add_pairs(self, pairs: Iterable[tuple[str, str]]) -> None:
        cursor = self._db.executemany("INSERT OR IGNORE INTO keys VALUES (?, ?)", pairs)
        self.count += max(cursor.rowcount, 0)

    def lookup(self, keys: list[str]) -> dict[str, str]:
        """The keys of ``keys`` that are in the set, with their values."""
        found: dict[str, str] = {}
        for i in range(0, len(keys), _QUERY_CHUNK):
            part = keys[i:i + _QUERY_CHUNK]
            rows = self._db.execute(f"SELECT key, value FROM keys WHERE key IN ({','.join('?' * len(part))})", part)
            found.update(rows)
        return found

    def close(self) -> None:
        self._db.close()
        self._dir.cleanup()
