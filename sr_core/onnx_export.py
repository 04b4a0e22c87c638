"""ONNX export of a generator, verified with ONNX Runtime before it is written.

The graph takes ``input``: float (B, C, H, W) in [0, 1], with batch, height and width
dynamic, and gives ``output``: (B, C, H*scale, W*scale), not clamped (clamp to [0, 1]).
A model with a size requirement (``size_minimum``, ``size_multiple``, ``size_square`` in
the file's ONNX metadata) must be given padded inputs: the graph does no padding.

Exported with torch's TorchScript-based exporter (``dynamo=False``) at opset
``OPSET``: torch 2.13's default exporter (dynamo) needs the ``onnxscript`` package, and
the TorchScript exporter handles every convolutional model here with dynamic axes.
Verification runs the written bytes in ONNX Runtime (CPU) on sample photographs at two
different sizes and compares with PyTorch's fp32 output; an export below the PSNR bound
(a tracer that froze a shape, an unsupported op lowered wrongly) is refused, not written.
"""

from __future__ import annotations

import io
import json
import math

import numpy as np
import torch
from torch import nn

from sr_core import storage

OPSET = 17
# ORT vs PyTorch on the same fp32 weights: the same arithmetic in another order, so any
# real disagreement (a frozen shape, a mis-lowered op) falls far below this.
MIN_PSNR_FP32 = 60.0
# fp16 weights and activations against the fp32 PyTorch output: fp16's 11-bit mantissa
# keeps well-behaved models above this on 8-bit images.
MIN_PSNR_FP16 = 40.0
EXPORT_PRECISIONS = ("fp32", "fp16")
# Input sizes (height, width) of the two verification crops, before the model's size
# requirement is applied: two shapes, neither the traced one, neither square.
VERIFY_SIZES = ((48, 64), (72, 40))
TRACE_SIZE = (32, 32)


class ExportError(ValueError):
    """An export that cannot be made or does not agree with PyTorch (names why)."""


