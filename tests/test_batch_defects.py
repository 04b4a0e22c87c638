"""`sr batch` as a hostile or careless user meets it (issue 17): a second run into an
OUTPUT another run is writing, --include matching nothing, --reference with missing
and mismatched HR images, a discriminator as --model, Ray's own lines on every run,
what a SIGKILLed driver's local Ray leaves running, and SIGTERM during start-up.

Runs that need Ray run `sr batch` as a subprocess with its own local Ray (as a user
does), each under a generous timeout that only turns a hang into a failure; every wait
is for an event (a file, a process, a line), never for a time."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
from PIL import Image

from events import HANG_TIMEOUT, run_in_session, wait_for
from sr_cli.main import main as sr_main

REPO = Path(__file__).resolve().parent.parent
SR = [sys.executable, "-m", "sr_cli"]
ENV = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "PYTHONPATH": str(REPO)}


def images(folder: Path, names=("a.png", "sub/b.png"), size=(28, 24)) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    out = {}
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / name)
        out[name] = pixels
    return out


def run_sr(*args: str) -> subprocess.CompletedProcess:
    return run_in_session([*SR, *args], cwd=REPO, env=ENV)


def session_processes(driver_pid: int) -> list[psutil.Process]:
    """This user's processes with a file open in the Ray session folder of the driver
    ``driver_pid`` (session folders end with the pid of the process that started Ray)."""
    pattern = re.compile(rf"/session_[^/]*_{driver_pid}/")
    found = []
    for p in psutil.process_iter():
        try:
            if p.pid != os.getpid() and any(pattern.search(f.path) for f in p.open_files()):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


# ---- #12: one run at a time per OUTPUT ---------------------------------------------


def test_a_second_run_into_an_output_another_run_holds_is_refused_naming_it(tmp_path, model_file):
    from sr_core.lease import Lease

    src, out = tmp_path / "in", tmp_path / "out"
    images(src)
    # A live holder on this host: this test's process, as a running `sr batch` would be.
    with Lease(str(out), "sr batch"):
        proc = run_sr("batch", str(src), str(out), "--model", model_file, "-q")
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.rstrip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"sr batch: error: {out} is in use by sr batch on host {socket.gethostname()}, "
                               f"pid {os.getpid()} (heartbeat "), lines
    assert not (out / "_sr_batch").exists() and not list(out.glob("*.png"))  # nothing planned, nothing written


def test_a_run_holds_the_lease_while_it_plans_and_writes_and_a_dead_holder_is_replaced(tmp_path, model_file,
                                                                                        capsys, monkeypatch):
    from batch import inputs
    from sr_core.lease import LEASE_NAME, Lease

    src, out = tmp_path / "in", tmp_path / "out"
    images(src)
    for name in ("a_sr.png", "sub/b_sr.png"):  # outputs done: no Ray needed
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (56, 48)).save(out / name)
    # The lease of a run killed with SIGKILL: its pid is gone on this host.
    dead = subprocess.Popen(["true"])
    dead.wait()
    (out / LEASE_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid,
                                              "command": "sr batch", "heartbeat": 4e9, "stale_seconds": 120}))
    seen = []
    steps = inputs.Planner.steps

    def planning(self):  # what the lease says while this run plans
        seen.append(Lease.holder(str(out)))
        yield from steps(self)

    monkeypatch.setattr(inputs.Planner, "steps", planning)
    assert sr_main(["batch", str(src), str(out), "--model", model_file, "-q", "--run-id", "r"]) == 0
    assert seen[0]["pid"] == os.getpid() and seen[0]["command"] == "sr batch"
    assert not (out / LEASE_NAME).exists()  # given back at the end
    assert "done 0, skipped 2 (output exists)" in capsys.readouterr().out


# ---- minor: --include matching nothing ---------------------------------------------


def test_include_matching_nothing_warns_and_exits_1(tmp_path, model_file, capsys):
    src = tmp_path / "in"
    images(src)
    code = sr_main(["batch", str(src), str(tmp_path / "out"), "--model", model_file, "--include", "*.jpg", "-q"])
    err = capsys.readouterr().err
    assert code == 1, err
    assert (f"sr batch: warning: none of the 2 images in {src} is selected by --include '*.jpg'; nothing to do "
            "(exit code 1)") in err
    (tmp_path / "empty").mkdir()
    code = sr_main(["batch", str(tmp_path / "empty"), str(tmp_path / "out"), "--model", model_file, "-q"])
    err = capsys.readouterr().err
    assert code == 1 and f"sr batch: warning: no images found in {tmp_path / 'empty'}" in err, err
    help_text = subprocess.run([*SR, "batch", "--help"], capture_output=True, text=True, cwd=REPO, env=ENV,
                               timeout=HANG_TIMEOUT).stdout
    assert "or INPUT holds no images that --include/--exclude select" in help_text


# ---- minor: a discriminator as --model --------------------------------------------


def test_a_discriminator_as_model_names_the_users_file(tmp_path, capsys):
    import torch

    from sr_core import build_discriminator

    path = tmp_path / "netD.pth"
    torch.save({"params": build_discriminator("vgg_style", "tiny").state_dict()}, path)
    images(tmp_path / "in")
    code = sr_main(["batch", str(tmp_path / "in"), str(tmp_path / "out"), "--model", str(path), "-q"])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.rstrip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"sr batch: error: {path}: "), lines
    assert "memory://" not in err and "unrecognized weight layout" in err


# ---- minor: --reference problems on screen and in the table; no Ray noise ------------


def test_reference_problems_are_printed_and_recorded_and_ray_adds_no_lines(tmp_path, model_file):
    src, hr, out = tmp_path / "lr", tmp_path / "hr", tmp_path / "out"
    lr = images(src, ("ok.png", "wrong.png", "missing.png"), size=(20, 16))
    hr.mkdir()
    Image.fromarray(np.kron(lr["ok.png"], np.ones((2, 2, 1), np.uint8))).save(hr / "ok.png")  # 40x32: right
    Image.new("RGB", (30, 30)).save(hr / "wrong.png")  # not the output's size
    proc = run_sr("batch", str(src), str(out), "--model", model_file, "--reference", str(hr), "--run-id", "r",
                  "--num-cpus", "2", "-q")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # stderr holds our lines and nothing else: no token-authentication notice, no core
    # worker note about actor constructor arguments.
    assert proc.stderr.rstrip().splitlines() == [
        f"  NO REFERENCE SCORE {src / 'missing.png'}: no HR image for it below {hr} (looked for missing.*)",
        f"  NO REFERENCE SCORE {src / 'wrong.png'} (reference {hr / 'wrong.png'}): the reference is 30x30 colour, "
        "the output 40x32 colour",
    ], proc.stderr
    assert "; 2 image(s) without a reference score (below)" in proc.stdout
    rows = pd.read_parquet(out / "_sr_batch" / "r" / "metrics.parquet").set_index("input")
    assert rows.loc[str(src / "missing.png")].reference_error.startswith("no HR image for it below")
    assert rows.loc[str(src / "missing.png")].reference == ""
    assert "30x30" in rows.loc[str(src / "wrong.png")].reference_error
    assert rows.loc[str(src / "ok.png")].reference_error == "" and np.isfinite(rows.loc[str(src / "ok.png")].ref_psnr)
    summary = json.loads((out / "_sr_batch" / "r" / "summary.json").read_text())
    assert summary["reference_errors"] == 2 and summary["metrics"]["ref_psnr"]["count"] == 1


# ---- minor: what a killed driver's local Ray leaves running ---------------------------


def test_a_rerun_stops_what_a_killed_drivers_local_ray_left_running(tmp_path, model_file):
    src, out = tmp_path / "in", tmp_path / "out"
    images(src, [f"img{i}.png" for i in range(12)])
    cmd = [*SR, "batch", str(src), str(out), "--model", model_file, "--batch-size", "1", "--num-cpus", "2", "-q"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: out.exists() and any(out.glob("*_sr.png")), "an output (Ray up and working)", proc)
        os.kill(proc.pid, signal.SIGKILL)  # the driver only, as `kill -9 PID` does
        proc.wait(timeout=HANG_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    left = session_processes(proc.pid)
    print(f"left running after the kill: {[p.pid for p in left]}")
    # The rerun has nothing to upscale (--limit 0), so it starts no Ray: what it stops is
    # only what the killed one left.
    rerun = run_sr("batch", str(src), str(out), "--model", model_file, "--limit", "0", "-q")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert session_processes(proc.pid) == [], "processes of the killed driver's Ray still run after the rerun"
    # (How many it stopped depends on how many had exited by themselves meanwhile.)
    print(rerun.stderr)
    assert "Traceback" not in rerun.stderr


# ---- minor: SIGTERM during start-up ------------------------------------------------


def test_sigterm_while_ray_starts_is_one_line_and_exit_130(tmp_path, model_file):
    from sr_core.lease import LEASE_NAME

    src, out = tmp_path / "in", tmp_path / "out"
    images(src)
    proc = psutil.Popen([*SR, "batch", str(src), str(out), "--model", model_file, "--num-cpus", "2", "-q"],
                        cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def ray_starting() -> bool:
        try:
            return any("raylet" in " ".join(c.cmdline()[:1]) for c in proc.children(recursive=True))
        except psutil.Error:
            return False

    wait_for(ray_starting, "Ray's raylet to start", proc)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=HANG_TIMEOUT)
    assert proc.returncode == 130, stderr[-3000:]
    assert stderr.rstrip().splitlines() == ["sr batch: interrupted by SIGTERM"], stderr
    assert not (out / LEASE_NAME).exists()
    left = session_processes(proc.pid)
    assert left == [], [(p.pid, p.ppid(), p.cmdline()[:3], p.create_time() - proc.create_time()) for p in left]  # the Ray it was starting is stopped
