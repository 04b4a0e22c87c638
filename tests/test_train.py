"""The training job end to end on CPU with the tiny preset: real processes (gloo),
Accelerate's launcher, DeepSpeed ZeRO-2, the GCS emulator, TensorBoard files read back
with EventAccumulator, SIGKILL/SIGTERM and exact (bitwise) resume."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from events import wait_for
from jobs import checkpoint as ckpt
from jobs.prepare import PrepareSettings, prepare
from jobs.train import main as train_main
from sr_core import storage
from ports import free_port

ROOT = Path(__file__).resolve().parent.parent
IMAGES = ROOT / "assets" / "images"
# What every run here shares: the tiny preset, data read in the training process, a
# loss value logged every step.
COMMON = ["--preset", "tiny", "data.num_workers=0", "train.progress=false", "train.log_every=1"]
# The GAN stage's perceptual loss on an early VGG layer: the same code path as conv5_4
# at a fraction of the cost.
CHEAP_VGG = ["loss.perceptual_weight=1", "loss.perceptual_layers={conv2_2: 1.0}"]


def _env(threads: int | None = 1) -> dict:
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)  # two ranks on two cores
    return env


def sr(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "sr_cli", *args], env=_env(), capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """Shards of the sample photographs (86 sub-images of 96 px, one shard per photo), a
    validation folder of centre crops, a 'uniform' shard set whose every sample is the
    same 64 px image (so any split of a global batch over ranks holds the same crops),
    and a random tiny generator to start GAN runs from."""
    root = tmp_path_factory.mktemp("train-data")
    prepare(str(IMAGES), str(root / "shards"), PrepareSettings(size=96, step=96, images_per_shard=1), progress=False)
    (root / "val").mkdir()
    (root / "same").mkdir()
    for name in ("camera", "coffee"):
        image = Image.open(IMAGES / f"{name}.png").convert("RGB")
        w, h = image.size
        image.crop((w // 2 - 32, h // 2 - 32, w // 2 + 32, h // 2 + 32)).save(root / "val" / f"{name}.png")
    crop = Image.open(IMAGES / "chelsea.png").convert("RGB").crop((100, 100, 164, 164))
    for i in range(4):
        crop.save(root / "same" / f"{i}.png")
    prepare(str(root / "same"), str(root / "uniform"), PrepareSettings(size=64, step=64, images_per_shard=1),
            progress=False)
    from sr_core import build_generator, save_generator

    torch.manual_seed(5)
    save_generator(build_generator("rrdbnet", "tiny", scale=2), str(root / "start.safetensors"))
    return {"shards": str(root / "shards"), "val": str(root / "val"), "uniform": str(root / "uniform"),
            "start": str(root / "start.safetensors")}


def digests(run_dir: str, step: int, world_size: int) -> list[str]:
    folder = ckpt.step_dir(run_dir, step)
    return [ckpt.load_torch(f"{folder}/rank_{r}.pt")["digest"] for r in range(world_size)]


def scalars(tb_dir: str) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(tb_dir, size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    out = {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    out["__images__"] = acc.Tags()["images"]
    return out


def assert_same_state(a: dict, b: dict) -> None:
    """Bitwise equality of two checkpoints' training state."""
    assert a["step"] == b["step"]
    for key in ("g", "ema", "d"):
        if a.get(key) is not None:
            assert a[key].keys() == b[key].keys()
            for name in a[key]:
                assert torch.equal(a[key][name], b[key][name]), (key, name)
    for key in ("opt_g", "opt_d"):
        if key in a:
            for index, state in a[key]["state"].items():
                for name, value in state.items():
                    other = b[key]["state"][index][name]
                    assert torch.equal(torch.as_tensor(value), torch.as_tensor(other)), (key, name)


# ---------------------------------------------------------------- DDP on 2 processes


