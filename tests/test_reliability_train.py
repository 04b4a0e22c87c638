"""Issue 27 (items 1, 5, 7, 8, 10, 13), the training side: a damaged COMPLETE marker is
passed over like a damaged file; a run without validation logs no best PSNR; a run
directory holding an earlier run is not silently replaced; config values that are
finite but useless are refused naming the field; one run directory never has two
writers, whatever signal reaches `sr train --processes 2`."""

from __future__ import annotations

import contextlib
import os

import pytest

from jobs import checkpoint as ckpt
from jobs.train import main as train_main
from sr_cli.main import main as sr_main
from test_train import COMMON, data, scalars  # noqa: F401  (data: the fixture)

pytestmark = pytest.mark.faults_full


def _two_steps(data, run) -> list[str]:
    args = [*COMMON, f"data.train_shards={data['shards']}", "data.batch_size=2", "train.checkpoint_every=1"]
    assert train_main([*args, f"train.run_dir={run}", "train.max_steps=2"]) == 0
    assert ckpt.complete_steps(str(run)) == [1, 2]
    return args


def _damage(folder: str, marker: bytes, remove: str | None) -> None:
    with open(f"{folder}/{ckpt.COMPLETE}", "wb") as f:
        f.write(marker)
    if remove:
        os.remove(f"{folder}/{remove}")
    else:
        blob = open(f"{folder}/state.pt", "rb").read()
        open(f"{folder}/state.pt", "wb").write(blob[: len(blob) // 2])


@pytest.mark.parametrize("marker, remove", [
    (b"\x00garbage\xff", None),  # not JSON, and state.pt truncated below it
    (b"{}", "rank_0.pt"),  # an empty marker and rank 0's RNG and loader state gone
    (b'{"step": 2}', "rank_0.pt"),  # the old marker form, without rank 0's file
])
def test_a_damaged_complete_marker_falls_back_to_the_previous_step(data, tmp_path, capsys, marker, remove):
    run = tmp_path / "run"
    args = _two_steps(data, run)
    folder = ckpt.step_dir(str(run), 2)
    _damage(folder, marker, remove)
    capsys.readouterr()
    assert sr_main(["train", *args, f"train.run_dir={run}", "train.max_steps=3", "--resume", "auto"]) == 0
    err = capsys.readouterr().err
    assert f"resumed from {ckpt.step_dir(str(run), 1)} at step 1" in err, err[-3000:]
    assert "world size changed" not in err and "not a readable checkpoint" not in err, err[-3000:]
    warning = [ln for ln in err.splitlines() if "step_000000002" in ln and "damaged" in ln]
    assert len(warning) == 1 and "step 1" in warning[0], err[-3000:]
    assert ckpt.complete_steps(str(run)) == [1, 2, 3]  # step 2 written anew
    # Named explicitly, the damaged checkpoint is refused on one line (exit 2).
    _damage(folder, marker, remove)
    capsys.readouterr()
    assert sr_main(["train", *args, f"train.run_dir={run}", "train.max_steps=3", "--resume", folder]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "damaged" in err and (ckpt.COMPLETE in err or "rank_0.pt" in err), err


def test_a_run_without_validation_logs_no_best_psnr(data, tmp_path):
    run = tmp_path / "run"
    _two_steps(data, run)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = []
    for folder, _dirs, files in os.walk(run / "tb"):
        if any(name.startswith("events.") for name in files):
            acc = EventAccumulator(folder, size_guidance={"scalars": 0})
            acc.Reload()
            tags += acc.Tags()["scalars"]
    assert "loss/g_total" in tags  # the files were read
    assert "hparam/best_val_psnr" not in tags


# Finite but useless values, one per field that has a range (issue 27 #5 and the same
# class of defect in every other field): each is one line naming the field, exit 2.
USELESS_VALUES = [
    "optim.lr_g=1e300", "optim.lr_d=1e31", "optim.gamma=1e300", "optim.weight_decay_g=1e300",
    "optim.weight_decay_d=1.5", "optim.warmup_steps=10000000000", "optim.milestones=[10, 10000000000]",
    "data.prefetch_factor=0", "data.prefetch_factor=1000", "data.val_center_crop=-2", "data.val_center_crop=3",
    "data.scale=1000000", "data.gt_size=1000000", "data.batch_size=100000", "data.num_workers=100000",
    "data.samples_per_transfer=0", "data.shuffle_window_shards=0", "data.cache_max_gb=0",
    "loss.pixel_weight=1e300", "loss.gan_weight=1e300", "loss.perceptual_weight=1e300",
    "train.max_steps=1000000000", "train.grad_accum_steps=100000", "train.num_val_images_logged=100000",
    "train.sync_tensorboard_seconds=0",
]


@pytest.mark.parametrize("override", USELESS_VALUES)
def test_finite_but_useless_values_are_one_line_naming_the_field(tmp_path, capsys, override):
    field = override.split("=")[0]
    code = sr_main(["train", "--preset", "tiny", override, f"train.run_dir={tmp_path}/run",
                    f"data.train_shards={tmp_path}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and field in err, err
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("overrides, field", [
    (["optim.schedule=cosine_restart", "optim.periods=[10]", "optim.eta_min=1e300"], "optim.eta_min"),
    (["optim.schedule=cosine_restart", "optim.periods=[10]", "optim.eta_min=0.1"], "optim.eta_min"),
    (["optim.eta_min=1e300"], "optim.eta_min"),
    (["optim.schedule=cosine_restart", "optim.periods=[0]"], "optim.periods"),
])
def test_schedule_values_beyond_the_learning_rate_are_refused(overrides, field):
    from jobs.config import load_config

    with pytest.raises(ValueError, match=field):
        load_config(None, overrides, preset="tiny")


@pytest.mark.parametrize("overrides, named", [
    (["model.generator_options={num_feat: 0}"], "num_feat"),
    (["model.generator_options={num_feat: -3}"], "num_feat"),
    (["model.generator_options={num_block: 100000000}"], "num_block"),
    (["model.generator=srvgg_compact", "model.generator_options={num_conv: 100000000}"], "num_conv"),
    (["train.stage=gan", "train.pretrained=START", "model.discriminator_options={num_feat: -1}"], "num_feat"),
])
def test_architecture_values_no_model_can_have_are_one_line_before_any_process(tmp_path, capsys, overrides, named):
    """Issue 27 #4: refused by the config (the architecture's own ranges), exit 2."""
    start = tmp_path / "start.safetensors"
    start.write_bytes(b"")
    overrides = [o.replace("START", str(start)) for o in overrides]
    code = sr_main(["train", "--processes", "2", "--preset", "tiny", *overrides, f"train.run_dir={tmp_path}/run",
                    f"data.train_shards={tmp_path}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and named in err and "options" in err, err


def _processes_naming(text: str) -> list[int]:
    """Processes whose command line holds ``text`` (a run directory), this test's own
    children and grandchildren included."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
                with open(f"/proc/{entry}/stat") as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if text in cmdline and state != "Z":
                found.append(int(entry))
    return found


def _holder_pid(run: str) -> int | None:
    from sr_core.lease import Lease

    holder = Lease.holder(run)
    return holder.get("pid") if holder else None


@pytest.mark.parametrize("how", ["SIGINT", "SIGKILL"])
def test_one_run_directory_never_has_two_writers_whatever_reaches_the_launcher(data, tmp_path, how):
    """Issue 27 #1 and #8: `sr train --processes 2` hands its lease to rank 0, so a
    second job is refused for as long as any rank writes. SIGINT: the ranks checkpoint,
    the launcher prints one line and exits 130 after them (no torch-elastic report);
    SIGKILL to the launcher alone: the ranks, still running, still hold the lease."""
    import signal
    import subprocess
    import sys

    from events import HANG_TIMEOUT, wait_for
    from test_train import _env

    run = str(tmp_path / "run")
    args = ["train", *COMMON, f"data.train_shards={data['shards']}", "data.batch_size=2",
            "train.checkpoint_every=1", "train.max_steps=100000", f"train.run_dir={run}"]
    err_path = tmp_path / "err"
    with open(err_path, "w") as err_file:
        launcher = subprocess.Popen([sys.executable, "-m", "sr_cli", *args, "--processes", "2"], env=_env(),
                                    stderr=err_file)
    try:
        first = f"{ckpt.step_dir(run, 1)}/{ckpt.COMPLETE}"
        wait_for(lambda: os.path.exists(first), "the first checkpoint", proc=launcher)
        rank0 = _holder_pid(run)
        assert rank0 not in (None, launcher.pid) and rank0 in _processes_naming(run)  # handed to rank 0
        second = subprocess.run([sys.executable, "-m", "sr_cli", *args, "--resume", "auto"], env=_env(),
                                capture_output=True, text=True, timeout=HANG_TIMEOUT)
        assert second.returncode == 2 and f"pid {rank0}" in second.stderr, second.stderr[-2000:]

        launcher.send_signal(getattr(signal, how))
        code = launcher.wait(HANG_TIMEOUT)
        if how == "SIGKILL":
            assert _processes_naming(run), "the ranks were expected to live on"
            assert _holder_pid(run) == rank0  # still held, by the writer
            third = subprocess.run([sys.executable, "-m", "sr_cli", *args, "--resume", "auto"], env=_env(),
                                   capture_output=True, text=True, timeout=HANG_TIMEOUT)
            assert third.returncode == 2 and f"pid {rank0}" in third.stderr, third.stderr[-2000:]
            return
        err = err_path.read_text()
        assert code == 130, err[-3000:]
        assert err.strip().splitlines()[-1].startswith("sr train: interrupted by SIGINT: the ranks wrote a checkpoint")
        for noise in ("Traceback", "exitcode", "torch.distributed", "KeyboardInterrupt"):
            assert noise not in err, err[-3000:]
        assert not _processes_naming(run)  # the ranks ended before the launcher did
        assert _holder_pid(run) is None
    finally:
        for pid in _processes_naming(run):  # what this test started, by pid
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        wait_for(lambda: not _processes_naming(run), "the ranks to stop")
    # Nothing lost: the run continues from its last checkpoint.
    steps = ckpt.complete_steps(run)
    assert steps and sr_main([*args, "train.max_steps=" + str(steps[-1] + 1), "--resume", "auto"]) == 0


def test_a_fresh_start_on_a_run_directory_holding_an_earlier_run_is_refused(data, tmp_path, capsys):
    """Issue 27 #1: without --resume, nothing of the earlier run is replaced."""
    run = tmp_path / "run"
    args = _two_steps(data, run)
    before = {name: (run / name).read_bytes() for name in ("model.safetensors", "checkpoints/best.json")
              if (run / name).exists()}
    before["step1"] = (run / "checkpoints" / "step_000000001" / "state.pt").read_bytes()
    capsys.readouterr()
    for extra in ([], ["--processes", "2"]):
        assert sr_main(["train", *args, f"train.run_dir={run}", "train.max_steps=3", *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "earlier run" in err and "--resume auto" in err, err
    after = {name: (run / name).read_bytes() for name in before if name != "step1"}
    after["step1"] = (run / "checkpoints" / "step_000000001" / "state.pt").read_bytes()
    assert after == before and ckpt.complete_steps(str(run)) == [1, 2]
    assert sr_main(["train", *args, f"train.run_dir={run}", "train.max_steps=3", "--resume", "auto"]) == 0


def test_sigterm_to_prepare_with_workers_is_one_line_and_a_rerun_finishes(tmp_path):
    """Issue 27 #8: SIGTERM to `sr prepare -j 2` while its pool works: one line, exit 130
    (was: BrokenPipeError tracebacks from the workers, death by the signal, leaked
    semaphore warnings); the rerun finishes the missing shards."""
    import shutil
    import signal
    import subprocess
    import sys

    from events import HANG_TIMEOUT, wait_for
    from test_train import IMAGES, _env

    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    for i in range(12):  # enough units that the pool is still busy after the first
        for name in ("astronaut", "camera", "chelsea", "coffee"):
            shutil.copy(IMAGES / f"{name}.png", src / f"{name}_{i}.png")
    cmd = [sys.executable, "-m", "sr_cli", "prepare", str(src), str(dst), "-j", "2", "-q", "--size", "16", "--step",
           "8", "--png-level", "9", "--images-per-shard", "1"]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: (dst / "units" / "00000.json").exists(), "the first finished unit", proc=proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=HANG_TIMEOUT)
    assert proc.returncode == 130, err[-3000:]
    assert err.strip().splitlines() == ["sr prepare: interrupted by SIGTERM"], err[-3000:]
    assert not (dst / "index.json").exists()
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=HANG_TIMEOUT)
    assert done.returncode == 0 and "resuming: " in done.stdout, done.stderr[-3000:]  # the finished units kept
    assert (dst / "index.json").exists() and "48 images" in done.stdout, done.stdout


# Sends a real SIGINT to the process at the moment it imports MODULE (during the
# import machinery), then runs `sr` as `python -m sr_cli` would.
_SIGINT_AT_IMPORT = """
import builtins, os, runpy, signal, sys
target, original, sent = sys.argv.pop(1), builtins.__import__, []
def hooked(name, *args, **kwargs):
    if name == target and not sent:
        sent.append(name)
        os.kill(os.getpid(), signal.SIGINT)
    return original(name, *args, **kwargs)
builtins.__import__ = hooked
sys.argv[0] = "sr"
runpy.run_module("sr_cli", run_name="__main__")
"""


@pytest.mark.parametrize("module, command", [
    ("jobs.arguments", ["prepare", "SRC", "DST"]),  # the command modules' imports, while sr_cli.main imports
    ("infra.outfolder", ["upscale", "SRC", "-o", "DST", "--model", "M"]),
    ("jobs.prepare", ["prepare", "SRC", "DST"]),  # the command's own imports
    ("torch", ["upscale", "SRC", "-o", "DST", "--model", "M"]),
])
def test_sigint_while_starting_is_one_line_and_exit_130(tmp_path, module, command):
    """Issue 27 #8: Ctrl-C in the first moments of `sr prepare` / `sr upscale` (was: a
    KeyboardInterrupt traceback from the import machinery)."""
    import subprocess
    import sys

    from events import HANG_TIMEOUT
    from test_train import IMAGES, _env

    args = [{"SRC": str(IMAGES), "DST": str(tmp_path / "out"), "M": str(tmp_path / "m.safetensors")}.get(a, a)
            for a in command]
    done = subprocess.run([sys.executable, "-c", _SIGINT_AT_IMPORT, module, *args], env=_env(),
                          capture_output=True, text=True, timeout=HANG_TIMEOUT)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 130 and len(lines) == 1 and "interrupted" in lines[0], done.stderr[-3000:]
    assert not (tmp_path / "out").exists()
