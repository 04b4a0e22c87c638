"""Optional degradations of low-resolution training images (JPEG, noise, blur, dropout).

The published ESRGAN setting trains on plain bicubic LR; these let a model learn to
undo what real inputs carry (compression, sensor noise, softness, damaged regions).
They act on the LR image only, so the HR target stays clean.

Every function takes and returns a uint8 image, HW or HWC, and draws all its randomness
from the ``numpy.random.Generator`` it is given, so a seeded generator reproduces the
result exactly (a data loader can seed per sample). Ranges are inclusive and sampled
uniformly (integers for quality, hole counts and sizes).
"""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields

import numpy as np
from PIL import Image

from sr_core.resize import imresize


def _check_image(img: np.ndarray, what: str) -> None:
    if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim not in (2, 3):
        shape = getattr(img, "shape", None)
        dtype = getattr(img, "dtype", type(img).__name__)
        raise ValueError(f"{what}: expected a uint8 image HW or HWC, got {dtype} with shape {shape}")


def _check_range(value: tuple, what: str, low: float, high: float | None = None) -> tuple:
    if len(value) != 2 or value[0] > value[1] or value[0] < low or (high is not None and value[1] > high):
        bound = f"within [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{what} must be (min, max) with min <= max, {bound}; got {value!r}")
    return value


def jpeg(img: np.ndarray, quality_range: tuple[int, int] = (30, 95), *, rng: np.random.Generator) -> np.ndarray:
    """Encode to JPEG at a random quality and decode (Pillow, default 4:2:0 chroma)."""
    _check_image(img, "jpeg")
    low, high = _check_range(quality_range, "jpeg quality_range", 1, 100)
    quality = int(rng.integers(low, high + 1))
    channels = 1 if img.ndim == 2 else img.shape[2]
    if channels not in (1, 3):
        raise ValueError(f"jpeg: JPEG holds gray or RGB images, got {channels} channels")
    plane = img if img.ndim == 2 else (img[..., 0] if channels == 1 else img)
    buffer = io.BytesIO()
    Image.fromarray(plane).save(buffer, format="JPEG", quality=quality)
    decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())))
    return decoded.reshape(img.shape)


def gaussian_noise(
    img: np.ndarray,
    sigma_range: tuple[float, float] = (1, 30),
    *,
    rng: np.random.Generator,
    gray_prob: float = 0.4,
) -> np.ndarray:
    """Add Gaussian noise with a random sigma (on the 0..255 scale), rounded and clipped.

    With probability ``gray_prob`` the same noise goes to every channel (luminance
    noise, as Real-ESRGAN does); otherwise each channel gets its own (colour noise).
    """
    _check_image(img, "gaussian_noise")
    low, high = _check_range(sigma_range, "gaussian_noise sigma_range", 0)
    if not 0 <= gray_prob <= 1:
        raise ValueError(f"gaussian_noise gray_prob must be in [0, 1], got {gray_prob}")
    sigma = rng.uniform(low, high)
    gray = rng.random() < gray_prob
    noise_shape = img.shape[:2] + (1,) if (gray and img.ndim == 3) else img.shape
    noise = rng.normal(0.0, sigma, noise_shape)
    return np.clip(np.round(img + noise), 0, 255).astype(np.uint8)


def gaussian_kernel_1d(sigma: float, kernel_size: int) -> np.ndarray:
    offsets = np.arange(kernel_size) - (kernel_size - 1) / 2
    kernel = np.exp(-(offsets**2) / (2 * sigma * sigma))
    return kernel / kernel.sum()


