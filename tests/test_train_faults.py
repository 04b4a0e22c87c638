"""`sr train` under faults: SIGKILLed at seeded points and resumed each time, it ends
with weights identical to an uninterrupted run; its shard reads, checkpoints and
TensorBoard writes through the fault-injecting proxy give the same state as without
faults; a pickled `train.pretrained` is refused and never runs."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time

import pytest
import torch

from faultproxy import FaultProxy, FaultRates
from jobs import checkpoint as ckpt
from jobs.train import main as train_main
from sr_cli.main import main as sr_main
from test_train import COMMON, _env, assert_same_state, data, scalars  # noqa: F401  (data: the fixture)

pytestmark = pytest.mark.faults_full

FULL = os.environ.get("SR_FAULTS") == "full"
NUM_KILLS = 5 if FULL else 1
STEPS = 10 if FULL else 4


def test_training_killed_at_seeded_points_resumes_to_identical_weights(data, tmp_path):
    torch.set_num_threads(2)
    args = [*COMMON, f"data.train_shards={data['shards']}", "data.batch_size=2", f"train.max_steps={STEPS}",
            "train.checkpoint_every=1"]
    straight, broken = str(tmp_path / "straight"), str(tmp_path / "broken")
    assert train_main([*args, f"train.run_dir={straight}"]) == 0
    command = [sys.executable, "-m", "jobs.train", *args, f"train.run_dir={broken}", "--resume", "auto"]
    rng = random.Random(0)
    points = sorted(rng.sample(range(1, STEPS), NUM_KILLS))  # kill after these checkpoints...
    kills = 0
    for point in points:
        process = subprocess.Popen(command, env=_env(threads=2), stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while not os.path.exists(f"{ckpt.step_dir(broken, point)}/{ckpt.COMPLETE}"):
            if process.poll() is not None:
                break
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.3))  # ...plus a seeded moment: mid-step or mid-checkpoint
        if process.poll() is None:
            process.kill()
            kills += 1
        process.wait()
    assert kills >= max(1, NUM_KILLS - 1)
    assert train_main([*args, f"train.run_dir={broken}", "--resume", "auto"]) == 0
    assert_same_state(ckpt.load_torch(f"{ckpt.step_dir(straight, STEPS)}/state.pt"),
                      ckpt.load_torch(f"{ckpt.step_dir(broken, STEPS)}/state.pt"))
    print(f"train kills survived: {kills}")


def test_training_through_storage_faults_equals_a_run_without(data, gcs_emulator, tmp_path):
    torch.set_num_threads(2)
    bucket = gcs_emulator.make_bucket("tfault")
    fs = gcs_emulator.fs()
    fs.put(data["shards"], f"{bucket[5:]}/shards", recursive=True)
    args = [*COMMON, f"data.train_shards={bucket}/shards", "data.batch_size=2", "train.max_steps=4",
            "train.checkpoint_every=2", "train.sync_tensorboard_seconds=0.1"]
    assert train_main([*args, f"train.run_dir={bucket}/clean", f"data.cache_dir={tmp_path}/c1"]) == 0
    rates = FaultRates(drop_before=0.03, drop_after=0.03, status_429=0.03, status_500=0.03, status_503=0.03,
                       delay=0.05, delay_seconds=0.1)
    with FaultProxy(gcs_emulator.url, rates, seed=1) as proxy:
        env = {**_env(threads=2), "STORAGE_EMULATOR_HOST": proxy.url, "SR_STORAGE_ATTEMPTS": "10",
               "SR_STORAGE_BACKOFF": "0.02"}
        done = subprocess.run([sys.executable, "-m", "jobs.train", *args, f"train.run_dir={bucket}/faulty",
                               f"data.cache_dir={tmp_path}/c2"], env=env, capture_output=True, text=True,
                              timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert proxy.faults >= 2, proxy.counts
    assert_same_state(ckpt.load_torch(f"{bucket}/clean/checkpoints/step_000000004/state.pt"),
                      ckpt.load_torch(f"{bucket}/faulty/checkpoints/step_000000004/state.pt"))
    clean, faulty = scalars(f"{bucket}/clean/tb"), scalars(f"{bucket}/faulty/tb")
    assert clean["loss/g_pixel"] == faulty["loss/g_pixel"] and len(faulty["loss/g_pixel"]) == 4
    print(f"train faults injected: {proxy.faults} of {dict(proxy.counts)}")


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_a_pickled_pretrained_file_is_refused_and_never_runs(data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    evil = tmp_path / "evil.pth"
    torch.save({"params_ema": {"conv_first.weight": _RunsCode()}}, evil)
    capsys.readouterr()
    code = sr_main(["train", *COMMON, f"data.train_shards={data['shards']}", f"train.run_dir={tmp_path}/run",
                    "train.stage=gan", f"train.pretrained={evil}", "train.max_steps=1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "evil.pth" in err and "weights_only=False" not in err, err[-2000:]
    assert len(err.splitlines()) == 1, err[-2000:]
    assert not (tmp_path / "PWNED").exists()
