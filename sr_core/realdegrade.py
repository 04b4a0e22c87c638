"""Real-ESRGAN's second-order degradation model (Wang et al., ICCV-W 2021), on batches of
tensors on any device, for training models on real photographs.

An HR batch becomes its LR batch by: blur -> resize -> noise -> JPEG, a second time
with other ranges, then, in random order, [resize to the LR size + sinc filter] and
JPEG. The blur kernels are drawn from isotropic / anisotropic / generalized / plateau
Gaussians or a sinc (circular low-pass) filter; the noise is Gaussian or Poisson, in
colour or gray. The defaults of :class:`RealDegradationOptions` are the published values
(Real-ESRGAN ``options/train_realesrgan_x4plus.yml``; ``train_realesrnet_x4plus.yml`` has
the same ones). The GT used for the pixel and perceptual losses is sharpened by
:func:`usm_sharpen` (Real-ESRGAN's ``l1_gt_usm`` / ``percep_gt_usm``), and the first blur
is applied to that sharpened GT, as Real-ESRGAN does.

Which draws are per sample and which per batch follows Real-ESRGAN: kernels (type,
size, sigmas, angle, beta, cutoff), noise strength, gray-or-colour and JPEG quality are
per sample; the resize direction, scale and mode, Gaussian-or-Poisson, whether the
second blur happens, and the order of the last two steps are per batch (one resize of
the whole batch keeps the batch one tensor).

Every random draw comes from the ``torch.Generator`` passed in (on the images' device),
so a caller that seeds it from (seed, step, rank) gets the same LR batch again after a
resume — bitwise on CPU. Kernels are built in float64 on the CPU from the drawn
parameters and then moved, so they are the same on every device. JPEG is
``sr_core.jpeg_torch`` (libjpeg's quantisation in PyTorch). Differences from Real-ESRGAN
kept on purpose: the JPEG qualities are integers (as a real encoder's), the LR is not
re-cropped after degradation (the caller's GT crop is the training crop), and the
Poisson noise's photon scale is the 8-bit grid's 256 levels, not the crop's count of
distinct values (see :func:`_poisson_part`).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
from torch.nn import functional as F

from sr_core import jpeg_torch
# The options and their checks, torch-free (a training config reads them); also imported from here.
from sr_core.realdegrade_options import (  # noqa: F401
    KERNEL_PAD_SIZE,
    KERNEL_TYPES,
    RESIZE_MODES,
    SECOND_STAGE,
    RealDegradationOptions,
    StageOptions,
    check_options,
)


# ---------------------------------------------------------------- kernels (published formulas)


def mesh_grid(kernel_size: int) -> torch.Tensor:
    """(k, k, 2) float64 offsets (x, y) from the kernel centre, x along columns."""
    ax = torch.arange(kernel_size, dtype=torch.float64) - (kernel_size - 1) / 2
    yy, xx = torch.meshgrid(ax, ax, indexing="ij")
    return torch.stack([xx, yy], -1)


def covariance(sigma_x: float, sigma_y: float, theta: float) -> torch.Tensor:
    """Sigma = R(theta) diag(sigma_x^2, sigma_y^2) R(theta)^T (2x2, float64)."""
    c, s = math.cos(theta), math.sin(theta)
    rot = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    return rot @ torch.diag(torch.tensor([sigma_x**2, sigma_y**2], dtype=torch.float64)) @ rot.T


def _quadratic_form(kernel_size: int, sigma_x: float, sigma_y: float, theta: float) -> torch.Tensor:
    xy = mesh_grid(kernel_size)
    inverse = torch.linalg.inv(covariance(sigma_x, sigma_y, theta))
    return torch.einsum("ijk,kl,ijl->ij", xy, inverse, xy)  # x^T Sigma^-1 x at every tap


def gaussian_kernel(kernel_size: int, sigma_x: float, sigma_y: float, theta: float) -> torch.Tensor:
    """k(x) proportional to exp(-1/2 x^T Sigma^-1 x), summing to 1 (iso: sigma_x = sigma_y)."""
    k = torch.exp(-0.5 * _quadratic_form(kernel_size, sigma_x, sigma_y, theta))
    return k / k.sum()


def generalized_gaussian_kernel(kernel_size: int, sigma_x: float, sigma_y: float, theta: float,
                                beta: float) -> torch.Tensor:
    """k(x) proportional to exp(-1/2 (x^T Sigma^-1 x)^beta) (beta = 1: the Gaussian)."""
    k = torch.exp(-0.5 * _quadratic_form(kernel_size, sigma_x, sigma_y, theta) ** beta)
    return k / k.sum()


def plateau_kernel(kernel_size: int, sigma_x: float, sigma_y: float, theta: float, beta: float) -> torch.Tensor:
    """k(x) proportional to 1 / (1 + (x^T Sigma^-1 x)^beta): flat top, heavy tails."""
    k = 1 / (_quadratic_form(kernel_size, sigma_x, sigma_y, theta) ** beta + 1)
    return k / k.sum()


def sinc_kernel(kernel_size: int, cutoff: float) -> torch.Tensor:
    """The ideal circular low-pass filter of angular cutoff ``cutoff`` (radians per pixel):
    k(r) = cutoff J1(cutoff r) / (2 pi r), k(0) = cutoff^2 / (4 pi), summing to 1."""
    xy = mesh_grid(kernel_size)
    r = xy.norm(dim=-1)
    safe = torch.where(r == 0, torch.ones_like(r), r)
    k = cutoff * torch.special.bessel_j1(cutoff * safe) / (2 * math.pi * safe)
    k = torch.where(r == 0, torch.full_like(r, cutoff**2 / (4 * math.pi)), k)
    return k / k.sum()


def pad_kernel(kernel: torch.Tensor, size: int = KERNEL_PAD_SIZE) -> torch.Tensor:
    pad = (size - kernel.shape[-1]) // 2
    return F.pad(kernel, (pad, pad, pad, pad))


# ---------------------------------------------------------------- filtering, USM


def filter2d(img: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Convolve each image of ``img`` (B, C, H, W) with its own kernel (B, k, k) (or one
    (k, k) for all), odd k, reflect padding (replicate where the image is too small to
    reflect)."""
    b, c, h, w = img.shape
    k = kernel.shape[-1]
    kernel = kernel.to(img).expand(b, k, k)
    pad = k // 2
    mode = "reflect" if pad < min(h, w) else "replicate"
    padded = F.pad(img, (pad, pad, pad, pad), mode=mode).reshape(1, b * c, h + 2 * pad, w + 2 * pad)
    weight = kernel.repeat_interleave(c, 0).unsqueeze(1)  # (B*C, 1, k, k): one per channel
    return F.conv2d(padded, weight.flip(-1, -2), groups=b * c).view(b, c, h, w)


