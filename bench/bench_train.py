"""The training job's overhead: steps/s of `jobs.train`'s loop against a bare PyTorch
loop of the same model, batch, losses, optimizer and EMA reading the same loader, in
one run (alternating rounds and which loop goes first, median and best window per loop), plus the job's data-wait fraction.

    .venv/bin/python bench/bench_train.py [--steps 60] [--rounds 3] [--variant small]

Both loops: RRDBNet (``--variant``) x2, L1, Adam, EMA 0.999, batches of
``--batch`` 64 px GT crops from ``sr prepare`` raw shards of the photos in
assets/images, 2 DataLoader workers, one process, CPU. The job's step time is what it
logs to TensorBoard (perf/step_time_s) after its first logging window; the bare loop is
timed the same way, over the same steps.

``--precision`` instead runs the job with the CPU demo's preset (``demo_x2``: the compact
generator x2, batch 16 of 64 px) twice per round, ``train.precision=fp32`` forced and the
default ``auto`` (bf16 on CPUs with bf16 hardware), alternating which goes first, and
prints their step times side by side.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


from jobs.config import load_config
from jobs.data import build_train_loader
from jobs.prepare import PrepareSettings, prepare
from jobs.train import run
from sr_core import build_generator

REPO = Path(__file__).resolve().parents[1]


def overrides(shards: str, run_dir: str, args) -> list[str]:
    return [f"data.train_shards={shards}", f"train.run_dir={run_dir}", f"model.generator_variant={args.variant}",
            f"data.batch_size={args.batch}", "data.num_workers=2", f"train.max_steps={args.steps}",
            f"train.log_every={args.window}", f"train.checkpoint_every={args.steps}", "train.progress=false",
            "train.ema_decay=0.999", "optim.lr_g=2e-4"]


def job_step_times(config) -> tuple[list[float], list[float]]:
    """Run the job; its logged step times and data-wait fractions, first window dropped."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run(config)
    acc = EventAccumulator(os.path.join(config.train.run_dir, "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    times = [e.value for e in acc.Scalars("perf/step_time_s")][1:]
    waits = [e.value for e in acc.Scalars("perf/data_wait_fraction")][1:]
    return times, waits


def bare_step_times(config, window: int) -> list[float]:
    """The same work written plainly: forward, L1, backward, Adam, EMA."""
    d, o = config.data, config.optim
    torch.manual_seed(config.train.seed)
    model = build_generator(config.model.generator, config.model.generator_variant, scale=d.scale)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=o.lr_g, betas=o.betas_g)
    decay = config.train.ema_decay
    times = []
    with build_train_loader(d) as loader:
        batches = iter(_forever(loader))
        start = time.perf_counter()
        for step in range(1, config.train.max_steps + 1):
            batch = next(batches)
            loss = torch.nn.functional.l1_loss(model(batch["lr"]), batch["gt"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                for e, p in zip(ema.parameters(), model.parameters()):
                    e.mul_(decay).add_(p, alpha=1 - decay)
            if step % window == 0:
                now = time.perf_counter()
                times.append((now - start) / window)
                start = now
    return times[1:]


def compare_precision(shards: str, work: str, args) -> None:
    """The demo preset's step time with fp32 forced and with the default precision."""
    from accelerate.state import AcceleratorState

    from jobs.engines import resolve_precision

    chosen = resolve_precision("auto", torch.cuda.is_available(), "srvgg_compact")
    times: dict[str, list[float]] = {"fp32": [], "auto": []}
    for r in range(args.rounds):
        order = ("fp32", "auto") if r % 2 == 0 else ("auto", "fp32")
        for precision in order:
            extra = [f"data.train_shards={shards}", f"train.run_dir={os.path.join(work, f'p{r}-{precision}')}",
                     "data.num_workers=2", f"train.max_steps={args.steps}", f"train.log_every={args.window}",
                     f"train.checkpoint_every={args.steps}", "train.progress=false",
                     f"train.precision={precision}"]
            config = load_config(None, extra, preset="demo_x2")
            # Accelerate keeps one mixed-precision setting per process: forget it between runs.
            AcceleratorState._reset_state(reset_partial_state=True)
            step_times, _ = job_step_times(config)
            times[precision] += step_times
            print(f"round {r + 1} {precision}: {1000 * statistics.median(step_times):.1f} ms/step", file=sys.stderr)
    fp32, auto = (1000 * statistics.median(times[p]) for p in ("fp32", "auto"))
    fp32_best, auto_best = (1000 * min(times[p]) for p in ("fp32", "auto"))
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} torch thread(s); demo_x2 (srvgg_compact small x2, batch 16 of 64 px), "
          f"{args.rounds} rounds x {args.steps} steps (windows of {args.window}, first dropped)\n")
    print("| train.precision | runs in | ms/step (median) | ms/step (best window) | speed-up (median) |")
    print("|---|---|---|---|---|")
    print(f"| fp32 (forced) | fp32 | {fp32:.1f} | {fp32_best:.1f} | 1 |")
    print(f"| auto (default) | {chosen} | {auto:.1f} | {auto_best:.1f} | {fp32 / auto:.2f}x |")


def _forever(loader):
    while True:
        yield from loader


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--window", type=int, default=10, help="steps per timing window (default: 10)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variant", default="small", help="rrdbnet variant (default: small)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--precision", action="store_true",
                        help="the demo preset with train.precision=fp32 forced vs the default (auto)")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="bench-train-")
    shards = os.path.join(work, "shards")
    prepare(str(REPO / "assets" / "images"), shards, PrepareSettings(size=128, step=64, format="raw"), progress=False)
    if args.precision:
        compare_precision(shards, work, args)
        return
    job, bare, waits = [], [], []
    for r in range(args.rounds):
        config = load_config(None, overrides(shards, os.path.join(work, f"run{r}"), args), preset="tiny")
        if r % 2:  # alternate which goes first: no loop always gets the quieter half
            bare += bare_step_times(config, args.window)
        times, wait = job_step_times(config)
        job += times
        waits += wait
        if not r % 2:
            bare += bare_step_times(config, args.window)
        print(f"round {r + 1}: job {1000 * statistics.median(times):.1f} ms/step (best {1000 * min(times):.1f}), "
              f"bare {1000 * statistics.median(bare[-len(times):]):.1f} (best {1000 * min(bare[-len(times):]):.1f})",
              file=sys.stderr)
    job_ms, bare_ms = 1000 * statistics.median(job), 1000 * statistics.median(bare)
    # The fastest window of each: the least disturbed by other processes on a shared
    # machine (the medians move with the load of the moment).
    job_min, bare_min = 1000 * min(job), 1000 * min(bare)
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; "
          f"rrdbnet {args.variant} x2, batch {args.batch} of 64 px, {args.rounds} rounds x {args.steps} steps "
          f"(windows of {args.window}, first dropped)\n")
    print("| loop                          | ms/step (median) | ms/step (best window) | steps/s (best) | data wait |")
    print("|-------------------------------|------------------|-----------------------|----------------|-----------|")
    print(f"| bare PyTorch (same loader)    | {bare_ms:16.1f} | {bare_min:21.1f} | {1000 / bare_min:14.2f} |"
          "         - |")
    print(f"| jobs.train (Accelerate, DDP)  | {job_ms:16.1f} | {job_min:21.1f} | {1000 / job_min:14.2f} | "
          f"{100 * statistics.median(waits):8.1f}% |")
    print(f"\noverhead of the job: {100 * (job_ms / bare_ms - 1):+.1f}% by medians, "
          f"{100 * (job_min / bare_min - 1):+.1f}% by best windows (target < 5%)")


if __name__ == "__main__":
    main()
