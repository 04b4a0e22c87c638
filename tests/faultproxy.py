"""A fault-injecting HTTP proxy for tests: it sits on 127.0.0.1 in front of an HTTP
server (the GCS emulator) and, at seeded rates, drops connections (before the request
reaches the server, or after it was served so the client never hears the answer),
answers 429/500/503 itself, or delays the answer. Point ``STORAGE_EMULATOR_HOST`` at
``proxy.url``. ``counts`` says how many faults of each kind were injected.

An outage makes every request fail with 503 until it is lifted; it can start by itself
after a given number of uploads (``outage_after_uploads``), so a test can cut storage
off in the middle of a job.
"""

from __future__ import annotations

import http.client
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
              "proxy-authorization", "proxy-authenticate"}


@dataclass
class FaultRates:
    """Probability per request of each fault (they are exclusive; the rest pass)."""

    drop_before: float = 0.0
    """Close the connection without forwarding the request."""

    drop_after: float = 0.0
    """Forward the request, then close the connection without answering: the server
    acted (an upload happened), the client does not know it."""

    status_429: float = 0.0
    status_500: float = 0.0
    status_503: float = 0.0

    delay: float = 0.0
    """Forward, but wait ``delay_seconds`` before answering."""

    delay_seconds: float = 0.2


class FaultProxy:
    def __init__(self, upstream: str, rates: FaultRates | None = None, seed: int = 0):
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port)
        self.rates = rates or FaultRates()
        self.random = random.Random(seed)
        self.lock = threading.Lock()
        self.counts: Counter = Counter()
        self.outage = False
        self.outage_after_uploads: int | None = None
        self.in_progress = 0
        """Requests read and not answered yet: ones that may still reach the server (a
        killed client's last upload is forwarded all the same)."""
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        if size == 0:
                            self.rfile.readline()
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _handle(self):
                with proxy.lock:
                    proxy.in_progress += 1
                try:
                    self._answer()
                finally:
                    with proxy.lock:
                        proxy.in_progress -= 1

            def _answer(self):
                body = self._body()
                fault = proxy._decide(self.command, self.path)
                if fault == "drop_before":
                    self.close_connection = True
                    self.connection.close()
                    return
                if fault in ("status_429", "status_500", "status_503", "outage"):
                    code = 503 if fault == "outage" else int(fault[-3:])
                    payload = b'{"error": {"code": %d, "message": "injected fault"}}' % code
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                status, headers, data = proxy._forward(self.command, self.path, self.headers, body)
                if fault == "drop_after":
                    self.close_connection = True
                    self.connection.close()
                    return
                if fault == "delay":
                    time.sleep(proxy.rates.delay_seconds)
                self.send_response(status)
                for name, value in headers:
                    if name.lower() not in HOP_BY_HOP and (name.lower() != "content-length" or self.command == "HEAD"):
                        self.send_header(name, value)
                if self.command != "HEAD":
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _handle

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):
                # A client that hung up (a retry gave up on a delayed answer, a worker
                # process ended) is part of the game, not a proxy error.
                proxy.counts["client_hangups"] += 1

        self.server = Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _decide(self, method: str, path: str) -> str | None:
        with self.lock:
            self.counts["requests"] += 1
            if method == "POST" and "/upload/" in path:
                self.counts["uploads"] += 1
                if self.outage_after_uploads is not None and self.counts["uploads"] > self.outage_after_uploads:
                    self.outage = True
            if self.outage:
                self.counts["outage"] += 1
                return "outage"
            r = self.random.random()
            for kind in ("drop_before", "drop_after", "status_429", "status_500", "status_503", "delay"):
                r -= getattr(self.rates, kind)
                if r < 0:
                    self.counts[kind] += 1
                    return kind
            return None

    def _forward(self, method, path, headers, body):
        conn = http.client.HTTPConnection(*self.upstream, timeout=60)
        try:
            out_headers = {k: v for k, v in headers.items() if k.lower() not in HOP_BY_HOP}
            out_headers["Content-Length"] = str(len(body))
            conn.request(method, path, body=body, headers=out_headers)
            response = conn.getresponse()
            data = response.read() if method != "HEAD" else b""
            return response.status, response.getheaders(), data
        finally:
            conn.close()

    @property
    def faults(self) -> int:
        """Faults injected so far (all kinds)."""
        return sum(v for k, v in self.counts.items() if k not in ("requests", "uploads", "client_hangups"))

    def idle(self) -> bool:
        """No request being read, forwarded or answered."""
        with self.lock:
            return self.in_progress == 0

    def lift_outage(self) -> None:
        with self.lock:
            self.outage = False
            self.outage_after_uploads = None

    def __enter__(self) -> "FaultProxy":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