def opencv_gaussian_kernel(size: int, sigma: float = 0) -> torch.Tensor:
    """OpenCV's ``getGaussianKernel`` (1-D, float64; sigma <= 0: 0.3((size-1)/2 - 1) + 0.8)."""
    if sigma <= 0:
        sigma = 0.3 * ((size - 1) * 0.5 - 1) + 0.8
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def _reflect_indices(i: np.ndarray, n: int) -> np.ndarray:
    """Reflect-101 (OpenCV's default border, torch's "reflect") of indices ``i`` into
    0..n-1, bouncing as often as needed."""
    if n == 1:
        return np.zeros_like(i)
    period = 2 * (n - 1)
    i = np.abs(i) % period
    return np.where(i < n, i, period - i)


@lru_cache(maxsize=32)
def _blur_matrix(n: int, kernel_1d: tuple[float, ...]) -> torch.Tensor:
    """(n, n) float64 matrix M with ``x @ M`` = the 1-D convolution of rows x with the
    kernel, reflect-101 borders folded in."""
    k = len(kernel_1d)
    out, taps = np.meshgrid(np.arange(n), np.arange(k), indexing="ij")
    source = _reflect_indices(out + taps - k // 2, n)
    m = np.zeros((n, n))
    np.add.at(m, (source, out), np.asarray(kernel_1d)[::-1][taps])
    return torch.from_numpy(m)


def separable_blur(img: torch.Tensor, kernel_1d: torch.Tensor) -> torch.Tensor:
    """Convolve every channel with ``outer(kernel_1d, kernel_1d)``, reflect-101 borders,
    as two matrix products (``M_h^T X M_w``): CPUs and GPUs run them far faster than a
    51-tap single-channel convolution."""
    h, w = img.shape[-2:]
    taps = tuple(kernel_1d.tolist())
    m_h, m_w = _blur_matrix(h, taps).to(img), _blur_matrix(w, taps).to(img)
    return m_h.T @ img @ m_w


def usm_sharpen(img: torch.Tensor, weight: float = 0.5, radius: int = 50, threshold: float = 10) -> torch.Tensor:
    """Unsharp masking as Real-ESRGAN sharpens its GT: ``K = clip(I + weight (I - G*I))``
    where G is a Gaussian of odd size ``radius`` (+1 if even) and OpenCV's default sigma;
    applied where the residual exceeds ``threshold`` / 255, blended by the blurred mask:
    ``m K + (1 - m) I`` with ``m = G * [|I - G*I| * 255 > threshold]``."""
    size = radius + 1 if radius % 2 == 0 else radius
    kernel = opencv_gaussian_kernel(size)
    residual = img - separable_blur(img, kernel)
    mask = (residual.abs() * 255 > threshold).to(img.dtype)
    soft = separable_blur(mask, kernel)
    sharp = (img + weight * residual).clamp(0, 1)
    return soft * sharp + (1 - soft) * img


# ---------------------------------------------------------------- noise


def gaussian_noise(img: torch.Tensor, sigma: torch.Tensor, gray: torch.Tensor,
                   generator: torch.Generator) -> torch.Tensor:
    """Add N(0, sigma^2) noise, ``sigma`` (B,) on the 0..1 scale; where ``gray`` (B,) is
    true one noise plane goes to every channel. Clipped to [0, 1]."""
    b, c, h, w = img.shape
    colour = torch.randn(img.shape, generator=generator, device=img.device, dtype=img.dtype)
    mono = torch.randn((b, 1, h, w), generator=generator, device=img.device, dtype=img.dtype)
    g = gray.to(img).view(b, 1, 1, 1)
    noise = (mono * g + colour * (1 - g)) * sigma.to(img).view(b, 1, 1, 1)
    return (img + noise).clamp(0, 1)


def _luma(img: torch.Tensor) -> torch.Tensor:
    r, g, b = img.unbind(1)
    return (0.299 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


POISSON_LEVELS = 256
"""Photon-count scale of the shot noise: ``Poisson(x * 256) / 256`` for a pixel of value
``x`` in [0, 1], the 8-bit grid's number of levels."""


def _poisson_part(img: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Shot noise of the 8-bit image: ``Poisson(img * v) / v - img`` with ``v`` =
    ``POISSON_LEVELS``. Real-ESRGAN (after scikit-image's ``random_noise``) takes ``v`` =
    the image's number of distinct values rounded up to a power of two: the same 256 for
    a large photo crop, but a smooth 64 px crop has 14-18 distinct values (measured on the
    demo's photographs), so ``v`` = 16 to 32 and its noise came out 3-4x stronger; a flat
    image gets ``v`` = 1, one photon per full scale, so most of its samples clip at 1
    (a flat 0.5 came out 22 levels darker). A fixed ``v`` keeps the strength a function
    of the drawn scale and the pixel only."""
    img = (img * 255).round().clamp(0, 255) / 255
    return torch.poisson(img * POISSON_LEVELS, generator=generator) / POISSON_LEVELS - img


def poisson_noise(img: torch.Tensor, scale: torch.Tensor, gray: torch.Tensor,
                  generator: torch.Generator) -> torch.Tensor:
    """Add ``scale`` (B,) times Poisson shot noise (of the luma, to every channel, where
    ``gray`` is true). Clipped to [0, 1]."""
    b = img.shape[0]
    colour = _poisson_part(img, generator)
    mono = _poisson_part(_luma(img), generator).expand_as(img)
    g = gray.to(img).view(b, 1, 1, 1)
    noise = (mono * g + colour * (1 - g)) * scale.to(img).view(b, 1, 1, 1)
    return (img + noise).clamp(0, 1)


# ---------------------------------------------------------------- drawing


def _pick(u: float, probs) -> int:
    """The index whose cumulative-probability interval holds the uniform ``u``."""
    total = 0.0
    for i, p in enumerate(probs):
        total += p
        if u < total:
            return i
    return len(probs) - 1


def _between(u: float, low: float, high: float) -> float:
    return low + u * (high - low)


def _beta(u_side: float, u: float, low: float, high: float) -> float:
    """Real-ESRGAN's shape draw: half the time from (low, 1), half from (1, high)."""
    return _between(u, low, 1.0) if u_side < 0.5 else _between(u, 1.0, high)


def kernel_from_uniforms(u, stage: StageOptions, kernel_sizes) -> tuple[str, torch.Tensor]:
    """The blur kernel (padded to 21, float64) that 8 uniforms in [0, 1) select; returns
    its type name (``sinc`` or one of ``KERNEL_TYPES``) with it."""
    size = kernel_sizes[min(int(u[1] * len(kernel_sizes)), len(kernel_sizes) - 1)]
    if u[0] < stage.sinc_prob:
        # Real-ESRGAN: a lower cutoff only for big kernels, which can hold its ringing.
        cutoff = _between(u[2], math.pi / 3 if size < 13 else math.pi / 5, math.pi)
        return "sinc", pad_kernel(sinc_kernel(size, cutoff))
    kind = KERNEL_TYPES[_pick(u[2], stage.kernel_prob)]
    sigma_x = _between(u[3], *stage.blur_sigma)
    if kind.endswith("_iso"):
        sigma_y, theta = sigma_x, 0.0
    else:
        sigma_y, theta = _between(u[4], *stage.blur_sigma), _between(u[5], -math.pi, math.pi)
    if kind.startswith("generalized"):
        kernel = generalized_gaussian_kernel(size, sigma_x, sigma_y, theta, _beta(u[6], u[7], *stage.betag))
    elif kind.startswith("plateau"):
        kernel = plateau_kernel(size, sigma_x, sigma_y, theta, _beta(u[6], u[7], *stage.betap))
    else:
        kernel = gaussian_kernel(size, sigma_x, sigma_y, theta)
    return kind, pad_kernel(kernel)


def _uniforms(generator: torch.Generator, *shape) -> torch.Tensor:
    """Uniforms in [0, 1) from ``generator``, as float64 on the CPU (one device sync)."""
    return torch.rand(shape, generator=generator, device=generator.device, dtype=torch.float64).cpu()


def _resize_batch(img: torch.Tensor, u: torch.Tensor, stage: StageOptions, base: tuple[float, float]) -> torch.Tensor:
    """Resize to ``base`` times a factor drawn per batch (up/down/keep), with a drawn mode."""
    direction = _pick(float(u[0]), stage.resize_prob)
    low, high = stage.resize_range
    factor = (_between(float(u[1]), 1.0, high), _between(float(u[1]), low, 1.0), 1.0)[direction]
    mode = RESIZE_MODES[min(int(float(u[2]) * 3), 2)]
    size = (max(1, int(base[0] * factor)), max(1, int(base[1] * factor)))
    return F.interpolate(img, size=size, mode=mode)


def _jpeg_batch(img: torch.Tensor, generator: torch.Generator, quality_range) -> torch.Tensor:
    low, high = quality_range
    q = torch.randint(low, high + 1, (img.shape[0],), generator=generator, device=generator.device)
    return jpeg_torch.jpeg(img.clamp(0, 1), q.to(img.device))


def _noise_batch(img: torch.Tensor, generator: torch.Generator, stage: StageOptions) -> torch.Tensor:
    b = img.shape[0]
    u = _uniforms(generator, 1 + 2 * b)
    strength, gray = u[1:1 + b], u[1 + b:] < stage.gray_noise_prob
    if float(u[0]) < stage.gaussian_noise_prob:
        sigma = (stage.noise_range[0] + strength * (stage.noise_range[1] - stage.noise_range[0])) / 255
        return gaussian_noise(img, sigma.to(img.device), gray.to(img.device), generator)
    low, high = stage.poisson_scale_range
    return poisson_noise(img, (low + strength * (high - low)).to(img.device), gray.to(img.device), generator)


# ---------------------------------------------------------------- the pipeline


class RealDegradation:
    """``RealDegradation(options)(gt, generator)`` -> ``(lr, gt_sharp)``: the degraded LR
    batch (on the 8-bit grid) of a GT batch (B, 3, H, W) in [0, 1], H and W multiples of
    ``options.scale``, and the GT for the pixel/perceptual losses (sharpened if
    ``options.usm_gt``). No gradients flow; ``generator`` lives on ``gt``'s device."""

    def __init__(self, options: RealDegradationOptions | None = None):
        self.options = options or RealDegradationOptions()

    def kernels(self, generator: torch.Generator, batch: int, stage: StageOptions) -> tuple[list[str], torch.Tensor]:
        """``batch`` kernels of one pass: their type names and (batch, 21, 21) float64."""
        u = _uniforms(generator, batch, 8).tolist()
        drawn = [kernel_from_uniforms(row, stage, self.options.kernel_sizes) for row in u]
        return [kind for kind, _ in drawn], torch.stack([k for _, k in drawn])

    def final_sinc_kernels(self, generator: torch.Generator, batch: int) -> torch.Tensor:
        u = _uniforms(generator, batch, 3).tolist()
        identity = torch.zeros(KERNEL_PAD_SIZE, KERNEL_PAD_SIZE, dtype=torch.float64)
        identity[KERNEL_PAD_SIZE // 2, KERNEL_PAD_SIZE // 2] = 1
        sizes = self.options.kernel_sizes
        out = []
        for u_apply, u_size, u_cut in u:
            if u_apply < self.options.final_sinc_prob:
                size = sizes[min(int(u_size * len(sizes)), len(sizes) - 1)]
                out.append(pad_kernel(sinc_kernel(size, _between(u_cut, math.pi / 3, math.pi))))
            else:
                out.append(identity)
        return torch.stack(out)

    @torch.no_grad()
    def __call__(self, gt: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        opts = self.options
        b, _, h, w = gt.shape
        if h % opts.scale or w % opts.scale:
            raise ValueError(f"degradation: GT {w}x{h} is not a multiple of scale {opts.scale}")
        gt_sharp = usm_sharpen(gt) if opts.usm_gt else gt
        # Draw every kernel first: the stream of draws does not depend on image content.
        _, kernel1 = self.kernels(generator, b, opts.first)
        _, kernel2 = self.kernels(generator, b, opts.second)
        sinc = self.final_sinc_kernels(generator, b)
        u = _uniforms(generator, 9)

        out = filter2d(gt_sharp, kernel1)
        out = _resize_batch(out, u[0:3], opts.first, (h, w))
        out = _noise_batch(out, generator, opts.first)
        out = _jpeg_batch(out, generator, opts.first.jpeg_range)

        if float(u[3]) < opts.second.blur_prob:
            out = filter2d(out, kernel2)
        out = _resize_batch(out, u[4:7], opts.second, (h / opts.scale, w / opts.scale))
        out = _noise_batch(out, generator, opts.second)

        mode = RESIZE_MODES[min(int(float(u[8]) * 3), 2)]
        lr_size = (h // opts.scale, w // opts.scale)
        if float(u[7]) < 0.5:
            out = filter2d(F.interpolate(out, size=lr_size, mode=mode), sinc)
            out = _jpeg_batch(out, generator, opts.second.jpeg_range)
        else:
            out = _jpeg_batch(out, generator, opts.second.jpeg_range)
            out = filter2d(F.interpolate(out, size=lr_size, mode=mode), sinc)
        lr = (out * 255).round().clamp(0, 255) / 255
        return lr, gt_sharp
