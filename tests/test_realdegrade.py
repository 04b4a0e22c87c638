"""Real-ESRGAN's second-order degradation (sr_core.realdegrade, sr_core.jpeg_torch): each
kernel, USM and noise model against its formula computed independently here (closed
forms, moments, symmetry, normalisation), the draws against their configured
distributions, JPEG against Pillow, and the pipeline's determinism."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sr_core import jpeg_torch
from sr_core import realdegrade as rd

IMAGES = Path(__file__).resolve().parent.parent / "assets" / "images"


def _photo(name="astronaut.png", box=(100, 150, 196, 246)) -> np.ndarray:
    top, left, bottom, right = box
    return np.asarray(Image.open(IMAGES / name).convert("RGB"))[top:bottom, left:right].copy()


def _tensor(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(img.transpose(2, 0, 1).copy()).float().unsqueeze(0) / 255


def _inverse_quadratic(x, y, sx, sy, theta):
    """x^T Sigma^-1 x with Sigma = R diag(sx^2, sy^2) R^T, by rotating the point back."""
    c, s = math.cos(theta), math.sin(theta)
    u, v = c * x + s * y, -s * x + c * y  # R^T (x, y)
    return (u / sx) ** 2 + (v / sy) ** 2


# ---------------------------------------------------------------- kernels


def test_isotropic_gaussian_is_the_outer_product_of_1d_gaussians():
    k = rd.gaussian_kernel(15, 1.7, 1.7, 0.0).numpy()
    x = np.arange(15) - 7
    g = np.exp(-x**2 / (2 * 1.7**2))
    expected = np.outer(g, g) / np.outer(g, g).sum()
    np.testing.assert_allclose(k, expected, rtol=1e-12, atol=1e-15)
    assert k.sum() == pytest.approx(1, abs=1e-12)


def test_anisotropic_gaussian_has_the_covariance_it_was_built_from():
    # On a kernel wide enough that truncation is negligible, the weights' second moments
    # are Sigma = R diag(sx^2, sy^2) R^T, computed here from the rotation directly.
    sx, sy, theta = 3.0, 1.2, 0.6
    k = rd.gaussian_kernel(61, sx, sy, theta).numpy()
    ax = np.arange(61) - 30
    yy, xx = np.meshgrid(ax, ax, indexing="ij")
    cov = np.array([[(k * xx * xx).sum(), (k * xx * yy).sum()], [(k * xx * yy).sum(), (k * yy * yy).sum()]])
    c, s = math.cos(theta), math.sin(theta)
    expected = np.array([[c * c * sx**2 + s * s * sy**2, c * s * (sx**2 - sy**2)],
                         [c * s * (sx**2 - sy**2), s * s * sx**2 + c * c * sy**2]])
    np.testing.assert_allclose(cov, expected, atol=1e-6)
    assert (k * xx).sum() == pytest.approx(0, abs=1e-12)  # centred
    np.testing.assert_allclose(k, k[::-1, ::-1], atol=1e-15)  # point symmetric
    # a quarter turn swaps the axes: the kernel of (sx, sy, theta + pi/2) is (sy, sx, theta)
    np.testing.assert_allclose(rd.gaussian_kernel(21, sx, sy, theta + math.pi / 2).numpy(),
                               rd.gaussian_kernel(21, sy, sx, theta).numpy(), atol=1e-12)


@pytest.mark.parametrize("beta", [0.5, 1.0, 2.7])
def test_generalized_gaussian_follows_its_formula(beta):
    size, sx, sy, theta = 21, 2.2, 0.9, -1.1
    k = rd.generalized_gaussian_kernel(size, sx, sy, theta, beta).numpy()
    half = size // 2
    for y, x in [(0, 1), (3, -2), (-5, 4), (7, 7), (0, -10)]:
        q = _inverse_quadratic(x, y, sx, sy, theta)
        assert k[half + y, half + x] / k[half, half] == pytest.approx(math.exp(-0.5 * q**beta), rel=1e-9)
    assert k.sum() == pytest.approx(1, abs=1e-12)
    if beta == 1.0:
        np.testing.assert_allclose(k, rd.gaussian_kernel(size, sx, sy, theta).numpy(), atol=1e-15)


@pytest.mark.parametrize("beta", [1.0, 1.6])
def test_plateau_kernel_follows_its_formula(beta):
    size, sx, sy, theta = 21, 1.5, 2.5, 0.4
    k = rd.plateau_kernel(size, sx, sy, theta, beta).numpy()
    half = size // 2
    for y, x in [(1, 0), (2, 3), (-6, 1), (9, -9)]:
        q = _inverse_quadratic(x, y, sx, sy, theta)
        assert k[half + y, half + x] / k[half, half] == pytest.approx(1 / (1 + q**beta), rel=1e-9)
    assert k.sum() == pytest.approx(1, abs=1e-12)
    np.testing.assert_allclose(k, k[::-1, ::-1], atol=1e-15)


def _bessel_j1(x: float) -> float:
    """J1(x) = 1/pi * integral_0^pi cos(t - x sin t) dt (Bessel's integral), by Simpson."""
    t = np.linspace(0, math.pi, 2001)
    f = np.cos(t - x * np.sin(t))
    h = t[1] - t[0]
    return float(h / 3 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum()) / math.pi)


