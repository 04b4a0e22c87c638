"""`sr batch` under faults: its workers reach the GCS emulator through the
fault-injecting proxy (dropped connections, 429/500/503, delays) and every output is
still the Upscaler's; its driver SIGKILLed at seeded points and rerun ends with every
output present once and decodable, and exactly one metrics row per input over the
runs' tables."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from batch import localray
from batch.results import read_table
from events import HANG_TIMEOUT, upscale_actors_below, wait_for
from faultproxy import FaultProxy, FaultRates
from sr_core import codecs, metrics
from sr_cli.main import main
from sr_core.resize import imresize
from sr_core.upscaler import Upscaler

pytestmark = pytest.mark.faults_full

FULL = os.environ.get("SR_FAULTS") == "full"
NUM_KILLS = 3 if FULL else 1
FAULTY = FaultRates(drop_before=0.03, drop_after=0.03, status_429=0.03, status_500=0.03, status_503=0.03,
                    delay=0.05, delay_seconds=0.1)


@pytest.fixture(scope="module")
def proxied_ray(gcs_emulator):
    """A local Ray whose workers reach the emulator only through a fault proxy (the
    driver, this process, reaches it directly)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    with FaultProxy(gcs_emulator.url, FAULTY, seed=3) as proxy:
        env = {"STORAGE_EMULATOR_HOST": proxy.url, "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
               "SR_STORAGE_ATTEMPTS": "10", "SR_STORAGE_BACKOFF": "0.02"}
        context = ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": env}, log_to_driver=False,
                           _system_config=localray.SYSTEM_CONFIG)
        try:
            yield context.address_info["address"], proxy
        finally:
            ray.shutdown()


def upload_photos(gcs_emulator, bucket, n, size=40):
    fs = gcs_emulator.fs()
    rng = np.random.default_rng(5)
    names = [f"set{i % 3}/img{i:03d}.png" for i in range(n)]
    for name in names:
        img = rng.integers(0, 256, (size, size + 3, 3), dtype=np.uint8)
        buf = codecs.encode_image(img)
        fs.pipe_file(f"{bucket[5:]}/in/{name}", buf)
    return names


def check_outputs(gcs_emulator, bucket, names, model_file, dst="out"):
    fs = gcs_emulator.fs()
    up = Upscaler.from_file(model_file, tile=8)
    for name in names:
        src = codecs.decode_image(fs.cat_file(f"{bucket[5:]}/in/{name}"))
        out = codecs.decode_image(fs.cat_file(f"{bucket[5:]}/{dst}/{os.path.splitext(name)[0]}_sr.png"))
        np.testing.assert_array_equal(out, up(src))


def test_batch_through_faults_writes_every_output_right(gcs_emulator, proxied_ray, model_file, capsys):
    address, proxy = proxied_ray
    bucket = gcs_emulator.make_bucket("bfault")
    names = upload_photos(gcs_emulator, bucket, 8)
    before = proxy.faults
    code = main(["batch", f"{bucket}/in", f"{bucket}/out", "--model", model_file, "--tile", "8",
                 "--batch-size", "2", "--address", address, "--run-id", "faulty", "-q"])
    err = capsys.readouterr().err
    assert code == 0, err[-3000:]
    injected = proxy.faults - before
    assert injected >= 3, proxy.counts
    check_outputs(gcs_emulator, bucket, names, model_file)
    rows = read_table(f"{bucket}/out/_sr_batch/faulty/metrics.parquet").to_pandas()
    assert sorted(rows["input"]) == sorted(f"{bucket}/in/{n}" for n in names)
    print(f"batch faults injected: {injected} of {dict(proxy.counts)}")


