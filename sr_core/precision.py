"""Precision names and the automatic choice per device, shared by inference (the
Upscaler), training and the command line. Pure Python: choosing needs no torch and no
device, so it is tested without a GPU.

On CPUs the choice depends on two things. The processor: bf16 autocast is only fast where
the CPU multiplies bf16 in hardware (Intel AMX, ``amx_bf16``; AVX512-BF16, ``avx512_bf16``,
e.g. AMD Zen 4 and Intel Cooper Lake); elsewhere oneDNN emulates it and it is slower than
fp32. And the architecture: bf16 keeps 8 bits of mantissa, and a deep trunk without
normalization (RRDBNet's 23 blocks of dense connections) accumulates the rounding, so an
architecture gets bf16 only where its bf16 output agrees with fp32 at >= ``BF16_MIN_PSNR_DB``
on the sample photographs (``tests/test_precision.py`` measures each one listed).
"""

from __future__ import annotations

PRECISIONS = ("auto", "fp32", "fp16", "bf16")

# Agreement of an 8-bit output in bf16 autocast with its fp32 output that counts as "the
# same picture" (the GPU check uses the same threshold).
BF16_MIN_PSNR_DB = 45.0

# Generators (registry names) that ``auto`` runs in bf16 on a CPU with bf16 hardware.
# Measured (uint8 output, bf16 autocast vs fp32, x4, seeded weights, 48 px centre crops of
# the four sample photographs, worst photo): srvgg_compact realesr_general 63.5 dB,
# animevideo 65.6 dB (its output follows the photograph: std ~68 grey levels, because the
# input is added back upsampled). Left in fp32:
# - rrdbnet esrgan: 42.8 dB (44.9 mean; real RealESRGAN_x4plus weights 44.6 dB end to end
#   on a 256 px crop): below the threshold. What would lift it: the trunk's last RRDB
#   blocks and conv_body in fp32 (the 0.2-scaled residual sums are where bf16 rounding
#   accumulates), at the cost of part of the speed-up; not done.
# - multihead_rrdbnet: RRDBNet's trunk (its seeded output is nearly flat, std ~4 levels,
#   so its own 53 dB shows little).
# - srresnet srgan: 62 dB, but its seeded output is nearly flat (std ~4 levels, mostly
#   clamped to black), so the figure does not show agreement on a drawn picture, and the
#   repository has no real SRResNet weights to measure with.
BF16_CPU_ARCHS = ("srvgg_compact",)

# /proc/cpuinfo flags of bf16 matrix hardware, in order of preference.
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_bf16_flag(cpuinfo: str | None = None) -> str | None:
    """The CPU's bf16 hardware as its /proc/cpuinfo flag (``amx_bf16`` or ``avx512_bf16``),
    or None (none, or not Linux).

    ``torch.backends.cpu.get_cpu_capability()`` is no help: it says ``AVX512`` on CPUs with
    AMX. ``cpuinfo`` is the file's text (read from /proc/cpuinfo when None)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
                cpuinfo = f.read()
        except OSError:
            return None
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            flags.update(value.split())
            break  # every core lists the same flags
    # AMX needs its tile registers too (amx_tile), or the kernels cannot run.
    if "amx_bf16" in flags and "amx_tile" in flags:
        return "amx_bf16"
    return "avx512_bf16" if "avx512_bf16" in flags else None


def choose_precision(device_type: str, capability: tuple[int, int] | None = None,
                     arch: str | None = None, cpu_bf16: str | None = None) -> str:
    """The automatic precision for a device (and, on CPU, an architecture).

    ``capability`` is CUDA's (major, minor) compute capability; ignored elsewhere. 7.x
    (V100) gets fp16: it has no bf16 tensor cores, though
    ``torch.cuda.is_bf16_supported()`` says True there through emulation. 8.0 and newer
    (A100, H100) get bf16: fp16's range without a loss scaler.

    On CPU: bf16 when ``cpu_bf16`` names the CPU's bf16 hardware (see ``cpu_bf16_flag``)
    and ``arch`` (a generator registry name) is in ``BF16_CPU_ARCHS``; fp32 otherwise.
    """
    if device_type == "cuda":
        if capability is None:
            raise ValueError("choose_precision: CUDA needs the device's compute capability")
        if capability[0] >= 8:
            return "bf16"
        if capability[0] == 7:
            return "fp16"
        return "fp32"
    if device_type == "cpu" and cpu_bf16 in CPU_BF16_FLAGS and arch in BF16_CPU_ARCHS:
        return "bf16"
    # MPS: fp16 autocast exists but its numerics for these models are unverified.
    return "fp32"


def describe_auto() -> str:
    """What ``auto`` picks, in one line (for help texts)."""
    return ("auto: fp16 on V100-class GPUs, bf16 on A100 and newer; on CPUs with bf16 hardware "
            f"(AMX, AVX512-BF16) bf16 for {', '.join(BF16_CPU_ARCHS)}; fp32 otherwise")
