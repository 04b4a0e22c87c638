"""`sr batch` on a real local Ray and the GCS emulator: outputs equal what the Upscaler
gives, one metrics row per good image, one failure row per bad one, a summary that
agrees with both, TensorBoard events that TensorBoard reads, resume after SIGKILL
with nothing done twice, and reference metrics equal to sr_core.metrics."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from batch import localray
from batch.results import read_table
from events import HANG_TIMEOUT, upscale_actors_below, wait_for
from sr_core import codecs, metrics, storage
from sr_cli.main import main
from sr_core.resize import imresize
from sr_core.upscaler import Upscaler

REPO = Path(__file__).resolve().parent.parent
IMAGES = REPO / "assets" / "images"
TILE = 16  # several tiles per image: the tiled path is what runs on real images


@pytest.fixture(scope="module")
def ray_address(gcs_emulator):
    """One local Ray for every batch test (its start costs seconds). Started after the
    emulator, and told where it is, so its workers reach the same storage. Shut down
    after this module, so other modules can start a Ray of their own; a Ray that is
    already up in this process is used as it is."""
    import ray

    if ray.is_initialized():
        yield ray.get_runtime_context().gcs_address
        return
    env = {k: os.environ[k] for k in ("STORAGE_EMULATOR_HOST", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT")}
    context = ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": env},
                       _system_config=localray.SYSTEM_CONFIG,
                       log_to_driver=False)
    yield context.address_info["address"]
    ray.shutdown()


def photo(name: str, size: tuple[int, int], mode: str = "RGB") -> Image.Image:
    return Image.open(IMAGES / name).convert("RGB").resize(size, Image.Resampling.BICUBIC).convert(mode)


def encoded(img: Image.Image | np.ndarray, fmt: str, **params) -> bytes:
    if isinstance(img, np.ndarray):
        img = Image.fromarray(img)
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def corpus() -> tuple[dict[str, bytes], dict[str, str]]:
    """20 good images of mixed sizes, modes and formats, and bad files with the stage
    they must fail in."""
    good = {
        "rgb.png": encoded(photo("astronaut.png", (40, 30)), "PNG"),
        "gray.png": encoded(photo("camera.png", (23, 31), "L"), "PNG"),
        "rgba.png": encoded(np.dstack([np.asarray(photo("coffee.png", (33, 21))),
                                       np.linspace(0, 255, 33 * 21).reshape(21, 33).astype(np.uint8)]), "PNG"),
        "la.png": encoded(photo("chelsea.png", (19, 24), "LA"), "PNG"),
        "gray16.png": encoded((np.asarray(photo("chelsea.png", (25, 19), "L")).astype(np.uint16) * 257), "PNG"),
        "palette.png": encoded(photo("coffee.png", (28, 20)).convert("P", palette=Image.Palette.ADAPTIVE), "PNG"),
        "palette_t.png": encoded(photo("coffee.png", (20, 28)).convert("P", palette=Image.Palette.ADAPTIVE),
                                 "PNG", transparency=0),
        "photos/a.jpg": encoded(photo("astronaut.png", (48, 36)), "JPEG", quality=90),
        "photos/b.jpeg": encoded(photo("camera.png", (36, 27), "L"), "JPEG", quality=90),
        "photos/cmyk.jpg": encoded(photo("coffee.png", (30, 22), "CMYK"), "JPEG"),
        "photos/c.webp": encoded(photo("chelsea.png", (26, 26)), "WEBP", lossless=True),
        "photos/d.tif": encoded(photo("astronaut.png", (22, 34)), "TIFF"),
        "photos/e.bmp": encoded(photo("coffee.png", (31, 17)), "BMP"),
        "deep/er/small.png": encoded(photo("camera.png", (9, 7)), "PNG"),
        "deep/er/wide.png": encoded(photo("astronaut.png", (64, 12)), "PNG"),
        "deep/er/tall.png": encoded(photo("coffee.png", (12, 50), "L"), "PNG"),
        "deep/one px.png": encoded(photo("coffee.png", (1, 1)), "PNG"),
        "deep/x[1].png": encoded(photo("chelsea.png", (16, 16)), "PNG"),
        "deep/rgb16.png": codecs.encode_image(
            (np.asarray(photo("coffee.png", (21, 15))).astype(np.uint16) * 257 + 3)),
        "deep/q.jpg": encoded(photo("chelsea.png", (40, 40)), "JPEG", quality=80),
    }
    full = good["rgb.png"]
    bad = {
        "bad/truncated.png": (full[: len(full) // 2], "decode"),
        "bad/empty.jpg": (b"", "decode"),
        "bad/text.png": (b"shopping list: milk, eggs", "decode"),
        "bad/huge.png": (encoded(photo("camera.png", (70, 60)), "PNG"), "decode"),  # above --max-pixels
        "bad/float.tif": (encoded(Image.fromarray(np.zeros((8, 8), np.float32), mode="F"), "TIFF"), "decode"),
    }
    return good, {k: v for k, v in bad.items()}


MAX_PIXELS = 70 * 60 - 1


def expected_output(up: Upscaler, data: bytes) -> np.ndarray:
    return up(codecs.decode_image(data, max_pixels=None))


def test_gcs_end_to_end_outputs_metrics_failures_summary_and_tensorboard(gcs_emulator, ray_address, model_file,
                                                                        tmp_path, capsys):
    bucket = gcs_emulator.make_bucket("batch")
    good, bad = corpus()
    for rel, data in good.items():
        storage.write_bytes(f"{bucket}/in/{rel}", data)
    for rel, (data, _) in bad.items():
        storage.write_bytes(f"{bucket}/in/{rel}", data)
    storage.write_bytes(f"{bucket}/in/notes.txt", b"not an image extension: not listed")
    storage.write_bytes(f"{bucket}/models/x2.safetensors", Path(model_file).read_bytes())

    code = main(["batch", f"{bucket}/in", f"{bucket}/out", "--model", f"{bucket}/models/x2.safetensors",
                 "--tile", str(TILE), "--max-pixels", str(MAX_PIXELS), "--run-id", "run1", "--batch-size", "3"])
    out = capsys.readouterr()
    assert code == 1, out.err
    assert f"done {len(good)}, skipped 0 (output exists), failed {len(bad)}" in out.out

    up = Upscaler.from_file(model_file, tile=TILE)
    for rel, data in good.items():
        stem = os.path.splitext(rel)[0]
        written = codecs.decode_image(storage.read_bytes(f"{bucket}/out/{stem}_sr.png"), max_pixels=None)
        expected = expected_output(up, data)
        assert written.shape == expected.shape and written.dtype == expected.dtype, rel
        np.testing.assert_array_equal(written, expected, err_msg=rel)
    fs = gcs_emulator.fs()
    listed = sorted(p.split("/out/", 1)[1] for p in fs.find(f"{bucket[5:]}/out") if "/_sr_batch/" not in p)
    assert listed == sorted(os.path.splitext(rel)[0] + "_sr.png" for rel in good)

    run = f"{bucket}/out/_sr_batch/run1"
    rows = read_table(f"{run}/metrics.parquet").to_pandas()
    failures = read_table(f"{run}/failures.parquet").to_pandas()
    summary = json.loads(storage.read_bytes(f"{run}/summary.json"))

    assert sorted(rows["input"]) == sorted(f"{bucket}/in/{rel}" for rel in good)
    assert dict(zip(failures["input"], failures["stage"])) == {f"{bucket}/in/{rel}": stage
                                                               for rel, (_, stage) in bad.items()}
    errors = dict(zip(failures["input"], failures["error"]))
    assert "truncated" in errors[f"{bucket}/in/bad/truncated.png"]
    assert "empty file" in errors[f"{bucket}/in/bad/empty.jpg"]
    assert "not an image" in errors[f"{bucket}/in/bad/text.png"]
    assert "exceeds the limit" in errors[f"{bucket}/in/bad/huge.png"]
    assert "floating-point" in errors[f"{bucket}/in/bad/float.tif"]

    by_input = rows.set_index("input")
    for rel, data in good.items():
        row = by_input.loc[f"{bucket}/in/{rel}"]
        image = codecs.decode_image(data)
        result = expected_output(up, data)
        assert (row.in_height, row.in_width) == image.shape[:2]
        assert (row.out_height, row.out_width) == result.shape[:2]
        assert row.bits == 8 * image.dtype.itemsize and row.in_bytes == len(data)
        assert row.out_bytes == len(storage.read_bytes(f"{bucket}/out/{os.path.splitext(rel)[0]}_sr.png"))
        for column in ("read_s", "decode_s", "model_s", "encode_s", "write_s", "metrics_s"):
            assert row[column] >= 0, (rel, column)
        # LR consistency: the input vs the MATLAB-bicubic downscale of the output, on Y.
        lr = codecs.to_rgb8(image, keep_gray=True)
        down = codecs.to_rgb8(imresize(result, size=image.shape[:2]), keep_gray=True)
        assert row.lr_psnr == pytest.approx(metrics.psnr(down, lr, y_channel=lr.ndim == 3), rel=1e-12), rel
        if min(image.shape[:2]) >= 11:
            assert row.lr_ssim == pytest.approx(metrics.ssim(down, lr, y_channel=lr.ndim == 3), rel=1e-12), rel
        else:
            assert np.isnan(row.lr_ssim)
        assert np.isnan(row.ref_psnr) and row.reference == ""

    assert summary["done"] == len(rows) == len(good)
    assert summary["failed"] == len(failures) == len(bad)
    assert summary["skipped"] == 0 and summary["found"] == len(good) + len(bad)
    assert summary["failures_by_stage"] == {"decode": len(bad)}
    assert summary["model"]["sha256"] == __import__("hashlib").sha256(Path(model_file).read_bytes()).hexdigest()
    assert summary["model"]["scale"] == 2 and summary["settings"]["tile"] == TILE
    assert summary["model"]["precision_cpu"] == Upscaler.from_file(model_file, device="cpu").precision
    assert summary["metrics"]["lr_psnr"]["mean"] == pytest.approx(rows["lr_psnr"].mean())
    assert summary["metrics"]["lr_psnr"]["p50"] == pytest.approx(rows["lr_psnr"].median())
    assert summary["metrics"]["model_s"]["p90"] == pytest.approx(np.percentile(rows["model_s"], 90))
    assert summary["output_pixels"] == int((rows["out_width"] * rows["out_height"]).sum())
    assert summary["images_per_second"] > 0

    # TensorBoard events land beside the tables and read back with TensorBoard's own reader.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = [p for p in fs.ls(run[5:]) if "tfevents" in p]
    assert len(events) == 1
    local = tmp_path / "tb"
    local.mkdir()
    (local / os.path.basename(events[0])).write_bytes(storage.read_bytes("gs://" + events[0]))
    acc = EventAccumulator(str(local), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    assert {"throughput/images_per_s", "throughput/output_mpx_per_s", "progress/failed"} <= set(acc.Tags()["scalars"])
    assert "metrics/lr_psnr" in acc.Tags()["histograms"]
    assert acc.Scalars("progress/done")[-1].value == len(good)
    assert acc.Histograms("metrics/lr_psnr")[-1].histogram_value.num == len(good)

    # A rerun finds everything done: nothing upscaled, nothing failed twice over.
    code = main(["batch", f"{bucket}/in", f"{bucket}/out", "--model", f"{bucket}/models/x2.safetensors",
                 "--tile", str(TILE), "--max-pixels", str(MAX_PIXELS), "--run-id", "run2", "--exclude", "bad/*",
                 "-q"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert f"done 0, skipped {len(good)} (output exists), failed 0" in out.out
    assert json.loads(storage.read_bytes(f"{bucket}/out/_sr_batch/run2/summary.json"))["recovered"] == 0

    # A run killed after writing its outputs but before recording their rows: the next
    # run measures them from the outputs (no model) and records what run1 recorded.
    fs.rm(f"{run[5:]}/metrics.parquet", recursive=True)
    code = main(["batch", f"{bucket}/in", f"{bucket}/out", "--model", f"{bucket}/models/x2.safetensors",
                 "--tile", str(TILE), "--max-pixels", str(MAX_PIXELS), "--run-id", "run3", "--exclude", "bad/*",
                 "-q"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert f"done 0, skipped {len(good)} (output exists) ({len(good)} of them measured" in out.out
    recovered = read_table(f"{bucket}/out/_sr_batch/run3/metrics.parquet").to_pandas()
    summary3 = json.loads(storage.read_bytes(f"{bucket}/out/_sr_batch/run3/summary.json"))
    assert (summary3["done"], summary3["recovered"], summary3["failed"]) == (0, len(good), 0)
    assert recovered["recovered"].all() and not rows["recovered"].any()
    recovered = recovered.set_index("input").loc[by_input.index]
    for column in ("output", "in_width", "in_height", "channels", "bits", "out_width", "out_height", "in_bytes",
                   "out_bytes", "reference", "reference_error"):
        assert recovered[column].tolist() == by_input[column].tolist(), column
    for column in ("lr_psnr", "lr_ssim"):
        np.testing.assert_allclose(recovered[column], by_input[column], rtol=1e-12, err_msg=column)
    for column in ("read_s", "decode_s", "model_s", "encode_s", "write_s", "metrics_s", "finished_at"):
        assert recovered[column].isna().all(), column


def test_sigkill_midway_then_rerun_finishes_only_what_is_missing(ray_address, model_file, tmp_path, capsys):
    src, dst = tmp_path / "in", tmp_path / "out"
    names = [f"set{i % 3}/img{i:02d}.png" for i in range(16)]
    for i, rel in enumerate(names):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        photo(["astronaut.png", "coffee.png", "chelsea.png"][i % 3], (48 + i, 40)).save(src / rel)
    outputs = [dst / (os.path.splitext(rel)[0] + "_sr.png") for rel in names]

    # Its own driver process on the session's Ray (as `ray job submit` would run it).
    proc = subprocess.Popen(
        [sys.executable, "-m", "sr_cli", "batch", str(src), str(dst), "--model", model_file, "--tile", "8",
         "--batch-size", "1", "--encode-threads", "1", "--address", ray_address, "--run-id", "killed", "-q"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        wait_for(lambda: sum(p.exists() for p in outputs) >= 2, "two outputs", proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=HANG_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # Ray stops the killed driver's actor (it runs in this process's Ray): once it is
    # gone, nothing writes any more (each output is written whole, under its name last).
    wait_for(lambda: not upscale_actors_below(), "the killed driver's actor to stop")
    done_before = {str(p) for p in outputs if p.exists()}
    assert 2 <= len(done_before) < len(names), "the kill must land midway"
    for path in dst.rglob("*.png"):  # no partial object under a visible name
        if not path.name.startswith("."):
            codecs.read_image(str(path))
    assert not storage.exists(str(dst / "_sr_batch" / "killed" / "summary.json"))

    code = main(["batch", str(src), str(dst), "--model", model_file, "--tile", "8", "--run-id", "rerun", "-q"])
    out = capsys.readouterr()
    assert code == 0, out.err
    table = pd.read_parquet(dst / "_sr_batch" / "rerun" / "metrics.parquet")
    rows = table[~table["recovered"]]
    assert len(rows) == len(names) - len(done_before)
    assert not set(rows["output"]) & done_before
    # The killed run's rows not checkpointed yet are measured by the rerun: one row per
    # input over both runs' tables.
    killed_table = dst / "_sr_batch" / "killed" / "metrics.parquet"
    killed = pd.read_parquet(killed_table) if killed_table.exists() else table.iloc[:0]
    assert set(table[table["recovered"]]["output"]) == done_before - set(killed["output"])
    assert sorted(pd.concat([killed, table])["input"]) == sorted(str(src / rel) for rel in names)
    summary = json.loads((dst / "_sr_batch" / "rerun" / "summary.json").read_text())
    assert (summary["done"], summary["skipped"], summary["failed"]) == (len(rows), len(done_before), 0)
    assert summary["recovered"] == len(table) - len(rows)
    up = Upscaler.from_file(model_file, tile=8)
    for rel, path in zip(names, outputs):
        np.testing.assert_array_equal(codecs.read_image(str(path)), up(codecs.read_image(str(src / rel))))


def test_reference_metrics_equal_sr_core_metrics_from_a_manifest(ray_address, model_file, tmp_path, capsys):
    hr_dir, lr_dir = tmp_path / "hr", tmp_path / "lr"
    (hr_dir / "g").mkdir(parents=True)
    (lr_dir / "g").mkdir(parents=True)
    # HR of odd sizes (cropped to the scale's multiple), gray and colour, one HR in another format.
    specs = {"a.png": ("astronaut.png", (61, 47), "RGB"), "g/b.png": ("camera.png", (44, 52), "L"),
             "c.png": ("coffee.png", (50, 50), "RGB"), "d.png": ("chelsea.png", (36, 30), "RGB")}
    for rel, (name, size, mode) in specs.items():
        hr = np.asarray(photo(name, size, mode))
        ext = ".jpg" if rel == "c.png" else ".png"
        Image.fromarray(hr).save(hr_dir / (os.path.splitext(rel)[0] + ext), quality=95)
        lr = imresize(hr[: hr.shape[0] // 2 * 2, : hr.shape[1] // 2 * 2], scale=0.5)
        Image.fromarray(lr).save(lr_dir / rel)
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(lr_dir / "no_hr.png")
    (hr_dir / "d.png").unlink()
    Image.fromarray(np.asarray(photo("chelsea.png", (20, 20)))).save(hr_dir / "d.png")  # wrong size
    manifest = tmp_path / "list.csv"
    manifest.write_text("path,label\n" + "".join(f"lr/{rel},x\n" for rel in [*specs, "no_hr.png"]))

    out_dir = tmp_path / "out"
    code = main(["batch", str(manifest), str(out_dir), "--model", model_file, "--reference", str(hr_dir),
                 "--run-id", "ref", "-q"])
    out = capsys.readouterr()
    assert code == 0, out.err
    rows = pd.read_parquet(out_dir / "_sr_batch" / "ref" / "metrics.parquet").set_index("input")
    assert sorted(p.relative_to(out_dir).as_posix() for p in out_dir.rglob("*.png")) == sorted(
        ["a_sr.png", "g/b_sr.png", "c_sr.png", "d_sr.png", "no_hr_sr.png"])
    for rel in ("a.png", "g/b.png", "c.png"):
        row = rows.loc[str(lr_dir / rel)]
        sr = codecs.to_rgb8(codecs.read_image(row.output), keep_gray=True)
        hr = codecs.to_rgb8(codecs.read_image(row.reference), keep_gray=True)[: sr.shape[0], : sr.shape[1]]
        colour = sr.ndim == 3
        assert row.ref_psnr == pytest.approx(metrics.psnr(sr, hr, crop_border=2, y_channel=colour), rel=1e-12)
        assert row.ref_ssim == pytest.approx(metrics.ssim(sr, hr, crop_border=2, y_channel=colour), rel=1e-12)
        assert row.ref_mse == pytest.approx(metrics.mse(sr, hr, crop_border=2, y_channel=colour), rel=1e-12)
        assert row.reference_error == ""
    assert rows.loc[str(lr_dir / "c.png")].reference.endswith("c.jpg")
    assert "20x20" in rows.loc[str(lr_dir / "d.png")].reference_error
    assert rows.loc[str(lr_dir / "no_hr.png")].reference == ""
    summary = json.loads((out_dir / "_sr_batch" / "ref" / "summary.json").read_text())
    assert summary["metrics"]["ref_psnr"]["count"] == 3
    assert summary["metrics"]["ref_psnr"]["mean"] == pytest.approx(rows["ref_psnr"].dropna().mean())

    # The rows of a killed run (its table lost): measured again from the outputs, with
    # the same reference metrics and reasons.
    shutil.rmtree(out_dir / "_sr_batch" / "ref" / "metrics.parquet")
    code = main(["batch", str(manifest), str(out_dir), "--model", model_file, "--reference", str(hr_dir),
                 "--run-id", "ref2", "-q"])
    assert code == 0, capsys.readouterr().err
    again = pd.read_parquet(out_dir / "_sr_batch" / "ref2" / "metrics.parquet").set_index("input").loc[rows.index]
    assert again["recovered"].all()
    for column in ("reference", "reference_error"):
        assert again[column].tolist() == rows[column].tolist(), column
    for column in ("ref_psnr", "ref_ssim", "ref_mse", "lr_psnr", "lr_ssim"):
        np.testing.assert_allclose(again[column], rows[column], rtol=1e-12, err_msg=column)
    # A reused --run-id replaces its table, so that table's rows are made again in it.
    code = main(["batch", str(manifest), str(out_dir), "--model", model_file, "--run-id", "ref2", "-q"])
    assert code == 0, capsys.readouterr().err
    assert sorted(pd.read_parquet(out_dir / "_sr_batch" / "ref2" / "metrics.parquet")["input"]) == sorted(rows.index)


def test_what_cannot_run_exits_2_with_one_line_before_ray(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    photo("coffee.png", (12, 12)).save(tmp_path / "in" / "a.png")
    (tmp_path / "broken.safetensors").write_bytes(b"not a model")
    cases = [
        (["--model", str(tmp_path / "missing.safetensors")], "no such model file"),
        (["--model", str(tmp_path / "broken.safetensors")], "broken.safetensors"),
    ]
    for extra, expected in cases:
        code = main(["batch", str(tmp_path / "in"), str(tmp_path / "out"), *extra])
        err = capsys.readouterr().err
        assert code == 2 and expected in err and "Traceback" not in err, err
        assert len(err.strip().splitlines()) == 1, err
    with pytest.raises(SystemExit) as exc:
        main(["batch", "in", "out", "--model", "m", "--actors", "3,1"])
    assert exc.value.code == 2
    help_text = subprocess.run([sys.executable, "-m", "sr_cli", "batch", "--help"], capture_output=True,
                               text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}).stdout
    for token in ("exit codes:", "0  every image", "1  some inputs failed", "2  the job could not run",
                  "--address", "--actors MIN,MAX", "--reference"):
        assert token in help_text


def test_batch_plan_filters_manifests_resume_and_limit(tmp_path):
    from batch.inputs import plan_batch

    src, out = tmp_path / "in", tmp_path / "out"
    for rel in ("a.png", "b.jpg", "drafts/c.png", "keep/d.webp", "keep/e.tif", "notes.txt"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(b"x")
    (out / "keep").mkdir(parents=True)
    (out / "keep" / "d_sr.png").write_bytes(b"done earlier")

    plan = plan_batch(str(src), str(out), "_sr", ".png", exclude=("drafts/*",))
    assert sorted(t.output for t in plan.todo) == sorted(str(out / r) for r in ("a_sr.png", "b_sr.png",
                                                                                 "keep/e_sr.png"))
    assert (plan.num_found, plan.num_skipped, plan.num_left) == (4, 1, 0)
    plan = plan_batch(str(src), str(out), "_sr", ".png", include=("keep/*",), overwrite=True)
    assert [os.path.basename(t.input) for t in plan.todo] == ["d.webp", "e.tif"]
    plan = plan_batch(str(src), str(out), "_sr", ".jpg", limit=2)
    assert len(plan.todo) == 2 and plan.num_left == 3 and plan.num_skipped == 0

    # Manifests: entries relative to the manifest's folder; outputs keep the path below
    # the entries' common folder; two inputs with one output name are a failure.
    (tmp_path / "list.txt").write_text("# a comment\nin/keep/e.tif\n\nin/drafts/c.png\n" + f"{src / 'a.png'}\n")
    plan = plan_batch(str(tmp_path / "list.txt"), str(out), "_sr", ".png")
    assert sorted(t.output for t in plan.todo) == sorted(str(out / r) for r in ("keep/e_sr.png",
                                                                                 "drafts/c_sr.png", "a_sr.png"))
    pd.DataFrame({"path": [str(src / "a.png"), str(src / "keep" / "a.png")]}).to_parquet(tmp_path / "m.parquet")
    (src / "keep" / "a.png").write_bytes(b"x")
    plan = plan_batch(str(tmp_path / "m.parquet"), str(out), "", ".png")
    assert [t.output for t in plan.todo] == [str(out / "a.png"), str(out / "keep" / "a.png")]
    (tmp_path / "mixed.txt").write_text(f"{src / 'a.png'}\ngs://bucket/x.png\n")
    with pytest.raises(ValueError, match="mix storage schemes"):
        plan_batch(str(tmp_path / "mixed.txt"), str(out), "_sr", ".png")
    (tmp_path / "bad.csv").write_text("file\nx.png\n")
    with pytest.raises(ValueError, match="'path' column"):
        plan_batch(str(tmp_path / "bad.csv"), str(out), "_sr", ".png")


def test_results_are_checkpointed_while_running_and_summary_comes_last(tmp_path):
    from batch.pipeline import _empty_row, _rows_to_batch
    from batch.results import RunResults

    results = RunResults(str(tmp_path / "out"), "r1", checkpoint_seconds=0)  # a checkpoint per batch
    rows = []
    for i in range(3):
        row = _empty_row({"input": f"in/{i}.png", "output": f"out/{i}_sr.png"})
        row.update(in_width=10, in_height=8, out_width=20, out_height=16, lr_psnr=30.0 + i, finished_at=100.0 + i)
        rows.append(row)
    rows[2].update(status="failed", stage="decode", error="truncated or corrupt PNG file")
    results.add_batch(_rows_to_batch(rows))
    run = tmp_path / "out" / "_sr_batch" / "r1"
    # What a run killed now leaves: the rows so far, and no summary (the run did not finish).
    assert len(pd.read_parquet(run / "metrics.parquet")) == 2
    assert pd.read_parquet(run / "failures.parquet").to_dict("records") == [
        {"input": "in/2.png", "output": "out/2_sr.png", "stage": "decode", "error": "truncated or corrupt PNG file"}]
    assert not (run / "summary.json").exists()
    summary = results.finish({"run_id": "r1"})
    saved = json.loads((run / "summary.json").read_text())
    assert saved["done"] == summary["done"] == 2 and saved["failed"] == 1
    assert saved["metrics"]["lr_psnr"] == {"count": 2, "mean": 30.5, "min": 30.0, "max": 31.0, "p50": 30.5,
                                           "p90": pytest.approx(30.9), "p99": pytest.approx(30.99)}
    assert saved["metrics"]["ref_psnr"] == {"count": 0}
    assert saved["steady_images_per_second"] == 1.0 and saved["output_pixels"] == 2 * 20 * 16


def test_one_image_gives_the_same_file_through_sr_upscale_and_sr_batch(ray_address, model_file, tmp_path, capsys):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    photo("astronaut.png", (30, 22)).save(src / "a.png")
    Image.fromarray(np.dstack([np.asarray(photo("coffee.png", (21, 17))), np.full((17, 21), 99, np.uint8)])).save(
        src / "sub" / "b.png")
    photo("camera.png", (19, 25), "L").save(src / "sub" / "c.jpg", quality=90)
    options = ["--format", "jpg", "--jpeg-quality", "90", "--outscale", "1.5", "--suffix", "_x", "--alpha",
               "bicubic", "--tile", "12"]
    assert main(["upscale", str(src), "-o", str(tmp_path / "up"), "--model", model_file, *options]) == 0
    assert main(["batch", str(src), str(tmp_path / "batch"), "--model", model_file, *options, "-q"]) == 0
    capsys.readouterr()
    names = sorted(p.relative_to(tmp_path / "up").as_posix() for p in (tmp_path / "up").rglob("*.jpg"))
    assert names == ["a_x.jpg", "sub/b_x.jpg", "sub/c_x.jpg"]
    for name in names:
        assert (tmp_path / "up" / name).read_bytes() == (tmp_path / "batch" / name).read_bytes(), name


def test_the_plan_reaches_ray_data_before_the_listing_ends(ray_address, tmp_path):
    """Issue 22: the first shard's tasks reach the pipeline while the driver still lists
    (no ``end.json`` yet). With a single read task for every shard, Ray Data held them
    back until the listing ended: this wait would hang."""
    import threading

    from batch import planfeed

    run = str(tmp_path / "run")
    rows = [{"input": f"/in/{i}.png", "output": f"/out/{i}.png", "reference": "", "reference_error": ""}
            for i in range(planfeed.FIRST_SHARD_TASKS)]
    storage.write_bytes(planfeed.shard_url(run, "shard", 0), planfeed._shard_bytes(rows))
    seen: list[str] = []
    errors: list[BaseException] = []

    def consume():
        try:
            for batch in planfeed.plan_dataset(run, block_rows=4).iter_batches(batch_size=None):
                seen.extend(batch["input"])
        except BaseException as exc:  # noqa: BLE001 - reported by the test's thread
            errors.append(exc)

    reader = threading.Thread(target=consume, daemon=True)
    reader.start()
    wait_for(lambda: seen or errors or not reader.is_alive(), "the first shard's tasks to arrive")
    assert not errors and seen, errors
    assert not os.path.exists(storage.join(planfeed.plan_url(run), "end.json"))  # still "listing"
    # A second shard, then the end: every task arrives once, and the read ends.
    more = [{**r, "input": r["input"].replace("/in/", "/in2/")} for r in rows]
    storage.write_bytes(planfeed.shard_url(run, "shard", 1), planfeed._shard_bytes(more))
    storage.write_bytes(storage.join(planfeed.plan_url(run), "end.json"), json.dumps({"shards": 2}).encode())
    reader.join(HANG_TIMEOUT)
    assert not reader.is_alive() and not errors, errors
    assert sorted(seen) == sorted(r["input"] for r in rows + more)
