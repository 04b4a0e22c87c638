"""Storage under faults: gs:// without credentials or network fails in seconds with one
line; requests through a fault-injecting proxy in front of the GCS emulator are
retried with bounded backoff, logged, and end in results identical to a run without
faults; a write that finally fails names the object; a long outage leaves a state
that a rerun finishes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

SR = os.path.join(os.path.dirname(sys.executable), "sr")


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def offline_env(tmp_path, **extra) -> dict:
    """An environment with no Google credentials anywhere, whose metadata server and
    (when given) emulator are closed loopback ports: nothing leaves 127.0.0.1."""
    port = closed_port()
    env = {k: v for k, v in os.environ.items()
           if k not in ("GOOGLE_APPLICATION_CREDENTIALS", "STORAGE_EMULATOR_HOST", "SR_GCS_ANON")}
    env.update(HOME=str(tmp_path), CLOUDSDK_CONFIG=str(tmp_path / "gcloud"),
               GCE_METADATA_HOST=f"127.0.0.1:{port}", GCE_METADATA_IP=f"127.0.0.1:{port}", **extra)
    return env


@pytest.mark.parametrize("case, args", [
    ("no credentials", ["prepare", "gs://bucket/in", "OUT"]),
    ("endpoint unreachable", ["prepare", "gs://bucket/in", "OUT"]),
    ("endpoint unreachable", ["upscale", "gs://bucket/in", "-o", "OUT", "-m", "gs://bucket/m.safetensors"]),
    ("no credentials", ["convert", "gs://bucket/m.safetensors", "OUT.safetensors"]),
])
def test_gs_without_credentials_or_network_fails_in_seconds_with_one_line(tmp_path, case, args):
    extra = {} if case == "no credentials" else {"STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{closed_port()}"}
    args = [a.replace("OUT", str(tmp_path / "out")) for a in args]
    start = time.monotonic()
    proc = subprocess.run([SR, *args], capture_output=True, text=True, timeout=60, env=offline_env(tmp_path, **extra))
    took = time.monotonic() - start
    err = proc.stderr.strip()
    assert proc.returncode == 75, err[-3000:]
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err[-3000:]
    assert "gs://bucket/" in err
    if case == "no credentials":
        assert "no Google Cloud credentials" in err and "GOOGLE_APPLICATION_CREDENTIALS" in err
    else:
        assert "cannot reach the storage endpoint 127.0.0.1" in err and "STORAGE_EMULATOR_HOST" in err
    assert took < 15, took
