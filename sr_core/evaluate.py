"""Scoring models and interpolation baselines on sets of HR images the way SR papers do.

Protocol (the one behind published tables; ESRGAN paper: bicubic x4 on Set5 = 28.42 dB
PSNR-Y):

- each HR image is cropped bottom/right to a multiple of the scale and downscaled with
  MATLAB-bicubic ``imresize`` to make the LR input — unless the set comes with its own
  LR images (a paired layout such as DIV2K's ``DIV2K_valid_LR_bicubic/X4``), which are
  then used as they are, the HR image cropped to LR size x scale;
- every method (baseline or model) upscales the same LR image;
- PSNR, SSIM and MSE are measured on the Y channel (MATLAB BT.601) or RGB, with
  ``crop_border`` pixels (default: the scale) dropped at each edge, in float64
  (``sr_core.metrics``); gray images are their own luminance.

The baselines, precisely:

- ``bicubic``: MATLAB's ``imresize(lr, scale, 'bicubic')`` as ``sr_core.resize`` computes
  it (Keys cubic a = -0.5, pixel centres aligned, symmetric padding, rounded once to 8
  bits), the papers' convention;
- ``nearest``, ``bilinear``, ``lanczos``: Pillow's ``Image.resize`` with the NEAREST,
  BILINEAR (triangle, support 1) and LANCZOS (Lanczos a = 3) filters on the 8-bit image.
  Pillow aligns pixel centres, renormalizes the kernel where it runs past the edge, and
  resamples horizontally then vertically, rounding to 8 bits (half up) after each pass;
  at an integer scale ``nearest`` repeats every LR pixel scale x scale times.

A model is run through ``Upscaler`` (tiling, padding, 8-bit output). A multi-head model
gives one method per head and one for the mean of its heads. Images are read through
``sr_core.codecs`` and sets listed through ``sr_core.storage``; nothing here writes
(the ``sr eval`` command writes the reports).
"""

from __future__ import annotations

import math
import posixpath
import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from PIL import Image

from sr_core import metrics, storage
from sr_core.archs.multihead_rrdbnet import MEAN_OF_HEADS, MultiHeadRRDBNet
from sr_core.codecs import INPUT_EXTENSIONS, read_image, to_rgb8
from sr_core.datasets import hr_key, read_list
from sr_core.degradations import EvalDegradation
from sr_core.errors import short_reason, strip_url
from sr_core.resize import imresize, mod_crop
from sr_core.upscaler import Upscaler

Upscale = Callable[[np.ndarray], np.ndarray]

# Canonical order of the baselines in tables and figures (coarsest first).
BASELINE_NAMES = ("nearest", "bilinear", "bicubic", "lanczos")
BASELINE_DEFINITIONS = {
    "nearest": "Pillow Image.resize NEAREST (each LR pixel repeated scale x scale times)",
    "bilinear": "Pillow Image.resize BILINEAR (triangle filter, 8-bit rounding after each of its two passes)",
    "bicubic": "MATLAB imresize bicubic (sr_core.resize), the papers' convention",
    "lanczos": "Pillow Image.resize LANCZOS (Lanczos a=3, 8-bit rounding after each of its two passes)",
}
# The method every gain is measured against (and figures are chosen by).
REFERENCE = "bicubic"
# Metrics in table order; True where larger is better.
METRICS = {"psnr": True, "ssim": True, "mse": False, "lpips": False}
# Upscaled images kept in memory per set for the figures; images beyond this budget are
# upscaled again when their figure is drawn.
KEEP_OUTPUT_BYTES = 256 * 2**20
HIDDEN_REASON = "hidden file (its name starts with '.'); not scored — rename it to score it"
LIST_SUFFIX = ".txt"


# ---------------------------------------------------------------- methods


@dataclass
class Method:
    """One row of the comparison: a name and a function from an LR array (uint8, HW or
    HWC) to the upscaled array of the same kind."""

    name: str
    kind: str
    """``baseline`` or ``model``."""
    upscale: Upscale
    definition: str
    """What the method is, for the report."""
    primary: bool = False
    """For models: the row the model file's own settings give (a multi-head model has
    one per head and one for the head mean; its saved ``output_head`` is primary)."""


