"""The options of Real-ESRGAN's second-order degradation (``sr_core.realdegrade``) and
their checks, apart from the code that draws and applies it: what a training config
reads, without importing torch (``sr --help`` lists the training presets)."""

from __future__ import annotations

from dataclasses import dataclass, fields

KERNEL_TYPES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")
RESIZE_MODES = ("area", "bilinear", "bicubic")
KERNEL_PAD_SIZE = 21
"""Every blur kernel is zero-padded to this size, so a batch shares one kernel shape."""


# ---------------------------------------------------------------- options


@dataclass(frozen=True)
class StageOptions:
    """One blur -> resize -> noise -> JPEG pass."""

    blur_prob: float = 1.0
    """Probability (per batch) that this pass blurs at all."""
    kernel_prob: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    """Probabilities of the kernel types, in the order of ``KERNEL_TYPES`` (iso, aniso,
    generalized_iso, generalized_aniso, plateau_iso, plateau_aniso)."""
    sinc_prob: float = 0.1
    """Probability of a sinc filter instead of a Gaussian-family kernel."""
    blur_sigma: tuple[float, float] = (0.2, 3.0)
    """Kernel sigma range in pixels (each axis for anisotropic kernels)."""
    betag: tuple[float, float] = (0.5, 4.0)
    """Shape range of generalized Gaussians (half the draws below 1, half above)."""
    betap: tuple[float, float] = (1.0, 2.0)
    """Shape range of plateau kernels."""
    resize_prob: tuple[float, float, float] = (0.2, 0.7, 0.1)
    """Probabilities of resizing up, down, or keeping the size."""
    resize_range: tuple[float, float] = (0.15, 1.5)
    """Scale range: up draws from (1, max), down from (min, 1)."""
    gaussian_noise_prob: float = 0.5
    """Probability of Gaussian noise (otherwise Poisson)."""
    noise_range: tuple[float, float] = (1.0, 30.0)
    """Gaussian noise sigma on the 0..255 scale."""
    poisson_scale_range: tuple[float, float] = (0.05, 3.0)
    """Multiplier of the Poisson noise."""
    gray_noise_prob: float = 0.4
    """Probability that the noise is the same in every channel."""
    jpeg_range: tuple[int, int] = (30, 95)
    """JPEG quality range (integers, inclusive)."""


SECOND_STAGE = StageOptions(blur_prob=0.8, blur_sigma=(0.2, 1.5), resize_prob=(0.3, 0.4, 0.3),
                            resize_range=(0.3, 1.2), noise_range=(1.0, 25.0), poisson_scale_range=(0.05, 2.5))


@dataclass(frozen=True)
class RealDegradationOptions:
    """The whole second-order model; the defaults are Real-ESRGAN x4plus's."""

    scale: int = 4
    """The LR is the GT's size divided by this."""
    first: StageOptions = StageOptions()
    """The first pass (applied to the sharpened GT)."""
    second: StageOptions = SECOND_STAGE
    """The second pass (the resize goes to ``scale`` times the drawn factor)."""
    kernel_sizes: tuple[int, ...] = (7, 9, 11, 13, 15, 17, 19, 21)
    """Odd kernel sizes, drawn uniformly (every kernel is padded to 21)."""
    final_sinc_prob: float = 0.8
    """Probability (per sample) of the final sinc filter (otherwise the identity)."""
    usm_gt: bool = True
    """Sharpen the GT for the pixel and perceptual losses (not for the discriminator)."""

    def __post_init__(self):
        check_options(self)


def _check_range(name: str, value, low: float, high: float) -> None:
    if len(value) != 2 or not low <= value[0] <= value[1] <= high:
        raise ValueError(f"degradation {name}: expected (min, max) with {low} <= min <= max <= {high}, got {value!r}")


def _check_probs(name: str, value, count: int) -> None:
    if len(value) != count or any(p < 0 for p in value) or abs(sum(value) - 1) > 1e-6:
        raise ValueError(f"degradation {name}: expected {count} probabilities summing to 1, got {value!r}")


def check_options(options: RealDegradationOptions) -> None:
    """A ValueError naming the field for any value out of its domain."""
    if options.scale < 1:
        raise ValueError(f"degradation scale must be >= 1, got {options.scale}")
    if not options.kernel_sizes or any(k % 2 == 0 or not 3 <= k <= KERNEL_PAD_SIZE for k in options.kernel_sizes):
        raise ValueError(f"degradation kernel_sizes: odd sizes in 3..{KERNEL_PAD_SIZE}, got {options.kernel_sizes!r}")
    if not 0 <= options.final_sinc_prob <= 1:
        raise ValueError(f"degradation final_sinc_prob must be in [0, 1], got {options.final_sinc_prob}")
    for stage_name in ("first", "second"):
        stage = getattr(options, stage_name)
        for f in fields(StageOptions):
            value, name = getattr(stage, f.name), f"{stage_name}.{f.name}"
            if f.name.endswith("_prob") and f.name not in ("kernel_prob", "resize_prob"):
                if not 0 <= value <= 1:
                    raise ValueError(f"degradation {name} must be in [0, 1], got {value}")
        _check_probs(f"{stage_name}.kernel_prob", stage.kernel_prob, len(KERNEL_TYPES))
        _check_probs(f"{stage_name}.resize_prob", stage.resize_prob, 3)
        _check_range(f"{stage_name}.blur_sigma", stage.blur_sigma, 1e-3, 50)
        _check_range(f"{stage_name}.betag", stage.betag, 1e-3, 1.0e3)
        _check_range(f"{stage_name}.betap", stage.betap, 1e-3, 1.0e3)
        _check_range(f"{stage_name}.resize_range", stage.resize_range, 1e-2, 1e2)
        _check_range(f"{stage_name}.noise_range", stage.noise_range, 0, 255)
        _check_range(f"{stage_name}.poisson_scale_range", stage.poisson_scale_range, 0, 100)
        _check_range(f"{stage_name}.jpeg_range", stage.jpeg_range, 1, 100)