def test_sinc_kernel_is_the_circular_lowpass_airy_pattern():
    size, cutoff = 17, 1.3
    k = rd.sinc_kernel(size, cutoff).numpy()
    half = size // 2
    for y, x in [(0, 1), (2, 2), (-3, 5), (8, 0)]:
        r = math.hypot(x, y)
        # k(r) / k(0) = [cutoff J1(cutoff r) / (2 pi r)] / [cutoff^2 / (4 pi)] = 2 J1(c r) / (c r)
        assert k[half + y, half + x] / k[half, half] == pytest.approx(2 * _bessel_j1(cutoff * r) / (cutoff * r),
                                                                      rel=1e-6, abs=1e-9)
    assert k.sum() == pytest.approx(1, abs=1e-12)
    np.testing.assert_allclose(k, k.T, atol=1e-15)  # circular: symmetric under every flip
    np.testing.assert_allclose(k, k[::-1], atol=1e-15)
    # A low-pass filter: a frequency well above the cutoff is mostly removed.
    wide = rd.sinc_kernel(21, math.pi / 4).numpy()
    ax = np.arange(21) - 10
    response = lambda w: abs((wide * np.cos(w * ax)[None, :]).sum())  # noqa: E731
    assert response(0.0) == pytest.approx(1, abs=1e-12)
    assert response(math.pi / 8) > 0.8 and response(math.pi * 0.75) < 0.1


def test_kernels_are_padded_to_21_keeping_their_mass():
    k = rd.pad_kernel(rd.gaussian_kernel(7, 1.0, 1.0, 0.0))
    assert k.shape == (21, 21) and float(k.sum()) == pytest.approx(1, abs=1e-12)
    assert float(k[7:14, 7:14].sum()) == pytest.approx(1, abs=1e-12)


# ---------------------------------------------------------------- filtering, USM


