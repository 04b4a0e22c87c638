"""`sr eval`: models and interpolation baselines compared with the papers' conventions
(mod-crop, MATLAB-bicubic LR, Y channel, border crop), each baseline checked against an
independent computation written here, tables and figures checked by reading them back,
and bad inputs reported while the rest is scored.

Photographs: chelsea.png (451x300 RGB) and camera.png (512x512 gray) from
assets/images (public domain / CC0, see assets/images/SOURCES.md), copied per test.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from sr_core import build_generator, metrics, save_generator
from sr_core.codecs import read_image, write_image
from sr_cli.eval_figures import PANEL, bar_chart_size, grid_size, panel_origin
from sr_core.evaluate import baseline, evaluate_set, list_set, model_methods, run_methods, summarize
from sr_core.resize import mod_crop
from sr_cli.main import main as sr_main
from sr_core.resize import imresize

IMAGES = Path(__file__).resolve().parents[1] / "assets" / "images"


@pytest.fixture
def photos(tmp_path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(IMAGES / "chelsea.png", folder / "chelsea.png")
    shutil.copy(IMAGES / "camera.png", folder / "camera.png")
    return folder


def strict_json(path: Path) -> dict:
    def refuse(constant):
        raise AssertionError(f"not strict JSON: {constant}")

    return json.loads(path.read_text(), parse_constant=refuse)


# ---------------------------------------------------------------- independent computations


def matlab_bicubic(image: np.ndarray, scale: float) -> np.ndarray:
    """MATLAB imresize(image, scale, 'bicubic') on uint8, written from MATLAB's definition
    with dense matrices: Keys cubic (a = -0.5), kernel widened by 1/scale when shrinking
    (antialiasing), output pixel i at input i/scale + (1 - 1/scale)/2 (1-based),
    symmetric padding, rows then columns, rounded once to uint8."""
    def cubic(x):
        x = np.abs(x)
        return np.where(x <= 1, 1.5 * x**3 - 2.5 * x**2 + 1,
                        np.where(x < 2, -0.5 * x**3 + 2.5 * x**2 - 4 * x + 2, 0.0))

    def matrix(n_in: int) -> np.ndarray:
        n_out = math.ceil(n_in * scale)
        k = min(scale, 1.0)
        width = 4 / k
        m = np.zeros((n_out, n_in))
        for i in range(1, n_out + 1):
            u = i / scale + 0.5 * (1 - 1 / scale)
            taps = np.floor(u - width / 2) + np.arange(int(np.ceil(width)) + 2)
            w = k * cubic(k * (u - taps))
            w /= w.sum()
            for t, wt in zip(taps.astype(int), w):
                j = t - 1
                while not 0 <= j < n_in:  # mirror: ... 1 0 | 0 1 2 ... n-1 | n-1 n-2 ...
                    j = -j - 1 if j < 0 else 2 * n_in - 1 - j
                m[i - 1, j] += wt
        return m

    x = image.astype(np.float64)
    x = np.einsum("oi,iw...->ow...", matrix(image.shape[0]), x)
    x = np.einsum("oi,hi...->ho...", matrix(image.shape[1]), x)
    return np.floor(np.clip(x, 0, 255) + 0.5).astype(np.uint8)


def psnr_y(a: np.ndarray, b: np.ndarray, border: int) -> float:
    """PSNR on MATLAB's BT.601 luma (gray images as they are), border cropped."""
    def y(img):
        img = img.astype(np.float64)
        return img if img.ndim == 2 else 16 + img @ np.array([65.481, 128.553, 24.966]) / 255

    d = (y(a) - y(b))[border:-border, border:-border]
    return 10 * math.log10(255**2 / np.mean(d**2))


