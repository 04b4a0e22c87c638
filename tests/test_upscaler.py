"""The Upscaler: tiling plan, tiled == untiled on photographs, padding for pixel-unshuffle
models, every image kind (gray/LA/RGB/RGBA, uint8/uint16, float tensors), outscale,
precision selection, bounded batches, and concurrent calls from threads."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from sr_core import build_generator, save_generator
from sr_core.precision import choose_precision
from sr_core.resize import imresize
from sr_core.upscaler import (
    AxisWindow,
    Upscaler,
    choose_tile,
    plan_axis,
)

IMAGES = Path(__file__).resolve().parent.parent / "assets" / "images"


def photo(name: str, mode: str = "RGB") -> np.ndarray:
    return np.asarray(Image.open(IMAGES / name).convert(mode))


def lively_model(scale: int, num_in_ch: int = 3, seed: int = 0) -> nn.Module:
    """A tiny RRDBNet with full-gain random weights: unlike the 0.1-scaled training
    init (whose output is nearly constant), its output depends strongly on a wide
    neighbourhood, so tiling mistakes show up as seams."""
    torch.manual_seed(seed)
    model = build_generator("rrdbnet", "tiny", scale=scale, num_in_ch=num_in_ch, num_out_ch=num_in_ch)
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, a=0.2)
            nn.init.zeros_(module.bias)
    model.conv_last.bias.data.fill_(0.5)
    return model.eval()


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(peak**2 / mse)


def reference(model: nn.Module, image: np.ndarray) -> np.ndarray:
    """Untiled run written out by hand: replicate-pad to the size multiple, forward,
    crop, clamp, round."""
    m, r = model.size_multiple, model.scale
    x = torch.from_numpy(image.astype(np.float32) / 255).permute(2, 0, 1)[None]
    h, w = x.shape[-2:]
    x = F.pad(x, (0, -w % m, 0, -h % m), mode="replicate")
    with torch.no_grad():
        y = model(x)[..., :h * r, :w * r].clamp(0, 1)
    return (y[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()


# ---------------------------------------------------------------- pure planning


@pytest.mark.parametrize("length", [1, 3, 7, 8, 33, 100, 257])
@pytest.mark.parametrize("tile,overlap", [(0, 16), (8, 0), (8, 4), (16, 8), (40, 16)])
@pytest.mark.parametrize("multiple", [1, 2, 4])
def test_plan_axis_covers_every_pixel_once_with_aligned_equal_windows(length, tile, overlap, multiple):
    windows = plan_axis(length, tile, overlap, multiple)
    padded = -(-length // multiple) * multiple
    written = np.zeros(length, dtype=int)
    for w in windows:
        written[w.core_start:w.core_end] += 1
        assert 0 <= w.start <= w.core_start < w.core_end <= w.start + w.length <= padded
        assert w.start % multiple == 0 and w.length % multiple == 0
        # Context: `overlap` pixels on each side unless the window reaches the border.
        assert w.core_start - w.start >= overlap or w.start == 0
        assert w.start + w.length - w.core_end >= overlap or w.start + w.length == padded
    assert (written == 1).all()
    assert len({w.length for w in windows}) == 1  # one shape: windows batch together
    rounded = -(-tile // multiple) * multiple + 2 * (-(-overlap // multiple) * multiple)
    if tile > 0 and padded > rounded:
        assert len(windows) > 1 and windows[0].length <= rounded
        # No more windows than needed: one fewer would not cover the axis.
        assert (len(windows) - 1) * (rounded - 2 * overlap) + 2 * overlap < padded


def test_plan_axis_untiled_is_one_padded_window():
    assert plan_axis(5, 0, 16, 4) == [AxisWindow(0, 8, 0, 5)]


@pytest.mark.parametrize(
    "device_type,capability,expected",
    [("cuda", (7, 0), "fp16"), ("cuda", (7, 5), "fp16"), ("cuda", (8, 0), "bf16"), ("cuda", (9, 0), "bf16"),
     ("cuda", (6, 1), "fp32"), ("cpu", None, "fp32"), ("mps", None, "fp32")],
)
def test_choose_precision(device_type, capability, expected):
    assert choose_precision(device_type, capability) == expected


def test_choose_tile_fits_the_budget_and_grows_with_it():
    small = choose_tile(2048, 64 * 2**20, 4, 16, 4)
    large = choose_tile(2048, 1024 * 2**20, 4, 16, 4)
    assert small % 4 == 0 and large % 4 == 0 and 32 <= small < large
    for tile, budget in ((small, 64 * 2**20), (large, 1024 * 2**20)):
        assert 4 * (tile + 32) ** 2 * 2048 <= budget


def test_bad_settings_are_value_errors():
    model = build_generator("rrdbnet", "tiny", scale=4)
    for kwargs in (dict(tile=-1), dict(overlap=-2), dict(tiles_per_batch=0), dict(alpha="nope"),
                   dict(precision="fp8"), dict(precision="fp16", device="cpu")):
        with pytest.raises(ValueError):
            Upscaler(model, **kwargs)
    up = Upscaler(model, device="cpu")
    with pytest.raises(ValueError, match="uint8 or uint16"):
        up(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="shape"):
        up(np.zeros((4, 4, 5), np.uint8))
    with pytest.raises(ValueError, match="outscale"):
        up(np.zeros((4, 4, 3), np.uint8), outscale=0)


# ---------------------------------------------------------------- tiling on photographs


@pytest.mark.parametrize("scale", [4, 2, 1])
def test_tiled_matches_untiled_on_photographs(scale):
    image = photo("coffee.png")[:203, :301]  # odd sizes: not multiples of 2 or 4
    model = lively_model(scale)
    untiled = Upscaler(model, device="cpu", tile=0)(image)
    assert untiled.shape == (203 * scale, 301 * scale, 3) and untiled.std() > 10
    np.testing.assert_array_equal(untiled, reference(model, image))
    tiled = Upscaler(model, device="cpu", tile=64, tiles_per_batch=3)(image)
    assert psnr(tiled, untiled) >= 50
    # Without context the seams are plain to see: the check above can fail.
    seamy = Upscaler(model, device="cpu", tile=64, overlap=0)(image)
    assert psnr(seamy, untiled) < 40


def test_batches_hold_several_tiles_and_never_the_whole_frame():
    image = photo("astronaut.png")[:200, :232]
    model = lively_model(4)
    up = Upscaler(model, device="cpu", tile=48, overlap=8, tiles_per_batch=4)
    inputs = []
    handle = model.register_forward_pre_hook(lambda _m, args: inputs.append(tuple(args[0].shape)))
    try:
        up(image)
    finally:
        handle.remove()
    windows = len(plan_axis(200, 48, 8, 1)) * len(plan_axis(232, 48, 8, 1))
    assert windows > 4 and len(inputs) == -(-windows // 4)
    assert inputs[0][0] == 4  # several tiles per forward pass
    assert all(b <= 4 and h <= 48 + 16 and w <= 48 + 16 for b, _c, h, w in inputs)


def test_automatic_tile_follows_the_memory_budget():
    model = lively_model(4)
    image = photo("chelsea.png")[:150, :170]
    roomy = Upscaler(model, device="cpu", tile=None, memory_budget=2**34)
    tight = Upscaler(model, device="cpu", tile=None, memory_budget=32 * 2**20)
    assert roomy.tile_for(150, 170) == 0
    tile = tight.tile_for(150, 170)
    assert 32 <= tile < 150
    # The chosen batch of windows fits the budget by the model's own estimate.
    assert tight.tiles_per_batch * (tile + 2 * tight.overlap) ** 2 * tight.bytes_per_pixel <= 32 * 2**20
    assert psnr(tight(image), roomy(image)) >= 50


# ---------------------------------------------------------------- sizes, kinds, depths


@pytest.mark.parametrize("scale", [1, 2, 4])
@pytest.mark.parametrize("size", [(1, 1), (3, 7), (5, 9), (13, 6), (18, 10)])
def test_odd_sizes_pad_and_crop_back(scale, size):
    rng = np.random.default_rng(sum(size))
    image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    model = lively_model(scale)
    out = Upscaler(model, device="cpu", tile=0)(image)
    assert out.shape == (size[0] * scale, size[1] * scale, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, reference(model, image))
    tiled = Upscaler(model, device="cpu", tile=4, overlap=4)(image)
    assert tiled.shape == out.shape


def test_grayscale_runs_as_replicated_rgb_and_comes_back_as_luma():
    model = lively_model(2)
    gray = photo("camera.png", "L")[:64, :80]
    up = Upscaler(model, device="cpu", tile=0)
    out = up(gray)
    assert out.shape == (128, 160) and out.dtype == np.uint8
    rgb = torch.from_numpy(gray.astype(np.float32) / 255)[None, None].expand(1, 3, -1, -1)
    with torch.no_grad():
        y = model(rgb.contiguous()).clamp(0, 1)[0]
    luma = (0.299 * y[0] + 0.587 * y[1] + 0.114 * y[2]) * 255
    assert np.abs(out.astype(np.float64) - luma.numpy()).max() <= 0.5 + 1e-3
    assert up(gray[..., None]).shape == (128, 160, 1)


def test_16_bit_stays_16_bit_with_full_precision():
    model = lively_model(2)
    gray16 = photo("camera.png", "L")[:40, :48].astype(np.uint16) * 257 + 100
    out = Upscaler(model, device="cpu", tile=16, overlap=8)(gray16)
    assert out.dtype == np.uint16 and out.shape == (80, 96)
    # Real 16-bit levels, not 8-bit values scaled up.
    assert np.count_nonzero(out % 257) > out.size // 2
    out8 = Upscaler(model, device="cpu", tile=16, overlap=8)((gray16 // 257).astype(np.uint8))
    assert psnr(out.astype(np.float64) / 257, out8.astype(np.float64)) > 30


@pytest.mark.parametrize("channels", [2, 4])
def test_alpha_by_model_or_bicubic(channels):
    model = lively_model(2)
    rgb = photo("chelsea.png")[:36, :44]
    color = rgb[..., :1] if channels == 2 else rgb
    yy, xx = np.mgrid[:36, :44]
    alpha = ((np.hypot(yy - 18, xx - 22) < 12) * 255).astype(np.uint8)[..., None]
    image = np.concatenate([color, alpha], axis=2)
    by_model = Upscaler(model, device="cpu", tile=16, overlap=8, alpha="model")(image)
    by_bicubic = Upscaler(model, device="cpu", tile=16, overlap=8, alpha="bicubic")(image)
    plain = Upscaler(model, device="cpu", tile=16, overlap=8)
    assert by_model.shape == by_bicubic.shape == (72, 88, channels)
    np.testing.assert_array_equal(by_model[..., :-1], plain(np.ascontiguousarray(color)).reshape(72, 88, -1))
    np.testing.assert_array_equal(by_model[..., -1], plain(alpha[..., 0]))
    np.testing.assert_array_equal(by_bicubic[..., :-1], by_model[..., :-1])
    np.testing.assert_array_equal(by_bicubic[..., -1], imresize(alpha[..., 0], size=(72, 88)))


def test_one_channel_model_runs_colour_images_per_channel():
    model = lively_model(2, num_in_ch=1)
    rgb = photo("astronaut.png")[:30, :34]
    up = Upscaler(model, device="cpu", tile=0)
    out = up(rgb)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], up(np.ascontiguousarray(rgb[..., c])))


def test_float_tensors_in_and_out():
    model = lively_model(2)
    rgb = photo("coffee.png")[:50, :66]
    up = Upscaler(model, device="cpu", tile=24, overlap=8)
    x = torch.from_numpy(rgb.astype(np.float32) / 255).permute(2, 0, 1)
    batch = torch.stack([x, x.flip(-1)])
    out = up(batch)
    assert out.shape == (2, 3, 100, 132) and out.dtype == torch.float32
    assert 0 <= out.min() and out.max() <= 1
    from_array = up(rgb).astype(np.float32) / 255
    assert np.abs(out[0].permute(1, 2, 0).numpy() - from_array).max() <= 0.5 / 255 + 1e-6
    torch.testing.assert_close(up(x), out[0])
    torch.testing.assert_close(out[1], up(x.flip(-1)))


def test_outscale_is_network_scale_then_matlab_bicubic():
    model = lively_model(4)
    rgb = photo("chelsea.png")[:30, :41]
    up = Upscaler(model, device="cpu", tile=0)
    net = up(rgb)
    out = up(rgb, outscale=2.5)
    assert out.shape == (75, 102, 3)
    np.testing.assert_array_equal(out, imresize(net, size=(75, 102)))
    np.testing.assert_array_equal(up(rgb, outscale=4), net)
    x = torch.from_numpy(rgb.astype(np.float32) / 255).permute(2, 0, 1)[None]
    assert up(x, outscale=3).shape == (1, 3, 90, 123)


def test_from_file_and_bf16_autocast(tmp_path):
    model = lively_model(2)
    save_generator(model, str(tmp_path / "m.safetensors"))
    rgb = photo("astronaut.png")[:40, :40]
    loaded = Upscaler.from_file(str(tmp_path / "m.safetensors"), device="auto", precision="auto", tile=None)
    assert loaded.device.type == "cpu" and loaded.precision == "fp32" and loaded.scale == 2
    np.testing.assert_array_equal(loaded(rgb), Upscaler(model, device="cpu", tile=0)(rgb))
    # The autocast path (what GPUs use) runs here with bf16 on CPU.
    bf16 = Upscaler(model, device="cpu", precision="bf16", tile=0)(rgb)
    assert bf16.shape == (80, 80, 3) and psnr(bf16, loaded(rgb)) > 25


# ---------------------------------------------------------------- threads


def test_one_upscaler_called_from_several_threads():
    model = lively_model(2)
    up = Upscaler(model, device="cpu", tile=24, overlap=8, tiles_per_batch=2)
    images = [photo("astronaut.png")[:48, :56], photo("coffee.png")[:37, :61], photo("chelsea.png")[:52, :40],
              photo("camera.png", "L")[:44, :44], photo("coffee.png", "RGBA")[:30, :50]]
    expected = [up(img) for img in images]
    barrier = threading.Barrier(len(images))

    def work(i):
        barrier.wait()  # start together so the calls really overlap
        return [up(images[i]) for _ in range(2)]

    with ThreadPoolExecutor(len(images)) as pool:
        results = list(pool.map(work, range(len(images))))
    for want, got in zip(expected, results):
        for g in got:
            np.testing.assert_array_equal(g, want)


# ---------------------------------------------------------------- models it cannot run


def test_models_it_cannot_run_are_refused_up_front_naming_the_file(tmp_path):
    """Not a generator, or a channel count images do not have: a ValueError when the
    Upscaler is made (one clear message), not a crash or a failure on every image."""
    with pytest.raises(ValueError, match="not a generator"):
        Upscaler(nn.Conv2d(3, 3, 3, padding=1), device="cpu")
    two = build_generator("rrdbnet", "tiny", scale=2, num_in_ch=2, num_out_ch=2)
    with pytest.raises(ValueError, match=r"2 input channels.*1- \(gray\), 3- \(RGB\) or 4-channel"):
        Upscaler(two, device="cpu")
    path = str(tmp_path / "two-channel-model.safetensors")
    save_generator(two, path)
    with pytest.raises(ValueError, match=r"^.*two-channel-model\.safetensors: .*2 input channels"):
        Upscaler.from_file(path, device="cpu")


def test_a_callers_model_is_left_as_it_was_found():
    """Validating a generator being trained must not freeze it, move it, change its
    memory format or its BatchNorm statistics; a model on another device is copied."""
    torch.manual_seed(0)
    model = build_generator("srresnet", "tiny", scale=2).train()  # BatchNorm: train mode matters
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pointers = {k: v.data_ptr() for k, v in model.state_dict().items()}
    image = photo("camera.png", "RGB")[:40, :48]
    out = Upscaler(model, device="cpu", tile=0)(image)
    assert model.training and all(m.training for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    assert all(p.is_contiguous() for p in model.parameters())  # not made channels_last
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == pointers
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # ... and the result is the eval-mode model's, not the train-mode one's.
    reference = Upscaler(build_generator("srresnet", "tiny", scale=2), device="cpu", tile=0)
    reference.model.load_state_dict(before)
    assert np.array_equal(out, reference(image))
    # Training goes on: a backward pass reaches every parameter.
    model(torch.rand(2, 3, 8, 8)).mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_an_owned_model_is_prepared_once(tmp_path):
    torch.manual_seed(0)
    path = str(tmp_path / "m.safetensors")
    save_generator(build_generator("rrdbnet", "tiny", scale=2), path)
    up = Upscaler.from_file(path, device="cpu")
    assert not up.model.training and not any(p.requires_grad for p in up.model.parameters())
    assert up.model.conv_first.weight.is_contiguous(memory_format=torch.channels_last)
