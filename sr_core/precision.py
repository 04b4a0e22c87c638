"""Precision names and the automatic choice per device, shared by inference (the
Upscaler), training and the command line. Pure Python: choosing needs no torch and no
device, so it is tested without a GPU."""

from __future__ import annotations

PRECISIONS = ("auto", "fp32", "fp16", "bf16")


def choose_precision(device_type: str, capability: tuple[int, int] | None = None) -> str:
    """The automatic precision for a device.

    ``capability`` is CUDA's (major, minor) compute capability; ignored elsewhere. 7.x
    (V100) gets fp16: it has no bf16 tensor cores, though
    ``torch.cuda.is_bf16_supported()`` says True there through emulation. 8.0 and newer
    (A100, H100) get bf16: fp16's range without a loss scaler.
    """
    if device_type == "cuda":
        if capability is None:
            raise ValueError("choose_precision: CUDA needs the device's compute capability")
        if capability[0] >= 8:
            return "bf16"
        if capability[0] == 7:
            return "fp16"
        return "fp32"
    # MPS: fp16 autocast exists but its numerics for these models are unverified; CPU:
    # bf16 autocast is slower than fp32 on CPUs without AMX.
    return "fp32"