def pillow_style_resize(lr: np.ndarray, scale: int, kernel, support: float) -> np.ndarray:
    """A separable resize as Pillow defines it for 8-bit images: output pixel centre
    (i + 0.5) / scale, taps within the kernel's support and inside the image, weights
    normalized, horizontal pass then vertical, each rounded half up to 8 bits."""
    def matrix(n_in: int) -> np.ndarray:
        m = np.zeros((n_in * scale, n_in))
        for i in range(n_in * scale):
            centre = (i + 0.5) / scale
            for j in range(max(0, int(centre - support) - 1), min(n_in, int(centre + support) + 2)):
                m[i, j] = kernel(j + 0.5 - centre)
            m[i] /= m[i].sum()
        return m

    x = lr.astype(np.float64)
    x = np.floor(np.clip(np.einsum("oi,hi...->ho...", matrix(lr.shape[1]), x), 0, 255) + 0.5)
    x = np.floor(np.clip(np.einsum("oi,iw...->ow...", matrix(lr.shape[0]), x), 0, 255) + 0.5)
    return x.astype(np.uint8)


def triangle(x: float) -> float:
    return max(0.0, 1.0 - abs(x))


def lanczos3(x: float) -> float:
    return float(np.sinc(x) * np.sinc(x / 3)) if -3 <= x < 3 else 0.0


