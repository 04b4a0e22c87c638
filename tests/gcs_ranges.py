"""The GCS emulator with ``objects.list`` paged and ranged as Cloud Storage does it.

gcp-storage-emulator 2026.7 answers ``objects.list`` with every matching object in one
response: it ignores ``maxResults``, ``pageToken``, ``startOffset`` and ``endOffset``
(read in its ``handlers/objects.py``). This module starts the same emulator, as its own
process, with that one handler completed from the JSON API's documentation:

- ``startOffset`` (inclusive) and ``endOffset`` (exclusive) filter object names before
  ``delimiter`` groups them, so a prefix is reported by a range that holds one of its
  objects;
- items and prefixes together, in name order, ``maxResults`` at a time (1,000 at most),
  with a ``nextPageToken`` while more remain.

Run: ``python tests/gcs_ranges.py PORT``. Everything else is the emulator's own code.
"""

from __future__ import annotations

import base64
import sys
from http import HTTPStatus

from gcp_storage_emulator.handlers import objects

MAX_RESULTS = 1000
_RANGED = ("startOffset", "endOffset", "maxResults", "pageToken")
_original_ls = objects.ls


def _query(request, name: str) -> str | None:
    values = request.query.get(name)
    return values[0] if values else None


def ls(request, response, storage, *args, **kwargs):
    if not any(_query(request, k) for k in _RANGED) or _query(request, "matchGlob") or _query(request, "softDeleted"):
        return _original_ls(request, response, storage, *args, **kwargs)
    bucket = request.params["bucket_name"]
    if bucket not in storage.buckets:
        response.status = HTTPStatus.NOT_FOUND
        return
    prefix, delimiter = _query(request, "prefix"), _query(request, "delimiter")
    start, end = _query(request, "startOffset"), _query(request, "endOffset")
    candidates = [(name, obj) for name, obj in storage._list_live_candidates(bucket, prefix)
                  if (start is None or name >= start) and (end is None or name < end)]
    if delimiter:
        items, prefixes = storage._apply_list_delimiter(candidates, prefix, delimiter, None)
    else:
        items, prefixes = [obj for _, obj in candidates], []
    entries = sorted([(obj["name"], obj) for obj in items] + [(p, None) for p in prefixes], key=lambda e: e[0])
    token = _query(request, "pageToken")
    if token:
        after = base64.urlsafe_b64decode(token.encode()).decode()
        entries = [e for e in entries if e[0] > after]
    size = min(int(_query(request, "maxResults") or MAX_RESULTS), MAX_RESULTS)
    page, rest = entries[:size], entries[size:]
    body = {"kind": "storage#objects", "items": [obj for _, obj in page if obj is not None],
            "prefixes": [name for name, obj in page if obj is None]}
    if rest:
        body["nextPageToken"] = base64.urlsafe_b64encode(page[-1][0].encode()).decode()
    response.json(body)


objects.ls = ls  # before the server module reads its routing table


def main(port: int) -> None:
    from gcp_storage_emulator.__main__ import main as emulator_main

    emulator_main(["start", "--host=127.0.0.1", f"--port={port}", "--in-memory", "--quiet"])


if __name__ == "__main__":
    main(int(sys.argv[1]))
