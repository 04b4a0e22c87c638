"""Every CUDA path of sr-cloud in one short check: ``./dev gpu-check``.

On a machine with CUDA it runs, in under 8 minutes on one GPU, the steps of ``STEPS``
(``--list`` prints them with their time budgets) and prints one Markdown table — device,
driver, torch/CUDA versions and every figure — which it also writes to ``--out`` (and a
``.json`` beside it). The exit code is 1 if any path failed, else 0. On a machine
without CUDA it prints one line and exits 0 without running anything.

- Upscaler, full ESRGAN RRDBNet x4 and the compact generator (``srvgg_compact``,
  ``realesr_general``): fp32 vs fp16 vs bf16 (bf16 only from compute capability 8.0:
  V100 is sm_70 and has no bf16 tensor cores, although
  ``torch.cuda.is_bf16_supported()`` says True there through emulation), output PSNR
  against fp32 (must be >= 45 dB), output Mpx/s, peak GPU memory
  (``torch.cuda.max_memory_allocated``), tiles per forward pass 1 vs 4 vs the automatic
  choice, channels_last on vs off — all through ``sr_core.Upscaler``'s own options, on
  the photographs in assets/images.
- ``sr upscale`` end to end against the bare model over the same batches of tiles (the
  floor) and the straightforward reference loop of bench/bench_upscaler.py.
- ``sr train``: both stages, a few dozen steps, at the device's default precision, with
  DDP (``sr train``) and with DeepSpeed ZeRO-2 (``accelerate launch --config_file
  jobs/launch/deepspeed_zero2_8_gpus.yaml``); losses finite and (PSNR stage) falling,
  the loss scale logged, a SIGTERM checkpoint and ``--resume auto`` continuing. With
  >= 2 GPUs the same with 2 processes over NCCL, both ranks ending with equal weights.
- ``sr batch`` on a local Ray with one GPU actor over a few hundred small images against
  ``sr upscale`` on the same GPU, GPU utilisation sampled with nvidia-smi, and whether
  the actor's encoding keeps up with its model.

Every step runs in a process of its own (its peak memory is its own, a crash or a hang
fails that step alone) with a hard limit of ``--timeout-factor`` times its budget.

Weights: the models are built with their published shapes and random weights (seeded;
ESRGAN's scaled initialisation) unless ``--rrdb-model`` / ``--compact-model`` name real
files (e.g. Real-ESRGAN's ``RealESRGAN_x4plus.pth``, ``realesr-general-x4v3.pth``), and
the GAN stage's perceptual loss uses a random VGG19 unless ``--vgg-weights`` is given:
the same computation, so speed, memory and precision paths are what they are with real
weights; the PSNR against fp32 is measured on those weights' outputs.

UNTESTED FOR LACK OF HARDWARE: this project has had no GPU machine. Nothing here has
run under CUDA: not the CUDA timings, memory figures, the nvidia-smi sampler, NCCL, the
DeepSpeed fp16 engines, fp16/bf16 autocast on a GPU, nor the budgets (estimates from
the FLOP model, see docs/PERFORMANCE.md). What the tests run is ``--cpu-rehearsal``:
the same step code on CPU with tiny sizes (fp32 and CPU bf16, gloo, CPU Ray actors),
which proves the steps, the table and the exit code work, and nothing about GPUs; its
table says so in its title and first row.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

IMAGES = REPO / "assets" / "images"
PSNR_FLOOR_DB = 45.0
"""Output PSNR of fp16/bf16 (and of every other variant) against the fp32 output."""
FLAT_STD = 1.0
"""An fp32 output whose pixel standard deviation is below this (8-bit levels) says
nothing about precision (random weights can give a constant image): no PSNR then."""
DEFAULT_OUT = "gpu-check.md"
REHEARSAL_OUT = "gpu-check-cpu-rehearsal.md"
TOTAL_BUDGET_ONE_GPU_S = 480
COMPACT = "srvgg_compact"
SUCCESS, UNAVAILABLE = "ok", "not available in this install"
OVERLAP = 16


# ---------------------------------------------------------------- sizes


@dataclass(frozen=True)
class Sizes:
    """What every step runs on. ``GPU`` fits the 8-minute budget on one V100-class GPU;
    ``REHEARSAL`` is for the CPU rehearsal of the tests."""

    variants: dict = field(default_factory=lambda: {"rrdbnet": "esrgan", COMPACT: "realesr_general"})
    """Generator variant per architecture (the published shapes)."""
    seed: int = 0
    """Seed of the random weights (0 gives the full RRDBNet a non-flat output)."""
    photo_crop: int = 384
    """The four photographs cropped to at most this side (input pixels)."""
    tile: int = 128
    """Fixed tile (input pixels) of the precision and tiles-per-forward rows."""
    repeats: int = 2
    """Timed passes after one warm-up pass; the best counts."""
    prepare: tuple = (192, 96)
    """``sr prepare --size --step`` of the training shards."""
    psnr_preset: str = "esrgan_psnr_x4"
    """``sr train --preset`` of the PSNR stage (the full RRDBNet x4, L1)."""
    gan_preset: str = "esrgan_gan_x4"
    """``sr train --preset`` of the GAN stage (RRDBNet vs the 128 px VGG-style discriminator, VGG19 conv5_4)."""
    train_overrides: tuple = ("data.batch_size=4", "data.num_workers=2")
    """Overrides of both stages (the published batch of 16 is cut to 4: the check wants steps, not samples)."""
    gan_overrides: tuple = ()
    """More overrides of the GAN stage."""
    checkpoint_every: int = 10
    """The preempted run gets SIGTERM once this step's checkpoint is complete."""
    steps_after_resume: int = 30
    """Steps the resumed PSNR-stage run trains past the step it was stopped at."""
    gan_steps: int = 30
    """Steps of the GAN stage (one straight run)."""
    batch_images: int = 300
    """Inputs of the ``sr batch`` step (crops of the photographs)."""
    batch_side: int = 128
    """Their side in pixels (x4: 512x512 outputs)."""
    degrade_batch: tuple = (12, 256)
    """(batch, GT side) of the second-order degradation step: Real-ESRGAN x4plus's per-GPU batch."""


GPU = Sizes()
REHEARSAL = Sizes(
    variants={"rrdbnet": "small", COMPACT: "tiny"}, seed=1, photo_crop=32, tile=16, repeats=1,
    psnr_preset="tiny", gan_preset="tiny", train_overrides=("data.num_workers=0",),
    gan_overrides=("train.stage=gan",), checkpoint_every=2, steps_after_resume=6, gan_steps=3,
    batch_images=8, batch_side=24, degrade_batch=(2, 64),
)


# ---------------------------------------------------------------- rows and the table


