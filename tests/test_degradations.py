"""LR degradations: dtype/shape kept, seeded determinism, and each does what it says."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sr_core.degradations import (
    DegradationConfig,
    apply_degradations,
    coarse_dropout,
    gaussian_blur,
    gaussian_noise,
    jpeg,
)
from sr_core.metrics import psnr

IMAGES = Path(__file__).resolve().parent.parent / "assets" / "images"


@pytest.fixture(scope="module")
def patch() -> np.ndarray:
    return np.asarray(Image.open(IMAGES / "astronaut.png").convert("RGB"))[100:196, 150:246]


DEGRADATIONS = {
    "jpeg": lambda img, rng: jpeg(img, (30, 60), rng=rng),
    "gaussian_noise": lambda img, rng: gaussian_noise(img, (5, 20), rng=rng),
    "gaussian_blur": lambda img, rng: gaussian_blur(img, (1.0, 2.0), rng=rng),
    "coarse_dropout": lambda img, rng: coarse_dropout(img, (2, 3), (4, 8), rng=rng),
}


@pytest.mark.parametrize("name", sorted(DEGRADATIONS))
def test_shape_dtype_determinism_and_effect(patch, name):
    degrade = DEGRADATIONS[name]
    gray = np.asarray(Image.fromarray(patch).convert("L"))
    for img in (patch, gray, gray[..., None]):
        out = degrade(img, np.random.default_rng(7))
        assert out.shape == img.shape and out.dtype == np.uint8
        np.testing.assert_array_equal(out, degrade(img, np.random.default_rng(7)))
        assert not np.array_equal(out, img)
        assert np.array_equal(img, patch) or img.ndim < 3 or img.shape[2] == 1  # input untouched
    # Different seeds give different draws.
    outputs = {degrade(patch, np.random.default_rng(seed)).tobytes() for seed in range(4)}
    assert len(outputs) > 1


def test_jpeg_quality_orders_the_damage(patch):
    rng = np.random.default_rng(0)
    near_lossless = psnr(jpeg(patch, (100, 100), rng=rng), patch)
    high = psnr(jpeg(patch, (90, 90), rng=rng), patch)
    low = psnr(jpeg(patch, (10, 10), rng=rng), patch)
    assert near_lossless > 40  # quality 100 barely changes the image (4:2:0 chroma aside)
    assert near_lossless > high > low


def test_blur_lowers_high_frequency_energy(patch):
    def high_frequency_energy(img):
        # Energy of the discrete Laplacian (a high-pass filter), away from the borders.
        x = img.astype(np.float64).mean(axis=2)
        laplacian = 4 * x[1:-1, 1:-1] - x[:-2, 1:-1] - x[2:, 1:-1] - x[1:-1, :-2] - x[1:-1, 2:]
        return np.mean(laplacian[10:-10, 10:-10] ** 2)

    rng = np.random.default_rng(0)
    mild = gaussian_blur(patch, (0.8, 0.8), rng=rng)
    strong = gaussian_blur(patch, (2.5, 2.5), rng=rng)
    before = high_frequency_energy(patch)
    assert high_frequency_energy(mild) < 0.5 * before
    assert high_frequency_energy(strong) < 0.1 * high_frequency_energy(mild)
    # Low frequencies (the mean) survive.
    assert abs(strong.astype(float).mean() - patch.astype(float).mean()) < 1.5
    # An explicit kernel size is used as given (a 1-tap kernel is the identity).
    np.testing.assert_array_equal(gaussian_blur(patch, (2, 2), rng=rng, kernel_size=1), patch)


@pytest.mark.parametrize("gray_prob", [0.0, 1.0])
def test_noise_std_near_requested_sigma(gray_prob):
    flat = np.full((128, 128, 3), 128, dtype=np.uint8)
    out = gaussian_noise(flat, (12, 12), rng=np.random.default_rng(3), gray_prob=gray_prob)
    residual = out.astype(np.float64) - 128
    assert residual.std() == pytest.approx(12, rel=0.03)  # rounding adds only 1/12 of a level^2
    assert abs(residual.mean()) < 0.3
    channels_equal = np.all(residual[..., 0] == residual[..., 1])
    assert channels_equal == (gray_prob == 1.0)


def test_dropout_holes_are_filled_rectangles(patch):
    img = np.full((40, 50, 3), 200, dtype=np.uint8)
    out = coarse_dropout(img, (1, 1), (5, 5), rng=np.random.default_rng(0), fill=17)
    holes = np.all(out == 17, axis=2)
    assert holes.sum() == 25
    rows, cols = np.nonzero(holes)
    assert rows.max() - rows.min() == 4 and cols.max() - cols.min() == 4
    assert np.all(out[~holes] == 200)


def test_apply_degradations_probabilities_and_config(patch):
    rng = np.random.default_rng(0)
    np.testing.assert_array_equal(apply_degradations(patch, {}, rng), patch)
    np.testing.assert_array_equal(apply_degradations(patch, {"jpeg": 0.0, "gaussian_noise": 0.0}, rng), patch)
    everything = {"jpeg": 1.0, "gaussian_noise": 1.0, "gaussian_blur": 1.0, "coarse_dropout": 1.0}
    first = apply_degradations(patch, everything, np.random.default_rng(5))
    again = apply_degradations(patch, DegradationConfig(**everything), np.random.default_rng(5))
    np.testing.assert_array_equal(first, again)
    assert first.shape == patch.shape and first.dtype == np.uint8
    assert psnr(first, patch) < 35
    # Probability 0.5: applied to roughly half of the samples.
    changed = sum(
        not np.array_equal(apply_degradations(patch, {"gaussian_noise": 0.5}, np.random.default_rng(seed)), patch)
        for seed in range(40)
    )
    assert 10 < changed < 30
    # Parameters come through the dict too (lists from YAML become tuples).
    mild = apply_degradations(patch, {"jpeg": 1.0, "jpeg_quality_range": [100, 100]}, np.random.default_rng(0))
    assert psnr(mild, patch) > 40


def test_bad_inputs_are_value_errors(patch):
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="unknown key.*'jpg'"):
        apply_degradations(patch, {"jpg": 0.5}, rng)
    with pytest.raises(ValueError, match="jpeg=1.5"):
        apply_degradations(patch, {"jpeg": 1.5}, rng)
    with pytest.raises(ValueError, match="uint8"):
        gaussian_noise(patch.astype(np.float32), rng=rng)
    with pytest.raises(ValueError, match="quality_range"):
        jpeg(patch, (90, 30), rng=rng)
    with pytest.raises(ValueError, match="kernel_size"):
        gaussian_blur(patch, rng=rng, kernel_size=4)
    with pytest.raises(ValueError, match="4 channels"):
        jpeg(np.zeros((8, 8, 4), dtype=np.uint8), rng=rng)
