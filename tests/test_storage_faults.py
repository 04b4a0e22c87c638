"""Storage under faults: gs:// without credentials or network fails in seconds with one
line; requests through a fault-injecting proxy in front of the GCS emulator are
retried with bounded backoff, logged, and end in results identical to a run without
faults; a write that finally fails names the object; a long outage leaves a state
that a rerun finishes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from faultproxy import FaultProxy, FaultRates
from ports import free_port

pytestmark = pytest.mark.faults_full

SR = os.path.join(os.path.dirname(sys.executable), "sr")


def offline_env(tmp_path, **extra) -> dict:
    """An environment with no Google credentials anywhere, whose metadata server and
    (when given) emulator are closed loopback ports: nothing leaves 127.0.0.1."""
    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if k not in ("GOOGLE_APPLICATION_CREDENTIALS", "STORAGE_EMULATOR_HOST", "SR_GCS_ANON")}
    env.update(HOME=str(tmp_path), CLOUDSDK_CONFIG=str(tmp_path / "gcloud"),
               GCE_METADATA_HOST=f"127.0.0.1:{port}", GCE_METADATA_IP=f"127.0.0.1:{port}", **extra)
    return env


@pytest.mark.parametrize("case, args", [
    ("no credentials", ["prepare", "gs://bucket/in", "OUT"]),
    ("endpoint unreachable", ["prepare", "gs://bucket/in", "OUT"]),
    ("endpoint unreachable", ["upscale", "gs://bucket/in", "-o", "OUT", "-m", "gs://bucket/m.safetensors"]),
])
def test_gs_without_credentials_or_network_fails_in_seconds_with_one_line(tmp_path, case, args):
    extra = {} if case == "no credentials" else {"STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{free_port()}"}
    args = [a.replace("OUT", str(tmp_path / "out")) for a in args]
    # Before, each of these took 50-87 s (credential probes, then ~30 s of retries per
    # request); now they take seconds. The bound is far from both: a loaded machine does
    # not reach it, the old behaviour does.
    proc = subprocess.run([SR, *args], capture_output=True, text=True, timeout=45, env=offline_env(tmp_path, **extra))
    err = proc.stderr.strip()
    assert proc.returncode == 75, err[-3000:]
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err[-3000:]
    assert "gs://bucket/" in err
    if case == "no credentials":
        assert "no Google Cloud credentials" in err and "GOOGLE_APPLICATION_CREDENTIALS" in err
    else:
        assert "cannot reach the storage endpoint 127.0.0.1" in err and "STORAGE_EMULATOR_HOST" in err


# ---- through the fault-injecting proxy ------------------------------------------------

# The CI run tries one seed per test; SR_FAULTS=full (./dev test -m faults_full) tries more.
FULL = os.environ.get("SR_FAULTS") == "full"
SEEDS = range(5) if FULL else range(1)
FAULTY = FaultRates(drop_before=0.04, drop_after=0.04, status_429=0.04, status_500=0.04, status_503=0.04,
                    delay=0.05, delay_seconds=0.1)


def cut_photos(folder, n, size):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"img{i:03d}.png")


@pytest.fixture(scope="module")
def photos_bucket(gcs_emulator, tmp_path_factory):
    """A bucket with 12 photos under photos/ and a clean `sr prepare` of them in clean/."""
    src = tmp_path_factory.mktemp("photos")
    cut_photos(src, 12, 96)
    bucket = gcs_emulator.make_bucket("faults")
    fs = gcs_emulator.fs()
    for p in sorted(src.iterdir()):
        fs.put_file(str(p), f"{bucket[5:]}/photos/{p.name}")
    clean = prepare_cmd(bucket, "clean", os.environ, "-j", "1")  # one process or two: the same bytes
    assert clean.returncode == 0, clean.stderr
    return bucket


def prepare_cmd(bucket, dst, env, *extra, timeout=300):
    return subprocess.run([SR, "prepare", f"{bucket}/photos", f"{bucket}/{dst}", "--size", "48", "--step", "24",
                           "--images-per-shard", "2", "-j", "2", "-q", *extra],
                          capture_output=True, text=True, timeout=timeout, env=env)


def shards_of(fs, bucket, dst):
    index = json.loads(fs.cat_file(f"{bucket[5:]}/{dst}/index.json"))
    return index["shards"], {s["name"]: fs.cat_file(f"{bucket[5:]}/{dst}/{s['name']}") for s in index["shards"]}


def proxy_env(proxy, attempts=10):
    return {**os.environ, "STORAGE_EMULATOR_HOST": proxy.url, "SR_STORAGE_ATTEMPTS": str(attempts),
            "SR_STORAGE_BACKOFF": "0.02"}


FAULT_COUNTS: dict = {}  # test -> faults injected, for the record in docs/RELIABILITY.md


@pytest.mark.parametrize("seed", SEEDS)
def test_prepare_through_faults_gives_the_same_shards(gcs_emulator, photos_bucket, seed):
    fs = gcs_emulator.fs()
    with FaultProxy(gcs_emulator.url, FAULTY, seed=seed) as proxy:
        proc = prepare_cmd(photos_bucket, f"faulty-{seed}", proxy_env(proxy))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proxy.faults >= 5, proxy.counts
    # every retry was logged, on one line, naming the request
    retries = [ln for ln in proc.stderr.splitlines() if ln.startswith("storage: ")]
    assert retries and all("retry" in ln and f"{photos_bucket}/" in ln for ln in retries), proc.stderr[-2000:]
    # no query strings (resumable-upload session ids act as credentials), no headers
    assert "?" not in proc.stderr and "upload_id" not in proc.stderr and "Authorization" not in proc.stderr
    assert "Traceback" not in proc.stderr
    clean_index, clean_bytes = shards_of(fs, photos_bucket, "clean")
    index, data = shards_of(fs, photos_bucket, f"faulty-{seed}")
    assert index == clean_index and data == clean_bytes
    print(f"faults injected: {dict(proxy.counts)}")


def test_an_outage_longer_than_the_retries_stops_naming_the_object_and_a_rerun_finishes(gcs_emulator, photos_bucket):
    fs = gcs_emulator.fs()
    with FaultProxy(gcs_emulator.url, seed=0) as proxy:
        proxy.outage_after_uploads = 3  # the plan and a couple of shards get through
        failed = prepare_cmd(photos_bucket, "outage", proxy_env(proxy, attempts=3))
        assert failed.returncode == 75, failed.stderr[-3000:]
        last = failed.stderr.strip().splitlines()[-1]
        assert last.startswith("sr prepare: error: ") and f"{photos_bucket}/outage/" in last, last
        assert "still failing after 3 attempts" in last and "rerun the same command" in last, last
        assert "Traceback" not in failed.stderr
        assert not fs.exists(f"{photos_bucket[5:]}/outage/index.json")
        # Each request was tried 3 times, not 3 x gcsfs's own 6: at most two worker
        # processes and the main one had a request in flight when storage went away.
        print(f"outage: {dict(proxy.counts)}")
        assert 3 <= proxy.counts["outage"] <= 3 * 3, proxy.counts
        proxy.lift_outage()
        rerun = prepare_cmd(photos_bucket, "outage", proxy_env(proxy))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert shards_of(fs, photos_bucket, "outage") == shards_of(fs, photos_bucket, "clean")


def test_upscale_stops_at_an_outage_naming_the_object_and_a_rerun_finishes(gcs_emulator, photos_bucket, tmp_path,
                                                                            monkeypatch, capsys):
    import torch

    from sr_core import build_generator, save_generator
    from sr_cli.main import main as sr_main

    torch.manual_seed(0)
    model = str(tmp_path / "m.safetensors")
    save_generator(build_generator("rrdbnet", "tiny", scale=2), model)
    fs = gcs_emulator.fs()
    args = ["upscale", f"{photos_bucket}/photos", "-o", f"{photos_bucket}/up", "-m", model, "--tile", "0"]
    with FaultProxy(gcs_emulator.url, seed=0) as proxy:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
        monkeypatch.setenv("SR_STORAGE_ATTEMPTS", "2")
        monkeypatch.setenv("SR_STORAGE_BACKOFF", "0.01")
        proxy.outage_after_uploads = 4  # the write check and three outputs get through
        capsys.readouterr()
        assert sr_main(args) == 1
        err = capsys.readouterr().err
        stop = next(ln for ln in err.splitlines() if ln.startswith("sr upscale: stopped"))
        # the object whose read or write failed first (the two race) is named
        assert f"{photos_bucket}/" in stop and "still failing after 2 attempts" in stop, stop
        assert "run the same command again" in stop and "Traceback" not in err
        proxy.lift_outage()
        written = [p for p in fs.find(f"{photos_bucket[5:]}/up") if p.endswith("_sr.png")]
        assert 3 <= len(written) < 12
        assert sr_main(args) == 0, capsys.readouterr().err[-2000:]
    fs.invalidate_cache()
    assert len([p for p in fs.find(f"{photos_bucket[5:]}/up") if p.endswith("_sr.png")]) == 12