def _required_size(model: nn.Module, height: int, width: int) -> tuple[int, int]:
    multiple = int(getattr(model, "size_multiple", 1))
    minimum = int(getattr(model, "size_minimum", 0))
    h = -(-max(height, minimum) // multiple) * multiple
    w = -(-max(width, minimum) // multiple) * multiple
    if getattr(model, "size_square", False):
        h = w = max(h, w)
    return h, w


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR of two [0, 1] outputs after clamping, on an 8-bit scale."""
    a, b = np.clip(a.astype(np.float64), 0, 1), np.clip(b.astype(np.float64), 0, 1)
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def onnx_bytes(model: nn.Module, precision: str = "fp32") -> bytes:
    """The model as ONNX (dynamic batch/height/width), on the CPU, not yet verified."""
    if precision not in EXPORT_PRECISIONS:
        raise ExportError(f"ONNX export precision must be one of {', '.join(EXPORT_PRECISIONS)}, got {precision!r}")
    if precision == "fp16" and not getattr(model, "supports_half", True):
        raise ExportError(f"{getattr(model, 'arch_name', type(model).__name__)} does not support fp16 "
                          "(its description says so); export it as fp32")
    channels = int(model.hparams.get("num_in_ch", 3))
    dtype = torch.float16 if precision == "fp16" else torch.float32
    import copy

    net = copy.deepcopy(model).to("cpu", dtype).eval()
    example = torch.rand(1, channels, *_required_size(model, *TRACE_SIZE), dtype=dtype)
    buf = io.BytesIO()
    try:
        with torch.inference_mode(False), torch.no_grad():
            torch.onnx.export(net, (example,), buf, dynamo=False, opset_version=OPSET,
                              input_names=["input"], output_names=["output"],
                              dynamic_axes={"input": {0: "batch", 2: "height", 3: "width"},
                                            "output": {0: "batch", 2: "out_height", 3: "out_width"}})
    except Exception as exc:  # the exporter's own refusal of an op or a construct
        first = str(exc).splitlines()[0][:300] if str(exc) else ""
        raise ExportError(f"torch.onnx could not export this model ({type(exc).__name__}: {first})") from None
    return _with_metadata(buf.getvalue(), model, precision)


def _with_metadata(data: bytes, model: nn.Module, precision: str) -> bytes:
    import onnx

    proto = onnx.load_from_string(data)
    entries = {"arch": getattr(model, "arch_name", type(model).__name__), "scale": str(model.scale),
               "precision": precision, "opset": str(OPSET), "input_range": "[0, 1]",
               "output": "clamp to [0, 1]",
               "size_minimum": str(int(getattr(model, "size_minimum", 0))),
               "size_multiple": str(int(getattr(model, "size_multiple", 1))),
               "size_square": str(bool(getattr(model, "size_square", False))).lower(),
               "hparams": json.dumps(model.hparams, sort_keys=True)}
    for key, value in entries.items():
        prop = proto.metadata_props.add()
        prop.key, prop.value = key, value
    return proto.SerializeToString()


def verification_inputs(model: nn.Module, photographs: list[np.ndarray]) -> list[np.ndarray]:
    """Centre crops of the photographs at ``VERIFY_SIZES`` (after the size requirement),
    as float32 (1, C, H, W) in [0, 1]; gray for one-channel models."""
    channels = int(model.hparams.get("num_in_ch", 3))
    out = []
    for n, (height, width) in enumerate(VERIFY_SIZES):
        photo = photographs[n % len(photographs)]
        h, w = _required_size(model, height, width)
        if photo.shape[0] < h or photo.shape[1] < w:
            raise ExportError(f"a verification photograph of {photo.shape[1]}x{photo.shape[0]} is smaller than "
                              f"the {w}x{h} crop the check needs")
        top, left = (photo.shape[0] - h) // 2, (photo.shape[1] - w) // 2
        crop = photo[top:top + h, left:left + w].astype(np.float32) / 255.0
        if crop.ndim == 2:
            crop = crop[..., None]
        if channels == 1 and crop.shape[2] == 3:
            crop = crop @ np.array([0.299, 0.587, 0.114], dtype=np.float32)[:, None]
        elif channels == 3 and crop.shape[2] == 1:
            crop = np.repeat(crop, 3, axis=2)
        out.append(np.ascontiguousarray(crop[..., :channels].transpose(2, 0, 1)[None]))
    return out


def verify(data: bytes, model: nn.Module, inputs: list[np.ndarray], precision: str) -> list[dict]:
    """Run the export in ONNX Runtime and PyTorch (fp32) on each input; refuse any below
    the bound. Returns one row per input: size and PSNR (dB)."""
    import onnxruntime

    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    bound = MIN_PSNR_FP16 if precision == "fp16" else MIN_PSNR_FP32
    net = model.to("cpu", torch.float32).eval()
    rows = []
    for x in inputs:
        feed = x.astype(np.float16) if precision == "fp16" else x
        try:
            ours = session.run(["output"], {"input": feed})[0].astype(np.float32)
        except Exception as exc:  # ORT refusing a shape the tracer froze
            first = str(exc).splitlines()[0][:300] if str(exc) else ""
            raise ExportError(f"ONNX Runtime could not run the export on a {x.shape[3]}x{x.shape[2]} input "
                              f"({type(exc).__name__}: {first}); the graph does not take other sizes") from None
        with torch.no_grad():
            reference = net(torch.from_numpy(x)).numpy()
        if ours.shape != reference.shape:
            raise ExportError(f"on a {x.shape[3]}x{x.shape[2]} input the export gives {ours.shape}, PyTorch "
                              f"{reference.shape}: the graph froze a shape")
        psnr = _psnr(ours, reference)
        rows.append({"height": int(x.shape[2]), "width": int(x.shape[3]), "psnr_db": psnr})
        if psnr < bound:
            raise ExportError(f"the ONNX Runtime output differs from PyTorch's on a {x.shape[3]}x{x.shape[2]} "
                              f"input: {psnr:.1f} dB PSNR, below the {bound:.0f} dB bound; not written")
    return rows


def export_onnx(model: nn.Module, url: str, photographs: list[np.ndarray], precision: str = "fp32") -> list[dict]:
    """Export ``model`` to ``url`` as ONNX, verified first (see the module docstring);
    returns the verification rows. Nothing is written when verification fails."""
    data = onnx_bytes(model, precision)
    rows = verify(data, model, verification_inputs(model, photographs), precision)
    storage.write_bytes(url, data)
    return rows


def trtexec_command(onnx_path: str, engine_path: str, channels: int = 3, max_side: int = 1024,
                    precision: str = "fp16") -> str:
    """The TensorRT engine build for an export: a shape profile over the dynamic axes
    (batch 1..4, sides 64..``max_side``, optimised at 1 x 256 x 256)."""
    flag = {"fp16": " --fp16", "bf16": " --bf16", "fp32": ""}[precision]
    return (f"trtexec --onnx={onnx_path} --saveEngine={engine_path}"
            f" --minShapes=input:1x{channels}x64x64 --optShapes=input:1x{channels}x256x256"
            f" --maxShapes=input:4x{channels}x{max_side}x{max_side}{flag}")
