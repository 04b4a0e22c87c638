"""Non-regular files (named pipes, sockets, devices) in an input folder: opening a FIFO
blocks until something writes to it, so a command that opens one never finishes. Every
command that lists a folder skips them before anything opens them and reports each one
(as it reports hidden files); one named directly is refused on one line.

Each command runs as a subprocess in its own session with a timeout, so a regression
fails (and its whole process tree is killed) instead of hanging the suite."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from events import HANG_TIMEOUT, run_in_session

REPO = Path(__file__).resolve().parent.parent


def run_sr(*args: str) -> subprocess.CompletedProcess:
    """``sr ARGS``; a hang (a FIFO opened) fails the test and kills everything it started."""
    return run_in_session([sys.executable, "-m", "sr_cli", *args], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def photo_folder(folder: Path, names=("a.png", "sub/b.png")) -> None:
    rng = np.random.default_rng(0)
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (24, 28, 3), dtype=np.uint8)).save(folder / name)


def add_special_files(folder: Path) -> list[Path]:
    """A FIFO named like an image, below a subfolder; returns it."""
    fifo = folder / "sub" / "pipe.png"
    os.mkfifo(fifo)
    return [fifo]


@pytest.fixture
def sock_file(tmp_path):
    """A bound Unix socket file named like an image (a socket cannot be opened either)."""
    path = tmp_path / "in" / "sock.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    yield path
    s.close()


def test_list_files_skips_and_reports_non_regular_files_without_opening_them(tmp_path, sock_file):
    from sr_core import storage

    src = tmp_path / "in"
    photo_folder(src)
    fifo, = add_special_files(src)
    os.mkfifo(src / "notes.txt")  # not an image name: neither listed nor reported
    special: list[tuple[str, str]] = []
    listed = storage.list_files(str(src), suffixes={".png"}, special=special)
    assert listed == [str(src / "a.png"), str(src / "sub" / "b.png")]
    assert special == [(str(sock_file), "a socket, not a regular file; not read"),
                       (str(fifo), "a named pipe (FIFO), not a regular file; not read")]
    # without a list to report into, they are still never listed
    assert storage.list_files(str(src)) == [str(src / "a.png"), str(src / "sub" / "b.png")]


def test_reading_a_fifo_is_refused_on_one_line_not_a_hang(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    code = ("from sr_core import storage\n"
            f"try:\n    storage.read_bytes({str(fifo)!r})\n"
            "except ValueError as exc:\n    print(exc)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=HANG_TIMEOUT,
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.strip() == f"{fifo}: a named pipe (FIFO), not a regular file; only files can be read", \
        proc.stderr


def test_upscale_skips_a_fifo_in_a_folder_and_refuses_one_named_directly(tmp_path, model_file):
    src = tmp_path / "in"
    photo_folder(src)
    fifo, = add_special_files(src)
    proc = run_sr("upscale", str(src), "-o", str(tmp_path / "out"), "-m", model_file)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "written 2, skipped 0 (output exists), failed 0, 1 non-regular file(s) not read" in proc.stdout
    assert f"  SKIPPED {fifo}: a named pipe (FIFO), not a regular file; not read" in proc.stderr
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.png")) == [
        "a_sr.png", "sub/b_sr.png"]

    proc = run_sr("upscale", str(fifo), "-o", str(tmp_path / "out2"), "-m", model_file)
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = proc.stderr.rstrip().splitlines()
    assert lines == [f"  FAILED {fifo}: a named pipe (FIFO), not a regular file; only files can be read"], lines
    # a glob that matches one lists it like a folder does
    proc = run_sr("upscale", str(src / "sub" / "*.png"), "-o", str(tmp_path / "out3"), "-m", model_file)
    assert proc.returncode == 0 and f"SKIPPED {fifo}: a named pipe" in proc.stderr, proc.stderr[-3000:]


def test_batch_skips_a_fifo_in_its_input_folder_and_records_it(tmp_path, model_file):
    src, dst = tmp_path / "in", tmp_path / "out"
    photo_folder(src)
    fifo, = add_special_files(src)
    proc = run_sr("batch", str(src), str(dst), "--model", model_file, "--run-id", "r", "--num-cpus", "2", "-q")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"  SKIPPED {fifo}: a named pipe (FIFO), not a regular file; not read" in proc.stderr
    assert "done 2, skipped 0 (output exists)" in proc.stdout and "1 non-regular file(s) not read" in proc.stdout
    summary = json.loads((dst / "_sr_batch" / "r" / "summary.json").read_text())
    assert summary["not_read"] == [{"input": str(fifo),
                                   "reason": "a named pipe (FIFO), not a regular file; not read"}]
    assert summary["done"] == 2 and summary["failed"] == 0
    # a FIFO as INPUT itself: refused before Ray starts
    proc = run_sr("batch", str(fifo), str(dst), "--model", model_file, "-q")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [
        f"sr batch: error: {fifo}: a named pipe (FIFO), not a folder, prefix or manifest"]


def test_eval_skips_a_fifo_in_a_set(tmp_path):
    src = tmp_path / "set"
    photo_folder(src)
    fifo, = add_special_files(src)
    proc = run_sr("eval", str(src), "--bicubic", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "scored 2 image(s) in 1 set(s); failed 0, skipped 1" in proc.stdout
    assert "skipped set/sub/pipe.png: a named pipe (FIFO), not a regular file; not read" in proc.stderr


def test_prepare_skips_a_fifo_in_its_source_folder(tmp_path):
    src = tmp_path / "src"
    photo_folder(src)
    add_special_files(src)
    proc = run_sr("prepare", str(src), str(tmp_path / "dst"), "--size", "16", "--step", "16", "-q")
    assert proc.returncode == 0, proc.stderr[-3000:]
    index = json.loads((tmp_path / "dst" / "index.json").read_text())
    assert index["num_sources"] == 2
    assert index["skipped"] == [{"source": "sub/pipe.png", "reason": "a named pipe (FIFO), not a regular file; not read"}]
    assert "skipped sub/pipe.png: a named pipe (FIFO)" in proc.stderr


def test_the_training_validation_loader_skips_a_fifo(tmp_path):
    src = tmp_path / "val"
    photo_folder(src)
    fifo, = add_special_files(src)
    code = ("import logging; logging.basicConfig(level=logging.WARNING, format='%(message)s')\n"
            "from jobs.data import ValidationDataset\n"
            f"ds = ValidationDataset({str(src)!r}, scale=2)\n"
            "print(len(ds), [ds[i]['name'] for i in range(len(ds))])\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=HANG_TIMEOUT,
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True)
    assert proc.stdout.strip() == "2 ['a.png', 'sub/b.png']", proc.stderr[-3000:]
    assert f"validation: skipped {fifo}: a named pipe (FIFO), not a regular file; not read" in proc.stderr