def gaussian_blur(
    img: np.ndarray,
    sigma_range: tuple[float, float] = (0.2, 3.0),
    *,
    rng: np.random.Generator,
    kernel_size: int | None = None,
) -> np.ndarray:
    """Isotropic Gaussian blur with a random sigma (pixels), reflect padding.

    ``kernel_size`` (odd) defaults to ``2 * ceil(3 * sigma) + 1``, which keeps >99.7%
    of the kernel's mass.
    """
    _check_image(img, "gaussian_blur")
    low, high = _check_range(sigma_range, "gaussian_blur sigma_range", 0)
    if low <= 0:
        raise ValueError(f"gaussian_blur sigma_range must be positive, got {sigma_range!r}")
    if kernel_size is not None and (kernel_size < 1 or kernel_size % 2 == 0):
        raise ValueError(f"gaussian_blur kernel_size must be a positive odd number, got {kernel_size}")
    sigma = rng.uniform(low, high)
    size = kernel_size if kernel_size is not None else 2 * math.ceil(3 * sigma) + 1
    kernel = gaussian_kernel_1d(sigma, size)
    radius = size // 2
    out = img.astype(np.float32)
    for axis in (0, 1):
        length = out.shape[axis]
        pad = [(0, 0)] * out.ndim
        pad[axis] = (radius, radius)
        # "reflect" needs radius < length; "symmetric" covers tiny crops as well.
        padded = np.pad(out, pad, mode="reflect" if radius < length else "symmetric")
        acc = np.zeros_like(out)
        for tap, weight in enumerate(kernel):
            window = [slice(None)] * out.ndim
            window[axis] = slice(tap, tap + length)
            acc += weight * padded[tuple(window)]
        out = acc
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def coarse_dropout(
    img: np.ndarray,
    num_holes_range: tuple[int, int] = (1, 4),
    hole_size_range: tuple[int, int] = (2, 8),
    *,
    rng: np.random.Generator,
    fill: int = 0,
) -> np.ndarray:
    """Fill a random number of random rectangles (sides in pixels) with ``fill``."""
    _check_image(img, "coarse_dropout")
    low_holes, high_holes = _check_range(num_holes_range, "coarse_dropout num_holes_range", 0)
    low_size, high_size = _check_range(hole_size_range, "coarse_dropout hole_size_range", 1)
    if not 0 <= fill <= 255:
        raise ValueError(f"coarse_dropout fill must be a uint8 value 0..255, got {fill}")
    out = img.copy()
    h, w = img.shape[:2]
    for _ in range(int(rng.integers(low_holes, high_holes + 1))):
        hole_h = min(int(rng.integers(low_size, high_size + 1)), h)
        hole_w = min(int(rng.integers(low_size, high_size + 1)), w)
        top = int(rng.integers(0, h - hole_h + 1))
        left = int(rng.integers(0, w - hole_w + 1))
        out[top : top + hole_h, left : left + hole_w] = fill
    return out


# The fields of DegradationConfig that are probabilities (the names a plain dict uses).
PROBABILITY_FIELDS = ("gaussian_blur", "gaussian_noise", "coarse_dropout", "jpeg")


@dataclass
class DegradationConfig:
    """Probabilities and parameters of the LR degradations, applied in a fixed order:
    blur, noise, dropout, JPEG (a camera blurs and adds noise; damage happens to the
    image; compression comes last, when it is saved)."""

    gaussian_blur: float = 0.0
    """Probability of a Gaussian blur."""

    gaussian_noise: float = 0.0
    """Probability of additive Gaussian noise."""

    coarse_dropout: float = 0.0
    """Probability of filling random rectangles."""

    jpeg: float = 0.0
    """Probability of a JPEG round trip."""

    blur_sigma_range: tuple[float, float] = (0.2, 3.0)
    """Blur sigma in LR pixels, sampled uniformly."""

    noise_sigma_range: tuple[float, float] = (1.0, 30.0)
    """Noise sigma on the 0..255 scale, sampled uniformly."""

    noise_gray_prob: float = 0.4
    """Probability that the noise is the same in every channel."""

    dropout_num_holes_range: tuple[int, int] = (1, 4)
    """Number of rectangles."""

    dropout_hole_size_range: tuple[int, int] = (2, 8)
    """Rectangle side lengths in LR pixels."""

    dropout_fill: int = 0
    """Value written into the rectangles."""

    jpeg_quality_range: tuple[int, int] = (30, 95)
    """JPEG quality, sampled uniformly."""

    def __post_init__(self):
        for name in PROBABILITY_FIELDS:
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 <= value <= 1):
                raise ValueError(f"degradations: probability {name}={value!r} must be in [0, 1]")