@dataclass
class Row:
    """One line of the table."""

    step: str
    case: str
    figures: dict = field(default_factory=dict)
    """Name -> value (numbers are formatted by ``fmt``; strings are shown as they are)."""
    status: str = SUCCESS
    """``ok``, ``FAIL: why``, ``NOT RUN: why``, ``skipped: why`` or ``not available in this install``."""


def failed(reason: str) -> str:
    return f"FAIL: {reason}"


def is_failure(status: str) -> bool:
    """A path that failed, or one that should have run and did not."""
    return status.startswith(("FAIL", "NOT RUN"))


def exit_code(rows: list[Row]) -> int:
    return 1 if any(is_failure(r.status) for r in rows) else 0


def fmt(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def render_table(title: str, rows: list[Row]) -> str:
    """The Markdown table: a title line, then one row per figure set."""
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    lines = [f"# {title}", "", "| step | case | figures | result |", "|---|---|---|---|"]
    for r in rows:
        figures = " · ".join(f"{name} {fmt(value)}".strip() for name, value in r.figures.items())
        lines.append(f"| {cell(r.step)} | {cell(r.case)} | {cell(figures) or '-'} | {cell(r.status)} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the step list


@dataclass(frozen=True)
class Step:
    name: str
    budget_s: int
    """Seconds this step should take on one V100-class GPU (the sizes are chosen for it)."""
    what: str
    min_gpus: int = 1


STEPS = [
    Step("environment", 10, "device, driver, torch/CUDA/cuDNN/NCCL versions, sm_XY kernels in this torch, "
                            "default precision"),
    Step("upscaler-rrdbnet", 80, "full ESRGAN RRDBNet x4: fp32/fp16/bf16, PSNR vs fp32, Mpx/s, peak memory, "
                                 "tiles per forward 1/4/auto, channels_last on/off"),
    Step("upscaler-compact", 30, f"the same for {COMPACT} (realesr_general), when this install has it"),
    Step("upscale-e2e", 50, "sr upscale (subprocess) vs the Upscaler vs the bare model (floor) vs the "
                            "reference loop, full RRDBNet x4"),
    Step("train-ddp", 75, "sr train, 1 GPU, DDP: PSNR stage stopped by SIGTERM and resumed, then the GAN "
                          "stage; losses, loss scale, precision"),
    Step("train-deepspeed", 90, "the same through accelerate launch --config_file "
                                "jobs/launch/deepspeed_zero2_8_gpus.yaml (ZeRO-2), 1 process"),
    Step("batch", 100, "sr batch, local Ray, 1 GPU actor, a few hundred small images, vs sr upscale; GPU "
                       "utilisation; does encoding keep up (RRDBNet, and the compact generator if present)"),
    Step("degradation", 20, "Real-ESRGAN's second-order degradation on the GPU (sr_core.realdegrade): degraded "
                            "pairs/s at x4plus's batch of 12 x 256 px, peak memory, its JPEG on the GPU vs on the CPU"),
    Step("train-nccl", 150, "with 2+ GPUs: sr train --processes 2 (DDP) and the DeepSpeed launch config, 2 "
                            "processes over NCCL, ranks equal", min_gpus=2),
]
assert sum(s.budget_s for s in STEPS if s.min_gpus == 1) <= TOTAL_BUDGET_ONE_GPU_S


def select_steps(only: list[str], skip: list[str]) -> list[Step]:
    """The steps to run, in list order; ``environment`` always runs (it heads the table)."""
    names = [s.name for s in STEPS]
    for name in [*only, *skip]:
        if name not in names:
            raise ValueError(f"unknown step {name!r}; steps: {', '.join(names)}")
    return [s for s in STEPS if s.name == "environment" or ((not only or s.name in only) and s.name not in skip)]


def step_list_text() -> str:
    lines = [f"{'step':18} {'budget':>7}  what"]
    for s in STEPS:
        gpus = f" [needs {s.min_gpus} GPUs]" if s.min_gpus > 1 else ""
        lines.append(f"{s.name:18} {s.budget_s:>6}s  {s.what}{gpus}")
    one = sum(s.budget_s for s in STEPS if s.min_gpus == 1)
    lines.append(f"total on one GPU: {one} s (limit {TOTAL_BUDGET_ONE_GPU_S} s); with 2+ GPUs "
                 f"{sum(s.budget_s for s in STEPS)} s")
    return "\n".join(lines)


# ---------------------------------------------------------------- context of a step


@dataclass
class Context:
    rehearsal: bool
    workdir: Path
    deadline: float
    """time.monotonic() by which the step must be done (its hard limit, less a margin)."""
    model_files: dict = field(default_factory=dict)
    vgg_weights: str = ""

    @property
    def sizes(self) -> Sizes:
        return REHEARSAL if self.rehearsal else GPU

    @property
    def device(self) -> str:
        return "cpu" if self.rehearsal else "cuda"

    def remaining(self) -> float:
        return max(1.0, self.deadline - time.monotonic())

    def capability(self) -> tuple[int, int] | None:
        import torch

        return None if self.rehearsal else torch.cuda.get_device_capability(0)

    def default_precision(self) -> str:
        from sr_core.precision import choose_precision

        return choose_precision(self.device, self.capability())

    def env(self, num_gpus: int = 1) -> dict:
        """The environment of the commands a step starts: the first ``num_gpus`` GPUs
        only (a local Ray or a launcher would take them all)."""
        env = dict(os.environ)
        env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
        env["PYTHONUNBUFFERED"] = "1"
        if self.rehearsal:
            env["OMP_NUM_THREADS"] = "1"
        else:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(visible_gpus()[:num_gpus])
        return env


def visible_gpus() -> list[str]:
    """The GPU ids this check may use: ``CUDA_VISIBLE_DEVICES`` as given, else all."""
    given = os.environ.get("CUDA_VISIBLE_DEVICES")
    if given is not None:
        return [g.strip() for g in given.split(",") if g.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


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


def sr_command() -> list[str]:
    """The installed ``sr`` entry point beside this interpreter."""
    sr = Path(sys.executable).with_name("sr")
    if not sr.exists():
        raise ValueError(f"{sr} does not exist: install the project (./dev setup) first")
    return [str(sr)]


_CHILDREN: list[subprocess.Popen] = []
"""The commands this step process started, each in a process group of its own."""


def start_child(command: list[str], out, env: dict) -> subprocess.Popen:
    """Start a command of a step (output to the open file ``out``), in its own process
    group so that it, and the processes it starts, can be stopped together."""
    out.write("$ " + " ".join(command) + "\n")
    out.flush()
    proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
    _CHILDREN.append(proc)
    return proc


class StepStopped(BaseException):
    """Raised in a step process at its time limit (a BaseException: the steps' own
    ``except Exception`` around one configuration must not swallow it)."""


def _stop_step(signum, frame) -> None:
    """SIGTERM to a step process (its limit passed): stop its commands, then fail the step."""
    for proc in _CHILDREN:
        if proc.poll() is None:
            _kill_group(proc)
    raise StepStopped("stopped at the step's time limit; the commands it started were stopped")


def run_logged(command: list[str], log: Path, env: dict, timeout: float) -> tuple[int, float, str]:
    """Run ``command`` with its output in ``log``; (exit code, seconds, output)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = start_child(command, out, env)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            code = -9
    return code, time.perf_counter() - start, log.read_text(errors="replace")


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(no output)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- measuring


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


# ---------------------------------------------------------------- models


def available(arch: str) -> bool:
    from sr_core.archs import GENERATORS

    return arch in GENERATORS


def build_model(ctx: Context, arch: str):
    """The generator of ``arch``: from ``--rrdb-model`` / ``--compact-model``, or the
    published shape with seeded random weights. Always on the CPU, in eval mode."""
    import torch

    from sr_core import build_generator, load_generator

    if ctx.model_files.get(arch):
        return load_generator(ctx.model_files[arch])
    torch.manual_seed(ctx.sizes.seed)
    return build_generator(arch, ctx.sizes.variants[arch], scale=4).eval()


def model_label(ctx: Context, arch: str) -> str:
    if ctx.model_files.get(arch):
        return f"{arch} x4 from {os.path.basename(ctx.model_files[arch])}"
    return f"{arch} {ctx.sizes.variants[arch]} x4, random weights (seed {ctx.sizes.seed})"


def model_file(ctx: Context, arch: str) -> str:
    """A model file for the commands: the one given, or the random model saved once."""
    if ctx.model_files.get(arch):
        return ctx.model_files[arch]
    from sr_core import save_generator

    path = ctx.workdir / "models" / f"{arch}-x4.safetensors"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        save_generator(build_model(ctx, arch), str(path), note="sr-cloud gpu check, random weights")
    return str(path)


def photos(ctx: Context):
    from bench_upscaler import load_photos

    return load_photos(ctx.sizes.photo_crop)


# ---------------------------------------------------------------- step: environment


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


# ---------------------------------------------------------------- steps: the Upscaler


def upscaler_configs(device: str, capability: tuple[int, int] | None, tile: int) -> list[tuple[str, dict, str]]:
    """(case, Upscaler options, skip reason or "") for one architecture on ``device``
    of CUDA compute ``capability``: the fp32 row first (the others are compared with it)."""
    from sr_core.precision import choose_precision

    default = choose_precision(device, capability)
    rows = []
    for precision in ("fp32", "fp16", "bf16"):
        skip = ""
        if precision == "fp16" and device == "cpu":
            skip = "fp16 is for GPUs (the Upscaler refuses it on CPU)"
        if precision == "bf16" and capability is not None and capability[0] < 8:
            skip = (f"sm_{capability[0]}{capability[1]} has no bf16 tensor cores (bf16 would be emulated; "
                    "the project never picks it there)")
        rows.append((f"{precision} · tile {tile} · 4/forward · channels_last",
                     dict(precision=precision, tile=tile, tiles_per_batch=4, channels_last=True), skip))
    rows.append((f"{default} · tile {tile} · 1/forward · channels_last",
                 dict(precision=default, tile=tile, tiles_per_batch=1, channels_last=True), ""))
    rows.append((f"{default} · automatic tile and tiles/forward · channels_last",
                 dict(precision=default, tile=None, tiles_per_batch=None, channels_last=True), ""))
    rows.append((f"{default} · tile {tile} · 4/forward · NCHW (channels_last off)",
                 dict(precision=default, tile=tile, tiles_per_batch=4, channels_last=False), ""))
    return rows


def make_upscaler(model, device: str, precision: str, tile, tiles_per_batch, channels_last: bool):
    """An Upscaler by its own options. channels_last off: the caller's model, already on
    the device in NCHW, which the Upscaler then runs as it is."""
    from sr_core.upscaler import Upscaler

    if channels_last:
        return Upscaler(copy.deepcopy(model), device=device, precision=precision, tile=tile, overlap=OVERLAP,
                        tiles_per_batch=tiles_per_batch, owns_model=True)
    plain = copy.deepcopy(model).to(device).eval().requires_grad_(False)
    return Upscaler(plain, device=device, precision=precision, tile=tile, overlap=OVERLAP,
                    tiles_per_batch=tiles_per_batch)


def psnr_against(outputs: list, reference: list) -> float | str:
    """Lowest PSNR (dB, RGB) of ``outputs`` against ``reference``, image by image; a
    string when the reference is flat (nothing to compare)."""
    import numpy as np

    from sr_core.metrics import psnr

    if max(float(np.std(r)) for r in reference) < FLAT_STD:
        return "n/a (flat fp32 output: random weights)"
    return min(psnr(o, r) for o, r in zip(outputs, reference))


def step_upscaler(ctx: Context, arch: str) -> Iterator[Row]:
    from bench_upscaler import conv_flops_per_input_pixel

    step = "upscaler-rrdbnet" if arch == "rrdbnet" else "upscaler-compact"
    if not available(arch):
        yield Row(step, f"{arch} {ctx.sizes.variants[arch]}", {}, UNAVAILABLE)
        return
    model = build_model(ctx, arch)
    images = photos(ctx)
    in_px = sum(im.shape[0] * im.shape[1] for im in images)
    out_px = in_px * model.scale**2
    flop = conv_flops_per_input_pixel(model)
    yield Row(step, "model and inputs", {"model": model_label(ctx, arch), "conv MFLOP/input px": flop / 1e6,
                                         "inputs": f"{len(images)} photos ≤ {ctx.sizes.photo_crop} px",
                                         "output Mpx": out_px / 1e6})
    reference = None
    for case, options, skip in upscaler_configs(ctx.device, ctx.capability(), ctx.sizes.tile):
        if skip:
            yield Row(step, case, {}, f"skipped: {skip}")
            continue
        figures, status, up = {}, SUCCESS, None
        try:
            up = make_upscaler(model, ctx.device, **options)
            outputs = [up(im) for im in images]  # warm-up (kernels, cuDNN's choices) and the outputs
            memory: dict = {}
            with peak_memory(ctx.device, memory):
                seconds = best_seconds(lambda: [up(im) for im in images], ctx.sizes.repeats, ctx.device)
            figures["out Mpx/s"] = out_px / seconds / 1e6
            figures["useful TFLOP/s"] = in_px * flop / seconds / 1e12
            figures["peak GiB"] = memory["peak_gib"] if memory["peak_gib"] is not None else "n/a (CPU)"
            if options["tile"] is None:
                figures["chosen tile"] = up.tile_for(*images[0].shape[:2]) or "whole image"
                figures["tiles/forward"] = up.tiles_per_batch
            if reference is None:
                if options["precision"] != "fp32":
                    raise AssertionError("the fp32 row comes first")
                reference = outputs
                figures["output std (8-bit)"] = float(max(o.std() for o in outputs))
            elif not reference:
                figures["dB vs fp32"] = "n/a (the fp32 row failed)"
            else:
                db = psnr_against(outputs, reference)
                figures["dB vs fp32"] = db
                if isinstance(db, float) and db < PSNR_FLOOR_DB:
                    status = failed(f"output {db:.1f} dB from fp32 (< {PSNR_FLOOR_DB:g} dB)")
        except Exception as exc:  # this configuration fails; the others still run
            status = failed(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300])
            if options["precision"] == "fp32" and reference is None:
                reference = []  # the fp32 row failed: the others have nothing to compare with
        up = outputs = None  # free its GPU memory before the next configuration is measured
        yield Row(step, case, figures, status)


def floor_batches(up, images, device: str):
    """The Upscaler's batches of windows, made up in device memory beforehand."""
    import torch

    from sr_core.upscaler import plan_axis

    batches = []
    for img in images:
        tile = up.tile_for(*img.shape[:2])
        rows = plan_axis(img.shape[0], tile, up.overlap, up.size_multiple)
        cols = plan_axis(img.shape[1], tile, up.overlap, up.size_multiple)
        windows = [(wy, wx) for wy in rows for wx in cols]
        for i in range(0, len(windows), up.tiles_per_batch):
            group = windows[i:i + up.tiles_per_batch]
            h, w = group[0][0].length, group[0][1].length
            batch = torch.rand(len(group), up.num_channels, h, w, device=device)
            batches.append(batch.contiguous(memory_format=up.memory_format))
    return batches


def startup_input(ctx: Context) -> Path:
    """A folder with one 16x16 image: ``sr upscale`` on it times the command's start-up."""
    folder = ctx.workdir / "startup-input"
    if not folder.exists():
        import numpy as np

        from sr_core.codecs import write_image

        folder.mkdir(parents=True)
        write_image(str(folder / "dot.png"), np.full((16, 16, 3), 128, np.uint8))
    return folder


def timed_sr_upscale(ctx: Context, inputs: Path, out: Path, model: str, sampler: GpuSampler | None = None) -> dict:
    """``sr upscale`` on ``inputs``, and on one 16x16 image (its start-up: interpreter,
    torch, CUDA context, model load). Raises if either fails."""
    base = [*sr_command(), "upscale", "--model", model, "--device", ctx.device, "--overwrite"]
    env = ctx.env()
    code, startup, text = run_logged([*base, str(startup_input(ctx)), "-o", str(out) + "-startup"],
                                     Path(str(out) + "-startup.log"), env, ctx.remaining())
    if code != 0:
        raise RuntimeError(f"sr upscale (start-up run) exit {code}: {last_line(text)}")
    with sampler or contextlib.nullcontext():
        code, seconds, text = run_logged([*base, str(inputs), "-o", str(out)], Path(str(out) + ".log"), env,
                                         ctx.remaining())
    if code != 0:
        raise RuntimeError(f"sr upscale exit {code}: {last_line(text)} (log: {out}.log)")
    # The work is the difference; when it is smaller than the start-up's own jitter
    # (tiny inputs), there is no rate to report.
    work = seconds - startup if seconds - startup > 0.25 * seconds else None
    return {"seconds": seconds, "startup": startup, "work": work}


NOISE = "n/a (within the start-up's noise)"


def step_upscale_e2e(ctx: Context) -> Iterator[Row]:
    import torch

    from bench_upscaler import reference_loop
    from sr_core.codecs import read_image, write_image
    from sr_core.upscaler import Upscaler

    step, arch = "upscale-e2e", "rrdbnet"
    precision = ctx.default_precision()
    path = model_file(ctx, arch)
    images = photos(ctx)
    folder = ctx.workdir / "e2e" / "in"
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        write_image(str(folder / f"photo{i}.png"), im)
    up = Upscaler.from_file(path, device=ctx.device)  # what `sr upscale` builds: everything automatic
    out_px = sum(im.shape[0] * im.shape[1] for im in images) * up.scale**2
    yield Row(step, "setup", {"model": model_label(ctx, arch), "precision": precision, "tile": "automatic",
                              "inputs": f"{len(images)} photos ≤ {ctx.sizes.photo_crop} px"})
    ours = [up(im) for im in images]
    upscaler_s = best_seconds(lambda: [up(im) for im in images], ctx.sizes.repeats, ctx.device)
    batches = floor_batches(up, images, ctx.device)

    def floor():
        with torch.inference_mode(), autocast(ctx.device, precision):
            for x in batches:
                up.model(x)

    floor()
    floor_s = best_seconds(floor, ctx.sizes.repeats, ctx.device)
    rate = out_px / floor_s / 1e6
    yield Row(step, "floor: bare model over the Upscaler's batches", {"s": floor_s, "out Mpx/s": rate,
                                                                      "vs floor": 1.0})
    yield Row(step, "Upscaler (in process)", {"s": upscaler_s, "out Mpx/s": out_px / upscaler_s / 1e6,
                                              "vs floor": floor_s / upscaler_s})

    from sr_core import load_generator

    plain = load_generator(path).to(ctx.device)  # NCHW, as those loops run it
    ref_tile = up.tile_for(*images[0].shape[:2]) or max(images[0].shape[:2])

    def reference():
        with autocast(ctx.device, precision):
            for im in images:
                reference_loop(plain, im, ref_tile, OVERLAP, device=ctx.device)

    reference()
    ref_s = best_seconds(reference, ctx.sizes.repeats, ctx.device)
    yield Row(step, f"reference loop (1 tile at a time, NCHW, full-frame float output, {precision})",
              {"s": ref_s, "out Mpx/s": out_px / ref_s / 1e6, "vs floor": floor_s / ref_s})
    up = plain = batches = None  # freed before sr upscale runs on the same GPU (and plans its tiles)
    if ctx.device == "cuda":
        torch.cuda.empty_cache()

    figures, status = {}, SUCCESS
    try:
        timing = timed_sr_upscale(ctx, folder, ctx.workdir / "e2e" / "out", path)
        work = timing["work"]
        outputs = [read_image(str(ctx.workdir / "e2e" / "out" / f"photo{i}_sr.png")) for i in range(len(images))]
        db = psnr_against(outputs, ours)
        figures = {"s (whole command)": timing["seconds"], "start-up s": timing["startup"],
                   "out Mpx/s (start-up excluded)": out_px / work / 1e6 if work else NOISE,
                   "vs floor": floor_s / work if work else NOISE, "dB vs Upscaler": db}
        if isinstance(db, float) and db < PSNR_FLOOR_DB:
            status = failed(f"sr upscale's output is {db:.1f} dB from the Upscaler's")
    except Exception as exc:
        status = failed(str(exc)[:300])
    yield Row(step, "sr upscale (subprocess, PNG out)", figures, status)


# ---------------------------------------------------------------- steps: training


def training_data(ctx: Context) -> dict:
    """Shards of the photographs (``sr prepare``) and a validation folder of two crops."""
    root = ctx.workdir / "train-data"
    paths = {"shards": str(root / "shards"), "val": str(root / "val")}
    if (root / "shards" / "index.json").exists():
        return paths
    from PIL import Image

    from jobs.prepare import PrepareSettings, prepare

    size, stride = ctx.sizes.prepare
    prepare(str(IMAGES), paths["shards"], PrepareSettings(size=size, step=stride), progress=False)
    (root / "val").mkdir(parents=True, exist_ok=True)
    for name in ("camera", "coffee"):
        image = Image.open(IMAGES / f"{name}.png").convert("RGB")
        w, h = image.size
        image.crop((w // 2 - 64, h // 2 - 64, w // 2 + 64, h // 2 + 64)).save(root / "val" / f"{name}.png")
    return paths


def read_scalars(tb_dir: str) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(tb_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [e.value for e in sorted(acc.Scalars(tag), key=lambda e: e.step)] for tag in acc.Tags()["scalars"]}


def loss_checks(scalars: dict, stage: str, precision: str) -> tuple[dict, list[str]]:
    """Figures and problems from a run's TensorBoard scalars: losses finite, the PSNR
    stage's loss falling, the loss scale logged (and moving under fp16)."""
    figures, problems = {}, []
    loss_tag = "loss/g_pixel" if stage == "psnr" else "loss/g_total"
    losses = scalars.get(loss_tag, [])
    if not losses:
        return figures, [f"no {loss_tag} in TensorBoard"]
    figures[f"{loss_tag} first→last"] = f"{losses[0]:.4g}→{losses[-1]:.4g}"
    watched = [t for t in scalars if t.startswith("loss/")]
    bad = [t for t in watched if not all(math.isfinite(v) for v in scalars[t])]
    if bad:
        problems.append(f"non-finite values in {', '.join(bad)}")
    if stage == "psnr":
        third = max(1, len(losses) // 3)
        first, last = statistics.fmean(losses[:third]), statistics.fmean(losses[-third:])
        if not last < first:
            problems.append(f"{loss_tag} did not fall (mean {first:.4g} over the first third, {last:.4g} over the last)")
    for tag in ("loss_scale/g", "loss_scale/d"):
        scales = scalars.get(tag)
        if tag == "loss_scale/d" and stage == "psnr":
            continue
        if not scales:
            problems.append(f"{tag} not logged")
            continue
        figures[tag] = f"{scales[0]:g}→{scales[-1]:g} (min {min(scales):g})"
        if precision == "fp16" and max(scales) <= 1:
            problems.append(f"{tag} stayed {max(scales):g} under fp16 (no dynamic loss scaling)")
    if "loss/d" in scalars:
        figures["loss/d first→last"] = f"{scalars['loss/d'][0]:.4g}→{scalars['loss/d'][-1]:.4g}"
    times = scalars.get("perf/step_time_s", [])[1:] or scalars.get("perf/step_time_s", [])
    if times:
        figures["ms/step (median)"] = 1000 * statistics.median(times)
    memory = scalars.get("perf/memory_mb", [])
    if memory:
        figures["peak MiB (GPU; RSS on CPU)"] = max(memory)
    return figures, problems


HEADER = re.compile(r"world size (\d+), backend (.+?), precision (\w+)")


def header_checks(text: str, processes: int, precision: str, backend: str) -> list[str]:
    match = HEADER.search(text)
    if not match:
        return ["no 'world size ..., backend ..., precision ...' line in the log"]
    problems = []
    if int(match.group(1)) != processes:
        problems.append(f"world size {match.group(1)}, expected {processes}")
    if match.group(3) != precision:
        problems.append(f"precision {match.group(3)}, expected {precision} (the device's default)")
    if not match.group(2).startswith(backend):
        problems.append(f"backend {match.group(2)}, expected {backend}")
    return problems


@dataclass
class Launch:
    """How a training run is started."""

    name: str
    backend: str
    processes: int

    def command(self) -> list[str]:
        if self.backend == "ddp":
            return [*sr_command(), "train", *(["--processes", str(self.processes)] if self.processes > 1 else [])]
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                "jobs/launch/deepspeed_zero2_8_gpus.yaml", "--num_processes", str(self.processes),
                "--main_process_port", str(free_port()), "-m", "jobs.train"]


def wait_for_checkpoint(run_dir: str, proc: subprocess.Popen, timeout: float) -> bool:
    """Poll (this is a benchmark, not a test) until the run has a complete checkpoint."""
    from jobs import checkpoint as ckpt

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if os.path.isdir(os.path.join(run_dir, "checkpoints")) and ckpt.complete_steps(run_dir):
            return True
        time.sleep(0.2)
    return False


def train_stage(ctx: Context, launch: Launch, stage: str, run_dir: Path, extra: list[str], preempt: bool) -> Row:
    """One stage: straight, or (``preempt``) stopped by SIGTERM after its first checkpoint
    and continued with ``--resume auto`` for ``steps_after_resume`` more steps."""
    from jobs import checkpoint as ckpt

    s = ctx.sizes
    precision = ctx.default_precision()
    preset = s.psnr_preset if stage == "psnr" else s.gan_preset
    env = ctx.env(launch.processes)
    data = training_data(ctx)
    base = [*launch.command(), "--preset", preset, *s.train_overrides, *extra,
            f"data.train_shards={data['shards']}", f"data.val_folder={data['val']}", "train.log_every=1",
            "train.val_every=1000000", "train.progress=false", f"train.run_dir={run_dir}"]
    case = f"{launch.name} · {stage} · {precision}"
    problems: list[str] = []
    figures: dict = {}
    started = time.perf_counter()
    if preempt:
        log = Path(f"{run_dir}.preempted.log")
        with open(log, "w") as out:
            proc = start_child([*base, "train.max_steps=1000000", f"train.checkpoint_every={s.checkpoint_every}",
                                "--resume", "auto"], out, env)
            if not wait_for_checkpoint(str(run_dir), proc, ctx.remaining()):
                _kill_group(proc)
                return Row("train", case, figures, failed(f"no checkpoint before the run ended or the time limit "
                                                          f"({last_line(log.read_text(errors='replace'))}; log {log})"))
            # SIGTERM to the command the user started (sr train, or accelerate's launcher,
            # which passes it on to its workers), as a spot VM's shutdown sends it.
            proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(timeout=min(ctx.remaining(), 300))
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                code = -9
        text = log.read_text(errors="replace")
        problems += header_checks(text, launch.processes, precision, launch.backend)
        if "SIGTERM: checkpoint" not in text:
            problems.append(f"no SIGTERM checkpoint (exit {code}: {last_line(text)}; log {log})")
        elif launch.backend == "ddp" and code != 0:
            problems.append(f"exit {code} after SIGTERM (expected 0)")
        steps = ckpt.complete_steps(str(run_dir))
        if not steps:
            return Row("train", case, figures, failed("; ".join(problems) or "no checkpoint"))
        stopped = steps[-1]
        final = stopped + s.steps_after_resume
        code, _, text = run_logged([*base, f"train.max_steps={final}", f"train.checkpoint_every={s.checkpoint_every}",
                                    "--resume", "auto"], Path(f"{run_dir}.resumed.log"), env, ctx.remaining())
        figures["steps"] = f"SIGTERM at {stopped}, resumed to {final}"
        if not re.search(rf"resumed from \S+ at step {stopped}\b", text):
            problems.append(f"the resumed run did not continue from step {stopped} ({last_line(text)})")
    else:
        final = s.gan_steps
        code, _, text = run_logged([*base, f"train.max_steps={final}", f"train.checkpoint_every={final}"],
                                   Path(f"{run_dir}.log"), env, ctx.remaining())
        figures["steps"] = final
        problems += header_checks(text, launch.processes, precision, launch.backend)
    if code != 0:
        problems.append(f"exit {code}: {last_line(text)}")
    if final not in ckpt.complete_steps(str(run_dir)):
        problems.append(f"no complete checkpoint at step {final}")
    elif launch.processes > 1:
        folder = ckpt.step_dir(str(run_dir), final)
        digests = {ckpt.load_torch(f"{folder}/rank_{r}.pt")["digest"] for r in range(launch.processes)}
        figures["ranks equal"] = len(digests) == 1
        if len(digests) != 1:
            problems.append("the ranks ended with different weights")
    if not (run_dir / "model.safetensors").exists():
        problems.append("no model.safetensors exported")
    if (run_dir / "tb").exists():
        more, issues = loss_checks(read_scalars(str(run_dir / "tb")), stage, precision)
        figures.update(more)
        problems += issues
    else:
        problems.append("no TensorBoard events")
    figures["wall s"] = time.perf_counter() - started
    return Row("train", case, figures, failed("; ".join(problems)) if problems else SUCCESS)


def step_train(ctx: Context, launch: Launch) -> Iterator[Row]:
    root = ctx.workdir / f"train-{launch.backend}-{launch.processes}p"
    root.mkdir(parents=True, exist_ok=True)
    psnr = train_stage(ctx, launch, "psnr", root / "psnr", [], preempt=True)
    yield psnr
    pretrained = root / "psnr" / "model.safetensors"
    if not pretrained.exists():
        yield Row("train", f"{launch.name} · gan", {}, "NOT RUN: the PSNR stage exported no model to start from")
        return
    extra = [f"train.pretrained={pretrained}", *ctx.sizes.gan_overrides]
    if ctx.vgg_weights:
        extra.append(f"loss.vgg_weights={ctx.vgg_weights}")
    elif not ctx.rehearsal:
        extra.append("loss.random_vgg=true")  # the same VGG19 computation, no download
    yield train_stage(ctx, launch, "gan", root / "gan", extra, preempt=False)


# ---------------------------------------------------------------- step: sr batch


def encoding_verdict(summary: dict, encode_threads: int) -> tuple[dict, bool]:
    """Does the actor's encoding keep up with its model? Per image: the model's seconds
    against (encode + metrics + write) / encode threads, and the share of the actor's
    steady time spent in the model."""
    m = summary["metrics"]
    model_s = m["model_s"]["mean"]
    finish_s = m["encode_s"]["mean"] + m["metrics_s"]["mean"] + m["write_s"]["mean"]
    steady = summary.get("steady_images_per_second") or summary["images_per_second"]
    busy = model_s * steady
    keeps_up = finish_s / encode_threads <= model_s
    figures = {"model ms/img": 1000 * model_s, "encode+metrics+write ms/img": 1000 * finish_s,
               "encode threads": encode_threads, "actor time in the model": f"{100 * min(busy, 1.0):.0f}%",
               "decode ms/img": 1000 * m["decode_s"]["mean"]}
    return figures, keeps_up


def step_batch(ctx: Context) -> Iterator[Row]:
    from bench_batch import make_inputs

    step = "batch"
    s = ctx.sizes
    folder = ctx.workdir / "batch" / "in"
    files = make_inputs(folder, s.batch_images, s.batch_side)
    yield Row(step, "inputs", {"images": len(files), "size": f"{s.batch_side}x{s.batch_side} PNG"})
    for arch in ("rrdbnet", COMPACT):
        if not available(arch):
            yield Row(step, f"{arch}", {}, UNAVAILABLE)
            continue
        path = model_file(ctx, arch)
        out_px = len(files) * s.batch_side**2 * build_model(ctx, arch).scale ** 2
        label = model_label(ctx, arch)
        try:
            sampler = GpuSampler(not ctx.rehearsal)
            timing = timed_sr_upscale(ctx, folder, ctx.workdir / "batch" / f"upscale-{arch}", path, sampler)
        except Exception as exc:
            yield Row(step, f"{arch} · sr upscale", {}, failed(str(exc)[:300]))
            continue
        work = timing["work"]
        upscale_rate = len(files) / work if work else None
        yield Row(step, f"{arch} · sr upscale", {"model": label, "img/s (start-up excluded)": upscale_rate or NOISE,
                                                 "out Mpx/s": out_px / work / 1e6 if work else NOISE,
                                                 "s (whole command)": timing["seconds"],
                                                 "start-up s": timing["startup"], **sampler.figures()})
        out = ctx.workdir / "batch" / f"batch-{arch}"
        run_id = f"gpu-check-{arch}"
        actor_case = f"{arch} · sr batch, 1 {'CPU' if ctx.rehearsal else 'GPU'} actor"
        command = [*sr_command(), "batch", str(folder), str(out), "--model", path, "--actors", "1", "--overwrite",
                   "--run-id", run_id, "-q"]
        command += ["--num-gpus-per-actor", "0", "--num-cpus", "2"] if ctx.rehearsal else \
            ["--num-gpus-per-actor", "1"]
        sampler = GpuSampler(not ctx.rehearsal)
        with sampler:
            code, seconds, text = run_logged(command, Path(f"{out}.log"), ctx.env(), ctx.remaining())
        summary_path = out / "_sr_batch" / run_id / "summary.json"
        if code != 0 or not summary_path.exists():
            yield Row(step, actor_case, {}, failed(f"exit {code}: {last_line(text)} "
                                                                          f"(log {out}.log)"))
            continue
        summary = json.loads(summary_path.read_text())
        problems = []
        if summary["failed"] or summary["done"] != len(files):
            problems.append(f"{summary['failed']} failed, {summary['done']} of {len(files)} done")
        gpus = summary.get("ray", {}).get("pool", {}).get("num_gpus")
        if not ctx.rehearsal and gpus != 1:
            problems.append(f"the actor had {gpus} GPUs, expected 1")
        steady = summary.get("steady_images_per_second") or summary["images_per_second"]
        yield Row(step, actor_case,
                  {"img/s (steady)": steady, "out Mpx/s (steady)": steady * out_px / len(files) / 1e6,
                   "vs sr upscale": steady / upscale_rate if upscale_rate else NOISE, "img/s (whole run)": summary["images_per_second"],
                   "first result s": summary.get("first_result_seconds") or math.nan,
                   "Ray start s": summary["ray"]["startup_seconds"], "s (whole command)": seconds,
                   **sampler.figures()},
                  failed("; ".join(problems)) if problems else SUCCESS)
        threads = int(summary.get("settings", {}).get("encode_threads") or 2)
        figures, keeps_up = encoding_verdict(summary, threads)
        figures["keeps up"] = keeps_up
        yield Row(step, f"{arch} · encoding in the actor", figures)


def step_degradation(ctx: Context) -> Iterator[Row]:
    """Degraded pairs/s of the whole pipeline on the device (what the training step adds
    per batch when ``degradation.enabled``), and the device's JPEG against the CPU's."""
    import torch

    from sr_core import jpeg_torch
    from sr_core.realdegrade import RealDegradation, RealDegradationOptions

    batch, side = ctx.sizes.degrade_batch
    crops = [torch.from_numpy(im[:side, :side].copy()).permute(2, 0, 1).float() / 255
             for im in photos(ctx) if min(im.shape[:2]) >= side]
    if not crops:
        crops = [torch.rand(3, side, side, generator=torch.Generator().manual_seed(0))]
    gt = torch.stack([crops[i % len(crops)] for i in range(batch)]).to(ctx.device)
    pipeline = RealDegradation(RealDegradationOptions(scale=4))
    seeds = iter(range(10**6))

    def run():
        return pipeline(gt, torch.Generator(device=ctx.device).manual_seed(next(seeds)))

    run()  # warm-up
    memory: dict = {}
    with peak_memory(ctx.device, memory):
        seconds = best_seconds(run, max(3, ctx.sizes.repeats), ctx.device)
    yield Row("degradation", f"second-order pipeline, {batch} x {side} px, x4", {
        "pairs/s": batch / seconds, "ms/batch": 1000 * seconds,
        "peak GiB": memory["peak_gib"] if memory["peak_gib"] is not None else "n/a (CPU)"})
    on_device = jpeg_torch.jpeg(gt, 60).cpu().double()
    on_cpu = jpeg_torch.jpeg(gt.cpu(), 60).double()
    mse = float(((on_device - on_cpu) ** 2).mean())
    yield Row("degradation", "JPEG q60 on the device vs on the CPU", {
        "dB": "identical" if mse == 0 else 10 * math.log10(1 / mse),
        "differing 8-bit values": float((on_device != on_cpu).float().mean())})


# ---------------------------------------------------------------- running the steps


STEP_FUNCTIONS: dict[str, Callable[[Context], Iterator[Row]]] = {
    "environment": step_environment,
    "upscaler-rrdbnet": lambda ctx: step_upscaler(ctx, "rrdbnet"),
    "upscaler-compact": lambda ctx: step_upscaler(ctx, COMPACT),
    "upscale-e2e": step_upscale_e2e,
    "train-ddp": lambda ctx: step_train(ctx, Launch("sr train (DDP)", "ddp", 1)),
    "train-deepspeed": lambda ctx: step_train(ctx, Launch("DeepSpeed ZeRO-2 launch config", "deepspeed", 1)),
    "batch": step_batch,
    "degradation": step_degradation,
    "train-nccl": lambda ctx: [*step_train(ctx, Launch("sr train --processes 2 (DDP, NCCL)", "ddp", 2)),
                               *step_train(ctx, Launch("DeepSpeed ZeRO-2 launch config, 2 processes", "deepspeed", 2))],
}
assert set(STEP_FUNCTIONS) == {s.name for s in STEPS}


def step_timeout(step: Step, args: argparse.Namespace) -> float:
    """The hard limit of a step's process. The rehearsal's budgets are the GPU's, so on a
    (shared, slow) CPU it gets a flat allowance instead."""
    if args.cpu_rehearsal:
        return max(600.0, step.budget_s * args.timeout_factor)
    return step.budget_s * args.timeout_factor


def worker_main(args: argparse.Namespace) -> int:
    """``--worker STEP``: run one step here, appending its rows to ``--rows`` as JSON lines."""
    ctx = Context(rehearsal=args.cpu_rehearsal, workdir=Path(args.workdir),
                  deadline=time.monotonic() + args.worker_seconds,
                  model_files={"rrdbnet": args.rrdb_model, COMPACT: args.compact_model}, vgg_weights=args.vgg_weights)
    step = args.worker
    code = 0
    signal.signal(signal.SIGTERM, _stop_step)
    if ctx.rehearsal:
        import torch

        # Two OpenMP threads on a shared 2-core machine can run 10x slower than one.
        torch.set_num_threads(1)
    with open(args.rows, "a") as out:
        try:
            for row in STEP_FUNCTIONS[step](ctx):
                row.step = step  # one name per step in the table, whatever the function called it
                out.write(json.dumps(asdict(row)) + "\n")
                out.flush()
                print(f"  {row.case}: {row.status}", file=sys.stderr, flush=True)
        except (Exception, StepStopped) as exc:
            import traceback

            traceback.print_exc()
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            row = Row(step, "(step)", {}, failed(f"{type(exc).__name__}: {first}"[:300]))
            out.write(json.dumps(asdict(row)) + "\n")
            code = 1
    return code


def run_step(step: Step, args: argparse.Namespace, workdir: Path) -> list[Row]:
    """Run one step in a process of its own, with its hard limit."""
    rows_file = workdir / f"{step.name}.rows.jsonl"
    limit = step_timeout(step, args)
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", step.name, "--workdir", str(workdir),
               "--rows", str(rows_file), "--worker-seconds", str(max(1.0, limit - 15)),
               *forwarded_options(args)]
    print(f"==> {step.name} (budget {step.budget_s} s, limit {limit:.0f} s)", file=sys.stderr, flush=True)
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=REPO, start_new_session=True)
    try:
        code = proc.wait(timeout=limit)
        killed = False
    except subprocess.TimeoutExpired:
        # SIGTERM first: the step stops the commands it started and records why.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            code = proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            code = -9
        killed = True
    except KeyboardInterrupt:
        _kill_group(proc)
        raise
    seconds = time.perf_counter() - start
    rows = [Row(**json.loads(line)) for line in rows_file.read_text().splitlines()] if rows_file.exists() else []
    if killed and not any(is_failure(r.status) for r in rows):
        rows.append(Row(step.name, "(step)", {}, failed(f"stopped at its limit of {limit:.0f} s")))
    elif code != 0 and not any(is_failure(r.status) for r in rows):
        rows.append(Row(step.name, "(step)", {}, failed(f"its process exited {code} (output above)")))
    status = SUCCESS if seconds <= step.budget_s else f"ok, over budget by {seconds - step.budget_s:.0f} s"
    rows.append(Row(step.name, "time", {"s": seconds, "budget s": step.budget_s}, status))
    return rows


def forwarded_options(args: argparse.Namespace) -> list[str]:
    out = ["--cpu-rehearsal"] if args.cpu_rehearsal else []
    for option in ("rrdb_model", "compact_model", "vgg_weights"):
        if getattr(args, option):
            out += [f"--{option.replace('_', '-')}", getattr(args, option)]
    return out


def no_cuda_line() -> str | None:
    """The one line said on a machine without CUDA (None where there is CUDA)."""
    import torch

    if torch.cuda.is_available():
        return None
    why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA device is visible"
    return f"gpu-check: no CUDA here ({why}; torch {torch.__version__}): nothing run"


def run_check(args: argparse.Namespace) -> int:
    if not args.cpu_rehearsal:
        line = no_cuda_line()
        if line:
            print(line)
            return 0
    steps = select_steps(args.only, args.skip)
    # No CUDA context in this process: it would hold GPU memory through every step.
    num_gpus = 0 if args.cpu_rehearsal else len(visible_gpus())
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="sr-gpu-check-"))
    workdir.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    interrupted = False
    try:
        for step in steps:
            if step.min_gpus > 1 and num_gpus < step.min_gpus:
                rows.append(Row(step.name, "(step)", {}, f"skipped: needs {step.min_gpus} GPUs "
                                                         f"({num_gpus} visible)" if not args.cpu_rehearsal else
                                "skipped: multi-GPU (NCCL) needs GPUs; 2-process runs on CPU are tests/test_train.py's"))
                continue
            rows += run_step(step, args, workdir)
    except KeyboardInterrupt:
        interrupted = True
        rows.append(Row("(check)", "interrupted", {}, "NOT RUN: interrupted (Ctrl-C); the rows above are complete"))
    if args.cpu_rehearsal:
        title = "sr-cloud GPU check — CPU REHEARSAL (tests only; tiny sizes on CPU; NOT GPU results)"
    else:
        names = [r.figures.get("GPU") for r in rows if r.step == "environment" and r.case == "device"]
        title = f"sr-cloud GPU check — {names[0] if names else 'GPU'} × {num_gpus}, {platform.node()}"
    table = render_table(title, rows)
    print()
    print(table)
    out = args.out or (REHEARSAL_OUT if args.cpu_rehearsal else DEFAULT_OUT)
    write_results(out, table, title, rows)
    code = 130 if interrupted else exit_code(rows)
    failures = [r for r in rows if is_failure(r.status)]
    if failures or args.keep or args.workdir:
        print(f"gpu-check: logs and outputs kept in {workdir}", file=sys.stderr)
    else:  # a scratch folder of our own, and nothing in it to look at
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"gpu-check: {len(failures)} path(s) failed; table in {out}" if failures else
          f"gpu-check: every path ran; table in {out}", file=sys.stderr)
    return code