def bicubic_upscaler(scale: int) -> Upscale:
    return lambda lr: imresize(lr, scale=scale)


def pillow_upscaler(resample: int, scale: int) -> Upscale:
    def run(lr: np.ndarray) -> np.ndarray:
        h, w = lr.shape[:2]
        return np.asarray(Image.fromarray(lr).resize((w * scale, h * scale), resample))

    return run


def baseline(name: str, scale: int) -> Method:
    """The baseline ``name`` (see the module docstring) at an integer ``scale``."""
    if name not in BASELINE_NAMES:
        raise ValueError(f"unknown baseline {name!r}; choose from {', '.join(BASELINE_NAMES)}")
    if name == "bicubic":
        upscale = bicubic_upscaler(scale)
    else:
        filters = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
                   "lanczos": Image.Resampling.LANCZOS}
        upscale = pillow_upscaler(filters[name], scale)
    return Method(name, "baseline", upscale, BASELINE_DEFINITIONS[name])


def model_methods(model, name: str, scale: int, device: str = "auto", tile: int | None = None) -> list[Method]:
    """The rows for one generator (an ``nn.Module`` with an integer ``scale``): one, or
    for a multi-head model one per head plus the head mean. A model whose own scale is
    not ``scale`` is followed by MATLAB bicubic to ``scale``, as ``sr upscale --outscale``."""
    up = Upscaler(model, device=device, tile=tile)
    outscale = None if up.scale == scale else scale
    resized = "" if outscale is None else f", then MATLAB bicubic x{scale / up.scale:g}"
    what = f"{getattr(model, 'arch_name', type(model).__name__)} x{up.scale}{resized}"
    if not isinstance(model, MultiHeadRRDBNet):
        return [Method(name, "model", lambda lr: up(lr, outscale=outscale), what, primary=True)]
    saved = model.output_head
    methods = []
    for head in [*range(len(model.heads)), MEAN_OF_HEADS]:
        def run(lr: np.ndarray, head: int = head) -> np.ndarray:
            # The one Upscaler runs whichever head is selected; runs are sequential.
            model.select_head(head)
            return up(lr, outscale=outscale)

        label = "head mean" if head == MEAN_OF_HEADS else f"head {head}"
        definition = f"{what}, the mean of its {len(model.heads)} heads' outputs" if head == MEAN_OF_HEADS else (
            f"{what}, head {head} alone")
        methods.append(Method(f"{name} ({label})", "model", run, definition, primary=head == saved))
    return methods


# ---------------------------------------------------------------- sets


@dataclass
class SetItem:
    name: str
    """Path relative to the set (what tables and JSON show)."""
    hr: str
    lr: str | None = None
    """The set's own LR image for it (paired layouts), else None: made by MATLAB bicubic."""


@dataclass
class ImageSet:
    name: str
    source: str
    lr_source: str | None = None
    items: list[SetItem] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)
    """(name, reason) of inputs refused while listing."""
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """(name, reason) of files deliberately left out (hidden files; named pipes, sockets
    and devices, which are never opened)."""


def _folder_files(root: str, kind: str, image_set: ImageSet) -> list[tuple[str, str]]:
    """(relative name, URL) of the images below a folder or prefix; hidden and
    non-regular files and links out of the folder are recorded on ``image_set``."""
    hidden: list[str] = []
    special: list[tuple[str, str]] = []
    urls = storage.list_files(root, suffixes=INPUT_EXTENSIONS, hidden=hidden, special=special)
    for url in hidden:
        image_set.skipped.append((_relative(root, url), f"{kind}{HIDDEN_REASON}"))
    for url, reason in special:
        image_set.skipped.append((_relative(root, url), f"{kind}{reason}"))
    files = []
    for url in urls:
        name = _relative(root, url)
        if target := storage.link_out_of(root, url):
            image_set.failures.append((name, f"{kind}a symbolic link to {target}, outside the folder {root}; "
                                             "not followed (copy the file into the folder)"))
            continue
        files.append((name, url))
    return files


def _relative(root: str, url: str) -> str:
    try:
        return storage.relative_key(root, url)
    except ValueError:
        return url


