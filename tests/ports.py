"""The tests' one free-port helper (the project's own is ``sr_core.net.free_port``; the
tests keep theirs so that a fixture never depends on the code under test)."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A loopback TCP port nothing listens on now (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