def write_results(out: str, table: str, title: str, rows: list[Row]) -> None:
    """The table at ``out`` (any fsspec URL) and the rows as JSON beside it."""
    from sr_core import storage

    def plain(value):  # standard JSON: inf and nan as strings
        return str(value) if isinstance(value, float) and not math.isfinite(value) else value

    storage.write_bytes(out, table.encode())
    base = out[:-3] if out.endswith(".md") else out
    data = {"title": title, "rows": [{**asdict(r), "figures": {k: plain(v) for k, v in r.figures.items()}}
                                     for r in rows]}
    storage.write_bytes(base + ".json", (json.dumps(data, indent=1, allow_nan=False) + "\n").encode())


# ---------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="./dev gpu-check",
        description="Every CUDA path of sr-cloud in one short check (under 8 minutes on one GPU): the Upscaler "
                    "in fp32/fp16/bf16, sr upscale, sr train (DDP, DeepSpeed ZeRO-2, NCCL), sr batch on a GPU "
                    "actor. Prints one Markdown table and writes it to --out; exit code 1 if a path failed. "
                    "Without CUDA it says so in one line and exits 0.",
        epilog="The steps and their time budgets: --list. On one V100 in Google Cloud: "
               "`sr cloud gpu-check --gpus V100:1` (see README).")
    parser.add_argument("--out", default=None,
                        help=f"where the table goes, any fsspec URL (default: {DEFAULT_OUT}; a .json of the rows "
                             "is written beside it)")
    parser.add_argument("--only", action="append", default=[], metavar="STEP", help="run only this step (repeatable)")
    parser.add_argument("--skip", action="append", default=[], metavar="STEP", help="leave out this step (repeatable)")
    parser.add_argument("--list", action="store_true", help="print the steps with their time budgets and exit")
    parser.add_argument("--rrdb-model", default="", metavar="FILE",
                        help="real RRDBNet x4 weights (e.g. RealESRGAN_x4plus.pth) instead of random ones")
    parser.add_argument("--compact-model", default="", metavar="FILE",
                        help=f"real {COMPACT} x4 weights (e.g. realesr-general-x4v3.pth) instead of random ones")
    parser.add_argument("--vgg-weights", default="", metavar="FILE",
                        help="torchvision's VGG19 ImageNet weights for the GAN stage (default: a random VGG19)")
    parser.add_argument("--workdir", default="", help="scratch folder, kept (default: a new temporary one, "
                                                      "removed unless a path failed or --keep)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder (logs, runs, outputs)")
    parser.add_argument("--timeout-factor", type=float, default=2.0,
                        help="a step is stopped at this many times its budget (default: 2)")
    parser.add_argument("--cpu-rehearsal", action="store_true",
                        help="FOR TESTS ONLY: run every step on the CPU with tiny sizes; the table says "
                             "CPU REHEARSAL and its figures are not GPU results")
    parser.add_argument("--worker", default="", help=argparse.SUPPRESS)
    parser.add_argument("--rows", default="", help=argparse.SUPPRESS)
    parser.add_argument("--worker-seconds", type=float, default=600.0, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    # nvidia-smi numbers GPUs in PCI bus order; CUDA (in every process of the check) too.
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.worker:
            return worker_main(args)
        if args.list:
            print(step_list_text())
            return 0
        if args.timeout_factor < 1:
            raise ValueError(f"--timeout-factor must be >= 1, got {args.timeout_factor}")
        select_steps(args.only, args.skip)  # a typo fails before anything runs
        return run_check(args)
    except ValueError as exc:
        print(f"gpu-check: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gpu-check: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
