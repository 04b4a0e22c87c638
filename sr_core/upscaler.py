"""The one inference path: ``Upscaler`` owns pad -> run -> clamp
-> crop, tiling with overlap, precision, grayscale, alpha and 16-bit.

How a frame of any size is processed
------------------------------------
The (padded) input is covered by *windows* of one fixed size, so that several windows
stack into one batch for the model. Each window owns a *core* (the pixels it writes)
and sees at least ``overlap`` real pixels of context around the core wherever the
image continues; at the image border the window is shifted inwards instead of being
padded with made-up pixels, so border pixels see exactly what an untiled run sees
(the model's own zero padding). Windows start on multiples of the model's size
requirement, so pixel-unshuffle models (x1 / x2) see the same pixel grouping as an
untiled run. Only each window's core is written, into an output preallocated on the
host in the output's own dtype (uint8 / uint16 for arrays), so host memory stays near
the output size and the device holds one batch of windows, never the whole frame.

Precision ``auto``: on accelerators (written, but not testable here: the test machines
have no GPU) fp16 autocast on compute capability 7.x (V100: fast fp16 tensor cores, no
bf16; ``torch.cuda.is_bf16_supported()`` says True there through emulation, so we decide
by capability), bf16 autocast on 8.0+ (same speed as fp16, fp32's range: no overflow in
un-normalized trunks). On CPUs with bf16 hardware (AMX, AVX512-BF16) bf16 autocast for the
architectures whose bf16 output agrees with fp32 (``sr_core.precision.BF16_CPU_ARCHS``),
fp32 elsewhere.
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from sr_core.modelfile import load_generator
from sr_core.precision import PRECISIONS, choose_precision, cpu_bf16_flag
from sr_core.resize import imresize
from sr_core.tiling import AxisWindow, activation_bytes_per_pixel, choose_tile, plan_axis  # noqa: F401  (API)

_AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}

# Context pixels (input resolution) seen beyond each tile's core. ESRGAN's effective
# receptive field falls off within a few pixels; 16 keeps tiled output within
# quantization noise of untiled output (tests require >= 50 dB PSNR).
DEFAULT_OVERLAP = 16
# Windows per forward pass. On a GPU small windows underfill the device, and a batch
# of them fills it without one huge window's activation peak. On a CPU the convolutions
# already keep every core busy with one window, and a batch of windows is slower per
# window (it falls out of cache) at several times the activation memory
# (bench/bench_upscaler.py, docs/PERFORMANCE.md), so CPUs take one window per forward pass.
DEFAULT_TILES_PER_BATCH_ACCELERATOR = 4
DEFAULT_TILES_PER_BATCH_CPU = 1
# Activation memory a batch of windows may use when the tile size is chosen
# automatically. On CPU it is host RAM next to the output, so it is kept modest.
DEFAULT_CPU_BUDGET_BYTES = 256 * 2**20
DEFAULT_MPS_BUDGET_BYTES = 1 * 2**30
# Share of the free GPU memory (measured at call time) one call may plan for.
GPU_BUDGET_FRACTION = 0.5
# A model whose description discourages tiling (it relies on wide context: SwinIR and
# the like, as spandrel describes them) plans its tiles with this many times the memory
# budget: tiles twice as wide, so half as many seams.
DISCOURAGED_TILING_BUDGET_FACTOR = 4

# BT.601 luma (what OpenCV's RGB2GRAY and Real-ESRGAN use) to turn the RGB output of a
# colour model run on a replicated gray image back into one channel.
_LUMA = (0.299, 0.587, 0.114)


# ---------------------------------------------------------------- device and precision


def choose_device(requested: str | torch.device | None = "auto") -> torch.device:
    """``auto``: CUDA if available, else MPS, else CPU."""
    if requested is None or requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(requested)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {requested!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"--device {requested}: {why}; use --device cpu (or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {requested}: only {torch.cuda.device_count()} CUDA device(s) visible")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) is not None
                                     and torch.backends.mps.is_available()):
        raise ValueError(f"--device {requested}: MPS is not available here; use --device cpu (or auto)")
    return device


def resolve_precision(precision: str, device: torch.device, arch: str | None = None) -> str:
    """``precision`` with ``auto`` replaced by the choice for this device and generator
    architecture (registry name; see ``sr_core.precision.choose_precision``)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    cpu_bf16 = cpu_bf16_flag() if device.type == "cpu" else None
    return choose_precision(device.type, capability, arch=arch, cpu_bf16=cpu_bf16)


