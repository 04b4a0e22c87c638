"""`sr batch` over 20,000 tiny images on a local Ray: the driver SIGKILLed midway (once a
results part is written), then rerun; across both runs' tables exactly one row per
input and every output written; the driver's own peak RSS (VmHWM, not Ray's processes)
at 20,000 inputs within 10% of its peak at 2,000.

Kept fast for two CPUs: every input is the same 8x8 PNG (its bytes copied, so writing
20,000 files takes a fraction of a second), the tiny x2 RRDBNet untiled, 64 images per
actor call. Each driver is its own process (``DRIVER``) that prints its VmHWM when the
command returns; the killed one's is read from /proc just before the kill.

Its time on 2 shared cores: 184 s and 333 s in two runs (three drivers, each starting its
own Ray; ~80 images/s, the tiny model's per-image overhead), at or over a 3-minute CI
budget. Measured driver peaks: 530 MiB at 2,000, 528 MiB when killed, 554 MiB for the
20,000-input rerun (+4.5%)."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
from PIL import Image

from batch.results import read_table
from events import HANG_TIMEOUT, run_in_session, wait_for
from sr_core import codecs

REPO = Path(__file__).resolve().parent.parent
NUM_LARGE = 20_000
NUM_SMALL = 2_000
FOLDER_FILES = 1000
# The command, then this process's peak RSS (kB) on stderr's last line.
DRIVER = ("import sys\nfrom sr_cli.main import main\ncode = main(sys.argv[1:])\n"
          "hwm = [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:')][0]\n"
          "print('driver VmHWM kB', hwm, file=sys.stderr)\nsys.exit(code)\n")
OPTIONS = ["--tile", "0", "--batch-size", "64", "--encode-threads", "1", "--num-cpus", "2", "-q"]


def tiny_png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def corpus(root: Path, count: int) -> list[str]:
    """``count`` copies of one 8x8 PNG in folders of 1,000; their paths."""
    data, paths = tiny_png(), []
    for i in range(count):
        folder = root / f"d{i // FOLDER_FILES:03d}"
        if i % FOLDER_FILES == 0:
            folder.mkdir(parents=True)
        path = folder / f"img{i:05d}.png"
        path.write_bytes(data)
        paths.append(str(path))
    return paths


def driver_cmd(src: Path, dst: Path, model: str, run_id: str) -> list[str]:
    return [sys.executable, "-c", DRIVER, "batch", str(src), str(dst), "--model", model, "--run-id", run_id,
            *OPTIONS]


def driver_env() -> dict:
    # its own local Ray, as `sr batch` on a machine without a cluster
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"PYTHONPATH": str(REPO)}


def finished_vmhwm(proc: subprocess.CompletedProcess) -> int:
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("driver VmHWM kB "), proc.stderr[-3000:]
    return int(last.split()[-1])


def test_20k_images_killed_midway_and_rerun_one_row_each_in_bounded_driver_memory(tmp_path, model_file):
    small = corpus(tmp_path / "small", NUM_SMALL)
    small_run = run_in_session(driver_cmd(tmp_path / "small", tmp_path / "small-out", model_file, "small"),
                               env=driver_env(), cwd=REPO)
    small_hwm = finished_vmhwm(small_run)
    assert len(read_table(str(tmp_path / "small-out" / "_sr_batch" / "small" / "metrics.parquet"))) == len(small)

    src, dst = tmp_path / "in", tmp_path / "out"
    inputs = corpus(src, NUM_LARGE)
    outputs = [str(dst / Path(p).relative_to(src)).replace(".png", "_sr.png") for p in inputs]
    first_part = dst / "_sr_batch" / "killed" / "metrics.parquet" / "part-000000.parquet"
    proc = subprocess.Popen(driver_cmd(src, dst, model_file, "killed"), env=driver_env(), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        wait_for(first_part.exists, "the killed run's first results part", proc)
        with open(f"/proc/{proc.pid}/status") as status:
            killed_hwm = int(next(line for line in status if line.startswith("VmHWM:")).split()[1])
        actors = [p for p in psutil.Process(proc.pid).children(recursive=True)
                  if "UpscaleActor" in " ".join(p.cmdline())]
        proc.send_signal(signal.SIGKILL)  # the driver alone: its Ray dies with it
        proc.wait(timeout=HANG_TIMEOUT)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    # The killed driver's actors write outputs until they are gone (each output whole).
    wait_for(lambda: not [a for a in actors if a.is_running() and a.status() != psutil.STATUS_ZOMBIE],
             "the killed driver's actors to stop")
    written = sum(os.path.exists(p) for p in outputs)
    assert 0 < written < NUM_LARGE, f"the kill must land midway ({written} of {NUM_LARGE} written)"

    rerun = run_in_session(driver_cmd(src, dst, model_file, "rerun"), env=driver_env(), cwd=REPO)
    rerun_hwm = finished_vmhwm(rerun)
    tables = [read_table(str(dst / "_sr_batch" / run / "metrics.parquet"), columns=["input", "output", "recovered"])
              .to_pandas() for run in ("killed", "rerun")]
    rows = pd.concat(tables)
    assert sorted(rows["input"]) == sorted(inputs), "not exactly one row per input across the runs"
    assert set(rows["output"]) == set(outputs)
    assert all(os.path.exists(p) for p in outputs)
    assert tables[1]["recovered"].sum() + len(tables[0]) <= written  # rows of the killed run's outputs only
    codecs.read_image(outputs[-1])

    print(f"driver VmHWM: {small_hwm / 1024:.0f} MiB at {NUM_SMALL} inputs, {killed_hwm / 1024:.0f} MiB when "
          f"killed at {written} of {NUM_LARGE}, {rerun_hwm / 1024:.0f} MiB for the rerun")
    assert killed_hwm <= 1.1 * small_hwm and rerun_hwm <= 1.1 * small_hwm, (small_hwm, killed_hwm, rerun_hwm)