class MatlabBicubicGenerator(nn.Module):
    """A test-only "model" whose forward is MATLAB bicubic x4 (sr_core.resize on the
    8-bit values it is given), run through the real Upscaler like any generator."""

    scale = 4
    size_multiple = 1
    arch_name = "matlab_bicubic"

    def __init__(self):
        super().__init__()
        self.hparams = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        images = (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        out = np.stack([imresize(np.ascontiguousarray(image), scale=self.scale) for image in images])
        return torch.from_numpy(out).permute(0, 3, 1, 2).float().div(255).to(x.device)


# ---------------------------------------------------------------- the protocol, exactly


def test_bicubic_row_equals_an_independent_matlab_computation(photos, tmp_path):
    out = tmp_path / "out"
    assert sr_main(["eval", str(photos), "--bicubic", "4", "--out", str(out), "--figures", "0"]) == 0
    report = strict_json(out / "results.json")
    (only,) = report["sets"]
    assert [m["name"] for m in report["methods"]] == ["bicubic"]
    expected = {}
    for name in ("camera.png", "chelsea.png"):
        hr = mod_crop(read_image(str(photos / name)), 4)  # chelsea 451x300 -> 448x300
        sr = matlab_bicubic(matlab_bicubic(hr, 0.25), 4)
        expected[name] = psnr_y(sr, hr, 4)
        row = next(i for i in only["images"] if i["name"] == name)
        assert (row["width"], row["height"]) == (hr.shape[1], hr.shape[0])
        assert row["scores"]["bicubic"]["psnr"] == pytest.approx(expected[name], rel=1e-12, abs=0)
        assert row["scores"]["bicubic"]["ssim"] == metrics.ssim(sr, hr, crop_border=4, y_channel=hr.ndim == 3)
    mean = only["summary"]["bicubic"]
    assert mean["psnr"] == pytest.approx(np.mean(list(expected.values())), rel=1e-12, abs=0)
    assert mean["images"] == mean["psnr_images"] == 2
    rows = list(csv.DictReader(io.StringIO((out / "results.csv").read_text())))
    assert float(rows[0]["psnr"]) == mean["psnr"]


def test_a_model_that_is_bicubic_scores_exactly_the_bicubic_row(photos):
    image_set = list_set(str(photos))
    for tile in (0, 40):  # untiled, and tiled with overlapping windows
        methods = [baseline("bicubic", 4)] + model_methods(MatlabBicubicGenerator(), "bicubic model", 4,
                                                           device="cpu", tile=tile)
        result = evaluate_set(image_set, methods, 4)
        assert len(result.images) == 2 and not result.failures
        for image in result.images:
            assert image.scores["bicubic model"] == image.scores["bicubic"]
        assert summarize(result, "bicubic model") == summarize(result, "bicubic")
    # Figures of images not kept in memory upscale them again, to the same pixels.
    assert evaluate_set(image_set, methods[:1], 4, keep_bytes=0).kept == {}
    hr, outputs = run_methods(image_set.items[0], methods, 4)
    kept_hr, kept = result.kept[image_set.items[0].name]
    assert np.array_equal(hr, kept_hr) and all(np.array_equal(outputs[k], kept[k]) for k in kept)


@pytest.mark.parametrize("name", ["chelsea.png", "camera.png"])
def test_nearest_bilinear_and_lanczos_agree_with_independent_computations(name):
    lr = read_image(str(IMAGES / name))[100:160, 200:280]  # an 80x60 piece, colour or gray
    assert np.array_equal(baseline("nearest", 4).upscale(lr), lr.repeat(4, axis=0).repeat(4, axis=1))
    assert np.array_equal(baseline("bilinear", 4).upscale(lr), pillow_style_resize(lr, 4, triangle, 1.0))
    # Pillow rounds its Lanczos weights to 22-bit fixed point: off by one level, rarely.
    ours, independent = baseline("lanczos", 4).upscale(lr), pillow_style_resize(lr, 4, lanczos3, 3.0)
    difference = np.abs(ours.astype(int) - independent.astype(int))
    assert difference.max() <= 1 and (difference > 0).mean() < 1e-3
    assert ours.shape == (240, 320) + lr.shape[2:]


# ---------------------------------------------------------------- tables and figures


def find_crop(panel: np.ndarray, image: np.ndarray, zoom: int) -> tuple[int, int]:
    """Where in ``image`` the zoomed crop shown in ``panel`` comes from."""
    crop = panel[::zoom, ::zoom]
    side = crop.shape[0]
    rgb = image if image.ndim == 3 else np.repeat(image[..., None], 3, axis=2)
    for y in range(rgb.shape[0] - side + 1):
        for x in range(rgb.shape[1] - side + 1):
            if rgb[y, x].tolist() == crop[0, 0].tolist() and np.array_equal(rgb[y:y + side, x:x + side], crop):
                return y, x
    raise AssertionError("the panel shows no crop of the image")


def test_models_and_baselines_tables_and_figures(photos, tmp_path):
    # Pieces of the photographs keep the models' runs short (the heads work at output size).
    write_image(str(photos / "chelsea.png"), read_image(str(photos / "chelsea.png"))[80:176, 150:278])
    write_image(str(photos / "camera.png"), read_image(str(photos / "camera.png"))[60:156, 200:296])
    torch.manual_seed(0)
    plain, multi = tmp_path / "plain.safetensors", tmp_path / "multi.safetensors"
    save_generator(build_generator("rrdbnet", "tiny", scale=4), str(plain))
    save_generator(build_generator("multihead_rrdbnet", "tiny", scale=4, output_head=1), str(multi))
    out = tmp_path / "out"
    assert sr_main(["eval", str(photos), "--model", str(plain), "--model", str(multi), "--baseline", "all",
                    "--out", str(out), "--figures", "1", "--device", "cpu"]) == 0
    report = strict_json(out / "results.json")
    names = ["nearest", "bilinear", "bicubic", "lanczos", "plain.safetensors",
             "multi.safetensors (head 0)", "multi.safetensors (head 1)", "multi.safetensors (head 2)",
             "multi.safetensors (head mean)"]
    assert [m["name"] for m in report["methods"]] == names
    summary = report["sets"][0]["summary"]
    heads = [summary[f"multi.safetensors (head {k})"]["psnr"] for k in range(3)]
    assert len(set(heads + [summary["multi.safetensors (head mean)"]["psnr"]])) == 4

    # Every head really is that head: head 2 alone through the Upscaler gives the same PSNR.
    from sr_core import Upscaler, load_generator
    model = load_generator(str(multi))
    model.select_head(2)
    hr = read_image(str(photos / "camera.png"))
    sr = Upscaler(model, device="cpu")(imresize(hr, scale=0.25))
    row = next(i for i in report["sets"][0]["images"] if i["name"] == "camera.png")
    assert row["scores"]["multi.safetensors (head 2)"]["psnr"] == pytest.approx(metrics.psnr(sr, hr, 4), abs=1e-9)

    table = (out / "results.md").read_text()
    assert "| method | PSNR (dB) | SSIM | MSE |" in table
    assert f"| lanczos | **{summary['lanczos']['psnr']:.2f}** |" in table  # best of this set (untrained models)
    assert "![" in table and "figures/photos-bars.png" in table
    rows = list(csv.DictReader(io.StringIO((out / "per_image.csv").read_text())))
    assert len(rows) == 2 * len(names) and {r["image"] for r in rows} == {"camera.png", "chelsea.png"}
    assert len(list(csv.DictReader(io.StringIO((out / "results.csv").read_text())))) == len(names)

    chart = Image.open(out / "figures" / "photos-bars.png")
    assert chart.size == bar_chart_size(len(names))
    # --figures 1: the image where the first model gains most over bicubic, and the one where it gains least.
    figures = report["sets"][0]["figures"]
    assert sorted(Path(f).name for f in figures) == ["photos-bars.png", "photos-least1-camera.png",
                                                     "photos-most1-chelsea.png"] or sorted(
        Path(f).name for f in figures) == ["photos-bars.png", "photos-least1-chelsea.png", "photos-most1-camera.png"]
    crop_figure = next(f for f in figures if "most1" in f)
    image_name = crop_figure.split("most1-")[1]
    grid = np.asarray(Image.open(out / crop_figure).convert("RGB"))
    num_panels = 1 + len(names) + 1  # overview, every method, HR
    assert (grid.shape[1], grid.shape[0]) == grid_size(num_panels)
    hr = mod_crop(read_image(str(photos / image_name)), 4)
    zoom = PANEL // 64

    def panel(index: int) -> np.ndarray:
        x, y = panel_origin(index, num_panels)
        return grid[y:y + PANEL, x:x + PANEL]

    corner = find_crop(panel(num_panels - 1), hr, zoom)  # the last panel is HR
    bicubic = imresize(imresize(hr, scale=0.25), scale=4)
    y, x = corner
    expected = bicubic[y:y + 64, x:x + 64]
    expected = expected if expected.ndim == 3 else np.repeat(expected[..., None], 3, axis=2)
    assert np.array_equal(panel(names.index("bicubic") + 1), expected.repeat(zoom, 0).repeat(zoom, 1))


# ---------------------------------------------------------------- bad inputs: reported, the rest scored


def test_missing_empty_and_unreadable_inputs_are_reported_and_the_rest_scored(photos, tmp_path, capsys):
    (photos / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (photos / "folder.png").mkdir()  # a folder with an image's name
    (photos / "folder.png" / "notes.txt").write_text("x")
    empty = tmp_path / "empty"
    empty.mkdir()
    report_file = tmp_path / "r.json"
    code = sr_main(["eval", str(tmp_path / "missing"), str(empty), str(photos), "--bicubic", "4",
                    "--json", str(report_file)])
    assert code == 1
    report = strict_json(report_file)
    (scored,) = report["sets"]
    assert [i["name"] for i in scored["images"]] == ["camera.png", "chelsea.png"]
    assert [f["name"] for f in scored["failures"]] == ["broken.png"]
    assert "truncated or corrupt PNG" in scored["failures"][0]["reason"]
    errors = {Path(e["input"]).name: e["reason"] for e in report["set_errors"]}
    assert "no such folder" in errors["missing"] and "no images" in errors["empty"]
    err = capsys.readouterr().err
    assert "FAILED photos/broken.png" in err and "Traceback" not in err


def test_a_text_file_listing_images_is_a_set(photos, tmp_path):
    listing = tmp_path / "Mine.txt"
    listing.write_text(f"# two photographs\nphotos/chelsea.png\n\n{photos / 'camera.png'}\nphotos/nothing.png\n")
    out = tmp_path / "r.json"
    assert sr_main(["eval", str(listing), "--bicubic", "4", "--json", str(out)]) == 1
    got = strict_json(out)["sets"][0]
    assert got["name"] == "Mine"
    assert [i["name"] for i in got["images"]] == ["photos/chelsea.png", str(photos / "camera.png")]
    assert got["failures"][0]["name"] == "photos/nothing.png" and "no such" in got["failures"][0]["reason"]


def test_models_of_different_scales_need_a_common_scale(photos, tmp_path, capsys):
    x2, x4 = tmp_path / "x2.safetensors", tmp_path / "x4.safetensors"
    torch.manual_seed(0)
    save_generator(build_generator("rrdbnet", "tiny", scale=2), str(x2))
    save_generator(build_generator("rrdbnet", "tiny", scale=4), str(x4))
    assert sr_main(["eval", str(photos / "chelsea.png"), "--model", str(x2), "--model", str(x4)]) == 2
    err = capsys.readouterr().err
    assert "x2.safetensors x2, x4.safetensors x4" in err and "--scale" in err and len(err.strip().splitlines()) == 1
    out = tmp_path / "r.json"
    assert sr_main(["eval", str(photos / "chelsea.png"), "--model", str(x2), "--model", str(x4), "--scale", "4",
                    "--json", str(out), "--device", "cpu"]) == 0
    assert set(strict_json(out)["sets"][0]["summary"]) == {"nearest", "bicubic", "x2.safetensors",
                                                            "x4.safetensors"}


def test_paired_lr_folder_is_used_and_lr_of_another_scale_is_refused(photos, tmp_path):
    lr = tmp_path / "lr"
    lr.mkdir()
    write_image(str(lr / "chelsea.png"), imresize(mod_crop(read_image(str(photos / "chelsea.png")), 4), scale=0.25))
    camera = read_image(str(photos / "camera.png"))
    write_image(str(lr / "camerax4.png"), imresize(camera, scale=1 / 3))  # DIV2K naming, but x3
    paired, plain = tmp_path / "paired.json", tmp_path / "plain.json"
    assert sr_main(["eval", "--paired", str(photos), str(lr), "--bicubic", "4", "--json", str(paired)]) == 1
    assert sr_main(["eval", str(photos / "chelsea.png"), "--bicubic", "4", "--json", str(plain)]) == 0
    got = strict_json(paired)["sets"][0]
    assert [i["name"] for i in got["images"]] == ["chelsea.png"]
    assert got["images"][0]["scores"] == strict_json(plain)["sets"][0]["images"][0]["scores"]
    assert got["failures"][0]["name"] == "camera.png"
    assert "another scale" in got["failures"][0]["reason"]


def test_flat_image_gives_strict_json_with_null_psnr_and_relative_names(photos, tmp_path):
    nested = photos / "sub"
    nested.mkdir()
    write_image(str(nested / "flat.png"), np.full((64, 64, 3), 128, np.uint8))  # bicubic reproduces it exactly
    out = tmp_path / "out"
    assert sr_main(["eval", str(photos), "--bicubic", "4", "--out", str(out)]) == 0
    report = strict_json(out / "results.json")
    images = {i["name"]: i for i in report["sets"][0]["images"]}
    assert set(images) == {"camera.png", "chelsea.png", "sub/flat.png"}  # relative to the set, as in the table
    assert images["sub/flat.png"]["scores"]["bicubic"]["psnr"] is None
    assert "infinite" in images["sub/flat.png"]["notes"][0]
    summary = report["sets"][0]["summary"]["bicubic"]
    assert (summary["images"], summary["psnr_images"]) == (3, 2) and "infinite" in summary["note"]
    finite = [images[n]["scores"]["bicubic"]["psnr"] for n in ("camera.png", "chelsea.png")]
    assert summary["psnr"] == pytest.approx(np.mean(finite))
    assert "sub/flat.png" in (out / "per_image.csv").read_text()


def test_symlinks_out_of_the_set_are_refused_and_links_inside_it_are_scored(photos, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(IMAGES / "coffee.png", outside / "secret.png")
    os.symlink(outside / "secret.png", photos / "link.png")
    os.symlink(photos / "chelsea.png", photos / "again.png")  # inside the folder: fine
    out = tmp_path / "r.json"
    assert sr_main(["eval", str(photos), "--bicubic", "4", "--json", str(out)]) == 1
    got = strict_json(out)["sets"][0]
    assert [i["name"] for i in got["images"]] == ["again.png", "camera.png", "chelsea.png"]
    (failure,) = got["failures"]
    assert failure["name"] == "link.png" and "symbolic link" in failure["reason"] and "not followed" in failure["reason"]


def test_hidden_files_are_reported_as_skipped(photos, tmp_path, capsys):
    shutil.copy(IMAGES / "coffee.png", photos / "..hidden.png")
    shutil.copy(IMAGES / "coffee.png", photos / ".dotfile.png")
    out = tmp_path / "r.json"
    assert sr_main(["eval", str(photos), "--bicubic", "4", "--json", str(out)]) == 0
    got = strict_json(out)["sets"][0]
    assert [s["name"] for s in got["skipped"]] == ["..hidden.png", ".dotfile.png"]
    assert "hidden" in got["skipped"][0]["reason"]
    captured = capsys.readouterr()
    assert "skipped photos/..hidden.png: hidden file" in captured.err
    assert "skipped 2" in captured.out


def test_a_newline_in_a_file_name_keeps_every_table_intact(photos, tmp_path, capsys):
    shutil.copy(IMAGES / "coffee.png", photos / "two\nlines|x.png")
    (photos / "bad\nname.png").write_bytes(b"not an image")
    out = tmp_path / "out"
    assert sr_main(["eval", str(photos), "--bicubic", "4", "--out", str(out), "--figures", "0"]) == 1
    captured = capsys.readouterr()
    assert "FAILED photos/bad\\nname.png:" in captured.err  # one line, the newline shown as \n
    assert all(line.startswith(("  ", "sr eval", "photos")) or not line for line in captured.out.splitlines())
    rows = list(csv.DictReader(io.StringIO((out / "per_image.csv").read_text(), newline="")))
    assert "two\nlines|x.png" in {r["image"] for r in rows}  # CSV quotes it; read back exactly
    report = strict_json(out / "results.json")
    assert "two\nlines|x.png" in [i["name"] for i in report["sets"][0]["images"]]
    table = (out / "results.md").read_text()
    assert "bad\\\\nname.png" in table  # shown as bad\nname.png (backslash escaped for Markdown)
    for line in table.splitlines():
        assert not line.startswith("|") or line.endswith("|")


def test_lpips_without_its_package_is_a_clear_one_line_error(photos, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lpips", None)  # as if not installed: `import lpips` raises ImportError
    assert sr_main(["eval", str(photos), "--bicubic", "4", "--lpips"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "`lpips` package is not installed" in err and "pip install lpips" in err


def test_sets_on_gcs_and_results_written_to_gcs(gcs_emulator, photos, tmp_path):
    fs = gcs_emulator.fs()
    bucket = gcs_emulator.make_bucket("eval")
    fs.put_file(str(photos / "chelsea.png"), f"{bucket}/Set/chelsea.png")
    fs.pipe_file(f"{bucket}/Set/broken.png", b"\x89PNG\r\n\x1a\n not really")
    assert sr_main(["eval", f"{bucket}/Set", "--bicubic", "4", "--out", f"{bucket}/results"]) == 1
    report = json.loads(fs.cat_file(f"{bucket}/results/results.json"), parse_constant=lambda c: 1 / 0)
    got = report["sets"][0]
    assert [i["name"] for i in got["images"]] == ["chelsea.png"] and got["failures"][0]["name"] == "broken.png"
    assert fs.exists(f"{bucket}/results/figures/Set-bars.png") and fs.exists(f"{bucket}/results/results.md")
    local = tmp_path / "local.json"
    assert sr_main(["eval", str(photos / "chelsea.png"), "--bicubic", "4", "--json", str(local)]) == 0
    assert got["images"][0]["scores"] == strict_json(local)["sets"][0]["images"][0]["scores"]


def test_mod_crop():
    assert mod_crop(np.zeros((7, 10, 3)), 4).shape == (4, 8, 3)
