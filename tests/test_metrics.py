"""PSNR/SSIM/MSE: cross-checked with scikit-image, known values, torch == numpy."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from sr_core.metrics import mse, psnr, psnr_torch, rgb_to_y, ssim, ssim_torch
from sr_core.resize import imresize

IMAGES = Path(__file__).resolve().parent.parent / "assets" / "images"


def photo(name: str) -> np.ndarray:
    return np.asarray(Image.open(IMAGES / name))


def degraded(img: np.ndarray, seed: int = 0) -> np.ndarray:
    """A realistic distorted version: bicubic x1/2 round trip plus a little noise."""
    rng = np.random.default_rng(seed)
    blurry = imresize(imresize(img, 0.5), size=img.shape[:2]).astype(np.float64)
    return np.clip(np.round(blurry + rng.normal(0, 3, img.shape)), 0, 255).astype(np.uint8)


def to_tensor(img: np.ndarray) -> torch.Tensor:
    if img.ndim == 2:
        img = img[..., None]
    return torch.from_numpy(img.astype(np.float32) / 255).permute(2, 0, 1)


@pytest.fixture(scope="module")
def pairs():
    # Small crops keep the file fast; two colour photos and the gray one.
    crops = [photo("astronaut.png")[:200, 100:300], photo("coffee.png")[100:260, 200:400], photo("camera.png")[:180, :220]]
    return [(hr, degraded(hr, seed)) for seed, hr in enumerate(crops)]


def test_psnr_and_mse_match_skimage(pairs):
    for hr, sr in pairs:
        expected = peak_signal_noise_ratio(hr, sr, data_range=255)
        assert psnr(sr, hr) == pytest.approx(expected, abs=1e-9)
        assert mse(sr, hr) == pytest.approx(np.mean((hr.astype(float) - sr) ** 2))
        assert 20 < psnr(sr, hr) < 45


def test_ssim_matches_skimage_gaussian_on_valid_region(pairs):
    # skimage filters with reflect padding, then averages the map after dropping
    # (win_size - 1) / 2 = 5 pixels per side: exactly the "valid" region we compute.
    for hr, sr in pairs:
        channel_axis = 2 if hr.ndim == 3 else None
        expected = structural_similarity(
            hr, sr, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255, channel_axis=channel_axis
        )
        assert ssim(sr, hr) == pytest.approx(expected, abs=1e-9)
        assert 0.3 < ssim(sr, hr) < 1


def test_y_channel_matches_skimage_on_bt601_luma(pairs):
    hr, sr = pairs[0]
    y_hr = 16 + (65.481 * hr[..., 0] + 128.553 * hr[..., 1] + 24.966 * hr[..., 2]) / 255
    y_sr = 16 + (65.481 * sr[..., 0] + 128.553 * sr[..., 1] + 24.966 * sr[..., 2]) / 255
    assert psnr(sr, hr, y_channel=True) == pytest.approx(peak_signal_noise_ratio(y_hr, y_sr, data_range=255), abs=1e-9)
    expected_ssim = structural_similarity(
        y_hr, y_sr, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255
    )
    assert ssim(sr, hr, y_channel=True) == pytest.approx(expected_ssim, abs=1e-9)


def test_known_values():
    rng = np.random.default_rng(1)
    img = rng.integers(20, 200, (32, 40, 3), dtype=np.uint8)
    assert psnr(img, img) == math.inf
    assert ssim(img, img) == pytest.approx(1.0, abs=1e-12)
    for offset in (1, 5, 17):
        shifted = img + np.uint8(offset)
        assert mse(shifted, img) == pytest.approx(offset**2)
        assert psnr(shifted, img) == pytest.approx(20 * math.log10(255 / offset), abs=1e-9)
    # SSIM of two constant images a, b: luminance term only, (2ab + C1) / (a^2 + b^2 + C1).
    a, b = 100.0, 140.0
    c1 = (0.01 * 255) ** 2
    flat_a = np.full((20, 20), a, dtype=np.uint8)
    flat_b = np.full((20, 20), b, dtype=np.uint8)
    assert ssim(flat_a, flat_b) == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), abs=1e-12)
    # uint16 uses its own peak: the same relative offset gives the same PSNR.
    img16 = img.astype(np.uint16) * 257
    assert psnr(img16 + np.uint16(5 * 257), img16) == pytest.approx(20 * math.log10(255 / 5), abs=1e-9)


def test_y_channel_values():
    white = np.full((4, 4, 3), 255, dtype=np.uint8)
    black = np.zeros((4, 4, 3), dtype=np.uint8)
    # Studio swing: black -> 16, white -> 235.
    np.testing.assert_allclose(rgb_to_y(black.astype(float)), 16)
    np.testing.assert_allclose(rgb_to_y(white.astype(float)), 235)
    # A gray offset of d levels in RGB is 219/255 * d levels in Y.
    gray = np.full((16, 16, 3), 100, dtype=np.uint8)
    assert psnr(gray + np.uint8(10), gray, y_channel=True) == pytest.approx(20 * math.log10(255 / (10 * 219 / 255)))


def test_crop_border_drops_exactly_the_border():
    rng = np.random.default_rng(2)
    hr = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
    sr = hr.copy()
    sr[:3] = 255 - sr[:3]  # errors only in the top 3 rows
    assert psnr(sr, hr, crop_border=2) == pytest.approx(psnr(sr[2:-2, 2:-2], hr[2:-2, 2:-2]))
    assert psnr(sr, hr, crop_border=3) == math.inf
    assert psnr(sr, hr, crop_border=2) > psnr(sr, hr)
    assert ssim(sr, hr, crop_border=3) == pytest.approx(1.0)


def test_bicubic_x4_round_trip_on_real_photos():
    """The full LR pipeline: HR -> MATLAB bicubic x1/4 -> bicubic x4, measured like the papers."""
    for name in ("astronaut.png", "chelsea.png", "coffee.png"):
        hr = photo(name)
        h, w = (s - s % 4 for s in hr.shape[:2])  # papers crop HR to a multiple of the scale
        hr = hr[:h, :w]
        sr = imresize(imresize(hr, 0.25), 4)
        assert sr.shape == hr.shape and sr.dtype == np.uint8
        y_psnr = psnr(sr, hr, crop_border=4, y_channel=True)
        rgb_psnr = psnr(sr, hr, crop_border=4)
        # Bicubic x4 on natural photos lands in the low-to-high 20s dB (Set5 28.42, Set14 26.00).
        assert 20 < y_psnr < 35
        # Per pixel, (sum_i w_i e_i)^2 <= 3 |w|^2 * mean_i e_i^2 with 3 |w|^2 = 0.989 for
        # the BT.601 weights w = (65.481, 128.553, 24.966) / 255 (Cauchy-Schwarz), so the
        # Y error is never larger than the RGB error: Y-PSNR >= RGB-PSNR + 0.048 dB.
        assert y_psnr >= rgb_psnr + 0.048
        assert 0.4 < ssim(sr, hr, crop_border=4, y_channel=True) < 0.95


def test_torch_agrees_with_numpy(pairs):
    colour = [(hr, sr) for hr, sr in pairs if hr.ndim == 3]
    # Same-size batch: crop both colour pairs to a common size.
    h = min(hr.shape[0] for hr, _ in colour)
    w = min(hr.shape[1] for hr, _ in colour)
    hr_batch = torch.stack([to_tensor(hr[:h, :w]) for hr, _ in colour])
    sr_batch = torch.stack([to_tensor(sr[:h, :w]) for _, sr in colour])
    # Off-grid values must be quantized like a saved image: add sub-level jitter.
    sr_batch_jittered = sr_batch + (torch.rand_like(sr_batch) - 0.5) * 0.9 / 255
    for crop_border, y_channel in [(0, False), (4, True), (2, False)]:
        got_psnr = psnr_torch(sr_batch_jittered, hr_batch, crop_border, y_channel)
        got_ssim = ssim_torch(sr_batch_jittered, hr_batch, crop_border, y_channel)
        assert got_psnr.shape == (len(colour),) and got_ssim.shape == (len(colour),)
        for i, (hr, sr) in enumerate(colour):
            assert got_psnr[i].item() == pytest.approx(psnr(sr[:h, :w], hr[:h, :w], crop_border, y_channel), abs=0.01)
            assert got_ssim[i].item() == pytest.approx(ssim(sr[:h, :w], hr[:h, :w], crop_border, y_channel), abs=1e-6)
    assert torch.isinf(psnr_torch(hr_batch, hr_batch)).all()
    gray_hr, gray_sr = pairs[2]
    assert psnr_torch(to_tensor(gray_sr)[None], to_tensor(gray_hr)[None], y_channel=True).item() == pytest.approx(
        psnr(gray_sr, gray_hr, y_channel=True), abs=0.01
    )


def test_bad_inputs_are_value_errors():
    a = np.zeros((20, 20, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match=r"\(20, 20, 3\).*\(20, 21, 3\)"):
        psnr(a, np.zeros((20, 21, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"\(1, 3, 20, 20\).*\(1, 3, 20, 21\)"):
        ssim_torch(torch.zeros(1, 3, 20, 20), torch.zeros(1, 3, 20, 21))
    with pytest.raises(ValueError, match="uint8"):
        ssim(a.astype(np.float32), a.astype(np.float32))
    with pytest.raises(ValueError, match="crop_border"):
        psnr(a, a, crop_border=10)
    with pytest.raises(ValueError, match="y_channel"):
        psnr(np.zeros((20, 20, 4), dtype=np.uint8), np.zeros((20, 20, 4), dtype=np.uint8), y_channel=True)
    with pytest.raises(ValueError, match="11x11"):
        ssim(a[:8], a[:8])
