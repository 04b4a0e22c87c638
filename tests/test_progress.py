"""Progress bars in a log file: where stderr is not a terminal (a cloud VM's job log, CI)
each redraw stays in the log as text, so a bar redraws at most every LOG_INTERVAL_S
seconds there, plus its start and its end; on a terminal at tqdm's usual rate."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from events import HANG_TIMEOUT
from sr_core import progress

ROOT = Path(__file__).resolve().parent.parent


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _redraws(text: str) -> int:
    return text.count("\r")


def test_a_bar_in_a_log_redraws_at_its_start_and_end_only_within_the_interval():
    log = io.StringIO()
    start = time.monotonic()
    with progress.bar(None, "work", "img", file=log) as bar:
        # Updates for a second at least: tqdm's own rate would redraw ~10 times.
        while time.monotonic() - start < 1.0:
            bar.update()
    elapsed = time.monotonic() - start
    assert f"{bar.n}img" in log.getvalue().replace(" ", "")
    # Start and end; on a machine slow enough to take longer than the interval, one
    # redraw per interval more.
    assert 1 <= _redraws(log.getvalue()) <= 2 + int(elapsed // progress.LOG_INTERVAL_S), log.getvalue()


def test_a_bar_on_a_terminal_keeps_tqdm_s_rate_and_a_hidden_bar_writes_nothing():
    assert progress.bar(10, "work", "img", file=Terminal()).mininterval == 0.1
    quiet = io.StringIO()
    with progress.bar(10, "work", "img", file=quiet, shown=False) as bar:
        bar.update(10)
    assert quiet.getvalue() == ""


def test_sr_upscale_into_a_log_file_writes_a_few_redraws(tmp_path):
    """End to end: ``sr upscale`` over 30 images with stderr to a file (a few seconds of
    work, where tqdm's own rate would redraw at every image)."""
    from PIL import Image

    from sr_core import modelfile
    from sr_core.archs import build_generator

    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(30):
        Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(src / f"img{i:02d}.png")
    model = tmp_path / "x2.safetensors"
    modelfile.save_generator(build_generator("srvgg_compact", "tiny", scale=2), str(model))
    start = time.monotonic()
    with open(tmp_path / "stderr.log", "w") as log:
        proc = subprocess.run([sys.executable, "-m", "sr_cli", "upscale", str(src), "-o", str(tmp_path / "out"),
                               "--model", str(model), "--device", "cpu"],
                              stdout=subprocess.DEVNULL, stderr=log, cwd=ROOT, timeout=HANG_TIMEOUT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    elapsed = time.monotonic() - start
    text = (tmp_path / "stderr.log").read_bytes().decode()  # read_text() would turn \r into \n
    assert proc.returncode == 0, text[-2000:]
    assert len(list((tmp_path / "out").glob("*.png"))) == 30
    assert "30/30" in text
    assert _redraws(text) <= 2 + int(elapsed // progress.LOG_INTERVAL_S), text
