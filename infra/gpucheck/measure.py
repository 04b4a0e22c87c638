"""Timing on the device, peak GPU memory, autocast, and the nvidia-smi sampler."""

from __future__ import annotations

import contextlib
import math
import shutil
import statistics
import subprocess
import threading
import time
from typing import Callable

from infra.gpucheck.context import visible_gpus


def synchronize(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


@contextlib.contextmanager
def peak_memory(device: str, result: dict):
    """``result["peak_gib"]``: the most GPU memory allocated inside (None on CPU)."""
    if device != "cuda":
        result["peak_gib"] = None
        yield
        return
    import torch

    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    yield
    torch.cuda.synchronize()
    result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30


def autocast(device: str, precision: str):
    import torch

    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16}
    if precision in dtypes:
        return torch.autocast(device, dtype=dtypes[precision])
    return contextlib.nullcontext()


def best_seconds(fn: Callable[[], object], repeats: int, device: str) -> float:
    best = math.inf
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def parse_smi_line(line: str) -> tuple[float, float] | None:
    """``nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits``
    prints ``87, 1234``; None for anything else (``[N/A]``, a header, a blank line)."""
    parts = [p.strip() for p in line.split(",")]
    if len(parts) != 2:
        return None
    try:
        return float(parts[0]), float(parts[1])
    except ValueError:
        return None


def utilisation_summary(samples: list[float]) -> dict:
    """Mean utilisation over all samples and over the busy span (from the first to the
    last non-zero sample: start-up and tear-down left out)."""
    if not samples:
        return {}
    busy = [i for i, s in enumerate(samples) if s > 0]
    span = samples[busy[0]:busy[-1] + 1] if busy else []
    return {"GPU util % (mean)": statistics.fmean(samples),
            "GPU util % (busy span)": statistics.fmean(span) if span else 0.0,
            "samples": len(samples)}


class GpuSampler:
    """Samples the utilisation of the first GPU the steps use (``Context.env``) with
    nvidia-smi about every ``period_ms`` while inside: one query per sample (a looping
    nvidia-smi writes into a pipe through a buffer that may not be flushed before it is
    stopped). Untested for lack of hardware: on CPU it records nothing."""

    def __init__(self, enabled: bool, period_ms: int = 200):
        self.enabled = enabled and shutil.which("nvidia-smi") is not None
        self.period_s = period_ms / 1000
        self.utilisation: list[float] = []
        self.memory_mib: list[float] = []
        self._stop = threading.Event()
        self._thread = None

    def __enter__(self):
        if self.enabled:
            self._query = ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits",
                           "-i", visible_gpus()[0]]
            self._take()  # the first sample before anything runs, then one every period
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def _take(self) -> None:
        done = subprocess.run(self._query, capture_output=True, text=True)
        sample = parse_smi_line(done.stdout.strip())
        if sample:
            self.utilisation.append(sample[0])
            self.memory_mib.append(sample[1])

    def _loop(self) -> None:
        while not self._stop.wait(self.period_s):
            self._take()

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=10)

    def figures(self) -> dict:
        if not self.enabled:
            return {"GPU util": "n/a (no nvidia-smi)" if shutil.which("nvidia-smi") is None else "n/a"}
        summary = utilisation_summary(self.utilisation)
        summary.pop("samples", None)
        return summary or {"GPU util": "no samples"}