def test_batch_killed_then_rerun_has_every_output_once(gcs_emulator, proxied_ray, model_file, capsys):
    address, proxy = proxied_ray
    bucket = gcs_emulator.make_bucket("bkill")
    names = upload_photos(gcs_emulator, bucket, 12 if FULL else 8)
    fs = gcs_emulator.fs()
    outputs = [f"{bucket[5:]}/out/{os.path.splitext(n)[0]}_sr.png" for n in names]
    rng = random.Random(0)
    first_seen: dict[str, str] = {}  # output -> its generation when first seen

    def done() -> int:
        fs.invalidate_cache()
        found = [p for p in fs.find(f"{bucket[5:]}/out") if p.endswith("_sr.png")]
        for p in found:
            first_seen.setdefault(p, fs.info(p).get("generation"))
        return len(found)

    kills = 0
    for k in range(NUM_KILLS):
        target = done() + rng.randint(1, 3)
        proc = subprocess.Popen(
            [SR_BIN, "batch", f"{bucket}/in", f"{bucket}/out", "--model", model_file, "--tile", "8",
             "--batch-size", "1", "--encode-threads", "1", "--address", address, "--run-id", f"killed{k}", "-q"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_for(lambda: done() >= target or proc.poll() is not None, f"{target} outputs", interval=0.1)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait(timeout=HANG_TIMEOUT)
        # Ray stops the killed driver's actors (they run in this process's Ray); after
        # that, nothing but a request the proxy is still forwarding can write.
        wait_for(lambda: not upscale_actors_below(), "the killed driver's actors to stop")
        wait_for(proxy.idle, "the proxy to finish forwarding")
    assert kills >= 1
    code = main(["batch", f"{bucket}/in", f"{bucket}/out", "--model", model_file, "--tile", "8",
                 "--address", address, "--run-id", "final", "-q"])
    assert code == 0, capsys.readouterr().err[-3000:]
    assert done() == len(names)
    check_outputs(gcs_emulator, bucket, names, model_file)
    # none written twice: each output still has the generation it had when first seen
    for p in outputs:
        assert fs.info(p).get("generation") == first_seen[p], p
    # metrics rows over every run's table: exactly one for each input. The rows of
    # outputs a killed run wrote after its last checkpoint are measured by a later run
    # ("recovered"), equal to what the run that wrote the output would have recorded.
    runs = [p for p in fs.ls(f"{bucket[5:]}/out/_sr_batch") if fs.isdir(p)]
    tables = [f"gs://{p}/metrics.parquet" for p in runs if fs.exists(f"{p}/metrics.parquet")]
    rows = pd.concat([read_table(t).to_pandas() for t in tables])
    print(f"batch kills survived: {kills}; metrics rows {len(rows)} of {len(names)} inputs in {len(tables)} "
          f"tables, {int(rows['recovered'].sum())} recovered")
    assert sorted(rows["input"]) == sorted(f"{bucket}/in/{n}" for n in names)
    up = Upscaler.from_file(model_file, tile=8)
    for row in rows.itertuples():
        image = codecs.decode_image(fs.cat_file(row.input[5:]))
        lr = codecs.to_rgb8(image)
        down = codecs.to_rgb8(imresize(up(image), size=image.shape[:2]))
        assert row.lr_psnr == pytest.approx(metrics.psnr(down, lr, y_channel=True), rel=1e-12), row.input
        assert row.lr_ssim == pytest.approx(metrics.ssim(down, lr, y_channel=True), rel=1e-12), row.input
        assert row.out_bytes == len(fs.cat_file(row.output[5:])) and row.in_bytes == len(fs.cat_file(row.input[5:]))
        assert np.isnan(row.model_s) == row.recovered, row.input


SR_BIN = os.path.join(os.path.dirname(sys.executable), "sr")


# ---- load: many small inputs, bounded memory ------------------------------------------

NUM_LOAD = 2000 if FULL else 200


def test_batch_on_many_small_inputs_completes_with_bounded_memory(tmp_path, model_file):
    import psutil

    src, dst = tmp_path / "in", tmp_path / "out"
    rng = np.random.default_rng(7)
    for i in range(NUM_LOAD):
        folder = src / f"part{i // 100:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(folder / f"{i:05d}.png")
    # its own driver, which starts its own local Ray: the whole process tree is measured
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = psutil.Popen([SR_BIN, "batch", str(src), str(dst), "--model", model_file, "--tile", "0",
                         "--batch-size", "16", "--num-cpus", "2", "--run-id", "load", "-q"],
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    peaks: dict[int, tuple[int, str]] = {}
    deadline = time.monotonic() + HANG_TIMEOUT * 1.5  # only a hang fails it; 2,000 inputs take ~1 min alone
    while proc.poll() is None:
        assert time.monotonic() < deadline, "sr batch did not finish: a hang"
        try:
            tree = [proc] + proc.children(recursive=True)
        except psutil.NoSuchProcess:
            break
        for p in tree:
            try:
                rss, name = p.memory_info().rss, " ".join(p.cmdline())[:80]
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            if rss > peaks.get(p.pid, (0, ""))[0]:
                peaks[p.pid] = (rss, name)
        time.sleep(0.2)
    out, err = proc.communicate()
    assert proc.returncode == 0, err.decode()[-3000:]
    assert len(list(dst.rglob("*_sr.png"))) == NUM_LOAD
    rows = pd.read_parquet(dst / "_sr_batch" / "load" / "metrics.parquet")
    assert len(rows) == NUM_LOAD and rows["input"].is_unique
    assert len(pd.read_parquet(dst / "_sr_batch" / "load" / "failures.parquet")) == 0
    driver = peaks[proc.pid][0]
    actors = [rss for pid, (rss, name) in peaks.items() if "UpscaleActor" in name or "MapWorker" in name]
    workers = [rss for pid, (rss, name) in peaks.items() if pid != proc.pid and name.startswith("ray::")]
    mib = 2**20
    print(f"load: {NUM_LOAD} inputs; peak RSS driver {driver / mib:.0f} MiB, actors "
          f"{[round(a / mib) for a in actors]} MiB, largest Ray worker {max(workers) / mib:.0f} MiB")
    # bounded: no process grows with the number of inputs (all are far below a GiB each)
    assert driver < 1.5 * 2**30 and max(workers) < 1.5 * 2**30
