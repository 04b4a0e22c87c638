"""What only gs:// URLs need: credentials decided once per process, a reachability probe
that fails in seconds, and bounded, logged retries as an aiohttp client middleware.

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

One case stays gcsfs's: a connection dropped in the middle of a response body, after
its headers arrived, fails where gcsfs reads the body, outside the middleware; gcsfs's
own loop retries that request (silently, up to 6 times), each try passing through the
middleware again. (tests/faultproxy.py drops connections before an answer starts.)

Imported only when a gs:// URL is first used (``storage.get_fs``, after it has set the
environment gcsfs and google-auth read at import): it loads aiohttp and gcsfs.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp
from gcsfs.retry import NonRetryableError

from sr_core.errors import StorageError, short_reason
from sr_core.retry import RetryPolicy

# The retry lines are storage's: the same logger as sr_core.storage's own messages.
logger = logging.getLogger("sr_core.storage")

GCS_ENDPOINT = "https://storage.googleapis.com"
# What GCS's retry guidance calls transient: request timeout, rate limiting, server errors.
TRANSIENT_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


@functools.lru_cache(maxsize=None)
def gcs_options(emulator: str, anon: str) -> dict:
    """Credentials for gcsfs, decided once per process (per emulator setting).

    gcsfs on its own tries every credential source in turn, falls back to anonymous
    access, then retries each request for ~30 s before a long traceback; without a
    network that took a minute and more. Here: the credential search of google-auth
    (key file, gcloud login, GCE metadata server with a short timeout), then one TCP
    connection to the endpoint with a short timeout."""
    endpoint = emulator or GCS_ENDPOINT
    options: dict = {}
    if emulator or anon == "1":
        options["token"] = "anon"
    else:
        import google.auth
        import google.auth.exceptions

        try:
            credentials, project = google.auth.default(
                scopes=["https://www.googleapis.com/auth/devstorage.read_write"])
        except google.auth.exceptions.DefaultCredentialsError:
            raise StorageError(
                "no Google Cloud credentials found (tried GOOGLE_APPLICATION_CREDENTIALS, gcloud's "
                "application-default login and the GCE metadata server); run `gcloud auth application-default "
                "login`, set GOOGLE_APPLICATION_CREDENTIALS=/path/to/key.json, SR_GCS_ANON=1 for public "
                "buckets, or STORAGE_EMULATOR_HOST for an emulator") from None
        options["token"] = credentials
        if project:
            options["project"] = project
    check_reachable(endpoint)
    return options


def check_reachable(endpoint: str, timeout: float = 5.0) -> None:
    """One TCP connection to the endpoint: a one-line StorageError naming it when nothing
    answers within ``timeout`` (instead of gcsfs's retries over half a minute)."""
    parts = urlsplit(endpoint if "://" in endpoint else "http://" + endpoint)
    host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        hint = ("check STORAGE_EMULATOR_HOST" if endpoint != GCS_ENDPOINT
                else "check the network (or set STORAGE_EMULATOR_HOST for an emulator)")
        raise StorageError(f"cannot reach the storage endpoint {host}:{port} "
                           f"({exc.strerror or type(exc).__name__}); {hint}") from None


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
