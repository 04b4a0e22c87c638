"""`sr train` under faults: SIGKILLed at seeded points and resumed each time, it ends
with weights identical to an uninterrupted run; its shard reads, checkpoints and
TensorBoard writes through the fault-injecting proxy give the same state as without
faults; storage that stays down ends `python -m jobs.train` with exit code 75 and a
rerun finishes; a pickled `train.pretrained` is refused and never runs; SIGTERM to the
whole process group or during start-up gives a checkpoint and exit 0; a read-only run
directory, a run directory that is a file and a validation folder of broken images
are refused before training; a run whose loss stops being finite stops with one line,
its last good checkpoint kept. Issue 17: a damaged or changed shard, a full disk while
checkpointing, a checkpoint of another model or a damaged one, a busy run directory and
a pretrained file of another scale each end in one line (or a warning and a fallback)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shlex
import shutil
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import jobs.state
from events import wait_for
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
        kill_at = f"{ckpt.step_dir(broken, point)}/{ckpt.COMPLETE}" if rng.random() < 0.5 else \
            ckpt.step_dir(broken, point + 1)
        process = subprocess.Popen(command, env=_env(threads=2), stderr=subprocess.DEVNULL)
        wait_for(lambda: os.path.exists(kill_at), kill_at, proc=process, interval=0.01)
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


# ---------------------------------------------------------------- issue 17: one line, the right exit code


def _copy_shards(src: str, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def _rewrite_index_checksums(shards: str) -> None:
    """Make index.json agree with the shard files as they are now (a shard damaged before
    its checksum was taken: only decoding can tell)."""
    path = os.path.join(shards, "index.json")
    index = json.load(open(path))
    for shard in index["shards"]:
        data = open(os.path.join(shards, shard["name"]), "rb").read()
        shard["bytes"], shard["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    with open(path, "w") as f:
        json.dump(index, f)


def _after_header(err: str) -> list[str]:
    """The lines after the job's start-up header (all of them when it stopped before)."""
    lines = err.strip().splitlines()
    starts = [i for i, ln in enumerate(lines) if ln.startswith("stage ") and ("fresh start" in ln or "resumed from" in ln)]
    return lines[starts[-1] + 1:] if starts else lines


