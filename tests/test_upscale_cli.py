"""`sr upscale` end to end: a folder with good and bad files (the good ones are written
with the relative structure, the bad ones reported, exit code 1), reruns skip existing
outputs, globs and fsspec URLs, formats, suffixes and outscale."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
from PIL import Image

from events import HANG_TIMEOUT, wait_for
from sr_core import build_generator, codecs, save_generator
from sr_cli.main import main

IMAGES = Path(__file__).resolve().parent.parent / "assets" / "images"
REPO = Path(__file__).resolve().parent.parent


def small_photo(name: str, size: tuple[int, int], mode: str = "RGB") -> Image.Image:
    return Image.open(IMAGES / name).convert("RGB").resize(size, Image.Resampling.BICUBIC).convert(mode)


@pytest.fixture()
def photo_folder(tmp_path) -> Path:
    """in/ with photographs of several kinds in a subfolder, plus three bad files."""
    root = tmp_path / "in"
    (root / "trip" / "day1").mkdir(parents=True)
    small_photo("astronaut.png", (40, 36)).save(root / "astronaut.png")
    small_photo("camera.png", (30, 26), "L").save(root / "trip" / "camera.jpg", quality=95)
    rgba = np.dstack([np.asarray(small_photo("coffee.png", (33, 21))), np.full((21, 33), 128, np.uint8)])
    Image.fromarray(rgba).save(root / "trip" / "day1" / "coffee.webp", lossless=True)
    gray16 = (np.asarray(small_photo("chelsea.png", (25, 19), "L")).astype(np.uint16) * 257)
    Image.fromarray(gray16).save(root / "trip" / "day1" / "chelsea16.png")
    full = (root / "astronaut.png").read_bytes()
    (root / "trip" / "broken.png").write_bytes(full[: len(full) // 3])
    (root / "trip" / "empty.jpg").write_bytes(b"")
    (root / "notes.png").write_bytes(b"shopping list: milk, eggs")
    (root / "readme.txt").write_text("not an image extension: ignored when listing a folder")
    return root


GOOD = {
    "astronaut_sr.png": ((72, 80, 3), np.uint8),
    "trip/camera_sr.png": ((52, 60), np.uint8),
    "trip/day1/coffee_sr.png": ((42, 66, 4), np.uint8),
    "trip/day1/chelsea16_sr.png": ((38, 50), np.uint16),
}
BAD = {"trip/broken.png": "truncated", "trip/empty.jpg": "empty file", "notes.png": "not an image"}


def test_folder_with_bad_files_in_a_real_process(photo_folder, model_file, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "sr_cli", "upscale", str(photo_folder), "-o", str(out), "--model", model_file,
         "--tile", "16"],
        capture_output=True, text=True, cwd=REPO, timeout=HANG_TIMEOUT,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 1, proc.stderr
    assert "written 4, skipped 0 (output exists), failed 3" in proc.stdout
    for rel, (shape, dtype) in GOOD.items():
        image = codecs.read_image(str(out / rel))
        assert image.shape == shape and image.dtype == dtype, rel
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == sorted(GOOD)
    for rel, reason in BAD.items():
        line = next(ln for ln in proc.stderr.splitlines() if str(photo_folder / rel) in ln)
        assert "FAILED" in line and reason in line
    # Alpha kept (constant 128 in, near 128 out: the model upscales it as a gray image).
    alpha = codecs.read_image(str(out / "trip/day1/coffee_sr.png"))[..., 3]
    assert alpha.std() < 40


def test_rerun_skips_existing_outputs_unless_overwrite(photo_folder, model_file, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["upscale", str(photo_folder / "trip"), "-o", str(out), "-m", model_file]
    assert main(args) == 1
    # The summary names the device and the precision the model ran in (RRDBNet: fp32 on CPU).
    assert "written 3, skipped 0 (output exists), failed 2 on cpu in fp32" in capsys.readouterr().out
    (out / "camera_sr.png").unlink()
    before = (out / "day1" / "coffee_sr.png").stat().st_mtime_ns
    assert main(args) == 1
    assert "written 1, skipped 2 (output exists), failed 2" in capsys.readouterr().out
    assert (out / "day1" / "coffee_sr.png").stat().st_mtime_ns == before
    assert main(args + ["--overwrite"]) == 1
    assert "written 3, skipped 0 (output exists), failed 2" in capsys.readouterr().out
    assert (out / "day1" / "coffee_sr.png").stat().st_mtime_ns != before


def test_all_good_exits_zero_with_format_suffix_and_outscale(photo_folder, model_file, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["upscale", str(photo_folder / "astronaut.png"), str(photo_folder / "trip" / "day1"),
                 "-o", str(out), "-m", model_file, "--format", "jpg", "--suffix", "", "--outscale", "3"])
    assert code == 0
    assert "written 3, skipped 0 (output exists), failed 0" in capsys.readouterr().out
    assert codecs.read_image(str(out / "astronaut.jpg")).shape == (108, 120, 3)
    assert codecs.read_image(str(out / "coffee.jpg")).shape == (63, 99, 3)  # alpha flattened for JPEG
    assert codecs.read_image(str(out / "chelsea16.jpg")).shape == (57, 75)


def test_globs_and_fsspec_urls(photo_folder, model_file, capsys):
    fs = fsspec.filesystem("memory")
    for path in (photo_folder / "trip" / "day1").iterdir():
        fs.pipe(f"/cli-in/day1/{path.name}", path.read_bytes())
    fs.pipe("/cli-in/other.png", (photo_folder / "astronaut.png").read_bytes())
    code = main(["upscale", "memory://cli-in/**/*.webp", "memory://cli-in/other.png", "memory://cli-in/missing.png",
                 "-o", "memory://cli-out", "-m", model_file, "--format", "webp", "--webp-lossless"])
    captured = capsys.readouterr()
    assert code == 1
    assert "written 2, skipped 0 (output exists), failed 1" in captured.out
    assert "missing.png" in captured.err and "no such file" in captured.err
    assert codecs.read_image("memory://cli-out/day1/coffee_sr.webp").shape == (42, 66, 4)
    assert codecs.read_image("memory://cli-out/other_sr.webp").shape == (72, 80, 3)


def test_outputs_that_would_collide_or_replace_inputs_are_failures(photo_folder, model_file, tmp_path, capsys):
    small_photo("chelsea.png", (20, 20)).save(photo_folder / "astronaut.jpg")
    code = main(["upscale", str(photo_folder / "astronaut.png"), str(photo_folder / "astronaut.jpg"),
                 "-o", str(tmp_path / "out"), "-m", model_file])
    captured = capsys.readouterr()
    assert code == 1 and "written 1" in captured.out and "is also the output of" in captured.err
    code = main(["upscale", str(photo_folder / "astronaut.png"), "-o", str(photo_folder), "-m", model_file,
                 "--suffix", ""])
    assert code == 1 and "would replace an input" in capsys.readouterr().err
    assert codecs.read_image(str(photo_folder / "astronaut.png")).shape == (36, 40, 3)


def test_a_bad_model_is_a_one_line_error(photo_folder, tmp_path, capsys):
    bad_model = tmp_path / "m.safetensors"
    bad_model.write_bytes(b"nope")
    assert main(["upscale", str(photo_folder), "-o", str(tmp_path / "out"), "-m", str(bad_model)]) == 2
    assert "not a model file" in capsys.readouterr().err


def test_gcs_folder_to_gcs_with_a_bad_object(gcs_emulator, photo_folder, model_file, capsys):
    """gs:// in and out through a real GCS API server on 127.0.0.1."""
    bucket = gcs_emulator.make_bucket("upscale")
    fs = gcs_emulator.fs()
    fs.pipe(f"{bucket}/photos/a/astronaut.png", (photo_folder / "astronaut.png").read_bytes())
    fs.pipe(f"{bucket}/photos/b/camera.jpg", (photo_folder / "trip" / "camera.jpg").read_bytes())
    fs.pipe(f"{bucket}/photos/b/broken.png", (photo_folder / "trip" / "broken.png").read_bytes())
    code = main(["upscale", f"{bucket}/photos", "-o", f"{bucket}/out", "-m", model_file])
    captured = capsys.readouterr()
    assert code == 1
    assert "written 2, skipped 0 (output exists), failed 1" in captured.out
    assert f"{bucket}/photos/b/broken.png" in captured.err
    assert codecs.read_image(f"{bucket}/out/a/astronaut_sr.png").shape == (72, 80, 3)
    assert codecs.read_image(f"{bucket}/out/b/camera_sr.png").shape == (52, 60)
    # A rerun finds the outputs and skips them.
    assert main(["upscale", f"{bucket}/photos", "-o", f"{bucket}/out", "-m", model_file]) == 1
    assert "written 0, skipped 2 (output exists), failed 1" in capsys.readouterr().out