def set_name(source: str) -> str:
    """A set's display name: the folder's, list's (without .txt) or image's base name."""
    base = posixpath.basename(source.rstrip("/")) or source
    return base[: -len(LIST_SUFFIX)] if base.lower().endswith(LIST_SUFFIX) else base


def list_set(source: str, lr_source: str | None = None, scale: int | None = None) -> ImageSet:
    """The images of one set: a folder or prefix (recursive), one image, or a ``.txt``
    file listing images (one path or URL per line). With ``lr_source`` (a folder of LR
    images), each HR image is paired with the LR image of the same relative path and
    stem, DIV2K's ``0801x4.png`` naming included. Raises FileNotFoundError / ValueError
    for a set that cannot be listed or holds no images."""
    image_set = ImageSet(set_name(source), source, lr_source)
    fs, path = storage.get_fs(source)
    if not fs.exists(path):
        raise FileNotFoundError(f"{source}: no such folder, prefix or file")
    if fs.isdir(path):
        files = _folder_files(source, "", image_set)
    elif source.lower().endswith(LIST_SUFFIX):
        files = read_list(source)
    else:
        files = [(posixpath.basename(path), source)]
    if not files and not image_set.failures:
        hidden = f" ({len(image_set.skipped)} hidden or non-regular file(s) skipped)" if image_set.skipped else ""
        raise ValueError(f"{source}: no images ({', '.join(INPUT_EXTENSIONS)}) in this set{hidden}")
    lr_index = _lr_index(lr_source, scale, image_set) if lr_source is not None else None
    for name, url in files:
        if lr_index is None:
            image_set.items.append(SetItem(name, url))
            continue
        key = hr_key(name, scale)
        if key not in lr_index:
            stem = posixpath.splitext(name)[0]
            image_set.failures.append((name, f"no LR image for it in {lr_source} (looked for {stem}.* and "
                                             f"{stem}x{scale}.*)"))
            continue
        image_set.items.append(SetItem(name, url, lr_index[key]))
    return image_set


def _lr_index(lr_source: str, scale: int | None, image_set: ImageSet) -> dict[str, str]:
    fs, path = storage.get_fs(lr_source)
    if not fs.exists(path) or not fs.isdir(path):
        raise FileNotFoundError(f"{lr_source}: no such LR folder or prefix")
    index: dict[str, str] = {}
    for name, url in _folder_files(lr_source, "LR: ", image_set):
        index.setdefault(hr_key(name, scale), url)
    return index


# ---------------------------------------------------------------- scoring


@dataclass
class Score:
    psnr: float
    """dB; ``inf`` where the output equals HR."""
    ssim: float
    mse: float
    lpips: float | None = None


@dataclass
class ImageResult:
    name: str
    width: int
    height: int
    scores: dict[str, Score]


@dataclass
class SetResult:
    image_set: ImageSet
    images: list[ImageResult] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)
    kept: dict[str, tuple[np.ndarray, dict[str, np.ndarray]]] = field(default_factory=dict)
    """name -> (HR, outputs per method) for images kept in memory for the figures."""
    warnings: list[tuple[str, str]] = field(default_factory=list)
    """(name, message) of decoder warnings (a corrupt EXIF block...) on images still scored."""

    @property
    def all_failures(self) -> list[tuple[str, str]]:
        return self.image_set.failures + self.failures


def make_pair(hr: np.ndarray, lr: np.ndarray | None, scale: int, degrade: EvalDegradation | None = None,
              name: str = "") -> tuple[np.ndarray, np.ndarray]:
    """(HR cropped to the scored size, LR input), both uint8 HW (gray) or HWC (colour).
    With ``degrade`` (and no LR of the set's own) the LR is made by that fixed chain,
    seeded by the image's ``name``."""
    hr = to_rgb8(hr, keep_gray=True)
    if lr is None:
        hr = mod_crop(hr, scale)
        if min(hr.shape[:2]) < scale:
            raise ValueError(f"{hr.shape[1]}x{hr.shape[0]} is too small to score at x{scale}")
        return hr, (degrade.make_lr(hr, scale, name) if degrade else imresize(hr, scale=1 / scale))
    lr = to_rgb8(lr, keep_gray=True)
    if lr.ndim != hr.ndim:  # one gray, one colour: compare in colour
        hr, lr = to_rgb8(hr), to_rgb8(lr)
    want_h, want_w = lr.shape[0] * scale, lr.shape[1] * scale
    # The HR image may be up to scale - 1 pixels larger (cropped to a multiple of the scale).
    if not (want_h <= hr.shape[0] < want_h + scale and want_w <= hr.shape[1] < want_w + scale):
        raise ValueError(f"its LR image is {lr.shape[1]}x{lr.shape[0]}, which at x{scale} needs an HR image of "
                         f"{want_w}x{want_h} (or up to {scale - 1} pixels more), but the HR image is "
                         f"{hr.shape[1]}x{hr.shape[0]}; is the LR folder for another scale?")
    return hr[:want_h, :want_w], lr


