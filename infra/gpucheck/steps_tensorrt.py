"""The TensorRT step: the ONNX export of RRDBNet x4 (``sr convert``) built into a
TensorRT engine with the ``trtexec`` line docs/MODEL_FILES.md gives."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from typing import Iterator

from infra.gpucheck.context import Context
from infra.gpucheck.table import UNAVAILABLE, Row


def step_tensorrt(ctx: Context) -> Iterator[Row]:
    """Self-contained: export the full RRDBNet x4 with `sr convert` (verified there with
    ONNX Runtime), build a TensorRT engine with the trtexec line docs/MODEL_FILES.md
    gives, and read trtexec's own throughput figure. Untested: no GPU or TensorRT on
    the machines this was written on."""
    trtexec = shutil.which("trtexec")
    if trtexec is None:
        yield Row("tensorrt", "trtexec", status=UNAVAILABLE)
        return
    from sr_core import build_generator, save_generator
    from sr_core.onnx_export import trtexec_command

    folder = ctx.workdir / "tensorrt"
    folder.mkdir(parents=True, exist_ok=True)
    model, onnx_path, engine = folder / "rrdbnet_x4.safetensors", folder / "rrdbnet_x4.onnx", folder / "x4.plan"
    save_generator(build_generator("rrdbnet", "tiny" if ctx.rehearsal else "esrgan", scale=4), str(model))
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "sr_cli", "convert", str(model), str(onnx_path), "--overwrite"],
                          capture_output=True, text=True, timeout=max(10.0, ctx.deadline - time.monotonic()))
    if done.returncode != 0:
        yield Row("tensorrt", "onnx export", status=f"FAIL: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
        return
    yield Row("tensorrt", "onnx export", {"seconds": time.perf_counter() - start})
    start = time.perf_counter()
    line = trtexec_command(str(onnx_path), str(engine), max_side=512)
    built = subprocess.run(line.split(), capture_output=True, text=True,
                           timeout=max(10.0, ctx.deadline - time.monotonic()))
    if built.returncode != 0:
        yield Row("tensorrt", "engine build", status=f"FAIL: {(built.stdout + built.stderr).strip()[-200:]}")
        return
    throughput = re.search(r"Throughput: ([\d.]+) qps", built.stdout)
    figures = {"build seconds": time.perf_counter() - start}
    if throughput:
        figures["qps at 1x3x256x256"] = float(throughput[1])
    yield Row("tensorrt", "engine build (fp16, profile 64..512)", figures)