def _sr_train(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sr_cli", "train", *args], env=_env(threads=2),
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("damage", ["corrupt", "truncated"])
def test_a_damaged_member_read_by_a_dataloader_worker_is_one_line_naming_it(data, tmp_path, damage):
    """Issue 17 #1: the member's bytes are damaged but the index's checksums agree (so
    the decode in the DataLoader worker is what fails): one line naming the shard, the
    member and `sr prepare`, exit 2; no worker traceback."""
    shards = _copy_shards(data["shards"], tmp_path / "shards")
    index = json.load(open(os.path.join(shards, "index.json")))
    for shard in index["shards"]:  # every member, so the first sample read is damaged
        path = os.path.join(shards, shard["name"])
        blob = bytearray(open(path, "rb").read())
        for _name, offset, size, _h, _w in shard["members"]:
            if damage == "corrupt":
                blob[offset + 40: offset + size] = bytes(range(256)) * ((size - 40) // 256) + bytes((size - 40) % 256)
            else:  # the PNG cut short: its second half zeros
                blob[offset + size // 2: offset + size] = bytes(size - size // 2)
        open(path, "wb").write(bytes(blob))
    _rewrite_index_checksums(shards)
    done = _sr_train(*COMMON, "data.num_workers=1", f"data.train_shards={shards}", "data.batch_size=2",
                     "train.max_steps=1", f"train.run_dir={tmp_path}/run")
    err = done.stderr.strip()
    assert done.returncode == 2, err[-3000:]
    assert len(_after_header(err)) == 1 and "Traceback" not in err and "DataLoader worker" not in err, err[-3000:]
    err = _after_header(err)[0]
    assert f"{shards}/shards/" in err and ": member " in err and "sr prepare" in err, err


def test_a_changed_local_shard_is_refused_naming_it(data, tmp_path):
    """Issue 17 #11: a local shard whose bytes changed after `sr prepare` (here: in tar
    padding, so every member still decodes) is refused on first open, one line naming
    it, exit 2 (it used to train silently)."""
    shards = _copy_shards(data["shards"], tmp_path / "shards")
    for name in sorted(os.listdir(f"{shards}/shards")):
        path = f"{shards}/shards/{name}"
        blob = bytearray(open(path, "rb").read())
        blob[-1] ^= 0xFF  # the tar's final zero padding
        open(path, "wb").write(bytes(blob))
    done = _sr_train(*COMMON, f"data.train_shards={shards}", "data.batch_size=2", "train.max_steps=1",
                     f"train.run_dir={tmp_path}/run")
    err = done.stderr.strip()
    assert done.returncode == 2 and len(_after_header(err)) == 1, err[-3000:]
    err = _after_header(err)[0]
    assert f"{shards}/shards/" in err and "index.json" in err and "sr prepare" in err, err


@pytest.mark.skipif(not _can_mount(), reason="needs user+mount namespaces (unshare -rm) to make a small full filesystem")
@pytest.mark.parametrize("processes", [1, 2])
def test_a_full_disk_while_checkpointing_is_one_line_and_the_run_resumes(data, tmp_path, processes):
    """Issue 17 #3, on a really full filesystem: RUN is a 1.5 MiB tmpfs (enough for the
    start-up check, which wants 1 MiB free) that holds the step-1 checkpoint (~1 MiB: the
    generator has 16 features) but not the step-2 one beside it. One line saying what
    was kept and how to resume, exit 2; no step-2 folder is left (nothing mistaken for
    a checkpoint); after the filesystem is enlarged, --resume auto continues from step 1.
    With 2 processes, both ranks stop at that checkpoint with the same line (none hangs
    waiting for the other) and the partial folder is gone before they exit."""
    run = tmp_path / "run"
    run.mkdir()
    args = [*COMMON, f"data.train_shards={data['shards']}", "data.batch_size=2", "train.max_steps=3",
            "model.generator_options={num_feat: 16, num_block: 1, num_grow_ch: 8}",
            "train.checkpoint_every=1", f"train.run_dir={run}", "--resume", "auto", "--processes", str(processes)]
    train = " ".join(shlex.quote(a) for a in [sys.executable, "-m", "sr_cli", "train", *args])
    script = (f"mount -t tmpfs -o size=1536k tmpfs {run} && "
              f"{{ {train} 2>{tmp_path}/err1; echo EXIT1=$?; }} && "
              f"cp -a {run} {tmp_path}/after_full && "
              f"mount -o remount,size=8m {run} && "
              f"{{ {train} 2>{tmp_path}/err2; echo EXIT2=$?; }} && "
              f"cp -a {run} {tmp_path}/after_resume")
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], env=_env(threads=2 // processes),
                          capture_output=True, text=True, timeout=600)
    err1 = (tmp_path / "err1").read_text().strip()
    if processes == 1:
        assert "EXIT1=2" in proc.stdout, (proc.stdout, proc.stderr, err1[-3000:])
        assert len(_after_header(err1)) == 1 and "Traceback" not in err1, err1[-3000:]
        lines = _after_header(err1)
    else:  # Accelerate's launcher adds its own report of the ranks' exit codes
        assert "EXIT1=0" not in proc.stdout, (proc.stdout, proc.stderr, err1[-3000:])
        lines = [ln for ln in err1.splitlines() if ln.startswith("jobs.train: error:")]
        assert len(lines) == 2 and lines[0] == lines[1], err1[-3000:]
    line = lines[0]
    assert "No space left on device" in line and "step_000000002" in line, line
    assert "step 1" in line and "--resume auto" in line, line
    full = tmp_path / "after_full" / "checkpoints"
    assert sorted(os.listdir(full)) == ["step_000000001"]
    assert ckpt.complete_steps(str(tmp_path / "after_full")) == [1]
    err2 = (tmp_path / "err2").read_text()
    assert "EXIT2=0" in proc.stdout, (proc.stdout, err2[-3000:])
    assert "resumed from" in err2 and "step_000000001 at step 1" in err2, err2[-3000:]
    assert ckpt.complete_steps(str(tmp_path / "after_resume")) == [1, 2, 3]
    assert not os.path.exists(tmp_path / "after_resume" / ".sr-lease.json")


def _run_two_steps(data, run) -> list[str]:
    args = [*COMMON, f"data.train_shards={data['shards']}", "data.batch_size=2", "train.checkpoint_every=1"]
    assert train_main([*args, f"train.run_dir={run}", "train.max_steps=2"]) == 0
    assert ckpt.complete_steps(str(run)) == [1, 2]
    return args


@pytest.mark.parametrize("change, theirs, ours", [
    (["model.generator_variant=small"], "rrdbnet (tiny) x2", "rrdbnet (small) x2"),
    (["data.scale=4"], "rrdbnet (tiny) x2", "rrdbnet (tiny) x4"),
    (["model.generator=srresnet", "model.generator_variant=tiny"], "rrdbnet (tiny) x2", "srresnet (tiny) x2"),
])
def test_resume_onto_a_checkpoint_of_another_architecture_is_refused_before_any_model_is_built(
        data, tmp_path, monkeypatch, capsys, change, theirs, ours):
    """Issue 17 #4: one line naming the checkpoint's configuration and the requested one,
    exit 2, and no model is built first (building one would fail this test)."""
    run = tmp_path / "run"
    args = _run_two_steps(data, run)

    def no_model(*a, **k):
        raise AssertionError("a model was built before the checkpoint was checked")

    # jobs.state builds the networks (with the names it imported from sr_core)
    monkeypatch.setattr(jobs.state, "build_generator", no_model)
    monkeypatch.setattr(jobs.state, "build_discriminator", no_model)
    capsys.readouterr()
    code = sr_main(["train", *args, f"train.run_dir={run}", "train.max_steps=3", *change, "--resume", "auto"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err[-3000:]
    assert "step_000000002" in err and theirs in err and ours in err, err


def _damage(path: str, how: str) -> None:
    blob = open(path, "rb").read()
    if how == "truncate":
        blob = blob[: len(blob) // 2]
    else:  # flip bytes in the middle (inside the zip's payload)
        middle = len(blob) // 2
        blob = blob[:middle] + bytes(b ^ 0xFF for b in blob[middle:middle + 8]) + blob[middle + 8:]
    open(path, "wb").write(blob)


@pytest.mark.parametrize("file, how", [("state.pt", "truncate"), ("rank_0.pt", "flip")])
def test_a_damaged_complete_checkpoint_falls_back_to_the_previous_one(data, tmp_path, capsys, file, how):
    """Issue 17 #5: COMPLETE records each file's size and checksum; --resume auto verifies
    them, warns and resumes from the previous complete checkpoint; with none left it stops
    on one line; `sr train export` does the same. torch's advice to retry with
    weights_only=False is never shown."""
    run = tmp_path / "run"
    args = _run_two_steps(data, run)
    _damage(f"{ckpt.step_dir(str(run), 2)}/{file}", how)
    capsys.readouterr()
    assert sr_main(["train", *args, f"train.run_dir={run}", "train.max_steps=3", "--resume", "auto"]) == 0
    err = capsys.readouterr().err
    warning = [ln for ln in err.splitlines() if "step_000000002" in ln and file in ln]
    assert len(warning) == 1 and "step 1" in warning[0], err[-3000:]
    assert f"resumed from {ckpt.step_dir(str(run), 1)} at step 1" in err, err[-3000:]
    assert ckpt.complete_steps(str(run)) == [1, 2, 3]  # step 2 written anew
    assert "weights_only" not in err

    # export: the newest is damaged -> a warning and the one before; a named damaged one -> one line
    _damage(f"{ckpt.step_dir(str(run), 3)}/{file}", how)
    assert sr_main(["train", "export", str(run)]) == 0
    out, err = capsys.readouterr()
    assert f"{run}/model.safetensors" in out
    assert "step_000000003" in err and file in err and "step 2" in err, err
    from sr_core.modelfile import read_metadata

    assert read_metadata(f"{run}/model.safetensors")["provenance"]["step"] == 2
    assert sr_main(["train", "export", str(run), "--step", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "step_000000003" in err and file in err, err

    # nothing intact left: one line, exit 2, nothing trained
    assert ckpt.complete_steps(str(run)) == [1, 2, 3]  # export marks nothing
    for step in (1, 2):  # step 3 is damaged already (a second flip would repair it)
        _damage(f"{ckpt.step_dir(str(run), step)}/{file}", how)
    assert sr_main(["train", *args, f"train.run_dir={run}", "train.max_steps=4", "--resume", "auto"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(_after_header(err)) == 1 and "no intact checkpoint" in err, err[-3000:]
    assert "weights_only" not in err and "Traceback" not in err
    assert not os.path.exists(ckpt.step_dir(str(run), 4))


def test_a_second_train_on_a_busy_run_dir_is_refused_naming_the_holder(data, tmp_path, capsys):
    """Issue 17 #12: while one `sr train --resume auto` runs, a second one on the same
    run directory exits 2 with one line naming the holder (host and pid); the first
    finishes unharmed (SIGTERM: checkpoint, exit 0) and releases the lease."""
    run = tmp_path / "run"
    args = [*COMMON, f"data.train_shards={data['shards']}", "data.batch_size=2", "train.max_steps=100000",
            "train.checkpoint_every=1", "train.keep_checkpoints=1", f"train.run_dir={run}", "--resume", "auto"]
    first = subprocess.Popen([sys.executable, "-m", "sr_cli", "train", *args], env=_env(threads=1),
                             stderr=subprocess.DEVNULL)
    try:
        # The first checkpoint exists: the loop runs (its SIGTERM handler is installed)
        # and the lease is held.
        first_checkpoint = f"{ckpt.step_dir(str(run), 1)}/{ckpt.COMPLETE}"
        wait_for(lambda: os.path.exists(first_checkpoint), "the first checkpoint", proc=first, interval=0.01)
        capsys.readouterr()
        assert sr_main(["train", *args, "train.max_steps=1"]) == 2  # bounded, should it train
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err[-3000:]
        assert str(run) in err and f"pid {first.pid}" in err and socket.gethostname() in err, err
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 0  # checkpointed and exited as usual
    assert not [n for n in os.listdir(run) if "lease" in n]  # released
    assert ckpt.complete_steps(str(run))


def test_a_pretrained_file_of_another_scale_names_both(data, tmp_path, capsys):
    """Issue 17, minor: the message names the file's architecture and scale and the run's,
    instead of stopping at "Error(s) in loading state_dict"."""
    from sr_core import build_generator, save_generator

    x4 = str(tmp_path / "x4.safetensors")
    save_generator(build_generator("rrdbnet", "small", scale=4), x4)
    capsys.readouterr()
    code = sr_main(["train", *COMMON, f"data.train_shards={data['shards']}", f"train.run_dir={tmp_path}/run",
                    f"train.pretrained={x4}", "train.max_steps=1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err[-3000:]
    assert "x4.safetensors" in err and "rrdbnet x4" in err and "rrdbnet (tiny) x2" in err, err
    assert "num_feat" in err and "Error(s)" not in err, err  # and what differs


# ---------------------------------------------------------------- exit codes, SIGTERM, refusals before training


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
    wait_for(lambda: os.path.exists(first), "the first checkpoint", proc=process, interval=0.01)
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