# ---------------------------------------------------------------- padding and precision


def _reflect_share(pad: int, size: int, mode: str) -> int:
    """How much of ``pad`` is reflected: reflection reaches at most size - 1 pixels; the
    rest replicates the edge (spandrel's padding for its models)."""
    return min(pad, size - 1) if mode == "reflect" else 0


def _pad_array(patch: np.ndarray, pad_h: int, pad_w: int, mode: str) -> np.ndarray:
    ref_h, ref_w = _reflect_share(pad_h, patch.shape[0], mode), _reflect_share(pad_w, patch.shape[1], mode)
    if ref_h or ref_w:
        patch = np.pad(patch, ((0, ref_h), (0, ref_w), (0, 0)), mode="reflect")
    return np.pad(patch, ((0, pad_h - ref_h), (0, pad_w - ref_w), (0, 0)), mode="edge")


def _pad_tensor(patch: torch.Tensor, pad_h: int, pad_w: int, mode: str) -> torch.Tensor:
    ref_h, ref_w = _reflect_share(pad_h, patch.shape[-2], mode), _reflect_share(pad_w, patch.shape[-1], mode)
    if ref_h or ref_w:
        patch = F.pad(patch, (0, ref_w, 0, ref_h), mode="reflect")
    return F.pad(patch, (0, pad_w - ref_w, 0, pad_h - ref_h), mode="replicate")


_PRECISION_SUPPORT = {"fp16": "supports_half", "bf16": "supports_bfloat16"}


def _precision_the_model_supports(model: nn.Module, precision: str) -> str:
    """fp32 for a model whose description says it breaks in fp16 / bf16 (spandrel marks
    e.g. SwinIR as fp16-unsafe: its attention overflows), said once per model kind."""
    flag = _PRECISION_SUPPORT.get(precision)
    if flag is None or getattr(model, flag, True):
        return precision
    warnings.warn(f"{getattr(model, 'arch_name', type(model).__name__)} does not support {precision}; "
                  "running it in fp32", stacklevel=3)
    return "fp32"


# ---------------------------------------------------------------- the Upscaler


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """Eval mode inside, each module's own mode restored after (a no-op for a model
    already in eval mode, which is what keeps calls on an owned model thread-safe)."""
    training = [m for m in model.modules() if m.training]
    for m in training:
        m.training = False
    try:
        yield
    finally:
        for m in training:
            m.training = True


def _check_options(tile: int | None, overlap: int, tiles_per_batch: int | None, alpha: str) -> None:
    if tile is not None and tile < 0:
        raise ValueError(f"tile must be >= 0 (0 disables tiling) or None (automatic), got {tile}")
    if overlap < 0:
        raise ValueError(f"overlap must be >= 0, got {overlap}")
    if tiles_per_batch is not None and tiles_per_batch < 1:
        raise ValueError(f"tiles_per_batch must be >= 1 (or None: automatic), got {tiles_per_batch}")
    if alpha not in ("model", "bicubic"):
        raise ValueError(f"alpha must be 'model' or 'bicubic', got {alpha!r}")


def _place_model(model: nn.Module, device: torch.device, owns_model: bool) -> nn.Module:
    """The model the Upscaler runs (see ``Upscaler.__init__``'s ``owns_model``)."""
    tensors = list(model.parameters()) + list(model.buffers())
    if owns_model or not all(_same_device(t.device, device) for t in tensors):
        if not owns_model:
            # The caller's model stays where it is: we run a copy on our device.
            model = copy.deepcopy(model)
        # channels_last: cuDNN's and oneDNN's fast convolution layout (NHWC); the
        # windows are built NHWC on the host already, so it costs no transposes.
        model = model.eval().requires_grad_(False).to(device, memory_format=torch.channels_last)
    # Otherwise the caller's model is used as it is (e.g. a generator being trained,
    # validated between steps): calls run under inference_mode in eval mode and then
    # give every module back its train/eval mode; parameters are never touched.
    return model


