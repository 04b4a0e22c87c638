"""`sr train` under faults: SIGKILLed at seeded points and resumed each time, it ends
with weights identical to an uninterrupted run; its shard reads, checkpoints and
TensorBoard writes through the fault-injecting proxy give the same state as without
faults; storage that stays down ends `python -m jobs.train` with exit code 75 and a
rerun finishes; a pickled `train.pretrained` is refused and never runs; SIGTERM to the
whole process group or during start-up gives a checkpoint and exit 0; a read-only run
directory, a run directory that is a file and a validation folder of broken images
are refused before training; a run whose loss stops being finite stops with one line,
its last good checkpoint kept."""

from __future__ import annotations

import os
import random
import shlex
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from faultproxy import FaultProxy, FaultRates
from jobs import checkpoint as ckpt
from jobs.train import main as train_main
from sr_cli.main import main as sr_main
from test_reliability_cli import _can_mount
from test_train import (  # noqa: F401  (data: the fixture)
    COMMON,
    _env,
    assert_same_state,
    data,
    scalars,
    sigterm_blocked,
)

pytestmark = pytest.mark.faults_full

FULL = os.environ.get("SR_FAULTS") == "full"
NUM_KILLS = 5 if FULL else 1
STEPS = 10 if FULL else 4


def test_training_killed_at_seeded_points_resumes_to_identical_weights(data, tmp_path):
    torch.set_num_threads(2)
    args = [*COMMON, f"data.train_shards={data['shards']}", "data.batch_size=2", f"train.max_steps={STEPS}",
            "train.checkpoint_every=1", "train.keep_checkpoints=1000"]
    straight, broken = str(tmp_path / "straight"), str(tmp_path / "broken")
    assert train_main([*args, f"train.run_dir={straight}"]) == 0
    # The killed runs are asked for many more steps (the schedule does not depend on
    # train.max_steps), so every kill lands in a running job however slow the machine.
    command = [sys.executable, "-m", "jobs.train", *args, "train.max_steps=100000", f"train.run_dir={broken}",
               "--resume", "auto"]
    rng = random.Random(0)
    points = sorted(rng.sample(range(1, STEPS), NUM_KILLS))  # kill after these checkpoints...
    kills = 0
    for point in points:
        # ...as soon as it is complete, or once the next one has started (mid-checkpoint)
        wait_for = f"{ckpt.step_dir(broken, point)}/{ckpt.COMPLETE}" if rng.random() < 0.5 else \
            ckpt.step_dir(broken, point + 1)
        process = subprocess.Popen(command, env=_env(threads=2), stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while not os.path.exists(wait_for):
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        process.kill()
        kills += 1
        process.wait()
    assert kills == NUM_KILLS
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


def test_python_m_jobs_train_exits_75_when_storage_stays_down_and_a_rerun_finishes(data, gcs_emulator, tmp_path):
    """What a training VM runs: storage down past the retries is exit code 75 (a managed
    job restarts on it) with one line naming the object; the same command again
    finishes the run."""
    bucket = gcs_emulator.make_bucket("tdown")
    command = [sys.executable, "-m", "jobs.train", *COMMON, f"data.train_shards={data['shards']}",
               "data.batch_size=2", "train.max_steps=3", "train.checkpoint_every=1", f"train.run_dir={bucket}/run",
               "--resume", "auto"]
    with FaultProxy(gcs_emulator.url, seed=0) as proxy:
        # The write check's probe and config.yaml get through, then storage goes away.
        proxy.outage_after_uploads = 2
        env = {**_env(threads=2), "STORAGE_EMULATOR_HOST": proxy.url, "SR_STORAGE_ATTEMPTS": "3",
               "SR_STORAGE_BACKOFF": "0.02"}
        failed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        assert failed.returncode == 75, failed.stderr[-3000:]
        last = failed.stderr.strip().splitlines()[-1]
        assert last.startswith("jobs.train: error: ") and f"{bucket}/run/" in last, last
        assert "still failing after 3 attempts" in last and "rerun the same command" in last, last
        assert "Traceback" not in failed.stderr
        assert proxy.counts["outage"] >= 3, proxy.counts
        proxy.lift_outage()
        rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert ckpt.complete_steps(f"{bucket}/run")[-1] == 3
    assert gcs_emulator.fs().exists(f"{bucket[5:]}/run/model.safetensors")


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def test_sigterm_to_the_whole_process_group_checkpoints_and_exits_0(data, tmp_path):
    """`timeout`, `kill -- -PGID`, systemd and a VM shutdown signal every process of the
    group, DataLoader workers included: the job still checkpoints and exits 0, and no
    worker outlives it."""
    run = tmp_path / "run"
    args = [*COMMON, f"data.train_shards={data['shards']}", "data.num_workers=2", "data.batch_size=2",
            "train.checkpoint_every=1", "train.keep_checkpoints=1000", f"train.run_dir={run}"]
    process = subprocess.Popen([sys.executable, "-m", "jobs.train", *args, "train.max_steps=100000"],
                               env=_env(threads=2), stderr=subprocess.PIPE, text=True, start_new_session=True)
    first = f"{ckpt.step_dir(str(run), 1)}/{ckpt.COMPLETE}"  # a step trained: the workers are up
    deadline = time.monotonic() + 300
    while not os.path.exists(first):
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()[-3000:]
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGTERM)
    err = process.communicate(timeout=300)[1]
    assert process.returncode == 0, err[-3000:]
    assert "SIGTERM: checkpoint" in err and "Traceback" not in err and "killed by signal" not in err, err[-3000:]
    assert not _group_alive(process.pid)
    stopped = ckpt.complete_steps(str(run))[-1]
    # the checkpoint resumes
    assert train_main([*args, f"train.max_steps={stopped + 1}", "--resume", "auto"]) == 0
    assert ckpt.complete_steps(str(run))[-1] == stopped + 1


