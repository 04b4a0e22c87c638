"""Steps ``train-ddp``, ``train-deepspeed`` and ``train-nccl``: both stages through the real
commands, a SIGTERM checkpoint and ``--resume auto``, losses and loss scales from TensorBoard."""

from __future__ import annotations

import math
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from infra.gpucheck.context import Context
from infra.gpucheck.processes import kill_group, last_line, run_logged, sr_command, start_child
from infra.gpucheck.table import SUCCESS, Row, failed
from infra.gpucheck.workloads import IMAGES
from sr_core.net import free_port


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
                kill_group(proc)
                return Row("train", case, figures, failed(f"no checkpoint before the run ended or the time limit "
                                                          f"({last_line(log.read_text(errors='replace'))}; log {log})"))
            # SIGTERM to the command the user started (sr train, or accelerate's launcher,
            # which passes it on to its workers), as a spot VM's shutdown sends it.
            proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(timeout=min(ctx.remaining(), 300))
            except subprocess.TimeoutExpired:
                kill_group(proc)
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


def step_train_ddp(ctx: Context) -> Iterator[Row]:
    yield from step_train(ctx, Launch("sr train (DDP)", "ddp", 1))


def step_train_deepspeed(ctx: Context) -> Iterator[Row]:
    yield from step_train(ctx, Launch("DeepSpeed ZeRO-2 launch config", "deepspeed", 1))


def step_train_nccl(ctx: Context) -> Iterator[Row]:
    yield from step_train(ctx, Launch("sr train --processes 2 (DDP, NCCL)", "ddp", 2))
    yield from step_train(ctx, Launch("DeepSpeed ZeRO-2 launch config, 2 processes", "deepspeed", 2))