class Upscaler:
    """Upscale images of any size with one generator.

    ``__call__`` takes a uint8/uint16 array (H, W), (H, W, 1|2|3|4) — see
    ``sr_core.codecs`` — and returns an array of the same dtype and channels, or a float
    tensor (B, C, H, W) / (C, H, W) in [0, 1] and returns a float tensor on the same
    device. The last channel of 2- and 4-channel images is alpha.

    The object holds only configuration and the model: every call keeps its working
    state in local variables, so one Upscaler can serve several threads.
    """

    def __init__(
        self,
        model: nn.Module,
        device: str | torch.device | None = "auto",
        precision: str = "auto",
        tile: int | None = None,
        overlap: int = DEFAULT_OVERLAP,
        tiles_per_batch: int | None = None,
        alpha: str = "model",
        memory_budget: int | None = None,
        owns_model: bool = False,
    ):
        """
        device: ``auto`` (CUDA, else MPS, else CPU) or a torch device string.
        precision: ``auto`` (see the module docstring), ``fp32``, ``fp16`` or ``bf16``.
        tile: core side of a tile in input pixels; ``0`` disables tiling; ``None``
            picks the largest that fits ``memory_budget``.
        overlap: context pixels (input resolution) around each tile.
        tiles_per_batch: tiles stacked into one forward pass (default: 4 on GPUs,
            1 on CPU; see ``DEFAULT_TILES_PER_BATCH_*``).
        alpha: ``model`` (alpha upscaled by the network as a gray image) or
            ``bicubic`` (MATLAB bicubic; cheaper, softer edges).
        memory_budget: activation bytes a batch of tiles may use when ``tile`` is None
            (default: half the free GPU memory, or 256 MiB on CPU).
        owns_model: the model is the Upscaler's alone (``from_file``, batch workers that
            load their own): it is moved to the device, switched to eval mode, frozen and
            made channels_last in place. Otherwise the caller's model is left as it was
            found: used as is when it is already on ``device`` (calls switch it to eval
            mode and back, so such an Upscaler is not for concurrent threads while the
            model is in train mode), else copied to the device.
        """
        _check_options(tile, overlap, tiles_per_batch, alpha)
        self._read_model_description(model)
        self.device = choose_device(device)
        self.precision = resolve_precision(precision, self.device, getattr(model, "arch_name", None))
        self.precision = _precision_the_model_supports(model, self.precision)
        if self.precision == "fp16" and self.device.type == "cpu":
            raise ValueError("fp16 is for GPUs; use fp32 (or bf16) on CPU")
        self.tile = tile
        self.overlap = overlap
        if tiles_per_batch is None:
            tiles_per_batch = (DEFAULT_TILES_PER_BATCH_CPU if self.device.type == "cpu"
                               else DEFAULT_TILES_PER_BATCH_ACCELERATOR)
        self.tiles_per_batch = tiles_per_batch
        self.alpha = alpha
        self.memory_budget = memory_budget
        self.model = model = _place_model(model, self.device, owns_model)
        # Feed the layout the weights have: mixing layouts costs conversions (and rounds
        # differently from a plain run of the caller's model).
        self.memory_format = (torch.channels_last if any(
            p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
            for p in model.parameters()) else torch.contiguous_format)
        with _eval_mode(self.model):
            self.bytes_per_pixel = activation_bytes_per_pixel(self.model, self.num_channels, self.size_multiple,
                                                              self.device, self.size_minimum)

    def _read_model_description(self, model: nn.Module) -> None:
        """Scale, channels and what a model described by spandrel (``sr_core.foreign``)
        may add; our own generators take any size, pad by replicating edges and tile freely."""
        if not isinstance(getattr(model, "scale", None), int):
            raise ValueError(f"{type(model).__name__} is not a generator (it has no integer `scale`); "
                             "load one with sr_core.modelfile.load_generator or build_generator")
        hparams = getattr(model, "hparams", {})
        self.num_channels = int(hparams.get("num_in_ch", 3))
        if self.num_channels not in (1, 3, 4):
            # Images are gray or colour (+ alpha: run separately, or by an RGBA model).
            raise ValueError(f"the model has {self.num_channels} input channels; the Upscaler runs "
                             "1- (gray), 3- (RGB) or 4-channel (RGBA) models")
        if int(hparams.get("num_out_ch", self.num_channels)) != self.num_channels:
            raise ValueError("the Upscaler needs a model with as many output channels as input channels")
        self.scale = int(model.scale)
        self.size_multiple = int(getattr(model, "size_multiple", 1))
        self.size_minimum = int(getattr(model, "size_minimum", 0))
        self.size_square = bool(getattr(model, "size_square", False))
        self.pad_mode = getattr(model, "pad_mode", "replicate")
        self.tiling = getattr(model, "tiling", "supported")

    @classmethod
    def from_file(
        cls,
        url: str,
        device: str | torch.device | None = "auto",
        precision: str = "auto",
        tile: int | None = None,
        overlap: int = DEFAULT_OVERLAP,
        tiles_per_batch: int | None = None,
        alpha: str = "model",
        memory_budget: int | None = None,
    ) -> "Upscaler":
        """An Upscaler for a model file (ours, or a foreign ESRGAN / Real-ESRGAN .pth)."""
        model = load_generator(url)
        try:
            return cls(model, device=device, precision=precision, tile=tile, overlap=overlap,
                       tiles_per_batch=tiles_per_batch, alpha=alpha, memory_budget=memory_budget,
                       owns_model=True)
        except ValueError as exc:
            raise ValueError(f"{url}: {exc}") from None

    def __repr__(self) -> str:
        return (f"Upscaler(x{self.scale}, device={self.device}, precision={self.precision}, tile={self.tile}, "
                f"overlap={self.overlap}, tiles_per_batch={self.tiles_per_batch}, alpha={self.alpha!r})")

    # ------------------------------------------------------------ public entry

    def __call__(self, image, outscale: float | None = None):
        """Upscale ``image`` by the network's scale, or by ``outscale`` (network scale,
        then MATLAB bicubic to ``round(size * outscale)``)."""
        if outscale is not None and not (math.isfinite(outscale) and outscale > 0):
            raise ValueError(f"outscale must be a positive number, got {outscale}")
        if isinstance(image, np.ndarray):
            out = self._upscale_array(image)
            in_h, in_w = image.shape[:2]
        elif isinstance(image, torch.Tensor):
            out = self._upscale_tensor(image)
            in_h, in_w = image.shape[-2:]
        else:
            raise ValueError(f"expected a numpy array or a torch tensor, got {type(image).__name__}")
        if outscale is None or outscale == self.scale:
            return out
        size = (max(1, round(in_h * outscale)), max(1, round(in_w * outscale)))
        resized = imresize(out, size=size)
        return resized.clamp_(0, 1) if isinstance(resized, torch.Tensor) else resized

    def tile_for(self, height: int, width: int) -> int:
        """The tile size a call on an image of this size uses (0: untiled)."""
        if self.tiling == "internal" or self.size_square:
            return self._check_untiled_fits(height, width)
        if self.tile is not None:
            return self.tile
        budget = self._memory_budget()
        if self.tiling == "discouraged":
            budget *= DISCOURAGED_TILING_BUDGET_FACTOR
        bytes_per_pixel = self.bytes_per_pixel / (2 if self.precision in _AUTOCAST_DTYPES else 1)
        tile = choose_tile(bytes_per_pixel, budget, self.tiles_per_batch, self.overlap, self.size_multiple)
        # An image that fits in one window is run whole.
        return 0 if max(height, width) <= tile + 2 * self.overlap else tile

    def _memory_budget(self) -> float:
        if self.memory_budget is not None:
            return self.memory_budget
        if self.device.type == "cuda":
            free, _total = torch.cuda.mem_get_info(self.device)
            return GPU_BUDGET_FRACTION * free
        if self.device.type == "mps":
            return DEFAULT_MPS_BUDGET_BYTES
        return DEFAULT_CPU_BUDGET_BYTES

    def _check_untiled_fits(self, height: int, width: int) -> int:
        """A model that must see the whole image (it tiles internally, or takes square
        inputs only) runs untiled: refuse an image whose estimated activations exceed
        the memory limit instead of running out of memory half-way."""
        padded_h, padded_w = self._padded_size(height, width)
        needed = self.bytes_per_pixel * padded_h * padded_w / (2 if self.precision in _AUTOCAST_DTYPES else 1)
        budget = self._untiled_memory_limit()
        if needed > budget:
            why = "takes square inputs only" if self.size_square else "must not be tiled (it tiles internally)"
            raise ValueError(f"a {width}x{height} image needs about {needed / 2**30:.1f} GiB for this model, "
                             f"which {why}, and {budget / 2**30:.1f} GiB are available; use a smaller image")
        return 0

    def _untiled_memory_limit(self) -> float:
        """All the memory there is (the tiled budget is a share of it, to leave room
        for the output): the free GPU memory, or the host's available memory."""
        if self.memory_budget is not None:
            return self.memory_budget
        if self.device.type == "cuda":
            return torch.cuda.mem_get_info(self.device)[0]
        from sr_core.memory import available_memory

        return available_memory() or DEFAULT_CPU_BUDGET_BYTES

    def _padded_size(self, height: int, width: int) -> tuple[int, int]:
        """The model input size of an untiled run: the size requirement applied."""
        multiple = self.size_multiple
        padded_h = -(-max(height, self.size_minimum) // multiple) * multiple
        padded_w = -(-max(width, self.size_minimum) // multiple) * multiple
        if self.size_square:
            padded_h = padded_w = max(padded_h, padded_w)
        return padded_h, padded_w

    # ------------------------------------------------------------ arrays

    def _upscale_array(self, image: np.ndarray) -> np.ndarray:
        if image.dtype not in (np.uint8, np.uint16):
            raise ValueError(f"expected a uint8 or uint16 image array, got {image.dtype}")
        squeeze = image.ndim == 2
        hwc = image[..., None] if squeeze else image
        if hwc.ndim != 3 or hwc.shape[2] not in (1, 2, 3, 4) or 0 in hwc.shape:
            raise ValueError(f"expected an (H, W) or (H, W, 1|2|3|4) image, got shape {image.shape}")
        height, width, channels = hwc.shape
        r = self.scale
        out = np.empty((height * r, width * r, channels), dtype=image.dtype)
        max_value = float(np.iinfo(image.dtype).max)
        color = slice(0, 1) if channels <= 2 else slice(0, 3)
        groups = [color] if channels in (1, 3) else [color, slice(channels - 1, channels)]
        if self.num_channels == 4:
            groups = [slice(0, channels)]  # an RGBA model upscales colour and alpha together
        tile = self.tile_for(height, width)
        for group in groups:
            src, dst = hwc[..., group], out[..., group]
            if group.start == channels - 1 and channels in (2, 4) and self.alpha == "bicubic":
                dst[..., 0] = imresize(np.ascontiguousarray(src[..., 0]), size=(height * r, width * r))
                continue
            self._run_array_group(src, dst, tile, max_value)
        return out[..., 0] if squeeze else out

    def _run_array_group(self, src: np.ndarray, dst: np.ndarray, tile: int, max_value: float) -> None:
        height, width, _ = src.shape
        r = self.scale

        def read(_n: int, wy: AxisWindow, wx: AxisWindow) -> np.ndarray:
            patch = src[wy.start:min(wy.start + wy.length, height), wx.start:min(wx.start + wx.length, width)]
            pad_h, pad_w = wy.length - patch.shape[0], wx.length - patch.shape[1]
            if pad_h or pad_w:
                # Bottom/right padding to the model's size requirement only: replicate
                # (reflect first for spandrel's models, as spandrel pads), as an untiled
                # run pads the same pixels the same way.
                patch = _pad_array(patch, pad_h, pad_w, self.pad_mode)
            return patch

        def to_model_input(patches: list[np.ndarray]) -> torch.Tensor:
            batch = torch.from_numpy(np.stack(patches))  # NHWC
            if batch.dtype == torch.uint8:
                # Ship uint8 to the device (4x less traffic), convert there.
                batch = batch.to(self.device, non_blocking=True).float()
            else:
                # uint16 kernels are sparse on accelerators: convert on the host.
                batch = batch.float().to(self.device, non_blocking=True)
            return batch.div_(max_value).permute(0, 3, 1, 2)  # NCHW view of NHWC memory

        def write(_n: int, wy: AxisWindow, wx: AxisWindow, result: torch.Tensor) -> None:
            # result: (C, h*r, w*r) float in [0, 1] on the device.
            y0, y1 = (wy.core_start - wy.start) * r, (wy.core_end - wy.start) * r
            x0, x1 = (wx.core_start - wx.start) * r, (wx.core_end - wx.start) * r
            core = result[:, y0:y1, x0:x1].mul(max_value).round_()
            core = core.to(torch.uint8) if max_value == 255 else core.to(torch.int32)
            dst[wy.core_start * r:wy.core_end * r, wx.core_start * r:wx.core_end * r] = (
                core.permute(1, 2, 0).cpu().numpy())

        self._run_tiles(read, to_model_input, write, 1, height, width, src.shape[2], tile)

    # ------------------------------------------------------------ tensors

    def _upscale_tensor(self, image: torch.Tensor) -> torch.Tensor:
        if not image.is_floating_point():
            raise ValueError(f"expected a float tensor in [0, 1], got {image.dtype}")
        squeeze = image.ndim == 3
        bchw = image[None] if squeeze else image
        if bchw.ndim != 4 or bchw.shape[1] not in (1, 2, 3, 4) or 0 in bchw.shape:
            raise ValueError(f"expected a (B, C, H, W) or (C, H, W) tensor with C in 1..4, got {tuple(image.shape)}")
        num_images, channels, height, width = bchw.shape
        r = self.scale
        out = torch.empty((num_images, channels, height * r, width * r), dtype=image.dtype, device=image.device)
        color = slice(0, 1) if channels <= 2 else slice(0, 3)
        groups = [color] if channels in (1, 3) else [color, slice(channels - 1, channels)]
        if self.num_channels == 4:
            groups = [slice(0, channels)]  # an RGBA model upscales colour and alpha together
        tile = self.tile_for(height, width)
        for group in groups:
            src, dst = bchw[:, group], out[:, group]
            if group.start == channels - 1 and channels in (2, 4) and self.alpha == "bicubic":
                dst.copy_(imresize(src, size=(height * r, width * r)).clamp_(0, 1))
                continue
            self._run_tensor_group(src, dst, tile)
        return out[0] if squeeze else out

    def _run_tensor_group(self, src: torch.Tensor, dst: torch.Tensor, tile: int) -> None:
        num_images, channels, height, width = src.shape
        r = self.scale

        def read(n: int, wy: AxisWindow, wx: AxisWindow) -> torch.Tensor:
            patch = src[n, :, wy.start:min(wy.start + wy.length, height), wx.start:min(wx.start + wx.length, width)]
            pad_h, pad_w = wy.length - patch.shape[1], wx.length - patch.shape[2]
            if pad_h or pad_w:
                patch = _pad_tensor(patch.float(), pad_h, pad_w, self.pad_mode)
            return patch

        def to_model_input(patches: list[torch.Tensor]) -> torch.Tensor:
            batch = torch.stack(patches).to(self.device, torch.float32, non_blocking=True)
            return batch.contiguous(memory_format=torch.channels_last)

        def write(n: int, wy: AxisWindow, wx: AxisWindow, result: torch.Tensor) -> None:
            y0, y1 = (wy.core_start - wy.start) * r, (wy.core_end - wy.start) * r
            x0, x1 = (wx.core_start - wx.start) * r, (wx.core_end - wx.start) * r
            dst[n, :, wy.core_start * r:wy.core_end * r, wx.core_start * r:wx.core_end * r] = result[:, y0:y1, x0:x1]

        self._run_tiles(read, to_model_input, write, num_images, height, width, channels, tile)

    # ------------------------------------------------------------ the shared loop

    def _run_tiles(self, read, to_model_input, write, num_images: int, height: int, width: int,
                   channels: int, tile: int) -> None:
        # Square-only models run untiled (tile_for), padded to one side for both axes.
        side = max(self._padded_size(height, width)) if self.size_square else self.size_minimum
        rows = plan_axis(height, tile, self.overlap, self.size_multiple, side)
        cols = plan_axis(width, tile, self.overlap, self.size_multiple, side)
        windows = [(n, wy, wx) for n in range(num_images) for wy in rows for wx in cols]
        # A colour image on a one-channel model runs as three gray images.
        per_forward = max(1, self.tiles_per_batch // (channels if self.num_channels == 1 else 1))
        for i in range(0, len(windows), per_forward):
            batch = windows[i:i + per_forward]
            x = to_model_input([read(n, wy, wx) for n, wy, wx in batch])
            y = self.forward(x)
            for (n, wy, wx), result in zip(batch, y):
                write(n, wy, wx, result)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The model on one batch already on the device: BCHW float in [0, 1] with 1 or
        3 channels (1 to 4 for an RGBA model; mapped onto the model's), returning the
        clamped fp32 output."""
        batch, channels, height, width = x.shape
        if self.num_channels == 4:
            return self._forward_rgba(x)
        if channels == self.num_channels:
            model_in = x
        elif channels == 1 and self.num_channels == 3:
            model_in = x.expand(-1, 3, -1, -1)
        elif channels == 3 and self.num_channels == 1:
            model_in = x.reshape(batch * 3, 1, height, width)
        else:
            raise ValueError(f"cannot run a {channels}-channel image through a {self.num_channels}-channel model")
        model_in = model_in.contiguous(memory_format=self.memory_format)
        with torch.inference_mode(), _eval_mode(self.model):
            if self.precision in _AUTOCAST_DTYPES:
                with torch.autocast(self.device.type, dtype=_AUTOCAST_DTYPES[self.precision]):
                    y = self.model(model_in)
            else:
                y = self.model(model_in)
            y = y.float().clamp_(0, 1)
            if channels == 1 and self.num_channels == 3:
                luma = torch.tensor(_LUMA, device=y.device, dtype=y.dtype).view(1, 3, 1, 1)
                y = (y * luma).sum(dim=1, keepdim=True)
            elif channels == 3 and self.num_channels == 1:
                y = y.reshape(batch, 3, y.shape[-2], y.shape[-1])
        return y

    def _run_model(self, model_in: torch.Tensor) -> torch.Tensor:
        model_in = model_in.contiguous(memory_format=self.memory_format)
        with torch.inference_mode(), _eval_mode(self.model):
            if self.precision in _AUTOCAST_DTYPES:
                with torch.autocast(self.device.type, dtype=_AUTOCAST_DTYPES[self.precision]):
                    return self.model(model_in).float().clamp_(0, 1)
            return self.model(model_in).float().clamp_(0, 1)

    def _forward_rgba(self, x: torch.Tensor) -> torch.Tensor:
        """An RGBA model: gray is replicated to RGB, a missing alpha is opaque; what the
        image did not have is dropped from the output (RGB back to gray by BT.601 luma)."""
        channels = x.shape[1]
        colour = x[:, :3] if channels >= 3 else x[:, :1].expand(-1, 3, -1, -1)
        alpha = x[:, channels - 1:] if channels in (2, 4) else torch.ones_like(x[:, :1])
        y = self._run_model(torch.cat([colour, alpha], dim=1))
        if channels >= 3:
            return y[:, :channels]
        luma = torch.tensor(_LUMA, device=y.device, dtype=y.dtype).view(1, 3, 1, 1)
        gray = (y[:, :3] * luma).sum(dim=1, keepdim=True)
        return torch.cat([gray, y[:, 3:]], dim=1) if channels == 2 else gray
