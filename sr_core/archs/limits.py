"""Ranges of the architectures' hyperparameters and the size estimate checked before a
network is built.

torch accepts a width of 0 and fails later (``expected weight to be at least 1 at
dimension 0``), fails on a negative one with its own traceback, and builds 10^8
convolutions for minutes without looking at a signal. So every architecture checks
its hyperparameters first (``check_hparams`` in each architecture's file): integers in
a range far above any published model, then the parameter count its layers would hold,
refused when its fp32 weights alone would not fit the memory available. The ranges are
generous on purpose: they refuse nonsense, not unusual models.
"""

from __future__ import annotations

MAX_WIDTH = 4096
"""Features, growth channels, dense units (published models: 32-1024)."""

MAX_IMAGE_CHANNELS = 64
"""Image channels in or out (RGB is 3; multispectral images have a few dozen)."""

MAX_DEPTH = 1000
"""Blocks or body convolutions (published models: 16-32)."""

BYTES_PER_PARAMETER = 4  # fp32, what a model is built and loaded in


def check_int(arch: str, name: str, value, low: int, high: int) -> None:
    """``value`` is an integer (not a bool) from ``low`` to ``high``, else one line naming
    the architecture and the hyperparameter."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{arch}: {name} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{arch}: {name} must be from {low} to {high}, got {value}")


def check_choice(arch: str, name: str, value, choices) -> None:
    if isinstance(value, bool) or value not in choices:
        raise ValueError(f"{arch}: {name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def conv(in_ch: int, out_ch: int, kernel: int, bias: bool = True) -> int:
    """Parameters of a 2-D convolution."""
    return in_ch * out_ch * kernel * kernel + (out_ch if bias else 0)


def linear(in_features: int, out_features: int) -> int:
    return in_features * out_features + out_features


def check_size(arch: str, num_parameters: int, limit: int | None = None) -> None:
    """Refuse hyperparameters whose weights alone exceed ``limit`` bytes (default: the
    memory available now), before a layer is made: nothing that large can be trained
    or run here, and building it would take minutes."""
    if limit is None:
        from sr_core.memory import available_memory

        limit = available_memory()
    need = num_parameters * BYTES_PER_PARAMETER
    if limit is not None and need > limit:
        raise ValueError(f"{arch}: these hyperparameters make {num_parameters:,} parameters ({need / 2**30:,.1f} GiB "
                         f"of fp32 weights), more than the {limit / 2**30:,.1f} GiB of memory available; use fewer "
                         "features or blocks")
