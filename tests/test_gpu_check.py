"""``./dev gpu-check`` (``python -m infra.gpucheck``) on this CPU-only machine: the skip without
CUDA, argument parsing and the step list, the table writer and the exit code, the pure
parts of the GPU steps (nvidia-smi parsing, kernel and precision choices, loss and
encoding verdicts), the SkyPilot task checked by SkyPilot's own validator, and the whole
check end to end in its CPU rehearsal (every step's code on CPU, tiny sizes, real
processes: `sr upscale`, `sr train` with SIGTERM and --resume auto, the DeepSpeed launch
config, `sr batch` on a local Ray). No test asserts a timing; nothing here says anything
about GPUs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from infra.gpucheck import (context, measure, runner, steps_batch, steps_codecs, steps_compile, steps_degrade,
                            steps_environment, steps_train, steps_upscale)
from infra.gpucheck import table as tables

ROOT = Path(__file__).resolve().parents[1]


def check(*args, env=None, timeout=900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "infra.gpucheck", *map(str, args)], capture_output=True, text=True,
                          env=env or dict(os.environ), cwd=ROOT, timeout=timeout)


def isolated_env(tmp_path: Path) -> dict:
    """Temporary files in a folder of the test's own; no credentials, proxies that
    reach nothing (SkyPilot's import must not find a cloud)."""
    (tmp_path / "tmp").mkdir(exist_ok=True)
    (tmp_path / "home").mkdir(exist_ok=True)
    env = dict(os.environ, TMPDIR=str(tmp_path / "tmp"), HOME=str(tmp_path / "home"),
               NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY"):
        env[name] = "http://127.0.0.1:9"
    env.pop("GOOGLE_APPLICATION_CREDENTIALS", None)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    return env


def rows_of(table: str) -> list[list[str]]:
    """The body rows of the Markdown table as cells."""
    lines = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| step |")]
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines]


def figure(row: list[str], name: str) -> str:
    for part in row[2].split(" · "):
        if part.startswith(name + " "):
            return part[len(name) + 1:]
    raise AssertionError(f"no figure {name!r} in {row}")


# ---------------------------------------------------------------- without CUDA


def test_without_cuda_one_line_exit_0_and_nothing_run_or_written(tmp_path):
    import torch

    assert not torch.cuda.is_available()  # this machine; the GPU paths are the rehearsal's below
    env = isolated_env(tmp_path)
    done = check("--out", tmp_path / "table.md", env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu-check: no CUDA here") and "nothing run" in lines[0]
    assert done.stderr == ""
    assert not (tmp_path / "table.md").exists() and not (tmp_path / "table.json").exists()
    assert list((tmp_path / "tmp").iterdir()) == []  # no scratch folder made

    # the same through the developer entry point (which runs in the checkout)
    default_out = ROOT / runner.DEFAULT_OUT
    before = default_out.stat().st_mtime_ns if default_out.exists() else None
    done = subprocess.run(["bash", str(ROOT / "dev"), "gpu-check"], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1].startswith("gpu-check: no CUDA here")
    assert (default_out.stat().st_mtime_ns if default_out.exists() else None) == before


def test_dev_help_lists_gpu_check():
    done = subprocess.run(["bash", str(ROOT / "dev"), "help"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0
    assert any(line.strip().startswith("./dev gpu-check") for line in done.stdout.splitlines())


# ---------------------------------------------------------------- arguments and the step list


def test_step_list_budgets_fit_eight_minutes_on_one_gpu():
    done = check("--list", timeout=60)
    assert done.returncode == 0, done.stderr
    for step in runner.STEPS:
        assert any(line.split()[:2] == [step.name, f"{step.budget_s}s"] for line in done.stdout.splitlines()), step
    one_gpu = [s for s in runner.STEPS if s.min_gpus == 1 and not s.opt_in]
    assert sum(s.budget_s for s in one_gpu) <= 8 * 60
    assert f"total on one GPU: {sum(s.budget_s for s in one_gpu)} s" in done.stdout
    # every path of the issue has a step
    names = {s.name for s in runner.STEPS}
    assert {"upscaler-rrdbnet", "upscaler-compact", "upscale-e2e", "train-ddp", "train-deepspeed", "train-nccl",
            "batch", "jpeg-gpu", "compile", "degradation"} <= names
    assert [s.name for s in runner.STEPS if s.min_gpus > 1] == ["train-nccl"]
    assert runner.STEPS[-1].name == "train-nccl"
    assert "compile" in done.stdout and "[opt-in: --only compile]" in done.stdout
    assert "[opt-in: --only degradation]" in done.stdout


def test_step_selection_and_usage_errors():
    assert [s.name for s in runner.select_steps([], [])] == [s.name for s in runner.STEPS if not s.opt_in]
    assert [s.name for s in runner.select_steps(["batch", "train-ddp"], [])] == ["environment", "train-ddp", "batch"]
    assert "batch" not in [s.name for s in runner.select_steps([], ["batch"])]
    # an opt-in step runs only when named
    assert "compile" not in [s.name for s in runner.select_steps([], [])]
    assert [s.name for s in runner.select_steps(["compile"], [])] == ["environment", "compile"]
    with pytest.raises(ValueError, match="unknown step 'trian-ddp'"):
        runner.select_steps(["trian-ddp"], [])
    for args, message in ((["--only", "trian-ddp"], "unknown step 'trian-ddp'; steps: environment"),
                          (["--timeout-factor", "0.5"], "--timeout-factor must be >= 1")):
        done = check(*args, timeout=60)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("gpu-check: error: ") and message in lines[0], lines
    parsed = runner.build_parser().parse_args(["--cpu-rehearsal", "--rrdb-model", "a.pth", "--vgg-weights", "v.pth"])
    assert runner.forwarded_options(parsed) == ["--cpu-rehearsal", "--rrdb-model", "a.pth", "--vgg-weights", "v.pth"]


def test_benches_import_the_installed_project_and_not_each_other():
    """The check is a package of the project (``sr cloud gpu-check`` ships it); bench/
    holds harnesses that import the project as installed: no ``sys.path`` edits, no
    imports of one another (what they share lives in infra.gpucheck.workloads)."""
    import ast

    benches = sorted((ROOT / "bench").glob("*.py"))
    assert benches and not (ROOT / "bench" / "gpu_check.py").exists()
    names = {p.stem for p in benches}
    for path in benches:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr == "path" and getattr(node.value, "id", "") == "sys":
                raise AssertionError(f"{path.name}:{node.lineno} uses sys.path")
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                imported = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not {m.split(".")[0] for m in imported} & (names | {"bench"}), (path.name, node.lineno)


# ---------------------------------------------------------------- the table and the exit code


def test_table_writer_json_and_exit_code(tmp_path):
    rows = [tables.Row("environment", "device", {"GPU": "Tesla V100-SXM2-16GB", "memory GiB": 15.77}),
            tables.Row("upscaler-rrdbnet", "fp16 · tile 128", {"out Mpx/s": 12.345, "dB vs fp32": math.inf,
                                                           "note": "a | b\nc"}),
            tables.Row("upscaler-rrdbnet", "bf16", {}, "skipped: sm_70 has no bf16 tensor cores"),
            tables.Row("upscaler-compact", "srvgg_compact", {}, tables.UNAVAILABLE),
            tables.Row("environment", "default precision", {"": "fp16 (sm_7x)"})]
    assert tables.exit_code(rows) == 0
    table = tables.render_table("sr-cloud GPU check — test", rows)
    lines = table.splitlines()
    assert lines[0] == "# sr-cloud GPU check — test"
    assert lines[2:4] == ["| step | case | figures | result |", "|---|---|---|---|"]
    body = rows_of(table)
    assert len(body) == len(rows) and all(len(r) == 4 for r in body)  # the pipe in a value is escaped
    assert body[0][2] == "GPU Tesla V100-SXM2-16GB · memory GiB 15.8"
    assert figure(body[1], "out Mpx/s") == "12.3" and figure(body[1], "dB vs fp32") == "inf"
    assert "a \\| b c" in body[1][2]
    assert body[2][2] == "-" and body[2][3] == "skipped: sm_70 has no bf16 tensor cores"
    assert body[4][2] == "fp16 (sm_7x)"

    for status in ("FAIL: output 38.2 dB from fp32 (< 45 dB)", "NOT RUN: interrupted"):
        assert tables.is_failure(status) and tables.exit_code([*rows, tables.Row("x", "y", {}, status)]) == 1
    assert not tables.is_failure("ok, over budget by 12 s")

    out = tmp_path / "results" / "v100.md"
    tables.write_results(str(out), table, "title", rows)
    assert out.read_text() == table
    data = json.loads((tmp_path / "results" / "v100.json").read_text())  # standard JSON: no Infinity
    assert data["title"] == "title" and [r["case"] for r in data["rows"]] == [r.case for r in rows]
    assert data["rows"][1]["figures"]["dB vs fp32"] == "inf" and data["rows"][1]["figures"]["out Mpx/s"] == 12.345


# ---------------------------------------------------------------- the GPU steps' pure parts


def test_precisions_and_kernels_by_compute_capability():
    def by_precision(device, capability):
        return {options["precision"]: skip for case, options, skip in steps_upscale.upscaler_configs(device, capability, 128)
                if case.startswith(options["precision"] + " · tile 128 · 4/forward · channels_last")}

    v100 = by_precision("cuda", (7, 0))
    assert v100["fp32"] == "" and v100["fp16"] == "" and "sm_70 has no bf16 tensor cores" in v100["bf16"]
    a100 = by_precision("cuda", (8, 0))
    assert set(a100.values()) == {""}
    cpu = by_precision("cpu", None)
    assert cpu["bf16"] == "" and "fp16 is for GPUs" in cpu["fp16"]
    # the variants of tiles per forward pass and layout run at the device's default precision
    cases = [case for case, _, _ in steps_upscale.upscaler_configs("cuda", (7, 0), 128)]
    assert cases[0].startswith("fp32")  # the reference of every PSNR comes first
    assert "fp16 · tile 128 · 1/forward · channels_last" in cases
    assert "fp16 · automatic tile and tiles/forward · channels_last" in cases
    assert "fp16 · tile 128 · 4/forward · NCHW (channels_last off)" in cases
    assert [c for c in steps_upscale.upscaler_configs("cuda", (9, 0), 128) if "automatic" in c[0]][0][1] == \
        {"precision": "bf16", "tile": None, "tiles_per_batch": None, "channels_last": True}

    cu126 = ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"]
    cu128 = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]
    assert steps_environment.has_kernels(cu126, 7, 0) and not steps_environment.has_kernels(cu128, 7, 0)
    assert steps_environment.has_kernels(cu128, 8, 9)  # sm_86 cubins run on sm_89
    assert steps_environment.has_kernels(["sm_90", "compute_90"], 10, 0) and not steps_environment.has_kernels(["sm_90"], 10, 0)


def test_nvidia_smi_samples_and_utilisation():
    assert measure.parse_smi_line("87, 1234\n") == (87.0, 1234.0)
    for line in ("[N/A], 12", "utilization.gpu [%], memory.used [MiB]", "", "1, 2, 3"):
        assert measure.parse_smi_line(line) is None
    summary = measure.utilisation_summary([0, 0, 50, 100, 0, 80, 0, 0])
    assert summary["GPU util % (mean)"] == pytest.approx(230 / 8)
    assert summary["GPU util % (busy span)"] == pytest.approx(230 / 4)
    assert measure.utilisation_summary([]) == {}
    sampler = measure.GpuSampler(enabled=False)
    with sampler:
        pass
    assert sampler.utilisation == [] and list(sampler.figures().values())[0].startswith("n/a")


def test_sampler_queries_nvidia_smi_for_the_first_gpu_in_use(tmp_path, monkeypatch):
    """The real nvidia-smi needs a GPU: a stand-in on PATH prints what nvidia-smi's
    documented CSV query prints and records how it was called."""
    stand_in = tmp_path / "bin" / "nvidia-smi"
    stand_in.parent.mkdir()
    stand_in.write_text(f'#!/usr/bin/env bash\necho "$*" >> {tmp_path}/calls\necho "73, 2048"\n')
    stand_in.chmod(0o755)
    monkeypatch.setenv("PATH", f"{stand_in.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")
    with measure.GpuSampler(enabled=True) as sampler:
        pass
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls and calls[0] == "--query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits -i 3"
    assert sampler.utilisation[0] == 73.0 and sampler.memory_mib[0] == 2048.0
    assert sampler.figures()["GPU util % (mean)"] == 73.0


def test_loss_checks_and_training_log_header():
    falling = {"loss/g_pixel": [0.45, 0.40, 0.5, 0.3, 0.25, 0.2], "loss/g_total": [0.45, 0.4, 0.5, 0.3, 0.25, 0.2],
               "loss_scale/g": [65536.0, 32768.0, 32768.0], "perf/step_time_s": [0.5, 0.1, 0.12],
               "perf/memory_mb": [900.0, 1000.0]}
    figures, problems = steps_train.loss_checks(falling, "psnr", "fp16")
    assert problems == []
    assert figures["loss/g_pixel first→last"] == "0.45→0.2" and figures["loss_scale/g"] == "65536→32768 (min 32768)"
    assert figures["ms/step (median)"] == pytest.approx(110)

    rising = {**falling, "loss/g_pixel": [0.2, 0.25, 0.3, 0.4, math.nan, 0.5], "loss_scale/g": [1.0, 1.0]}
    _, problems = steps_train.loss_checks(rising, "psnr", "fp16")
    assert any("did not fall" in p for p in problems)
    assert any("non-finite values in loss/g_pixel" in p for p in problems)
    assert any("loss_scale/g stayed 1 under fp16" in p for p in problems)
    _, problems = steps_train.loss_checks({**falling, "loss_scale/g": [1.0]}, "psnr", "bf16")
    assert problems == []  # no loss scaling is right for bf16 and fp32
    _, problems = steps_train.loss_checks(falling, "gan", "fp16")
    assert problems == ["loss_scale/d not logged"]

    header = "world size 2, backend deepspeed ZeRO-2 (jobs/launch/deepspeed_zero2.json), precision fp16, distributed X"
    assert steps_train.header_checks(header, 2, "fp16", "deepspeed") == []
    assert steps_train.header_checks(header, 1, "bf16", "ddp") == [
        "world size 2, expected 1", "precision fp16, expected bf16 (the device's default)",
        "backend deepspeed ZeRO-2 (jobs/launch/deepspeed_zero2.json), expected ddp"]
    assert steps_train.header_checks("Traceback ...", 1, "fp32", "ddp")[0].startswith("no 'world size")


def test_encoding_verdict():
    def summary(model_s, encode_s):
        stats = {name: {"mean": value} for name, value in
                 (("model_s", model_s), ("encode_s", encode_s), ("metrics_s", 0.01), ("write_s", 0.002),
                  ("decode_s", 0.003))}
        return {"metrics": stats, "steady_images_per_second": 0.9 / model_s, "images_per_second": 1.0}

    figures, keeps_up = steps_batch.encoding_verdict(summary(0.050, 0.060), encode_threads=2)
    assert keeps_up and figures["actor time in the model"] == "90%"
    assert figures["encode+metrics+write ms/img"] == pytest.approx(72)
    _, keeps_up = steps_batch.encoding_verdict(summary(0.005, 0.060), encode_threads=2)  # a fast model, PNG encoding
    assert not keeps_up


def test_gpu_jpeg_verdict_and_compile_payback():
    assert steps_codecs.jpeg_verdict(40.2, 40.9) == tables.SUCCESS  # within 1 dB of libjpeg
    assert steps_codecs.jpeg_verdict(41.0, 40.0) == tables.SUCCESS
    worse = steps_codecs.jpeg_verdict(38.0, 40.0)
    assert tables.is_failure(worse) and "38.0 dB vs CPU 40.0 dB" in worse
    # 10 s first pass, 1 s eager, 0.5 s compiled: 9.5 s more, 0.5 s saved a pass -> 19 passes
    figures = steps_compile.compile_figures(10.0, 1.0, 0.5)
    assert figures["speed-up"] == 2.0 and math.isclose(figures["passes to pay back"], 19.0)
    assert steps_compile.compile_figures(10.0, 1.0, 1.25)["passes to pay back"] == "never"


@pytest.mark.slow
def test_cpu_rehearsal_of_the_jpeg_and_compile_steps(tmp_path):
    """The opt-in compile step and the GPU JPEG step's CPU fallback, each in its process."""
    out = tmp_path / "rehearsal.md"
    done = check("--cpu-rehearsal", "--only", "jpeg-gpu", "--only", "compile", "--out", out, env=isolated_env(tmp_path))
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    by_step: dict[str, list[list[str]]] = {}
    for row in rows_of(out.read_text()):
        by_step.setdefault(row[0], []).append(row)
    assert set(by_step) == {"environment", "jpeg-gpu", "compile"}
    jpeg = {r[1]: r for r in by_step["jpeg-gpu"]}
    fallback = jpeg["CPU fallback (no GPU JPEG encoder)"]
    assert fallback[3] == "ok" and figure(fallback, "same bytes as CPU") == "yes"
    assert float(figure(fallback, "CPU ms/output Mpx")) > 0
    (compiled,) = [r for r in by_step["compile"] if r[1] != "time"]
    assert compiled[3] == "ok", compiled
    assert float(figure(compiled, "first pass s (compile)")) > 0
    # inductor's kernels may round differently from eager's, but the picture is the same
    assert float(figure(compiled, "dB vs eager")) >= context.PSNR_FLOOR_DB
    assert figure(compiled, "precision") in ("fp32", "bf16")


# ---------------------------------------------------------------- failures reach the exit code


def test_a_failing_path_makes_exit_1_and_the_others_still_run(tmp_path):
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"this is not a model file")
    env = isolated_env(tmp_path)
    out = tmp_path / "table.md"
    done = check("--cpu-rehearsal", "--only", "upscaler-rrdbnet", "--rrdb-model", broken, "--out", out, env=env)
    assert done.returncode == 1, done.stderr[-3000:]
    body = rows_of(out.read_text())
    failed = [r for r in body if r[0] == "upscaler-rrdbnet" and r[3].startswith("FAIL")]
    assert failed, body
    assert "broken.pth" in failed[0][3]  # the failure names the input
    assert [r[3] for r in body if r[0] == "environment" and r[1] == "software"] == ["ok"]  # ran regardless
    assert any(r[0] == "upscaler-rrdbnet" and r[1] == "time" for r in body)
    assert "1 path(s) failed" in done.stderr
    kept = [p for p in (tmp_path / "tmp").iterdir() if p.name.startswith("sr-gpu-check-")]
    assert len(kept) == 1 and f"kept in {kept[0]}" in done.stderr  # the logs stay for a look


# ---------------------------------------------------------------- the whole check, rehearsed on CPU


@pytest.mark.slow
def test_cpu_rehearsal_runs_every_step_end_to_end(tmp_path):
    from sr_core.archs import GENERATORS

    import tempfile

    env = isolated_env(tmp_path)
    # Ray's socket paths must stay under 108 bytes: a short temporary folder, not tmp_path.
    short_tmp = tempfile.mkdtemp(prefix="gc-", dir="/tmp")
    env["TMPDIR"] = short_tmp
    out = tmp_path / "rehearsal.md"
    try:
        done = check("--cpu-rehearsal", "--out", out, env=env, timeout=1500)
        leftovers = list(Path(short_tmp).glob("sr-gpu-check-*"))
    finally:
        subprocess.run(["rm", "-rf", short_tmp])
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-6000:]
    table = out.read_text()
    assert table in done.stdout  # printed and written
    title = table.splitlines()[0]
    assert "CPU REHEARSAL" in title and "NOT GPU results" in title
    body = rows_of(table)
    assert body[0][:2] == ["environment", "mode"] and "NOT GPU results" in body[0][2]
    assert all(not tables.is_failure(r[3]) for r in body), [r for r in body if tables.is_failure(r[3])]
    by_step: dict[str, list[list[str]]] = {}
    for row in body:
        by_step.setdefault(row[0], []).append(row)
    for step in [s for s in runner.STEPS[:-1] if not s.opt_in]:  # each ran in its own process, timed against its budget
        times = [r for r in by_step[step.name] if r[1] == "time"]
        assert len(times) == 1 and f"budget s {step.budget_s}" in times[0][2], step.name
    assert by_step["train-nccl"][0][3].startswith("skipped: multi-GPU (NCCL) needs GPUs")

    tile = context.REHEARSAL.tile
    up = {p: r for p in ("fp32", "fp16", "bf16") for r in by_step["upscaler-rrdbnet"]
          if r[1] == f"{p} · tile {tile} · 4/forward · channels_last"}
    assert up["fp16"][3].startswith("skipped: fp16 is for GPUs")
    assert float(figure(up["bf16"], "dB vs fp32")) >= context.PSNR_FLOOR_DB  # CPU bf16 autocast, compared pixel by pixel
    assert float(figure(up["fp32"], "output std (8-bit)")) >= context.FLAT_STD  # so the comparison means something
    assert len([r for r in by_step["upscaler-rrdbnet"] if "dB vs fp32" in r[2]]) == 4  # bf16, 1/forward, auto, NCHW
    assert any("chosen tile" in r[2] for r in by_step["upscaler-rrdbnet"])
    compact = [r for r in by_step["upscaler-compact"] if r[1] != "time"]
    if context.COMPACT in GENERATORS:
        assert any("dB vs fp32" in r[2] for r in compact)
    else:
        assert [r[3] for r in compact] == [tables.UNAVAILABLE]

    e2e = {r[1].split(" (")[0].split(":")[0]: r for r in by_step["upscale-e2e"]}
    assert {"floor", "Upscaler", "reference loop", "sr upscale"} <= set(e2e)
    assert figure(e2e["sr upscale"], "dB vs Upscaler") == "inf"  # the command writes what the Upscaler makes

    for step, launch in (("train-ddp", "sr train (DDP)"), ("train-deepspeed", "DeepSpeed ZeRO-2 launch config")):
        rows = {r[1]: r for r in by_step[step] if r[1] != "time"}
        psnr, gan = rows[f"{launch} · psnr · fp32"], rows[f"{launch} · gan · fp32"]
        stopped, resumed = figure(psnr, "steps").removeprefix("SIGTERM at ").split(", resumed to ")
        assert int(resumed) == int(stopped) + context.REHEARSAL.steps_after_resume
        assert figure(psnr, "loss_scale/g") == "1→1 (min 1)"  # fp32: no scaling, but logged
        assert figure(gan, "steps") == str(context.REHEARSAL.gan_steps) and "loss/d first→last" in gan[2]

    batch = {r[1]: r for r in by_step["batch"]}
    assert batch["rrdbnet · sr batch, 1 CPU actor"][3] == "ok"
    assert figure(batch["rrdbnet · encoding in the actor"], "keeps up") in ("yes", "no")
    if context.COMPACT in GENERATORS:
        assert batch[f"{context.COMPACT} · sr batch, 1 CPU actor"][3] == "ok"
    else:
        assert batch[context.COMPACT][3] == tables.UNAVAILABLE

    jpeg = {r[1]: r for r in by_step["jpeg-gpu"]}  # the CPU fallback of the GPU JPEG path
    assert figure(jpeg["CPU fallback (no GPU JPEG encoder)"], "same bytes as CPU") == "yes"
    assert "compile" not in by_step and "degradation" not in by_step  # opt-in

    data = json.loads(out.with_suffix(".json").read_text())
    assert len(data["rows"]) == len(body) and data["title"] == title[2:]
    assert leftovers == []  # nothing failed: the scratch folder is gone


def test_degradation_step_on_the_cpu(tmp_path):
    """The GPU step's code on the CPU rehearsal's sizes: a real degraded batch is timed
    and the JPEG compared (CPU against CPU, so it must come out identical)."""
    import time

    ctx = context.Context(rehearsal=True, workdir=tmp_path, deadline=time.monotonic() + 60)
    gt = steps_degrade.gt_batch(ctx, 2, 64)
    assert gt.shape == (2, 3, 64, 64) and float(gt.std()) > 0.05  # photograph crops, not a flat image
    rows = list(steps_degrade.step_degradation(ctx))
    assert [r.case for r in rows] == ["second-order pipeline, 2 x 64 px, x4", "JPEG q60 on the device vs on the CPU"]
    assert all(r.status == tables.SUCCESS for r in rows)
    pipeline = rows[0].figures
    assert pipeline["pairs/s"] > 0 and math.isclose(pipeline["ms/batch"], 1000 * 2 / pipeline["pairs/s"])
    assert pipeline["peak GiB"] == "n/a (CPU)"
    assert rows[1].figures == {"dB": "identical", "differing 8-bit values": 0.0}