def score(sr: np.ndarray, hr: np.ndarray, crop_border: int, y_channel: bool,
          lpips: Callable[[np.ndarray, np.ndarray], float] | None = None) -> Score:
    # The Y channel only exists for colour images; gray images are their own luminance.
    use_y = y_channel and hr.ndim == 3
    return Score(
        psnr=metrics.psnr(sr, hr, crop_border=crop_border, y_channel=use_y),
        ssim=metrics.ssim(sr, hr, crop_border=crop_border, y_channel=use_y),
        mse=metrics.mse(sr, hr, crop_border=crop_border, y_channel=use_y),
        lpips=None if lpips is None else lpips(_crop(sr, crop_border), _crop(hr, crop_border)),
    )


def _crop(image: np.ndarray, border: int) -> np.ndarray:
    return image[border:-border, border:-border] if border else image


def _upscale(method: Method, lr: np.ndarray, hr: np.ndarray) -> np.ndarray:
    sr = method.upscale(lr)
    if sr.shape != hr.shape:
        raise ValueError(f"{method.name} gave an output of shape {sr.shape}, the HR image is {hr.shape}; wrong scale?")
    return sr


def read_pair(item: SetItem, scale: int, degrade: EvalDegradation | None = None) -> tuple[np.ndarray, np.ndarray]:
    return make_pair(read_image(item.hr), read_image(item.lr) if item.lr else None, scale, degrade, item.name)


