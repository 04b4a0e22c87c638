"""Kills and concurrency: `sr prepare` SIGKILLed at seeded points and rerun ends with
shards byte-identical to an uninterrupted run; two `sr prepare` runs into one DST at
once both finish correctly (same plan) or the second refuses (another plan); `sr
upscale` killed and rerun ends with every output present and decodable."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from events import HANG_TIMEOUT, wait_for
from sr_core import build_generator, codecs, save_generator

pytestmark = pytest.mark.faults_full

SR = os.path.join(os.path.dirname(sys.executable), "sr")
FULL = os.environ.get("SR_FAULTS") == "full"
NUM_KILLS = 5 if FULL else 2


def cut_photos(folder, n, size, seed=2):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"img{i:03d}.png")


PREPARE_ARGS = ["--size", "64", "--step", "32", "--images-per-shard", "1", "--png-level", "9", "-j", "2", "-q"]


def prepare_cmd(src, dst, *extra):
    return [SR, "prepare", str(src), str(dst), *PREPARE_ARGS, *extra]


def tree_bytes(root):
    """Every file below root (shards, units, index without its timing), by relative name."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            if p.name == "index.json":
                index = json.loads(data)
                index.pop("seconds_last_run")
                data = json.dumps(index, sort_keys=True).encode()
            out[str(p.relative_to(root))] = data
    return out


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Source photos and an uninterrupted `sr prepare` of them."""
    root = tmp_path_factory.mktemp("kills")
    cut_photos(root / "src", 24, 200)
    done = subprocess.run(prepare_cmd(root / "src", root / "clean"), capture_output=True, text=True, timeout=HANG_TIMEOUT)
    assert done.returncode == 0, done.stderr
    return root


def kill_when(proc, ready):
    """SIGKILL the whole process group (main process and pool workers) once ready()."""
    wait_for(lambda: proc.poll() is not None or ready(), "the kill point", interval=0.005)
    if proc.poll() is not None:
        return False  # finished before the kill point
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return True


@pytest.mark.parametrize("seed", [0, 1] if FULL else [0])
def test_prepare_killed_at_seeded_points_then_rerun_is_byte_identical(prepared, tmp_path, seed):
    rng = random.Random(seed)
    dst = tmp_path / "dst"
    units = dst / "units"
    kills = 0
    # kill points: after a seeded number of finished units, plus a seeded few ms, so
    # kills land between units, inside a unit, and between a write and its rename
    points = sorted(rng.sample(range(1, 20), NUM_KILLS))
    for point in points:
        wait_ms = rng.uniform(0, 40)
        proc = subprocess.Popen(prepare_cmd(prepared / "src", dst), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        reached = [None]

        def ready():
            if len(list(units.glob("*.json"))) >= point if units.exists() else False:
                reached[0] = reached[0] or time.monotonic()
                return time.monotonic() - reached[0] >= wait_ms / 1000
            return False

        kills += kill_when(proc, ready)
        assert not (dst / "index.json").exists() or len(list(units.glob("*.json"))) == 24
    assert kills == NUM_KILLS
    final = subprocess.run(prepare_cmd(prepared / "src", dst), capture_output=True, text=True, timeout=HANG_TIMEOUT)
    assert final.returncode == 0, final.stderr
    assert tree_bytes(dst) == tree_bytes(prepared / "clean")  # and no temporaries left
    print(f"kills survived: {kills}")


def test_two_prepares_of_one_plan_into_one_dst_both_finish(prepared, tmp_path):
    dst = tmp_path / "dst"
    procs = [subprocess.Popen(prepare_cmd(prepared / "src", dst), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    results = [(p.wait(timeout=HANG_TIMEOUT), p.stderr.read()) for p in procs]
    for code, err in results:
        assert code == 0, err
    assert tree_bytes(dst) == tree_bytes(prepared / "clean")


def test_a_prepare_of_another_plan_into_a_busy_dst_is_refused(prepared, tmp_path):
    dst = tmp_path / "dst"
    first = subprocess.Popen(prepare_cmd(prepared / "src", dst), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    wait_for(lambda: (dst / "plan.json").exists(), "plan.json", first, interval=0.01)
    other = subprocess.run(prepare_cmd(prepared / "src", dst, "--png-level", "1"), capture_output=True, text=True,
                           timeout=HANG_TIMEOUT)
    assert other.returncode == 2
    assert "unfinished prepare of other images or settings" in other.stderr and len(other.stderr.splitlines()) == 1
    assert first.wait(timeout=HANG_TIMEOUT) == 0, first.stderr.read()
    assert tree_bytes(dst) == tree_bytes(prepared / "clean")


def test_two_prepares_into_one_gcs_prefix_both_finish(gcs_emulator, prepared):
    bucket = gcs_emulator.make_bucket("conc")
    fs = gcs_emulator.fs()
    for p in sorted((prepared / "src").iterdir())[:3]:
        fs.put_file(str(p), f"{bucket[5:]}/src/{p.name}")
    clean = subprocess.run(prepare_cmd(f"{bucket}/src", f"{bucket}/clean", "-j", "1"), capture_output=True,
                           text=True, timeout=HANG_TIMEOUT)
    assert clean.returncode == 0, clean.stderr
    procs = [subprocess.Popen(prepare_cmd(f"{bucket}/src", f"{bucket}/dst", "-j", "1"), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for p in procs:
        assert p.wait(timeout=HANG_TIMEOUT) == 0, p.stderr.read()

    def shards(dst):
        index = json.loads(fs.cat_file(f"{bucket[5:]}/{dst}/index.json"))
        return index["shards"], {s["name"]: fs.cat_file(f"{bucket[5:]}/{dst}/{s['name']}") for s in index["shards"]}

    assert shards("dst") == shards("clean")


# ---- sr upscale ------------------------------------------------------------------------


def test_upscale_killed_and_rerun_ends_with_every_output_decodable(tmp_path):
    torch.manual_seed(0)
    model = str(tmp_path / "m.safetensors")
    save_generator(build_generator("rrdbnet", "tiny", scale=2), model)
    cut_photos(tmp_path / "in", 6, 48, seed=3)
    out = tmp_path / "out"
    cmd = [SR, "upscale", str(tmp_path / "in"), "-o", str(out), "-m", model]
    rng = random.Random(0)
    kills = 0
    for _ in range(NUM_KILLS if FULL else 1):  # each restart costs a torch import: one in CI
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        target = (len(list(out.glob("*.png"))) if out.exists() else 0) + rng.randint(1, 2)
        kills += kill_when(proc, lambda: out.exists() and len(list(out.glob("*.png"))) >= target)
    final = subprocess.run(cmd, capture_output=True, text=True, timeout=HANG_TIMEOUT)
    assert final.returncode == 0, final.stderr
    outputs = sorted(p.name for p in out.iterdir())
    assert outputs == [f"img{i:03d}_sr.png" for i in range(6)]  # no temporaries, nothing twice
    for name in outputs:
        assert codecs.read_image(str(out / name)).shape == (96, 96, 3)
    assert kills >= 1
