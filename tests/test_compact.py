"""Real-ESRGAN's compact generator (SRVGGNetCompact) end to end: files in Real-ESRGAN's
layout (made here, key by key, the way its ``realesr-*`` .pth files hold them) load
through every command with outputs equal to a plain forward written in this file;
export to Real-ESRGAN's .pth and back is lossless; lying files are refused; and the
`demo_x2` training preset learns (validation PSNR rises past its start).

The layout, from Real-ESRGAN's ``realesrgan/archs/srvgg_arch.py``: one ``body`` list of
conv 3x3 (image -> num_feat), activation, then num_conv x (conv 3x3, activation), then
conv 3x3 (num_feat -> channels * scale**2); PReLU activations hold one slope per
channel; the output is ``pixel_shuffle(body(x), scale) + nearest_upscale(x, scale)``.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch.nn import functional as F

from sr_cli.main import main as sr_main
from sr_core import build_generator, codecs, load_generator, metrics, save_generator
from sr_core.modelfile import ModelFileError, read_metadata
from sr_core.resize import imresize

# ---- Real-ESRGAN's layout and a plain forward, written independently of sr_core -------


def realesrgan_compact_state(num_feat: int, num_conv: int, scale: int, seed: int, prelu: bool = True,
                             channels: int = 3) -> dict[str, torch.Tensor]:
    """Random weights under Real-ESRGAN's exact keys. Slopes and biases are random too
    (not PyTorch's 0.25 and 0), so a loader that dropped or reordered any of them would
    change the output."""
    g = torch.Generator().manual_seed(seed)
    state, index = {}, 0

    def conv(cin, cout):
        nonlocal index
        state[f"body.{index}.weight"] = torch.randn(cout, cin, 3, 3, generator=g) * (0.5 / (cin * 9) ** 0.5)
        state[f"body.{index}.bias"] = torch.randn(cout, generator=g) * 0.01
        index += 1

    def activation():
        nonlocal index
        if prelu:
            state[f"body.{index}.weight"] = torch.rand(num_feat, generator=g) * 0.5
        index += 1  # ReLU / LeakyReLU hold no tensors but keep their place in the list

    conv(channels, num_feat)
    activation()
    for _ in range(num_conv):
        conv(num_feat, num_feat)
        activation()
    conv(num_feat, channels * scale * scale)
    return state


def reference_forward(state: dict[str, torch.Tensor], x: torch.Tensor, scale: int,
                      activation: str = "prelu") -> torch.Tensor:
    """SRVGGNetCompact's forward from the state dict alone."""
    convs = sorted(int(k.split(".")[1]) for k, v in state.items() if k.endswith(".weight") and v.ndim == 4)
    out = x
    for i in convs:
        out = F.conv2d(out, state[f"body.{i}.weight"], state[f"body.{i}.bias"], padding=1)
        if i != convs[-1]:
            if activation == "prelu":
                out = F.prelu(out, state[f"body.{i + 1}.weight"])
            elif activation == "relu":
                out = F.relu(out)
            else:
                out = F.leaky_relu(out, 0.1)
    return F.pixel_shuffle(out, scale) + F.interpolate(x, scale_factor=scale, mode="nearest")


def reference_uint8(state, image: np.ndarray, scale: int) -> np.ndarray:
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        y = reference_forward(state, x, scale).clamp(0, 1)
    return (y[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()


def seeded_input(*shape, seed=3):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def photo(name: str, size: tuple[int, int]) -> np.ndarray:
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "assets" / "images" / name
    return np.asarray(Image.open(path).convert("RGB").resize(size, Image.Resampling.BICUBIC))


# ---- loading Real-ESRGAN's files --------------------------------------------------


@pytest.mark.parametrize("scale, num_feat, num_conv", [(1, 8, 0), (2, 8, 3), (3, 6, 2), (4, 12, 5)])
@pytest.mark.parametrize("wrapper", ["params", "params_ema", "bare"])
def test_realesrgan_layout_loads_with_inferred_hparams_and_reference_outputs(tmp_path, scale, num_feat, num_conv,
                                                                             wrapper):
    state = realesrgan_compact_state(num_feat, num_conv, scale, seed=scale)
    if wrapper == "params_ema":
        # Real-ESRGAN prefers params_ema when a file has both; so do we.
        obj = {"params": {k: torch.zeros_like(v) for k, v in state.items()}, "params_ema": state}
    elif wrapper == "params":
        obj = {"params": state}  # how realesr-animevideov3.pth / realesr-general-x4v3.pth hold them
    else:
        obj = dict(state)
    path = tmp_path / "realesr-x.pth"
    torch.save(obj, path)
    model = load_generator(str(path))
    assert model.arch_name == "srvgg_compact"
    assert model.hparams == dict(num_in_ch=3, num_out_ch=3, scale=scale, num_feat=num_feat, num_conv=num_conv,
                                 activation="prelu")
    x = seeded_input(2, 3, 9, 7)
    with torch.no_grad():
        assert torch.equal(model(x), reference_forward(state, x, scale))


def test_published_sizes_load_and_a_bare_safetensors_state_dict_too(tmp_path):
    # realesr-general-x4v3's shapes (64 features, 32 convolutions, x4) and animevideov3's (64, 16).
    for num_conv in (32, 16):
        state = realesrgan_compact_state(64, num_conv, 4, seed=num_conv)
        path = str(tmp_path / f"general-{num_conv}.safetensors")
        save_file(state, path)
        model = load_generator(path)
        assert model.hparams["num_feat"] == 64 and model.hparams["num_conv"] == num_conv
        x = seeded_input(1, 3, 6, 5)
        with torch.no_grad():
            assert torch.equal(model(x), reference_forward(state, x, 4))


def test_grayscale_compact_model_loads(tmp_path):
    state = realesrgan_compact_state(8, 1, 2, seed=5, channels=1)
    torch.save({"params": state}, tmp_path / "gray.pth")
    model = load_generator(str(tmp_path / "gray.pth"))
    assert model.hparams["num_in_ch"] == model.hparams["num_out_ch"] == 1
    x = seeded_input(1, 1, 5, 6)
    with torch.no_grad():
        assert torch.equal(model(x), reference_forward(state, x, 2))


# ---- bad and lying files ----------------------------------------------------------


def test_relu_layout_is_refused_because_the_tensors_cannot_name_the_activation(tmp_path):
    torch.save({"params": realesrgan_compact_state(8, 2, 2, seed=1, prelu=False)}, tmp_path / "relu.pth")
    with pytest.raises(ModelFileError, match=r"relu\.pth.*ReLU or LeakyReLU.*activation="):
        load_generator(str(tmp_path / "relu.pth"))


@pytest.mark.parametrize("damage, named", [
    ("drop_middle_conv", "missing"),        # body.4 gone: the later layers no longer line up
    ("wrong_prelu_width", "other shapes"),  # a slope vector of another width
    ("extra_key", "unexpected"),
    ("non_square_scale", "channels x scale"),
    ("scale_8", "scale one of"),
    ("zero_input_channels", "first convolution"),
])
def test_damaged_realesrgan_files_are_refused_naming_the_file(tmp_path, damage, named):
    state = realesrgan_compact_state(8, 3, 2, seed=1)
    if damage == "drop_middle_conv":
        del state["body.4.weight"], state["body.4.bias"]
    elif damage == "wrong_prelu_width":
        state["body.3.weight"] = torch.rand(5)
    elif damage == "extra_key":
        state["body.99.weight"] = torch.rand(8)
    elif damage == "non_square_scale":
        state["body.8.weight"], state["body.8.bias"] = torch.rand(5 * 3, 8, 3, 3), torch.rand(5 * 3)
    elif damage == "zero_input_channels":
        state["body.0.weight"] = torch.rand(8, 0, 3, 3)
    elif damage == "scale_8":
        state["body.8.weight"], state["body.8.bias"] = torch.rand(3 * 64, 8, 3, 3), torch.rand(3 * 64)
    path = tmp_path / f"{damage}.pth"
    torch.save({"params": state}, path)
    with pytest.raises(ModelFileError, match=re.escape(path.name) + ".*" + named):
        load_generator(str(path))


def our_file_claiming(path: str, model, **claimed) -> None:
    """Our format, with metadata claiming other hyperparameters than the tensors have."""
    meta = {"format": "sr-cloud", "format_version": "1", "arch": model.arch_name,
            "hparams": json.dumps({**model.hparams, **claimed}), "scale": str(model.scale)}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path, metadata=meta)


@pytest.mark.parametrize("claimed, named", [
    ({"num_conv": 3}, "do not fit"),
    ({"scale": 4}, "do not fit"),
    ({"activation": "relu"}, "do not fit"),       # PReLU slopes in the file: unexpected tensors
    ({"num_feat": 10**7}, "claims num_feat=10000000"),
    ({"num_conv": 10**8}, "claims num_conv=100000000"),
    ({"activation": "gelu"}, "gelu"),
])
def test_lying_metadata_is_refused_before_anything_large_is_built(tmp_path, claimed, named):
    import resource

    torch.manual_seed(0)
    model = build_generator("srvgg_compact", "tiny", scale=2)
    path = str(tmp_path / "lies.safetensors")
    our_file_claiming(path, model, **claimed)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ValueError, match=named):
        load_generator(path)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB


# ---- the commands -----------------------------------------------------------------


@pytest.mark.parametrize("activation", ["prelu", "relu", "leakyrelu"])
def test_sr_convert_to_realesrgan_pth_and_back_is_lossless(tmp_path, activation):
    torch.manual_seed(0)
    model = build_generator("srvgg_compact", "tiny", scale=3, activation=activation)
    with torch.no_grad():  # PyTorch's default slopes are all 0.25: make every one distinct
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ours = str(tmp_path / "ours.safetensors")
    save_generator(model, ours, run="unit")
    pth = str(tmp_path / "realesr-ours.pth")
    assert sr_main(["convert", ours, pth]) == 0

    # What Real-ESRGAN's RealESRGANer and its network interpolation read: `params`,
    # a plain state dict in its keys (our metadata rides beside it as plain strings).
    obj = torch.load(pth, weights_only=True)
    expected_keys = set(realesrgan_compact_state(16, 4, 3, seed=0, prelu=activation == "prelu"))
    assert set(obj["params"]) == expected_keys
    assert set(obj) == {"params", "sr_cloud_metadata"}

    back = str(tmp_path / "back.safetensors")
    assert sr_main(["convert", pth, back]) == 0
    loaded = load_generator(back)
    assert loaded.hparams == model.hparams
    reloaded_state = loaded.state_dict()
    assert all(torch.equal(v, reloaded_state[k]) for k, v in model.state_dict().items())
    assert read_metadata(back)["provenance"] == {"run": "unit", "converted_from": pth}
    x = seeded_input(1, 3, 5, 4)
    with torch.no_grad():
        assert torch.equal(loaded(x), reference_forward(obj["params"], x, 3, activation))


@pytest.mark.parametrize("scale", [2, 3])
def test_realesrgan_pth_through_sr_upscale_and_sr_eval_matches_the_reference(tmp_path, scale):
    state = realesrgan_compact_state(8, 2, scale, seed=7)
    model_path = str(tmp_path / "realesr-animevideo-like.pth")
    torch.save({"params": state}, model_path)
    hr = photo("chelsea.png", (12 * scale, 9 * scale))
    lr = imresize(hr, scale=1 / scale)
    (tmp_path / "lr").mkdir()
    (tmp_path / "hr").mkdir()
    codecs.write_image(str(tmp_path / "lr" / "cat.png"), lr)
    codecs.write_image(str(tmp_path / "hr" / "cat.png"), hr)
    expected = reference_uint8(state, lr, scale)

    # sr upscale, tiled (the receptive field, 4 convolutions, fits in the overlap) and not.
    for tile in ("0", "8"):
        out = tmp_path / f"up-{tile}"
        assert sr_main(["upscale", str(tmp_path / "lr"), "-o", str(out), "--model", model_path, "--tile", tile,
                        "--overlap", "6", "--device", "cpu"]) == 0
        got = codecs.read_image(str(out / "cat_sr.png"))
        assert got.shape == expected.shape
        # Same weights, same maths; float sums in another order may move a value across a
        # rounding boundary, never further.
        assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1, tile

    assert sr_main(["eval", str(tmp_path / "hr"), "--model", model_path, "--baseline", "bicubic",
                    "--json", str(tmp_path / "eval.json"), "--device", "cpu", "--tile", "0"]) == 0
    report = json.loads((tmp_path / "eval.json").read_text())
    row = report["sets"][0]["images"][0]["scores"]
    assert row["realesr-animevideo-like.pth"]["psnr"] == pytest.approx(
        metrics.psnr(expected, hr, crop_border=scale, y_channel=True), abs=0.01)


def test_sr_interpolate_two_realesrgan_files_is_their_denoise_strength_blend(tmp_path):
    # Real-ESRGAN's --denoise_strength s for realesr-general-x4v3 blends the weights as
    # s * general + (1 - s) * general-wdn: `sr interpolate WDN GENERAL --alpha s`.
    general = realesrgan_compact_state(8, 3, 4, seed=1)
    wdn = realesrgan_compact_state(8, 3, 4, seed=2)
    torch.save({"params": general}, tmp_path / "realesr-general-x4v3.pth")
    torch.save({"params": wdn}, tmp_path / "realesr-general-wdn-x4v3.pth")
    out = str(tmp_path / "dn-0.3.safetensors")
    assert sr_main(["interpolate", str(tmp_path / "realesr-general-wdn-x4v3.pth"),
                    str(tmp_path / "realesr-general-x4v3.pth"), "--alpha", "0.3", "-o", out]) == 0
    blended = {k: 0.3 * general[k] + (1 - 0.3) * wdn[k] for k in general}
    model = load_generator(out)
    x = seeded_input(1, 3, 6, 6)
    with torch.no_grad():
        assert torch.allclose(model(x), reference_forward(blended, x, 4), atol=1e-6)
    # Two compact models of different shapes do not blend.
    torch.save({"params": realesrgan_compact_state(8, 2, 4, seed=3)}, tmp_path / "short.pth")
    assert sr_main(["interpolate", str(tmp_path / "short.pth"), str(tmp_path / "realesr-general-x4v3.pth"),
                    "-o", str(tmp_path / "no.safetensors")]) == 2
    assert not (tmp_path / "no.safetensors").exists()


def test_realesrgan_pth_through_sr_batch_matches_the_reference(tmp_path, capsys):
    # A local Ray of this test's own (started and stopped by `sr batch`).
    state = realesrgan_compact_state(8, 2, 2, seed=11)
    model_path = str(tmp_path / "compact.pth")
    torch.save({"params": state}, model_path)
    src = tmp_path / "in"
    src.mkdir()
    images = {"a.png": photo("astronaut.png", (24, 18)), "b.png": photo("coffee.png", (17, 21))}
    for name, image in images.items():
        codecs.write_image(str(src / name), image)
    assert sr_main(["batch", str(src), str(tmp_path / "out"), "--model", model_path, "--tile", "0", "-q"]) == 0
    capsys.readouterr()
    for name, image in images.items():
        got = codecs.read_image(str(tmp_path / "out" / name.replace(".png", "_sr.png")))
        assert np.abs(got.astype(int) - reference_uint8(state, image, 2).astype(int)).max() <= 1, name


# ---- training ---------------------------------------------------------------------


def test_demo_x2_preset_learns_then_its_gan_stage_runs(tmp_path):
    """The demo's preset, at test sizes (the `tiny` compact variant, 32 px crops, a few
    hundred steps): the run starts from a saved random generator, and its validation
    PSNR on a held-out photograph ends far above that start, both as the job's own
    validation logs it and as `sr eval` scores the exported model. No timing involved."""
    from pathlib import Path

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from jobs.prepare import PrepareSettings, prepare
    from jobs.train import main as train_main

    images = Path(__file__).resolve().parent.parent / "assets" / "images"
    shards, val, run = tmp_path / "shards", tmp_path / "val", tmp_path / "run"
    prepare(str(images), str(shards), PrepareSettings(size=96, step=96, format="raw", exclude=("coffee.png",)),
            progress=False)
    val.mkdir()
    coffee = codecs.read_image(str(images / "coffee.png"))
    codecs.write_image(str(val / "coffee.png"), coffee[150:246, 250:346])
    torch.manual_seed(1)
    start = str(tmp_path / "start.safetensors")
    save_generator(build_generator("srvgg_compact", "tiny", scale=2), start)

    assert train_main(["--preset", "demo_x2", f"data.train_shards={shards}", f"data.val_folder={val}",
                       f"train.run_dir={run}", f"train.pretrained={start}", "model.generator_variant=tiny",
                       "data.gt_size=32", "data.batch_size=8", "data.num_workers=0", "train.max_steps=200",
                       "train.val_every=100", "train.ema_decay=0.9", "train.log_every=50",
                       "train.num_val_images_logged=0", "train.progress=false"]) == 0

    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    logged = [e.value for e in acc.Scalars("val/psnr")]
    assert len(logged) == 2

    def eval_psnr(model: str) -> float:
        out = tmp_path / f"eval-{Path(model).stem}.json"
        assert sr_main(["eval", str(val), "--model", model, "--baseline", "bicubic", "--json", str(out),
                        "--device", "cpu"]) == 0
        summary = json.loads(out.read_text())["sets"][0]["summary"]
        return summary[Path(model).name]["psnr"]

    before, after = eval_psnr(start), eval_psnr(str(run / "model_ema.safetensors"))
    assert after > before + 3.0, (before, after)
    # The job's validation scores the same model on the same image (float output rather
    # than sr eval's 8-bit one, hence the tolerance) and it rose too.
    assert logged[-1] == pytest.approx(after, abs=0.1)
    assert logged[-1] > before + 3.0

    # The GAN stage trains the compact generator from those weights against the preset's
    # discriminator, with the usual losses; what it exports loads as the same architecture.
    gan_run = tmp_path / "gan"
    assert train_main(["--preset", "demo_x2", "train.stage=gan", f"data.train_shards={shards}",
                       f"train.run_dir={gan_run}", f"train.pretrained={run / 'model.safetensors'}",
                       "model.generator_variant=tiny", "data.gt_size=32", "data.batch_size=4", "data.num_workers=0",
                       "train.max_steps=4", "train.log_every=2", "train.progress=false"]) == 0
    acc = EventAccumulator(str(gan_run / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    assert {"loss/d", "loss/g_gan", "loss/g_perceptual", "loss/g_pixel"} <= set(acc.Tags()["scalars"])
    gan_model = load_generator(str(gan_run / "model_ema.safetensors"))
    assert gan_model.arch_name == "srvgg_compact" and gan_model.hparams["num_conv"] == 4
