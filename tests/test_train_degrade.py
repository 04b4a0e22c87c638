"""The second-order degradation in the training job (jobs.degrade, the ``degradation``
config section, the Real-ESRGAN presets) and ``sr eval --degrade``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from jobs import checkpoint as ckpt
from jobs.config import REAL_PRESETS, load_config
from jobs.degrade import PairPool, step_generator
from jobs.prepare import PrepareSettings, prepare
from jobs.train import main as train_main
from sr_core.degradations import EvalDegradation, parse_eval_degradation
from sr_core.resize import imresize

ROOT = Path(__file__).resolve().parent.parent
IMAGES = ROOT / "assets" / "images"


# ---------------------------------------------------------------- the pool


def test_pool_passes_batches_while_filling_then_swaps_shuffled_pairs():
    pool = PairPool(6)
    g = torch.Generator().manual_seed(0)

    def batch(value):  # values on the 8-bit grid, as the pipeline's LR and the loader's GT
        return torch.full((2, 3, 2, 2), value / 255), torch.full((2, 3, 4, 4), value / 255)

    seen = []
    for value in (10, 20, 30):  # filling: each batch comes back as it is, and is stored
        lr, gt = pool.exchange(*batch(value), g)
        assert torch.equal(lr, batch(value)[0]) and torch.equal(gt, batch(value)[1])
    assert pool.filled == 6
    for value in (40, 50, 60, 70):
        lr, gt = pool.exchange(*batch(value), g)
        out = (lr[:, 0, 0, 0] * 255).round().tolist()
        assert out == (gt[:, 0, 0, 0] * 255).round().tolist()  # LR and GT stay paired
        seen += out
        assert len(pool.lr) == 6
    # pairs come out of the pool (not the batch that just went in), each at most once
    # while the pool holds it; the last batch in is still in the pool
    assert 70 not in seen and set(seen) <= {10, 20, 30, 40, 50, 60}
    stored = sorted((pool.lr[:, 0, 0, 0]).tolist())
    assert len(seen) + len(stored) == 6 + 8 and 70 in stored
    state = pool.state_dict()
    again = PairPool(6)
    again.load_state_dict(state, "cpu")
    assert torch.equal(again.lr, pool.lr) and again.filled == 6
    assert again.exchange(*batch(80), torch.Generator().manual_seed(1))[0].shape == (2, 3, 2, 2)


def test_step_generators_depend_on_the_place_in_the_run_only():
    a = torch.rand(4, generator=step_generator(0, 0, 5, 0, "cpu"))
    assert torch.equal(a, torch.rand(4, generator=step_generator(0, 0, 5, 0, "cpu")))
    for other in ((1, 0, 5, 0), (0, 1, 5, 0), (0, 0, 6, 0), (0, 0, 5, 1)):
        assert not torch.equal(a, torch.rand(4, generator=step_generator(*other, "cpu")))


# ---------------------------------------------------------------- config and presets


def test_presets_carry_the_published_values():
    net = load_config(None, [], preset="realesrnet_x4plus")
    assert net.degradation.enabled and net.degradation.pool_size == 180 and net.degradation.usm_gt
    assert (net.data.gt_size, net.data.batch_size, net.data.scale) == (256, 12, 4)
    assert net.optim.lr_g == 2e-4 and net.train.max_steps == 1_000_000 and net.train.ema_decay == 0.999
    assert net.degradation.first.kernel_prob == (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    assert net.degradation.second.blur_prob == 0.8 and net.degradation.second.noise_range == (1.0, 25.0)
    gan = load_config(None, ["train.pretrained=x", "loss.random_vgg=true"], preset="realesrgan_x4plus")
    assert (gan.model.discriminator, gan.model.discriminator_variant) == ("unet_sn", "realesrgan")
    assert gan.loss.gan == "vanilla" and gan.loss.gan_weight == 0.1 and gan.optim.lr_g == 1e-4
    assert gan.loss.perceptual_layers == {"conv1_2": 0.1, "conv2_2": 0.1, "conv3_4": 1.0, "conv4_4": 1.0,
                                          "conv5_4": 1.0}
    for name in REAL_PRESETS:
        overrides = ["train.pretrained=x", "loss.random_vgg=true"] if "gan" in name else []
        assert load_config(None, overrides, preset=name).degradation.enabled, name
    demo = load_config(None, [], preset="demo_real_x2")
    assert demo.model.generator_variant == "small" and demo.degradation.pool_size % demo.data.batch_size == 0


@pytest.mark.parametrize("override, message", [
    ("degradation.first.kernel_prob=[1, 1, 0, 0, 0, 0]", "degradation.first.kernel_prob"),
    ("degradation.second.jpeg_range=[50, 30]", "degradation.second.jpeg_range"),
    ("degradation.pool_size=100", "degradation.pool_size"),
    ("degradation.first.typo=1", "degradation.first.typo"),
    ("data.degradation_probs={jpeg: 0.5}", "data.degradation_probs"),
])
def test_bad_degradation_settings_name_the_field(override, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        load_config(None, ["degradation.enabled=true", "data.batch_size=12", override], preset="default")


# ---------------------------------------------------------------- in the job


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("degrade-data")
    prepare(str(IMAGES), str(root / "shards"), PrepareSettings(size=96, step=96, images_per_shard=1), progress=False)
    (root / "val").mkdir()
    image = Image.open(IMAGES / "coffee.png").convert("RGB")
    image.crop((100, 100, 164, 164)).save(root / "val" / "coffee.png")
    return str(root)


def test_training_with_degradation_logs_the_degraded_grid_and_saves_the_pool(shards, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = str(tmp_path / "run")
    assert train_main(["--preset", "tiny", "data.num_workers=0", "train.progress=false", "train.log_every=1",
                       f"data.train_shards={shards}/shards", f"data.val_folder={shards}/val", "train.max_steps=3",
                       "train.val_every=3", "degradation.enabled=true", "degradation.pool_size=8",
                       "degradation.num_images_logged=2", f"train.run_dir={run}"]) == 0
    acc = EventAccumulator(f"{run}/tb", size_guidance={"images": 0})
    acc.Reload()
    assert {"degraded/0", "degraded/1"} <= set(acc.Tags()["images"])
    image = acc.Images("degraded/0")[0]
    assert (image.width, image.height) == (3 * 64, 64)  # LR (nearest x2) | output | GT
    mine = ckpt.load_torch(f"{ckpt.step_dir(run, 3)}/rank_0.pt")
    pool = mine["degradation"]["pool"]
    assert pool["filled"] == 8 and pool["lr"].shape == (8, 3, 32, 32) and pool["gt"].dtype == torch.uint8


# ---------------------------------------------------------------- sr eval --degrade


def test_eval_degradation_chain_is_the_documented_one_and_seeded_by_name():
    hr = np.asarray(Image.open(IMAGES / "astronaut.png").convert("RGB"))[:128, :128].copy()
    chain = parse_eval_degradation("jpeg=60, noise=5,blur=1.2")  # any order: applied in the fixed one
    assert chain == EvalDegradation(blur=1.2, noise=5.0, jpeg=60)
    lr = chain.make_lr(hr, 2, "a.png")
    assert lr.shape == (64, 64, 3) and np.array_equal(lr, chain.make_lr(hr, 2, "a.png"))
    assert not np.array_equal(lr, chain.make_lr(hr, 2, "b.png"))  # the noise is per image
    # only the blur: equals an independent separable Gaussian, then MATLAB bicubic
    blurred = EvalDegradation(blur=1.0).make_lr(hr, 2, "a.png")
    x = np.arange(7) - 3
    g = np.exp(-x**2 / 2.0)
    g /= g.sum()
    padded = np.pad(hr.astype(np.float64), ((3, 3), (3, 3), (0, 0)), mode="reflect")
    rows = sum(w * padded[i:i + 128] for i, w in enumerate(g))
    both = sum(w * rows[:, i:i + 128] for i, w in enumerate(g))
    expected = imresize(np.clip(np.round(both), 0, 255).astype(np.uint8), scale=0.5)
    assert np.abs(blurred.astype(int) - expected.astype(int)).max() <= 1
    # only the noise: std close to its sigma
    noisy = EvalDegradation(noise=8).make_lr(hr, 2, "a.png").astype(float) - imresize(hr, scale=0.5)
    assert noisy.std() == pytest.approx(8, rel=0.1)
    for bad in ("blur=1,blur=2", "sharpen=1", "jpeg=60.5", "noise=x", ""):
        with pytest.raises(ValueError, match="--degrade"):
            parse_eval_degradation(bad)


def test_sr_eval_degrade_scores_the_degraded_copy(tmp_path, capsys):
    from sr_cli.main import main as sr_main

    (tmp_path / "set").mkdir()
    Image.open(IMAGES / "chelsea.png").convert("RGB").crop((0, 0, 128, 96)).save(tmp_path / "set" / "c.png")
    out = tmp_path / "out.json"
    assert sr_main(["eval", str(tmp_path / "set"), "--bicubic", "2", "--json", str(out)]) == 0
    clean = json.loads(out.read_text())["sets"][0]["summary"]["bicubic"]["psnr"]
    assert sr_main(["eval", str(tmp_path / "set"), "--bicubic", "2", "--degrade", "blur=1.2,noise=5,jpeg=60",
                    "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert "JPEG quality 60" in report["lr_chain"]
    assert report["sets"][0]["summary"]["bicubic"]["psnr"] < clean - 1
    assert "LR images: Gaussian blur sigma 1.2 px" in capsys.readouterr().out
    assert sr_main(["eval", "--paired", str(tmp_path / "set"), str(tmp_path / "set"), "--bicubic", "2",
                    "--degrade", "jpeg=50"]) == 2
