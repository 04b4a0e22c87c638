"""sr_core: ESRGAN models, losses, metrics, resize, model files and the Upscaler.

What a Python user imports: architectures (``archs/``), losses, metrics, resize,
degradations, codecs, model files, storage, the Upscaler, the output naming shared by
``sr upscale`` and ``sr batch`` (``outputs``), evaluation. Plain PyTorch + Pillow +
numpy + safetensors + fsspec; never imports accelerate, deepspeed or ray, and parses no
arguments (the ``sr`` command is ``sr_cli``). The public names below are imported on
first use, so that the light modules (``errors``, ``precision``) that the command line
needs for ``sr --help`` do not pay for importing torch.
"""

from importlib import import_module

_PUBLIC = {
    "build_generator": "sr_core.archs",
    "build_discriminator": "sr_core.archs",
    "load_generator": "sr_core.modelfile",
    "save_generator": "sr_core.modelfile",
    "Upscaler": "sr_core.upscaler",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name):
    if name in _PUBLIC:
        return getattr(import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'sr_core' has no attribute {name!r}")
