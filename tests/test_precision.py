"""The automatic precision on CPUs: bf16 hardware detected from /proc/cpuinfo flags, bf16
only for the architectures listed as agreeing with fp32, and that agreement measured on
the sample photographs for every architecture the list puts in bf16."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sr_core import build_generator
from sr_core import precision as prec
from sr_core import upscaler as upscaler_module
from sr_core.upscaler import Upscaler

IMAGES = Path(__file__).resolve().parent.parent / "assets" / "images"

SAPPHIRE_RAPIDS = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8\n"
ZEN4 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n"
SKYLAKE = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw\n"


@pytest.mark.parametrize("text,expected", [
    (SAPPHIRE_RAPIDS, "amx_bf16"),
    (ZEN4, "avx512_bf16"),
    (SKYLAKE, None),
    # amx_bf16 without its tile registers cannot run AMX kernels.
    ("flags\t: avx2 amx_bf16\n", None),
    ("", None),
])
def test_cpu_bf16_flag_reads_the_flags_line(text, expected):
    assert prec.cpu_bf16_flag(text) == expected


def test_cpu_bf16_flag_of_this_machine_is_one_of_the_known():
    assert prec.cpu_bf16_flag() in (None, *prec.CPU_BF16_FLAGS)


@pytest.mark.parametrize("arch,cpu_bf16,expected", [
    ("srvgg_compact", "amx_bf16", "bf16"),
    ("srvgg_compact", "avx512_bf16", "bf16"),
    ("srresnet", "amx_bf16", "fp32"),
    ("srvgg_compact", None, "fp32"),
    ("rrdbnet", "amx_bf16", "fp32"),
    ("multihead_rrdbnet", "amx_bf16", "fp32"),
    (None, "amx_bf16", "fp32"),
])
def test_cpu_auto_is_bf16_only_for_listed_architectures_on_bf16_hardware(arch, cpu_bf16, expected):
    assert prec.choose_precision("cpu", arch=arch, cpu_bf16=cpu_bf16) == expected
    # Other devices ignore the CPU's flags.
    assert prec.choose_precision("mps", arch=arch, cpu_bf16=cpu_bf16) == "fp32"
    assert prec.choose_precision("cuda", (7, 0), arch=arch, cpu_bf16=cpu_bf16) == "fp16"


@pytest.mark.parametrize("flag", ["amx_bf16", None])
def test_upscaler_auto_follows_the_cpu_and_the_architecture(monkeypatch, flag):
    monkeypatch.setattr(upscaler_module, "cpu_bf16_flag", lambda: flag)
    compact = Upscaler(build_generator("srvgg_compact", "tiny", scale=2), device="cpu")
    rrdb = Upscaler(build_generator("rrdbnet", "tiny", scale=2), device="cpu")
    assert compact.precision == ("bf16" if flag else "fp32")
    assert rrdb.precision == "fp32"
    # An explicit choice is kept whatever the CPU.
    assert Upscaler(build_generator("srvgg_compact", "tiny", scale=2), device="cpu",
                    precision="fp32").precision == "fp32"


def _crops(side: int) -> list[np.ndarray]:
    crops = []
    for path in sorted(IMAGES.glob("*.png")):
        img = np.asarray(Image.open(path).convert("RGB"))
        y, x = (img.shape[0] - side) // 2, (img.shape[1] - side) // 2
        crops.append(np.ascontiguousarray(img[y:y + side, x:x + side]))
    return crops


def _psnr_u8(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


# Every architecture auto puts in bf16, at its published sizes (and the demo's compact).
AGREEMENT_CASES = {
    "srvgg_compact": ["realesr_general", "animevideo", "small"],
}


def test_agreement_cases_cover_every_bf16_architecture():
    assert sorted(AGREEMENT_CASES) == sorted(prec.BF16_CPU_ARCHS)


@pytest.mark.parametrize("arch,variant", [(a, v) for a, vs in AGREEMENT_CASES.items() for v in vs])
def test_bf16_output_agrees_with_fp32_on_photographs(arch, variant):
    torch.manual_seed(0)
    model = build_generator(arch, variant, scale=4)
    fp32 = Upscaler(model, device="cpu", precision="fp32", tile=0)
    bf16 = Upscaler(model, device="cpu", precision="bf16", tile=0)
    for crop in _crops(48):
        reference, candidate = fp32(crop), bf16(crop)
        # A nearly flat output would agree whatever the precision: the seeded model must
        # really draw the photograph for the agreement to mean something.
        assert reference.std() > 5, f"{arch}/{variant}: output std {reference.std():.1f}, too flat to compare"
        assert _psnr_u8(reference, candidate) >= prec.BF16_MIN_PSNR_DB, (arch, variant)


@pytest.mark.parametrize("flag", ["avx512_bf16", None])
def test_training_auto_follows_the_cpu_and_the_generator(monkeypatch, flag):
    from jobs import engines

    monkeypatch.setattr(engines, "cpu_bf16_flag", lambda: flag)
    assert engines.resolve_precision("auto", False, "srvgg_compact") == ("bf16" if flag else "fp32")
    assert engines.resolve_precision("auto", False, "rrdbnet") == "fp32"
    assert engines.resolve_precision("fp32", False, "srvgg_compact") == "fp32"