def test_two_processes_both_stages_identical_ranks_and_the_loss_of_one_process(data, tmp_path):
    # GAN stage on the photographs: each rank reads other shards, so the ranks can only
    # end identical if gradients (of G and of D) are really averaged.
    run = str(tmp_path / "gan")
    out = sr("train", "--processes", "2", *COMMON, f"data.train_shards={data['shards']}", "data.batch_size=2",
             f"data.val_folder={data['val']}", f"train.run_dir={run}", "train.stage=gan",
             f"train.pretrained={data['start']}", *CHEAP_VGG, "train.max_steps=4",
             "train.checkpoint_every=2", "train.val_every=4")
    assert "world size 2, backend ddp, precision fp32" in out.stderr
    for step in (2, 4):
        first, second = digests(run, step, 2)
        assert first == second
    from sr_core.upscaler import Upscaler

    up = Upscaler.from_file(f"{run}/model_ema.safetensors", device="cpu")
    assert up(np.zeros((8, 8, 3), np.uint8)).shape == (16, 16, 3)

    # PSNR stage where every crop is the same image: 2 ranks x batch 2 see exactly the
    # global batch of 1 process x batch 4, so the losses must agree step by step.
    same = [f"data.train_shards={data['uniform']}", "data.hflip_prob=0", "data.vflip_prob=0",
            "data.transpose_prob=0", "train.max_steps=5", "train.checkpoint_every=5"]
    two, one = str(tmp_path / "two"), str(tmp_path / "one")
    sr("train", "--processes", "2", *COMMON, *same, "data.batch_size=2", f"train.run_dir={two}")
    assert train_main([*COMMON, *same, "data.batch_size=4", f"train.run_dir={one}"]) == 0
    assert len(set(digests(two, 5, 2))) == 1
    loss_two, loss_one = scalars(f"{two}/tb")["loss/g_total"], scalars(f"{one}/tb")["loss/g_total"]
    assert len(loss_one) == 5 and loss_one[-1] < loss_one[0]
    np.testing.assert_allclose(loss_two, loss_one, rtol=1e-4)
    g_two = ckpt.load_torch(f"{ckpt.step_dir(two, 5)}/state.pt")["g"]
    g_one = ckpt.load_torch(f"{ckpt.step_dir(one, 5)}/state.pt")["g"]
    for name in g_one:
        torch.testing.assert_close(g_two[name], g_one[name], rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- DeepSpeed


def test_deepspeed_zero2_two_processes_both_stages(data, tmp_path):
    psnr, gan = str(tmp_path / "psnr"), str(tmp_path / "gan")
    ds = ["--processes", "2", *COMMON, f"data.train_shards={data['shards']}", "data.batch_size=2",
          "train.backend=deepspeed", "train.zero_stage=2", "train.max_steps=3", "train.checkpoint_every=3"]
    out = sr("train", *ds, f"train.run_dir={psnr}")
    assert "backend deepspeed ZeRO-2, precision fp32" in out.stderr
    assert len(set(digests(psnr, 3, 2))) == 1
    sr("train", *ds, f"train.run_dir={gan}", "train.stage=gan", f"train.pretrained={psnr}/model.safetensors",
       *CHEAP_VGG)
    assert len(set(digests(gan, 3, 2))) == 1
    losses = scalars(f"{gan}/tb")
    assert len(losses["loss/d"]) == 3 and all(np.isfinite(losses["loss/g_gan"]))
    # COMPLETE records the size and SHA-256 of every file, DeepSpeed's own (every rank's) included
    for run in (psnr, gan):
        folder = ckpt.step_dir(run, 3)
        marker = ckpt.read_marker(folder)
        written = {storage.relative_key(folder, url) for url in storage.list_files(folder)} - {ckpt.COMPLETE}
        assert set(marker["files"]) == written, sorted(written ^ set(marker["files"]))
        assert {rel.split("/")[1] for rel in written if rel.startswith("ds/")} == {"rank_0", "rank_1"}
        assert ckpt.verify(folder, marker) is None
    # the GAN stage really started from the PSNR stage's generator
    start = ckpt.load_torch(f"{ckpt.step_dir(psnr, 3)}/state.pt")["g"]
    assert len(start) and (tmp_path / "gan" / "model.safetensors").exists()


# ---------------------------------------------------------------- exact resume


def test_psnr_stage_in_the_gcs_emulator_resumes_exactly_and_logs_to_tensorboard(data, gcs_emulator, tmp_path):
    """Data, checkpoints and TensorBoard in gs://. 3 steps, then train.max_steps raised to
    6 and --resume auto, equals 6 straight steps bitwise."""
    bucket = gcs_emulator.make_bucket("train")
    fs = gcs_emulator.fs()
    fs.put(data["shards"], f"{bucket[5:]}/shards", recursive=True)
    fs.put(data["val"], f"{bucket[5:]}/val", recursive=True)
    args = [*COMMON, f"data.train_shards={bucket}/shards", f"data.cache_dir={tmp_path}/cache",
            "train.checkpoint_every=1", "train.keep_checkpoints=2", "train.sync_tensorboard_seconds=0.1"]
    val = [f"data.val_folder={bucket}/val", "train.val_every=2"]
    assert train_main([*args, f"train.run_dir={bucket}/straight", "train.max_steps=4"]) == 0
    assert train_main([*args, *val, f"train.run_dir={bucket}/split", "train.max_steps=2"]) == 0
    assert train_main([*args, *val, f"train.run_dir={bucket}/split", "train.max_steps=4", "--resume", "auto"]) == 0
    straight = ckpt.load_torch(f"{bucket}/straight/checkpoints/step_000000004/state.pt")
    split = ckpt.load_torch(f"{bucket}/split/checkpoints/step_000000004/state.pt")
    assert_same_state(straight, split)
    assert ckpt.load_torch(f"{bucket}/split/checkpoints/step_000000004/rank_0.pt")["loader"] == \
        ckpt.load_torch(f"{bucket}/straight/checkpoints/step_000000004/rank_0.pt")["loader"]
    # keep_checkpoints=2 (the straight run validates nothing, so it has no best to keep)
    assert ckpt.complete_steps(f"{bucket}/straight") == [3, 4]
    tb = scalars(f"{bucket}/split/tb")
    for tag in ("loss/g_pixel", "lr/g", "grad_norm/g", "perf/samples_per_s", "perf/output_mpx_per_s",
                "perf/data_wait_fraction", "perf/step_time_s", "perf/memory_mb", "loss_scale/g"):
        assert len(tb[tag]) == 4, tag  # steps 1-2 from the first run, 3-4 from the resumed one
    assert len(tb["val/psnr"]) == 2 and len(tb["val/psnr_bicubic"]) == 2 and tb["val/psnr_bicubic"][0] > 25
    assert "val_images/0" in tb["__images__"] and "val_images/1" in tb["__images__"]
    # export from a checkpoint on demand
    out = sr("train", "export", f"{bucket}/split", "--step", "3")
    assert f"{bucket}/split/model.safetensors" in out.stdout
    from sr_core.modelfile import read_metadata

    assert read_metadata(f"{bucket}/split/model_ema.safetensors")["provenance"]["step"] == 3


@contextlib.contextmanager
def sigterm_blocked():
    """Processes started inside start with SIGTERM blocked (a child inherits its parent's
    signal mask), so a SIGTERM sent right after Popen waits until the job installs its
    handler, which unblocks it, instead of racing the job's start-up: the job answers it
    at the end of its first step."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM])
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


# Real-ESRGAN's second-order degradation in the step, with a pool of 4 pairs (full after
# the first step's two micro-batches, so every later batch comes out of the pool).
DEGRADED = ["degradation.enabled=true", "degradation.pool_size=4"]


@pytest.mark.parametrize("lr_made_by", ["bicubic", "degradation"])
def test_gan_stage_resumes_exactly_after_sigkill_and_sigterm(data, tmp_path, lr_made_by):
    """8 straight steps == 8 steps killed (SIGKILL) after the step-3 checkpoint, resumed,
    stopped by SIGTERM (checkpoint + exit 0), resumed again. Every part runs with the same
    number of threads (a different reduction order would round differently)."""
    torch.set_num_threads(2)
    args = [*COMMON, f"data.train_shards={data['shards']}", "data.num_workers=1", "data.batch_size=2",
            "train.stage=gan", f"train.pretrained={data['start']}", *CHEAP_VGG, "train.max_steps=8",
            "train.checkpoint_every=3", "optim.grad_clip=0.5", "train.grad_accum_steps=2",
            *(DEGRADED if lr_made_by == "degradation" else [])]
    straight, broken = str(tmp_path / "straight"), str(tmp_path / "broken")
    assert train_main([*args, f"train.run_dir={straight}"]) == 0
    command = [sys.executable, "-m", "jobs.train", *args, f"train.run_dir={broken}", "--resume", "auto"]

    process = subprocess.Popen(command, env=_env(threads=2), stderr=subprocess.PIPE, text=True)
    third = f"{ckpt.step_dir(broken, 3)}/{ckpt.COMPLETE}"
    wait_for(lambda: os.path.exists(third), "the step-3 checkpoint", proc=process, interval=0.05)
    process.kill()
    process.wait()
    assert ckpt.complete_steps(broken) == [3]

    # SIGTERM while the resumed run starts: it trains step 4, writes a checkpoint there
    # (not a scheduled one) and exits 0.
    with sigterm_blocked():
        process = subprocess.Popen(command, env=_env(threads=2), stderr=subprocess.PIPE, text=True)
    process.send_signal(signal.SIGTERM)
    rest = process.communicate(timeout=300)[1]
    assert process.returncode == 0, rest[-3000:]
    assert "resumed from" in rest and "SIGTERM: checkpoint" in rest, rest[-3000:]
    steps = ckpt.complete_steps(broken)
    assert steps[0] == 3 and 3 < steps[-1] < 8, steps

    assert train_main([*args, f"train.run_dir={broken}", "--resume", "auto"]) == 0
    assert_same_state(ckpt.load_torch(f"{ckpt.step_dir(straight, 8)}/state.pt"),
                      ckpt.load_torch(f"{ckpt.step_dir(broken, 8)}/state.pt"))


# ---------------------------------------------------------------- two machines


def test_two_machine_launch_on_one_host(data, tmp_path):
    """The way cloud VMs run it: `accelerate launch` with the shipped 2-VM config on
    machine rank 0 and 1, main process on loopback, `--resume auto` always passed."""
    port = free_port()
    run = str(tmp_path / "run")
    env = {**_env(), "ACCELERATE_USE_CPU": "true"}
    commands = [[sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                 str(ROOT / "jobs" / "launch" / "two_vms_8_gpus.yaml"), "--machine_rank", str(rank),
                 "--num_machines", "2", "--num_processes", "2", "--main_process_ip", "127.0.0.1",
                 "--main_process_port", str(port), "-m", "jobs.train", *COMMON,
                 f"data.train_shards={data['shards']}", "data.batch_size=2", "train.max_steps=3",
                 "train.checkpoint_every=3", "--resume", "auto", f"train.run_dir={run}"]
                for rank in (0, 1)]
    processes = [subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for c in commands]
    outputs = [p.communicate(timeout=600)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "world size 2" in outputs[0]
    assert len(set(digests(run, 3, 2))) == 1


def test_multihead_every_head_trained_and_validated(data, tmp_path):
    run = str(tmp_path / "run")
    assert train_main([*COMMON, f"data.train_shards={data['shards']}", f"data.val_folder={data['val']}",
                       "model.generator=multihead_rrdbnet", "train.max_steps=2", "train.val_every=2",
                       f"train.run_dir={run}"]) == 0
    tb = scalars(f"{run}/tb")
    for suffix in ("", "_head0", "_head1", "_head2"):
        assert len(tb[f"val/psnr{suffix}"]) == 1 and len(tb[f"val/mse{suffix}"]) == 1, suffix
    state = ckpt.load_torch(f"{ckpt.step_dir(run, 2)}/state.pt")
    from sr_core import build_generator

    torch.manual_seed(0)
    fresh = build_generator("multihead_rrdbnet", "tiny", scale=2).state_dict()
    for k in range(3):  # every head got gradients and moved
        assert not torch.equal(state["g"][f"heads.{k}.{2 * k}.weight"], fresh[f"heads.{k}.{2 * k}.weight"])


def test_validation_reports_the_mean_of_the_images_mse(data, tmp_path):
    """val/mse (model and bicubic) is the mean of the validation images' MSEs (Y channel,
    border = scale, 8-bit), not the MSE that the mean PSNR stands for; recomputed here
    with sr_core.metrics on the images themselves."""
    from jobs.data import ValidationDataset
    from sr_core import metrics
    from sr_core.resize import imresize
    from sr_core.upscaler import Upscaler

    run = str(tmp_path / "run")
    assert train_main([*COMMON, f"data.train_shards={data['shards']}", f"data.val_folder={data['val']}",
                       "train.max_steps=1", "train.val_every=1", f"train.run_dir={run}"]) == 0
    tb = scalars(f"{run}/tb")
    model = Upscaler.from_file(f"{run}/model_ema.safetensors", device="cpu", precision="fp32", tile=None)

    def as_uint8(chw: torch.Tensor) -> np.ndarray:
        return (chw.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)

    for suffix, upscale in (("", model), ("_bicubic", lambda lr: imresize(lr, scale=2))):
        mses, psnrs = [], []
        for item in ValidationDataset(data["val"], 2):
            sr, hr = as_uint8(upscale(item["lr"][None])[0]), as_uint8(item["gt"])
            mses.append(metrics.mse(sr, hr, crop_border=2, y_channel=True))
            psnrs.append(metrics.psnr(sr, hr, crop_border=2, y_channel=True))
        assert tb[f"val/mse{suffix}"] == [pytest.approx(np.mean(mses), rel=1e-5)], suffix
        assert tb[f"val/psnr{suffix}"] == [pytest.approx(np.mean(psnrs), rel=1e-5)], suffix
        # the two images differ enough that the MSE of the mean PSNR is another number
        assert abs(255.0**2 / 10 ** (np.mean(psnrs) / 10) / np.mean(mses) - 1) > 0.01, suffix


def test_runs_of_different_precisions_follow_each_other_in_one_process(data, tmp_path):
    """Accelerate keeps one set of settings per process: a bf16 run followed by an fp32 run
    in the same process (a notebook, a sweep) is refused by Accelerate unless each run
    forgets them at its end. Both runs train, and each writes its model."""
    for i, precision in enumerate(("bf16", "fp32", "bf16")):
        run = tmp_path / f"run_{i}_{precision}"
        assert train_main([*COMMON, f"data.train_shards={data['shards']}", "train.max_steps=1",
                           f"train.precision={precision}", f"train.run_dir={run}"]) == 0
        assert (run / "model.safetensors").exists()
