"""Step ``environment``: device, driver, versions, kernels of this torch build, default
precision, checkout."""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import subprocess
import time
from typing import Iterator

from infra.gpucheck.context import REPO, Context, visible_gpus
from infra.gpucheck.table import SUCCESS, Row, failed


def has_kernels(arch_list: list[str], major: int, minor: int) -> bool:
    """Whether a torch build with these ``torch.cuda.get_arch_list()`` entries runs on
    compute capability major.minor: a cubin of the same major and a lower or equal minor
    (binary compatible), or PTX of a lower or equal capability (compiled at load)."""
    for entry in arch_list:
        kind, _, number = entry.partition("_")
        if not number[:2].isdigit():
            continue
        e_major, e_minor = int(number[:-1]), int(number[-1])
        if kind == "sm" and e_major == major and e_minor <= minor:
            return True
        if kind == "compute" and (e_major, e_minor) <= (major, minor):
            return True
    return False


def step_environment(ctx: Context) -> Iterator[Row]:
    from importlib.metadata import PackageNotFoundError, version

    import torch

    step = "environment"
    if ctx.rehearsal:
        yield Row(step, "mode", {"": "CPU REHEARSAL: tiny sizes on the CPU, for the tests; NOT GPU results"})
        yield Row(step, "device", {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()})
    else:
        count = torch.cuda.device_count()
        props = torch.cuda.get_device_properties(0)
        major, minor = props.major, props.minor
        names = sorted({torch.cuda.get_device_name(i) for i in range(count)})
        yield Row(step, "device", {"GPU": " + ".join(names), "count": count, "compute capability": f"sm_{major}{minor}",
                                   "memory GiB": props.total_memory / 2**30, "CPU cores": os.cpu_count()})
        arch = f"sm_{major}{minor}"
        kernels = torch.cuda.get_arch_list()
        status = SUCCESS if has_kernels(kernels, major, minor) else failed(
            f"this torch build has no {arch} kernels ({' '.join(kernels)}); for V100 (sm_70) install the cu126 "
            "build: SR_TORCH_PIN=torch==2.13.0+cu126 PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cu126 "
            "./dev setup")
        yield Row(step, "kernels", {"torch arch list": " ".join(kernels)}, status)
    driver = "n/a"
    if not ctx.rehearsal and shutil.which("nvidia-smi"):
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", "-i",
                               visible_gpus()[0]], capture_output=True, text=True)
        driver = done.stdout.strip() or "unknown"
    nccl = "n/a"
    if torch.cuda.is_available() and hasattr(torch.cuda, "nccl"):
        with contextlib.suppress(Exception):
            nccl = ".".join(map(str, torch.cuda.nccl.version()))
    yield Row(step, "software", {"driver": driver, "torch": torch.__version__, "CUDA": torch.version.cuda or "none",
                                 "cuDNN": torch.backends.cudnn.version() or "none", "NCCL": nccl,
                                 "Python": platform.python_version()})
    versions = {}
    for package in ("accelerate", "deepspeed", "ray"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "missing"
    yield Row(step, "packages", versions)
    precision = ctx.default_precision()
    why = {"bf16": "sm_80+: bf16 tensor cores", "fp16": "sm_7x: fp16 tensor cores, no bf16 ones",
           "fp32": "CPU" if ctx.rehearsal else "no tensor cores"}[precision]
    figures = {"": f"{precision} ({why})"}
    if not ctx.rehearsal:
        # On sm_80+ cuDNN runs "fp32" convolutions in TF32 unless this is off: the fp32
        # rows (the reference of every PSNR) are then TF32.
        figures["cuDNN TF32 for fp32"] = bool(torch.backends.cudnn.allow_tf32 and ctx.capability()[0] >= 8)
    yield Row(step, "default precision", figures)
    commit = "unknown"
    with contextlib.suppress(OSError):
        done = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        commit = done.stdout.strip() or commit
    yield Row(step, "checkout", {"commit": commit,
                                 "date (UTC)": time.strftime("%Y-%m-%d %H:%M", time.gmtime())})