def run_methods(item: SetItem, methods: list[Method], scale: int,
                degrade: EvalDegradation | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(HR as scored, each method's output) for one image."""
    hr, lr = read_pair(item, scale, degrade)
    return hr, {method.name: _upscale(method, lr, hr) for method in methods}


def evaluate_set(image_set: ImageSet, methods: list[Method], scale: int, crop_border: int | None = None,
                 y_channel: bool = True, lpips: Callable[[np.ndarray, np.ndarray], float] | None = None,
                 on_method: Callable[[], None] | None = None, keep_bytes: int = KEEP_OUTPUT_BYTES,
                 degrade: EvalDegradation | None = None) -> SetResult:
    """Score every method on every image of the set. An image that cannot be read or
    scored (by any method) becomes a failure with its reason and is left out of every
    mean, so all rows are means over the same images. ``on_method`` is called after
    each method is scored on an image (a progress bar). ``degrade``: LR images made by
    that fixed chain instead of plain bicubic downscaling (sets without LR of their own)."""
    border = scale if crop_border is None else crop_border
    result = SetResult(image_set)
    kept_bytes = 0
    for item in image_set.items:
        outputs: dict[str, np.ndarray] = {}
        scores: dict[str, Score] = {}
        try:
            # Decoder warnings become a report line naming the image, not Python's two
            # anonymous lines on stderr.
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                hr, lr = read_pair(item, scale, degrade)
            result.warnings.extend((item.name, short_reason(w.message, None)) for w in caught)
            for method in methods:
                outputs[method.name] = _upscale(method, lr, hr)
                scores[method.name] = score(outputs[method.name], hr, border, y_channel, lpips)
                if on_method is not None:
                    on_method()
        except Exception as exc:  # one bad image is reported, the rest are scored
            result.failures.append((item.name, failure_reason(exc, item)))
            if on_method is not None:
                for _ in range(len(methods) - len(scores)):
                    on_method()
            continue
        result.images.append(ImageResult(item.name, hr.shape[1], hr.shape[0], scores))
        size = hr.nbytes * (1 + len(outputs))
        if kept_bytes + size <= keep_bytes:
            result.kept[item.name] = (hr, outputs)
            kept_bytes += size
    return result


def failure_reason(exc: Exception, item: SetItem) -> str:
    """The reason, without the URL our errors start with (the report names the image)."""
    if item.lr and str(exc).startswith(item.lr + ": "):
        return f"its LR image {item.lr}: {strip_url(exc, item.lr)}"
    return strip_url(exc, item.hr)


# ---------------------------------------------------------------- summaries


@dataclass
class MethodSummary:
    """Means over a set's scored images. PSNR is averaged over its finite values (an
    output identical to HR has infinite PSNR); ``psnr_images`` says how many."""

    images: int
    psnr: float | None
    psnr_images: int
    ssim: float | None
    mse: float | None
    lpips: float | None


def summarize(result: SetResult, method: str) -> MethodSummary:
    scores = [image.scores[method] for image in result.images]
    finite = [s.psnr for s in scores if math.isfinite(s.psnr)]
    lpips = [s.lpips for s in scores if s.lpips is not None]

    def mean(values: list[float]) -> float | None:
        return float(np.mean(values)) if values else None

    return MethodSummary(
        images=len(scores), psnr=mean(finite), psnr_images=len(finite),
        ssim=mean([s.ssim for s in scores]), mse=mean([s.mse for s in scores]),
        lpips=mean(lpips) if len(lpips) == len(scores) else None,
    )


def gains_over_reference(result: SetResult, method: str) -> list[tuple[float, str]]:
    """(PSNR of ``method`` minus bicubic's, image name) for images where both are finite."""
    gains = []
    for image in result.images:
        a, b = image.scores[method].psnr, image.scores[REFERENCE].psnr
        if math.isfinite(a) and math.isfinite(b):
            gains.append((a - b, image.name))
    return gains


def figure_images(result: SetResult, method: str, count: int) -> list[tuple[str, str, int]]:
    """(image name, "most" or "least", rank) for the ``count`` images where ``method``
    gains most over bicubic and the ``count`` where it gains least, each image once."""
    gains = sorted(gains_over_reference(result, method), key=lambda g: (-g[0], g[1]))
    chosen: list[tuple[str, str, int]] = []
    seen = set()
    for kind, ordered in (("most", gains), ("least", gains[::-1])):
        for rank, (_gain, name) in enumerate(ordered[:count], start=1):
            if name not in seen:
                seen.add(name)
                chosen.append((name, kind, rank))
    return chosen


# ---------------------------------------------------------------- LPIPS (optional)


LPIPS_HELP = (
    "LPIPS needs the optional `lpips` package (pip install lpips; it brings torchvision) and "
    "torchvision's AlexNet ImageNet weights in torch's cache ($TORCH_HOME/hub/checkpoints/"
    "alexnet-owt-7be5be79.pth), which are downloaded on first use; sr-cloud installs neither"
)


def load_lpips(device: str = "cpu") -> Callable[[np.ndarray, np.ndarray], float]:
    """LPIPS (AlexNet, v0.1) as a function of two uint8 images, or a ValueError saying
    what is missing. Written against the `lpips` package's documented API; untested
    here (its weights cannot be downloaded on the test machines)."""
    try:
        import lpips
    except ImportError:
        raise ValueError(f"--lpips: the `lpips` package is not installed. {LPIPS_HELP}") from None

    try:
        net = lpips.LPIPS(net="alex", verbose=False).to(device).eval()
    except Exception as exc:  # weights missing and no network, torchvision mismatch, ...
        raise ValueError(f"--lpips: could not load LPIPS ({type(exc).__name__}: {exc}). {LPIPS_HELP}") from None

    def distance(sr: np.ndarray, hr: np.ndarray) -> float:
        def tensor(image: np.ndarray) -> torch.Tensor:
            rgb = to_rgb8(image)  # gray as three equal channels
            return torch.from_numpy(rgb).permute(2, 0, 1)[None].float().div(127.5).sub(1).to(device)

        with torch.inference_mode():
            return float(net(tensor(sr), tensor(hr)).item())

    return distance