def outputs_below(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_an_output_folder_inside_the_input_folder_is_not_read_back(photo_folder, model_file, capsys):
    """A rerun must find its outputs as outputs (skipped), not upscale them again."""
    day1 = photo_folder / "trip" / "day1"
    args = ["upscale", str(photo_folder / "trip"), "-o", str(photo_folder / "trip" / "out"), "-m", model_file]
    assert main(args) == 1
    assert "written 3, skipped 0 (output exists), failed 2" in capsys.readouterr().out
    assert main(args) == 1
    captured = capsys.readouterr()
    assert "written 0, skipped 3 (output exists), failed 2" in captured.out, captured.err
    assert outputs_below(photo_folder / "trip" / "out") == ["camera_sr.png", "day1/chelsea16_sr.png",
                                                             "day1/coffee_sr.png"]
    # OUT = the input folder itself: outputs sit beside their inputs, and a rerun
    # treats them as outputs, not as new inputs.
    args = ["upscale", str(day1), "-o", str(day1), "-m", model_file]
    assert main(args) == 0
    assert "written 2, skipped 0 (output exists), failed 0" in capsys.readouterr().out
    assert main(args) == 0
    assert "written 0, skipped 2 (output exists), failed 0" in capsys.readouterr().out
    assert outputs_below(day1) == ["chelsea16.png", "chelsea16_sr.png", "coffee.webp", "coffee_sr.png"]


def test_file_names_with_spaces_unicode_dashes_and_glob_characters(model_file, tmp_path, capsys):
    folder = tmp_path / "my [photos]"
    folder.mkdir()
    names = ["a b.png", "ünïcødé 写真.png", "-dash.png", "x[1].png", "star*.png", "c..d.png"]
    for n in names:
        small_photo("coffee.png", (10, 8)).save(folder / n)
    # The folder (its name has glob characters) and files named literally.
    assert main(["upscale", str(folder), "-o", str(tmp_path / "o1"), "-m", model_file]) == 0
    assert "written 6" in capsys.readouterr().out
    assert outputs_below(tmp_path / "o1") == sorted(n[:-4] + "_sr.png" for n in names)
    assert main(["upscale", "-o", str(tmp_path / "o2"), "-m", model_file, "--",
                 str(folder / "x[1].png"), str(folder / "-dash.png"), str(folder / "star*.png")]) == 0
    assert "written 3" in capsys.readouterr().out
    assert outputs_below(tmp_path / "o2") == ["-dash_sr.png", "star*_sr.png", "x[1]_sr.png"]
    assert codecs.read_image(str(tmp_path / "o2" / "x[1]_sr.png")).shape == (16, 20, 3)


def test_symlinks_out_of_the_input_folder_are_not_followed(photo_folder, model_file, tmp_path, capsys):
    outside = tmp_path / "private"
    outside.mkdir()
    small_photo("chelsea.png", (12, 10)).save(outside / "secret.png")
    folder = photo_folder / "trip" / "day1"
    os.symlink(outside / "secret.png", folder / "link.png")
    os.symlink(folder / "coffee.webp", folder / "inside.webp")  # within the folder: fine
    out = tmp_path / "out"
    assert main(["upscale", str(folder), "-o", str(out), "-m", model_file]) == 1
    captured = capsys.readouterr()
    assert "written 3, skipped 0 (output exists), failed 1" in captured.out
    line = next(ln for ln in captured.err.splitlines() if "link.png" in ln)
    assert "outside" in line and str(outside / "secret.png") in line
    assert outputs_below(out) == ["chelsea16_sr.png", "coffee_sr.png", "inside_sr.png"]
    # Named on the command line, a link is the user's choice and is followed.
    assert main(["upscale", str(folder / "link.png"), "-o", str(out), "-m", model_file]) == 0
    assert (out / "link_sr.png").is_file()


def test_out_that_is_a_file_is_a_one_line_error_before_any_work(photo_folder, model_file, tmp_path, capsys):
    not_a_folder = tmp_path / "out.png"
    not_a_folder.write_bytes(b"an existing file")
    assert main(["upscale", str(photo_folder), "-o", str(not_a_folder), "-m", str(tmp_path / "no-model")]) == 2
    err = capsys.readouterr().err
    assert f"{not_a_folder} is a file" in err and "folder" in err
    assert not_a_folder.read_bytes() == b"an existing file"
    with pytest.raises(SystemExit):
        main(["upscale", str(photo_folder), "-o", str(tmp_path / "o"), "-m", model_file, "--outscale", "x"])
    assert main(["upscale", str(photo_folder), "-o", str(tmp_path / "o"), "-m", model_file, "--outscale", "nan"]) == 2
    assert "--outscale" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_ctrl_c_finishes_what_was_written_and_a_rerun_does_the_rest(tmp_path):
    import signal

    torch.manual_seed(0)
    model = str(tmp_path / "small_x4.safetensors")
    save_generator(build_generator("rrdbnet", "small", scale=4), model)
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for i in range(24):
        small_photo("coffee.png", (96, 64)).save(src / f"img{i:02d}.png")
    sr = [sys.executable, "-m", "sr_cli", "upscale", str(src), "-o", str(out), "--model", model]
    proc = subprocess.Popen(sr, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: out.exists() and any(out.iterdir()), "a first output", proc)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=HANG_TIMEOUT)
    assert proc.returncode == 130, stderr
    done = sorted(p.name for p in out.iterdir())
    assert 0 < len(done) < 24 and all(name.endswith("_sr.png") for name in done)  # no temp files
    for name in done:  # every output left behind is whole
        assert codecs.read_image(str(out / name)).shape == (256, 384, 3)
    assert f"{24 - len(done)} image(s) not done" in stderr and "run the same command again" in stderr

    rerun = subprocess.run(sr, capture_output=True, text=True, timeout=HANG_TIMEOUT)
    assert rerun.returncode == 0, rerun.stderr
    assert f"written {24 - len(done)}, skipped {len(done)}" in rerun.stdout


