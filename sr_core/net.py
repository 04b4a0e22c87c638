"""Loopback ports for the processes a command starts (a launcher's rendezvous, a local
Ray job server, a benchmark's TensorBoard)."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now: bound, then released. Another process may take it
    before the caller binds it; the launchers that use it fail loudly when that happens."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
