"""The step registry (``STEPS``), the process per step with its hard limit, the table at
the end, and the command line (``python -m infra.gpucheck``, ``./dev gpu-check``)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

from infra.gpucheck import (steps_batch, steps_codecs, steps_compile, steps_degrade, steps_environment, steps_tensorrt,
                            steps_train, steps_upscale)
from infra.gpucheck.context import COMPACT, REPO, Context, visible_gpus
from infra.gpucheck.processes import StepStopped, kill_group, stop_step
from infra.gpucheck.table import SUCCESS, Row, exit_code, failed, is_failure, render_table, write_results

DEFAULT_OUT = "gpu-check.md"
REHEARSAL_OUT = "gpu-check-cpu-rehearsal.md"
TOTAL_BUDGET_ONE_GPU_S = 480


@dataclass(frozen=True)
class Step:
    """One entry of ``STEPS``: a name for ``--only``/``--skip`` and the table, a time
    budget, a line for ``--list``, and the function that runs it."""

    name: str
    budget_s: int
    """Seconds this step should take on one V100-class GPU (the sizes are chosen for it)."""
    what: str
    """What it checks, for ``--list``."""
    run: Callable[[Context], Iterable[Row]]
    """The step itself: yields the table's rows, in a process of its own (``worker_main``)."""
    min_gpus: int = 1
    """Skipped (a row says so) on a machine with fewer GPUs."""
    opt_in: bool = False
    """Runs only when ``--only`` names it: its budget would take the default run past
    ``TOTAL_BUDGET_ONE_GPU_S``."""


# The registry, in run order. A new step: one function ``step_x(ctx) -> Iterator[Row]``
# in the steps_* module of its group (or a new one), one line here with its budget.
STEPS = [
    Step("environment", 10, "device, driver, torch/CUDA/cuDNN/NCCL versions, sm_XY kernels in this torch, "
                            "default precision", steps_environment.step_environment),
    Step("upscaler-rrdbnet", 80, "full ESRGAN RRDBNet x4: fp32/fp16/bf16, PSNR vs fp32, Mpx/s, peak memory, "
                                 "tiles per forward 1/4/auto, channels_last on/off",
         steps_upscale.step_upscaler_rrdbnet),
    Step("upscaler-compact", 30, f"the same for {COMPACT} (realesr_general), when this install has it",
         steps_upscale.step_upscaler_compact),
    Step("upscale-e2e", 50, "sr upscale (subprocess) vs the Upscaler vs the bare model (floor) vs the "
                            "reference loop, full RRDBNet x4", steps_upscale.step_upscale_e2e),
    Step("train-ddp", 75, "sr train, 1 GPU, DDP: PSNR stage stopped by SIGTERM and resumed, then the GAN "
                          "stage; losses, loss scale, precision", steps_train.step_train_ddp),
    Step("train-deepspeed", 90, "the same through accelerate launch --config_file "
                                "jobs/launch/deepspeed_zero2_8_gpus.yaml (ZeRO-2), 1 process",
         steps_train.step_train_deepspeed),
    Step("batch", 100, "sr batch, local Ray, 1 GPU actor, a few hundred small images, vs sr upscale; GPU "
                       "utilisation; does encoding keep up (RRDBNet, and the compact generator if present)",
         steps_batch.step_batch),
    Step("tensorrt", 40, "where trtexec is installed: ONNX export of RRDBNet x4 (sr convert), a TensorRT fp16 "
                         "engine with a dynamic shape profile, its throughput at 1x3x256x256",
         steps_tensorrt.step_tensorrt),
    Step("jpeg-gpu", 5, "JPEG q95 on the GPU (nvJPEG via torchvision.io, or nvImageCodec) vs the CPU encoder: "
                        "ms per output Mpx, PSNR vs the original, bytes; without one, the CPU fallback's bytes",
         steps_codecs.step_jpeg_gpu),
    Step("compile", 30, f"torch.compile of the Upscaler's model ({COMPACT}, default precision) vs eager: compile "
                        "time, Mpx/s, passes to pay back, output vs eager", steps_compile.step_compile, opt_in=True),
    Step("degradation", 5, "Real-ESRGAN's second-order degradation on the GPU (sr_core.realdegrade): degraded "
                           "pairs/s at x4plus's batch of 12 x 256 px, peak memory, its JPEG on the GPU vs the CPU",
         steps_degrade.step_degradation, opt_in=True),
    Step("train-nccl", 150, "with 2+ GPUs: sr train --processes 2 (DDP) and the DeepSpeed launch config, 2 "
                            "processes over NCCL, ranks equal", steps_train.step_train_nccl, min_gpus=2),
]
assert sum(s.budget_s for s in STEPS if s.min_gpus == 1 and not s.opt_in) <= TOTAL_BUDGET_ONE_GPU_S
assert len({s.name for s in STEPS}) == len(STEPS)


def select_steps(only: list[str], skip: list[str]) -> list[Step]:
    """The steps to run, in list order; ``environment`` always runs (it heads the table)."""
    names = [s.name for s in STEPS]
    for name in [*only, *skip]:
        if name not in names:
            raise ValueError(f"unknown step {name!r}; steps: {', '.join(names)}")
    return [s for s in STEPS if s.name == "environment"
            or ((s.name in only if only or s.opt_in else True) and s.name not in skip)]


def step_list_text() -> str:
    lines = [f"{'step':18} {'budget':>7}  what"]
    for s in STEPS:
        gpus = f" [needs {s.min_gpus} GPUs]" if s.min_gpus > 1 else ""
        gpus += f" [opt-in: --only {s.name}]" if s.opt_in else ""
        lines.append(f"{s.name:18} {s.budget_s:>6}s  {s.what}{gpus}")
    default = [s for s in STEPS if not s.opt_in]
    one = sum(s.budget_s for s in default if s.min_gpus == 1)
    lines.append(f"total on one GPU: {one} s (limit {TOTAL_BUDGET_ONE_GPU_S} s); with 2+ GPUs "
                 f"{sum(s.budget_s for s in default)} s; opt-in steps not counted")
    return "\n".join(lines)


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
    run = next((s.run for s in STEPS if s.name == step), None)
    if run is None:
        raise ValueError(f"--worker {step!r}: no such step")
    code = 0
    signal.signal(signal.SIGTERM, stop_step)
    if ctx.rehearsal:
        import torch

        # Two OpenMP threads on a shared 2-core machine can run 10x slower than one.
        torch.set_num_threads(1)
    with open(args.rows, "a") as out:
        try:
            for row in run(ctx):
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
    command = [sys.executable, "-m", "infra.gpucheck", "--worker", step.name, "--workdir", str(workdir),
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
            kill_group(proc)
            code = -9
        killed = True
    except KeyboardInterrupt:
        kill_group(proc)
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
