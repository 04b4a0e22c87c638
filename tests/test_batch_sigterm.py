"""SIGTERM to `sr batch` while it upscales: our one line and exit 130, without the
stack dump (`*** SIGTERM received at time=... PC: @ ...`) that Ray's C++ failure-signal
handler used to print before it in the driver."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import psutil
import pytest
from PIL import Image

from events import HANG_TIMEOUT, wait_for

REPO = Path(__file__).resolve().parent.parent
ENV = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "PYTHONPATH": str(REPO)}

pytestmark = pytest.mark.faults_full


def test_sigterm_while_upscaling_is_our_line_only(tmp_path, model_file):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(400):
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(src / f"{i:03d}.png")
    proc = psutil.Popen([sys.executable, "-m", "sr_cli", "batch", str(src), str(out), "--model", model_file,
                         "--num-cpus", "2", "-q"], cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: any(out.glob("*_sr.png")), "the first output image", proc)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=HANG_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, stderr[-3000:]
    assert "SIGTERM received" not in stderr and "PC: @" not in stderr, stderr[-3000:]
    assert stderr.rstrip().splitlines()[-1].startswith("sr batch: interrupted"), stderr[-3000:]
    assert len(stderr.strip().splitlines()) == 1, stderr[-3000:]