def degradation_config(spec: DegradationConfig | Mapping[str, float]) -> DegradationConfig:
    """A ``DegradationConfig`` from itself or from a dict of its fields (typically just
    the probabilities, e.g. ``{"jpeg": 0.5, "gaussian_noise": 0.3}``)."""
    if isinstance(spec, DegradationConfig):
        return spec
    if not isinstance(spec, Mapping):
        raise ValueError(f"degradations: expected a dict or DegradationConfig, got {type(spec).__name__}")
    known = {f.name for f in fields(DegradationConfig)}
    unknown = sorted(set(spec) - known)
    if unknown:
        raise ValueError(f"degradations: unknown key(s) {unknown}; known: {', '.join(sorted(known))}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()}
    return DegradationConfig(**values)


def apply_degradations(
    img: np.ndarray, config: DegradationConfig | Mapping[str, float], rng: np.random.Generator
) -> np.ndarray:
    """Apply each degradation with its probability, in the order documented on
    ``DegradationConfig``."""
    cfg = degradation_config(config)
    _check_image(img, "apply_degradations")
    if rng.random() < cfg.gaussian_blur:
        img = gaussian_blur(img, cfg.blur_sigma_range, rng=rng)
    if rng.random() < cfg.gaussian_noise:
        img = gaussian_noise(img, cfg.noise_sigma_range, rng=rng, gray_prob=cfg.noise_gray_prob)
    if rng.random() < cfg.coarse_dropout:
        img = coarse_dropout(img, cfg.dropout_num_holes_range, cfg.dropout_hole_size_range, rng=rng, fill=cfg.dropout_fill)
    if rng.random() < cfg.jpeg:
        img = jpeg(img, cfg.jpeg_quality_range, rng=rng)
    return img


# ---------------------------------------------------------------- a fixed chain for evaluation

EVAL_CHAIN_ORDER = ("blur", "noise", "jpeg")


@dataclass(frozen=True)
class EvalDegradation:
    """A fixed degradation of evaluation images, always in this order: the HR image is
    blurred (isotropic Gaussian, ``blur`` = sigma in HR pixels, kernel ``2 ceil(3 sigma) +
    1``, reflect padding), downscaled with MATLAB bicubic, given Gaussian noise (``noise``
    = sigma on the 0..255 scale, independent per channel, rounded and clipped) and saved
    as a Pillow JPEG (``jpeg`` = quality, 4:2:0). A step whose value is 0 is left out.
    The noise of an image is drawn from a generator seeded by the SHA-256 of its name, so
    every run degrades an image the same way."""

    blur: float = 0.0
    noise: float = 0.0
    jpeg: int = 0

    def describe(self) -> str:
        steps = [f"Gaussian blur sigma {self.blur:g} px (HR)"] if self.blur else []
        steps.append("MATLAB bicubic downscale")
        if self.noise:
            steps.append(f"Gaussian noise sigma {self.noise:g}/255")
        if self.jpeg:
            steps.append(f"JPEG quality {self.jpeg} (Pillow, 4:2:0)")
        return " -> ".join(steps)

    def make_lr(self, hr: np.ndarray, scale: int, name: str) -> np.ndarray:
        """The degraded LR of a uint8 HR image (HW or HWC) cropped to a multiple of ``scale``."""
        rng = np.random.default_rng(list(hashlib.sha256(name.encode("utf-8", "surrogateescape")).digest()[:16]))
        img = gaussian_blur(hr, (self.blur, self.blur), rng=rng) if self.blur else hr
        lr = imresize(img, scale=1 / scale)
        if self.noise:
            lr = gaussian_noise(lr, (self.noise, self.noise), rng=rng, gray_prob=0.0)
        if self.jpeg:
            lr = jpeg(lr, (self.jpeg, self.jpeg), rng=rng)
        return lr


def parse_eval_degradation(spec: str) -> EvalDegradation:
    """``"blur=1.2,noise=5,jpeg=60"`` -> :class:`EvalDegradation` (any subset, any order)."""
    values: dict[str, float] = {}
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        key, sep, raw = part.partition("=")
        key = key.strip()
        if not sep or key not in EVAL_CHAIN_ORDER:
            raise ValueError(f"--degrade {spec!r}: {part!r} is not one of blur=SIGMA, noise=SIGMA, jpeg=QUALITY "
                             "(e.g. --degrade blur=1.2,noise=5,jpeg=60)")
        if key in values:
            raise ValueError(f"--degrade {spec!r}: {key} is given twice")
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"--degrade {spec!r}: {key}={raw!r} is not a number") from None
        values[key] = value
    if not values:
        raise ValueError("--degrade: empty; e.g. --degrade blur=1.2,noise=5,jpeg=60")
    if not 0 <= values.get("blur", 0) <= 20 or not 0 <= values.get("noise", 0) <= 255:
        raise ValueError(f"--degrade {spec!r}: blur must be in [0, 20] px and noise in [0, 255]")
    quality = values.get("jpeg", 0)
    if quality != int(quality) or not (quality == 0 or 1 <= quality <= 100):
        raise ValueError(f"--degrade {spec!r}: jpeg must be an integer quality 1..100")
    return EvalDegradation(blur=values.get("blur", 0.0), noise=values.get("noise", 0.0), jpeg=int(quality))
