"""Step ``batch``: ``sr batch`` on a local Ray with one GPU actor against ``sr upscale`` on
the same GPU, GPU utilisation, and whether the actor's encoding keeps up with its model."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterator

from infra.gpucheck.context import COMPACT, Context, available, build_model, model_file, model_label
from infra.gpucheck.measure import GpuSampler
from infra.gpucheck.processes import last_line, run_logged, sr_command
from infra.gpucheck.steps_upscale import NOISE, timed_sr_upscale
from infra.gpucheck.table import SUCCESS, UNAVAILABLE, Row, failed


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
    from infra.gpucheck.workloads import make_inputs

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
