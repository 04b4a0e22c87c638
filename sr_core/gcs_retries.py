"""Bounded, logged retries for gs:// requests, as an aiohttp client middleware.

gcsfs accepts ``session_kwargs`` for the aiohttp session it sends every request through;
``sr_core.storage.get_fs`` passes ``middlewares=(RetryingRequests(policy),)``. Each HTTP
request (a listing page, a read, an upload, a ranged read of a large download) is then
tried up to ``policy.attempts`` times on a dropped connection, a timeout, a 408, 429 or
5xx answer, with one log line per retry naming the request, and ends in a one-line
:class:`StorageGaveUp` naming it. Other answers (404, 412, 403, ...) go back to gcsfs
untouched: they are answers, not faults.

Why this holds with gcsfs's own retry loop on top (6 tries per request, up to ~33 s,
silent until it logs a traceback): by the time gcsfs sees a request fail, ours has retried
it already, and :class:`StorageGaveUp` is one of aiohttp's client errors (so aiohttp passes
it on as it is) marked with gcsfs's ``NonRetryableError`` (so gcsfs raises it at once
instead of retrying). Retries therefore never multiply, and no gcsfs method is replaced:
the requirement can admit any gcsfs release that takes ``session_kwargs`` and knows
``NonRetryableError`` (tests/test_storage.py checks both on the installed one).

Imported only when a gs:// URL is first used: it loads aiohttp and gcsfs.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass

import aiohttp
from gcsfs.retry import NonRetryableError

from sr_core.errors import short_reason
from sr_core.storage import RetryPolicy, StorageError, logger

# What GCS's retry guidance calls transient: request timeout, rate limiting, server errors.
TRANSIENT_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


class StorageGaveUp(StorageError, aiohttp.ClientError, NonRetryableError):
    """A request still failing after the bounded retries (a :class:`StorageError`: exit
    75). Also an aiohttp client error marked non-retryable for gcsfs, so neither library
    wraps it or tries it again."""


class _QuietOnOurErrors(logging.Filter):
    """gcsfs logs a traceback when a request raises an error it will not retry; for ours
    the retry lines and the final one-line error have said everything already."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], StorageError))


logging.getLogger("gcsfs").addFilter(_QuietOnOurErrors())


def describe(request: aiohttp.ClientRequest) -> str:
    """``METHOD object`` for messages: the JSON API's ``b/BUCKET/o/OBJECT`` as the
    ``gs://`` URL users know (an upload names its object in ``name=``), never the rest of
    the query string (upload session ids act as credentials) nor headers."""
    path = request.url.path
    m = re.search(r"/b/([^/]+)/o(?:/(.*))?$", path)
    if m:
        path = f"gs://{m[1]}/{m[2] or request.url.query.get('name', '')}"
    return f"{request.method.upper()} {path}"


@dataclass(frozen=True)
class RetryingRequests:
    """The middleware: ``policy`` bounds the tries of each request. A frozen dataclass so
    that filesystems built with it pickle (worker processes rebuild them) and gcsfs's
    instance cache tells policies apart by their repr."""

    policy: RetryPolicy

    async def __call__(self, request: aiohttp.ClientRequest, handler) -> aiohttp.ClientResponse:
        attempts = self.policy.attempts
        for attempt in range(1, attempts + 1):
            try:
                response = await handler(request)
            except aiohttp.ClientError as exc:  # dropped, refused, timed out (ServerTimeoutError)
                reason = f"{type(exc).__name__}: {short_reason(exc)}".rstrip(": ")
            else:
                if response.status not in TRANSIENT_STATUSES:
                    return response
                reason = f"HTTP {response.status} {response.reason or ''}".rstrip()
                response.release()
            what = describe(request)
            if attempt == attempts:
                raise StorageGaveUp(f"{what}: still failing after {attempts} attempts ({reason}); "
                                    "rerun the same command to resume")
            delay = self.policy.delay(attempt)
            logger.warning("storage: %s failed (%s); retry %d of %d in %.1f s", what, reason, attempt,
                           attempts - 1, delay)
            await asyncio.sleep(delay)
        raise AssertionError("unreachable: the last attempt returns or raises")