def test_16_bit_colour_in_gives_16_bit_colour_out(model_file, tmp_path, capsys):
    """A 16-bit RGB PNG and a 16-bit RGBA TIFF come out as 16-bit RGB(A) PNGs with real
    16-bit values (not 8-bit values scaled by 257)."""
    import cv2
    import tifffile

    root = tmp_path / "in16"
    root.mkdir()
    rgb = np.asarray(small_photo("astronaut.png", (30, 22))).astype(np.uint16) * 257
    rgb = rgb + (np.arange(30, dtype=np.uint16)[None, :, None] * 7)  # low bits 8-bit data cannot have
    ok, png = cv2.imencode(".png", np.ascontiguousarray(rgb[..., ::-1]))
    assert ok
    (root / "astronaut16.png").write_bytes(png.tobytes())
    alpha = np.linspace(0, 65535, 22 * 30).reshape(22, 30).astype(np.uint16)
    tifffile.imwrite(root / "astronaut16a.tif", np.dstack([rgb, alpha]), photometric="rgb", extrasamples=[2])
    out = tmp_path / "out16"
    code = main(["upscale", str(root), "-o", str(out), "-m", model_file])
    assert code == 0
    assert "written 2, skipped 0 (output exists), failed 0" in capsys.readouterr().out
    for name, channels, colour_type in (("astronaut16_sr.png", 3, 2), ("astronaut16a_sr.png", 4, 6)):
        data = (out / name).read_bytes()
        assert data[24] == 16 and data[25] == colour_type, name  # PNG IHDR: 16-bit RGB / RGBA
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        assert image.dtype == np.uint16 and image.shape == (44, 60, channels), name
        assert (image % 257 != 0).mean() > 0.5, name
        assert np.array_equal(codecs.read_image(str(out / name))[..., :3], image[..., 2::-1]), name
