"""What the train loop reports: rank 0's log lines and progress bar, and the window of
steps between two TensorBoard logs (mean of each loss term over its steps, gradient
norms, samples/s, output megapixels/s, data-wait fraction, step time, memory).

Loss terms are summed as detached device tensors: nothing waits for the device until
the window is logged, and then one all-reduce averages every value over the ranks.
"""

from __future__ import annotations

import resource
import sys
import time

import torch
from accelerate import Accelerator
from tqdm import tqdm

from jobs.data import DataWaitMeter
from sr_core.progress import bar


def log(accelerator: Accelerator, message: str) -> None:
    """One line on rank 0's stderr (above the progress bar, if one is shown)."""
    if accelerator.is_main_process:
        tqdm.write(message, file=sys.stderr)


def progress_bar(accelerator: Accelerator, total: int, initial: int, shown: bool, stage: str) -> tqdm:
    return bar(total, f"train {stage}", "step", initial=initial, shown=accelerator.is_main_process and shown)


def memory_mb(device: torch.device) -> float:
    """Peak memory: the device's allocations on CUDA, the process's resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class LogWindow:
    """The steps since the last log: per-step means of the loss terms, the last
    gradient norms, and rates."""

    def __init__(self, accum_steps: int, samples_per_step: int, pixels_per_sample: int, meter: DataWaitMeter):
        self.accum_steps = accum_steps
        self.samples_per_step, self.pixels_per_sample = samples_per_step, pixels_per_sample
        self.meter = meter
        self._reset()

    def _reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.norms: dict[str, float] = {}
        self.steps = 0
        self.start = time.perf_counter()
        self.meter.reset()

    def add(self, terms: dict[str, torch.Tensor]) -> None:
        """One accumulated batch's loss terms (each counts 1/accum of its step)."""
        for name, value in terms.items():
            self.sums[name] = self.sums.get(name, 0.0) + value.detach().float() / self.accum_steps

    def norm(self, name: str, value: float | None) -> None:
        if value is not None:
            self.norms[name] = value

    def step_done(self) -> None:
        self.steps += 1

    def values(self, accelerator: Accelerator, device: torch.device) -> dict[str, float]:
        """The window's scalars (losses and norms averaged over the ranks), then a new
        window starts."""
        elapsed = time.perf_counter() - self.start
        averaged = {name: value / self.steps for name, value in self.sums.items()} | self.norms
        names = sorted(averaged)
        if names:
            stacked = torch.stack([torch.as_tensor(averaged[n], dtype=torch.float64, device=device) for n in names])
            averaged = dict(zip(names, accelerator.reduce(stacked, reduction="mean").tolist()))
        samples = self.steps * self.samples_per_step
        averaged.update({
            "perf/samples_per_s": samples / elapsed,
            "perf/output_mpx_per_s": samples * self.pixels_per_sample / elapsed / 1e6,
            "perf/data_wait_fraction": self.meter.fraction(),
            "perf/step_time_s": elapsed / self.steps,
            "perf/memory_mb": memory_mb(device),
        })
        self._reset()
        return averaged