def test_sigterm_during_start_up_is_answered_after_the_first_step(data, tmp_path):
    """A SIGTERM that arrives while `sr train` starts (before a model exists) gets what
    any SIGTERM gets: the step in progress, here the first, a checkpoint, exit 0."""
    run = tmp_path / "run"
    with sigterm_blocked():
        process = subprocess.Popen([sys.executable, "-m", "sr_cli", "train", *COMMON,
                                    f"data.train_shards={data['shards']}", "train.max_steps=50",
                                    f"train.run_dir={run}"], env=_env(threads=2), stderr=subprocess.PIPE, text=True)
    process.send_signal(signal.SIGTERM)
    err = process.communicate(timeout=300)[1]
    assert process.returncode == 0, err[-3000:]
    assert f"SIGTERM: checkpoint {ckpt.step_dir(str(run), 1)} written at step 1; exiting" in err, err[-3000:]
    assert ckpt.complete_steps(str(run)) == [1]
    assert not (run / "model.safetensors").exists()  # stopped, not finished


@pytest.mark.skipif(not _can_mount(), reason="needs user+mount namespaces (unshare -rm) to make a read-only "
                                              "filesystem")
def test_a_read_only_run_dir_is_refused_before_training(data, tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    command = " ".join(shlex.quote(a) for a in [sys.executable, "-m", "jobs.train", *COMMON,
                                                 f"data.train_shards={data['shards']}", f"train.run_dir={mnt}/run"])
    script = f"mount -t tmpfs -o size=4m tmpfs {mnt} && mount -o remount,ro {mnt} && {command}; echo EXIT=$?"
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert "EXIT=2" in proc.stdout, (proc.stdout, proc.stderr[-3000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines[0].startswith(f"jobs.train: error: train.run_dir: {mnt}/run: cannot write there (Read-only "
                               "file system"), lines[0]


def test_a_run_dir_that_is_a_file_is_named_as_such(data, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a folder")
    capsys.readouterr()
    code = sr_main(["train", *COMMON, f"data.train_shards={data['shards']}", f"train.run_dir={tmp_path}/notes.txt"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err[-2000:]
    assert f"train.run_dir: {tmp_path}/notes.txt: is a file, not a folder" in err, err
    assert (tmp_path / "notes.txt").read_text() == "not a folder"


def test_a_validation_folder_of_broken_images_is_refused_before_training(data, tmp_path, capsys):
    val = tmp_path / "val"
    val.mkdir()
    (val / "noise.png").write_bytes(os.urandom(2000))
    good = tmp_path / "good.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(good)
    (val / "cut.png").write_bytes(good.read_bytes()[:6000])  # truncated
    run = tmp_path / "run"
    capsys.readouterr()
    code = sr_main(["train", *COMMON, f"data.train_shards={data['shards']}", f"data.val_folder={val}",
                    "train.max_steps=3", f"train.run_dir={run}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err[-2000:]
    assert "data.val_folder: 2 of 2 validation images cannot be used" in err, err
    assert f"{val}/cut.png: " in err and f"{val}/noise.png: " in err, err
    assert not any(run.iterdir())  # nothing trained, nothing written


def test_a_loss_that_stops_being_finite_stops_the_run_keeping_the_last_good_checkpoint(data, tmp_path, capsys):
    # A learning rate of 1e30 moves every weight by about 1e30 in the first step: its
    # checkpoint is finite, the second step's forward overflows to inf and NaN.
    run = tmp_path / "run"
    capsys.readouterr()
    code = sr_main(["train", *COMMON, f"data.train_shards={data['shards']}", "optim.lr_g=1e30",
                    "train.max_steps=6", "train.checkpoint_every=1", f"train.run_dir={run}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "Traceback" not in err, err[-3000:]
    last = err.splitlines()[-1]
    assert last.startswith("sr train: error: step 2: the loss is not finite") and \
        f"the last good checkpoint, step 1 ({ckpt.step_dir(str(run), 1)}), is kept" in last, last
    assert ckpt.complete_steps(str(run)) == [1]
    state = ckpt.load_torch(f"{ckpt.step_dir(str(run), 1)}/state.pt")
    assert all(torch.isfinite(t).all() for t in state["g"].values())
    assert not (run / "model.safetensors").exists()
