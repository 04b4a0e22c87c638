"""`sr tensorboard` with a port it cannot serve on: an impossible port number and a port
another process listens on are one line each, exit 2, no traceback (TensorBoard raises
TensorBoardServerException / TensorBoardPortInUseError)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def run_tensorboard(*args: str) -> subprocess.CompletedProcess:
    # A server that did start would serve until stopped: the timeout turns that into a
    # failure (these cases must end by themselves, in seconds).
    return subprocess.run([sys.executable, "-m", "sr_cli", "tensorboard", *args], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)


@pytest.fixture
def run_dir(tmp_path):
    (tmp_path / "run" / "tb").mkdir(parents=True)
    return str(tmp_path / "run")


@pytest.mark.parametrize("port", ["99999", "-1", "65536"])
def test_a_port_out_of_range_is_one_line(run_dir, port):
    proc = run_tensorboard(run_dir, "--port", port)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.rstrip().splitlines() == [
        f"sr tensorboard: error: --port {port} is not a TCP port; give one from 1 to 65535, or 0 for a free one"]


def test_a_port_in_use_is_one_line(run_dir):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        proc = run_tensorboard(run_dir, "--port", str(port))
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.rstrip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines[0].startswith(f"sr tensorboard: error: port {port} on 127.0.0.1 is in use"), lines
    assert lines[0].endswith("choose another --port, or --port 0 for a free one"), lines
