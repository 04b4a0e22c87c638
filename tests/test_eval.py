"""`sr eval`: the paper conventions (mod-crop, MATLAB-bicubic LR, Y channel, border
crop) applied to bicubic and to a model, with bad inputs reported."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from sr_core import build_generator, metrics, save_generator
from sr_core.codecs import read_image
from sr_core.evaluate import mod_crop, score_image
from sr_core.main import main as sr_main
from sr_core.resize import imresize
from sr_core.upscaler import Upscaler

IMAGES = Path(__file__).resolve().parents[1] / "assets" / "images"


def test_bicubic_score_follows_the_paper_protocol():
    hr = read_image(str(IMAGES / "chelsea.png"))  # 451x300: not a multiple of 4
    score = score_image("chelsea", hr, 4, lambda lr: imresize(lr, scale=4))
    cropped = hr[:300, :448]
    expected_sr = imresize(imresize(cropped, scale=0.25), scale=4)
    assert (score.height, score.width) == (300, 448)
    assert score.psnr == metrics.psnr(expected_sr, cropped, crop_border=4, y_channel=True)
    assert score.ssim == metrics.ssim(expected_sr, cropped, crop_border=4, y_channel=True)
    rgb = score_image("chelsea", hr, 4, lambda lr: imresize(lr, scale=4), y_channel=False)
    assert rgb.psnr == metrics.psnr(expected_sr, cropped, crop_border=4)


def test_mod_crop():
    assert mod_crop(np.zeros((7, 10, 3)), 4).shape == (4, 8, 3)


def test_sr_eval_bicubic_and_model_with_a_bad_file(tmp_path, capsys):
    folder = tmp_path / "hr"
    folder.mkdir()
    shutil.copy(IMAGES / "chelsea.png", folder / "chelsea.png")
    shutil.copy(IMAGES / "camera.png", folder / "camera.png")  # grayscale
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")

    report = tmp_path / "bicubic.json"
    assert sr_main(["eval", str(folder), "--bicubic", "4", "--json", str(report)]) == 1
    out = json.loads(report.read_text())
    assert [Path(r["name"]).name for r in out["images"]] == ["camera.png", "chelsea.png"]
    assert Path(out["failures"][0]["input"]).name == "broken.png"
    assert out["mean_psnr"] == pytest.approx(np.mean([r["psnr"] for r in out["images"]]))
    assert "broken.png" in capsys.readouterr().err

    torch.manual_seed(0)
    model_path = tmp_path / "g.safetensors"
    save_generator(build_generator("rrdbnet", "tiny", scale=4), str(model_path))
    report = tmp_path / "model.json"
    (folder / "broken.png").unlink()
    assert sr_main(["eval", str(folder / "chelsea.png"), "--model", str(model_path), "--json", str(report)]) == 0
    row = json.loads(report.read_text())["images"][0]
    upscaler = Upscaler.from_file(str(model_path), device="cpu")
    hr = read_image(str(folder / "chelsea.png"))
    direct = score_image("chelsea", hr, 4, upscaler)
    assert row["psnr"] == pytest.approx(direct.psnr) and row["ssim"] == pytest.approx(direct.ssim)