def _reference_convolve(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """A true 2-D convolution (kernel flipped) of a 2-D plane, reflect-101 padding."""
    pad = kernel.shape[0] // 2
    padded = np.pad(img, pad, mode="reflect")
    flipped = kernel[::-1, ::-1]
    out = np.zeros_like(img)
    for i in range(img.shape[0]):
        for j in range(img.shape[1]):
            out[i, j] = (padded[i:i + kernel.shape[0], j:j + kernel.shape[1]] * flipped).sum()
    return out


def test_filter2d_convolves_each_image_with_its_own_kernel():
    rng = np.random.default_rng(0)
    img = rng.random((2, 3, 12, 13))
    kernels = rng.random((2, 5, 5))  # not symmetric: the convolution's orientation shows
    out = rd.filter2d(torch.from_numpy(img), torch.from_numpy(kernels)).numpy()
    for b in range(2):
        for c in range(3):
            np.testing.assert_allclose(out[b, c], _reference_convolve(img[b, c], kernels[b]), atol=1e-10)


def test_usm_sharpen_follows_its_formula():
    img = _photo(box=(200, 200, 260, 260)).astype(np.float64) / 255
    out = rd.usm_sharpen(torch.from_numpy(img.transpose(2, 0, 1)).unsqueeze(0).double())[0].numpy()
    # OpenCV's sigma for a 51-tap kernel with sigma 0: 0.3 * ((51 - 1) / 2 - 1) + 0.8 = 8.0
    x = np.arange(51) - 25
    g = np.exp(-x**2 / (2 * 8.0**2))
    g /= g.sum()
    kernel = np.outer(g, g)
    expected = np.zeros_like(out)
    for c in range(3):
        plane = img[..., c]
        residual = plane - _reference_convolve(plane, kernel)
        soft = _reference_convolve((np.abs(residual) * 255 > 10).astype(np.float64), kernel)
        sharp = np.clip(plane + 0.5 * residual, 0, 1)
        expected[c] = soft * sharp + (1 - soft) * plane
    np.testing.assert_allclose(out, expected, atol=1e-10)
    flat = torch.full((1, 3, 40, 40), 0.3, dtype=torch.float64)
    assert torch.equal(rd.usm_sharpen(flat), flat)  # nothing to sharpen on a flat image


# ---------------------------------------------------------------- noise


def test_gaussian_noise_has_the_drawn_sigma_and_gray_means_one_plane():
    img = torch.full((2, 3, 128, 128), 0.5)
    sigma = torch.tensor([5 / 255, 20 / 255])
    g = torch.Generator().manual_seed(1)
    out = rd.gaussian_noise(img, sigma, torch.tensor([False, True]), g) - img
    for b in range(2):
        noise = out[b].double()
        assert float(noise.mean()) == pytest.approx(0, abs=4 * float(sigma[b]) / math.sqrt(noise.numel()))
        assert float(noise.std()) == pytest.approx(float(sigma[b]), rel=0.02)
    assert not torch.equal(out[0, 0], out[0, 1])  # colour noise: channels differ
    assert torch.equal(out[1, 0], out[1, 1]) and torch.equal(out[1, 1], out[1, 2])  # gray: one plane
    # clipped to [0, 1]
    loud = rd.gaussian_noise(torch.zeros(1, 3, 32, 32), torch.tensor([0.5]), torch.tensor([False]), g)
    assert float(loud.min()) == 0 and float(loud.max()) <= 1


def test_poisson_noise_has_shot_noise_moments():
    # Two grey levels: the noise at a pixel of value p is scale * (Poisson(256 p) / 256 - p):
    # mean 0, variance scale^2 * p / 256, however few distinct values the image has
    # (Real-ESRGAN's v = 2 here would make it 128x that variance).
    img = torch.zeros(1, 3, 256, 256)
    img[..., :128] = 51 / 255
    img[..., 128:] = 153 / 255
    scale = 2.0
    g = torch.Generator().manual_seed(2)
    noise = (rd.poisson_noise(img, torch.tensor([scale]), torch.tensor([False]), g) - img).double()
    for region, p in ((noise[..., :128], 51 / 255), (noise[..., 128:], 153 / 255)):
        n = region.numel()
        variance = scale**2 * p / rd.POISSON_LEVELS
        assert float(region.mean()) == pytest.approx(0, abs=4 * math.sqrt(variance / n))
        assert float(region.var()) == pytest.approx(variance, rel=0.03)
    gray = rd.poisson_noise(img, torch.tensor([scale]), torch.tensor([True]), g) - img
    assert torch.equal(gray[0, 0], gray[0, 2])


def test_noise_keeps_the_mean_of_a_flat_image():
    # Mid-grey, far from both clipping ends at these strengths: neither noise may move
    # the mean. A flat image has one distinct value; with v = that count (rounded to a
    # power of two: 1) Poisson(0.5) samples clip at 1 and the mean fell 22 levels.
    flat = torch.full((8, 3, 64, 64), 0.5)
    g = torch.Generator().manual_seed(3)
    for noisy in (rd.poisson_noise(flat, torch.full((8,), 3.0), torch.tensor([True, False] * 4), g),
                  rd.gaussian_noise(flat, torch.full((8,), 30 / 255), torch.tensor([True, False] * 4), g)):
        # 4 standard errors of the mean (gray samples count once for their 3 channels): ~0.5 level
        tolerance = 4 * float(noisy.std()) / math.sqrt(noisy.numel() / 3)
        assert abs(float(noisy.mean()) - 0.5) < tolerance
        assert float(noisy.std()) * 255 > 10  # real noise, at the drawn strength


def test_pipeline_keeps_the_mean_of_a_flat_image():
    # Blur, resize, noise, JPEG and sinc all preserve a flat mid-grey's mean (the published
    # ranges, every draw of 8 seeds x 16 images); before the Poisson fix it fell 4 levels.
    flat = torch.full((16, 3, 64, 64), 0.5)
    pipeline = rd.RealDegradation(rd.RealDegradationOptions(scale=2))
    means = [float(pipeline(flat, torch.Generator().manual_seed(seed))[0].mean()) for seed in range(8)]
    assert abs(sum(means) / len(means) - 0.5) * 255 < 0.5, [round((m - 0.5) * 255, 2) for m in means]


# ---------------------------------------------------------------- the draws


def test_kernel_draws_follow_the_configured_distribution():
    stage = rd.StageOptions()
    pipeline = rd.RealDegradation()
    g = torch.Generator().manual_seed(3)
    kinds = []
    for _ in range(10):
        names, kernels = pipeline.kernels(g, 400, stage)
        kinds += names
        assert kernels.shape == (400, 21, 21)
        np.testing.assert_allclose(kernels.sum((1, 2)).numpy(), 1, atol=1e-12)
    n = len(kinds)
    expected = {"sinc": stage.sinc_prob}
    for kind, p in zip(rd.KERNEL_TYPES, stage.kernel_prob):
        expected[kind] = (1 - stage.sinc_prob) * p
    for kind, p in expected.items():
        count = kinds.count(kind)
        assert abs(count - n * p) < 4 * math.sqrt(n * p * (1 - p)) + 1, (kind, count, n * p)


def test_kernel_parameters_follow_their_ranges():
    # generalized aniso only, wide and flat enough that no tap underflows to 0: the
    # non-zero support of a padded kernel is its drawn size
    stage = rd.StageOptions(kernel_prob=(0, 0, 0, 1, 0, 0), sinc_prob=0.0, blur_sigma=(3.0, 3.0), betag=(0.5, 1.0))
    sizes = []
    for u in np.random.default_rng(4).random((2000, 8)):
        kind, kernel = rd.kernel_from_uniforms(list(u), stage, (7, 9, 11, 13, 15, 17, 19, 21))
        assert kind == "generalized_aniso"
        sizes.append(int((kernel.abs().sum(0) > 0).sum()))
    counts = np.bincount(sizes, minlength=22)[7::2]
    assert counts.sum() == 2000
    assert counts.min() > 2000 / 8 * 0.75 and counts.max() < 2000 / 8 * 1.25
    # the shape parameter: half the draws in (low, 1), half in (1, high), uniform in each
    u = np.random.default_rng(5).random((20000, 2))
    betas = np.array([rd._beta(a, b, 0.5, 4.0) for a, b in u])
    below = betas[betas < 1]
    assert 0.48 < len(below) / len(betas) < 0.52
    assert betas.min() >= 0.5 and betas.max() <= 4.0
    assert np.mean(below) == pytest.approx(0.75, abs=0.01) and np.mean(betas[betas >= 1]) == pytest.approx(2.5, abs=0.03)


def test_resize_draws_follow_the_configured_distribution():
    stage = rd.StageOptions()
    g = torch.Generator().manual_seed(5)
    img = torch.zeros(1, 1, 100, 100)
    up = down = keep = 0
    factors = []
    for _ in range(2000):
        out = rd._resize_batch(img, rd._uniforms(g, 3), stage, (100.0, 100.0))
        side = out.shape[-1]
        factors.append(side / 100)
        up += side > 100
        down += side < 100
        keep += side == 100
    n = 2000
    for count, p in ((up, 0.2), (down, 0.7), (keep, 0.1)):
        # a drawn factor within 1/100 of 1 also keeps the size: a little slack on "keep"
        assert abs(count - n * p) < 4 * math.sqrt(n * p * (1 - p)) + 15
    assert min(factors) >= 0.15 - 0.01 and max(factors) <= 1.5


def test_jpeg_quality_draws_are_uniform_integers():
    g = torch.Generator().manual_seed(6)
    q = torch.randint(30, 96, (20000,), generator=g)
    counts = torch.bincount(q, minlength=96)[30:96].double()
    assert counts.sum() == 20000 and counts.min() > 0
    assert float(counts.std() / counts.mean()) < 0.2


# ---------------------------------------------------------------- JPEG


def test_jpeg_tables_scale_as_libjpeg():
    luma, chroma = jpeg_torch.quality_scaled_tables(torch.tensor([50, 100, 10]))
    assert torch.equal(luma[0], torch.tensor(jpeg_torch.LUMA_TABLE, dtype=torch.float32))
    assert torch.equal(chroma[1], torch.ones(8, 8))
    assert float(luma[2, 0, 0]) == math.floor((16 * 500 + 50) / 100)  # 5000 / 10 = 500 %


def test_dct_is_orthonormal():
    d = jpeg_torch.dct_matrix(8, torch.float64)
    torch.testing.assert_close(d @ d.T, torch.eye(8, dtype=torch.float64))


@pytest.mark.parametrize("quality", [30, 60, 95])
def test_jpeg_matches_pillow_at_the_same_quality(quality):
    img = _photo(box=(60, 40, 157, 171))  # odd sizes: partial blocks and MCUs
    buffer = io.BytesIO()
    Image.fromarray(img).save(buffer, format="JPEG", quality=quality)
    pillow = np.asarray(Image.open(io.BytesIO(buffer.getvalue()))).astype(np.float64)
    ours = jpeg_torch.jpeg(_tensor(img), quality)[0].numpy().transpose(1, 2, 0) * 255

    def psnr(a, b):
        return 10 * math.log10(255**2 / np.mean((a - b) ** 2))

    # Much closer to Pillow's decode than either is to the original: the same artefacts.
    assert psnr(ours, pillow) > 40
    assert psnr(ours, pillow) > psnr(pillow, img) + 5
    assert psnr(ours, img) == pytest.approx(psnr(pillow, img), abs=0.5)
    assert np.array_equal(ours, np.round(ours))  # on the 8-bit grid


def test_jpeg_keeps_the_mean_colour_like_pillow():
    # A colour bias in the JPEG step would teach the model to shift colours: per channel,
    # the decoded mean stays within 0.5 of the original's, and of Pillow's, at q 60.
    for name in ("coffee.png", "chelsea.png", "astronaut.png"):
        img = _photo(name, box=(0, 0, 256, 256))
        buffer = io.BytesIO()
        Image.fromarray(img).save(buffer, format="JPEG", quality=60)
        pillow = np.asarray(Image.open(io.BytesIO(buffer.getvalue()))).astype(np.float64)
        ours = jpeg_torch.jpeg(_tensor(img), 60)[0].numpy().transpose(1, 2, 0) * 255
        mean = img.reshape(-1, 3).mean(0)
        assert np.abs(ours.reshape(-1, 3).mean(0) - mean).max() < 0.5, name
        assert np.abs(ours.reshape(-1, 3).mean(0) - pillow.reshape(-1, 3).mean(0)).max() < 0.5, name


def test_differentiable_jpeg_has_a_gradient():
    x = _tensor(_photo(box=(0, 0, 32, 32))).requires_grad_(True)
    jpeg_torch.jpeg(x, 50, differentiable=True).sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0


# ---------------------------------------------------------------- the pipeline


def test_pipeline_is_deterministic_per_seed_and_on_the_8bit_grid():
    gt = _tensor(_photo(box=(0, 0, 64, 64))).repeat(3, 1, 1, 1)
    pipeline = rd.RealDegradation(rd.RealDegradationOptions(scale=2))
    lr1, sharp1 = pipeline(gt, torch.Generator().manual_seed(7))
    lr2, sharp2 = pipeline(gt, torch.Generator().manual_seed(7))
    lr3, _ = pipeline(gt, torch.Generator().manual_seed(8))
    assert lr1.shape == (3, 3, 32, 32) and sharp1.shape == gt.shape
    assert torch.equal(lr1, lr2) and torch.equal(sharp1, sharp2)
    assert not torch.equal(lr1, lr3)
    assert not torch.equal(lr1[0], lr1[1])  # per-sample kernels and noise
    assert torch.equal(lr1, (lr1 * 255).round() / 255) and float(lr1.min()) >= 0 and float(lr1.max()) <= 1
    assert torch.equal(sharp1, rd.usm_sharpen(gt))


def test_options_refuse_out_of_domain_values_naming_the_field():
    with pytest.raises(ValueError, match="first.kernel_prob"):
        rd.RealDegradationOptions(first=rd.StageOptions(kernel_prob=(0.5, 0.5, 0.5, 0, 0, 0)))
    with pytest.raises(ValueError, match="kernel_sizes"):
        rd.RealDegradationOptions(kernel_sizes=(8,))
    with pytest.raises(ValueError, match="second.jpeg_range"):
        rd.RealDegradationOptions(second=rd.StageOptions(jpeg_range=(0, 95)))
    with pytest.raises(ValueError, match="multiple of scale"):
        rd.RealDegradation(rd.RealDegradationOptions(scale=4))(torch.zeros(1, 3, 30, 30), torch.Generator())
