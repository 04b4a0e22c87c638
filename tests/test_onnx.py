"""ONNX export (`sr convert M model.onnx`): RRDBNet x2 and x4, the compact generator and
a spandrel architecture, each exported once and run by ONNX Runtime at two sizes of a
sample photograph against PyTorch (>= 60 dB); exports that disagree are not written."""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from PIL import Image

from spandrel_models import save as save_spandrel
from sr_cli.main import main as sr_main
from sr_core import build_generator, save_generator
from sr_core.modelfile import load_generator
from sr_core.onnx_export import OPSET, ExportError, export_onnx

PHOTO = os.path.join(os.path.dirname(__file__), "..", "assets", "images", "chelsea.png")


def _psnr(a, b):
    a, b = np.clip(a, 0, 1).astype(np.float64), np.clip(b, 0, 1).astype(np.float64)
    mse = np.mean((a - b) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(1 / mse)


def _model(kind: str, folder) -> str:
    if kind == "SPAN":
        return save_spandrel("SPAN", folder)[0]
    torch.manual_seed(0)
    arch, scale = {"rrdbnet_x2": ("rrdbnet", 2), "rrdbnet_x4": ("rrdbnet", 4), "compact_x4": ("srvgg_compact", 4)}[kind]
    model = build_generator(arch, "tiny", scale=scale)
    with torch.no_grad():  # outputs centred in (0, 1), so clamping hides nothing
        last = model.conv_last if arch == "rrdbnet" else model.body[-1]
        last.bias.add_(0.45)
    path = str(folder / f"{kind}.safetensors")
    save_generator(model, path)
    return path


@pytest.mark.parametrize("kind", ["rrdbnet_x2", "rrdbnet_x4", "compact_x4", "SPAN"])
def test_export_agrees_with_pytorch_at_two_sizes(tmp_path, capsys, kind):
    src = _model(kind, tmp_path)
    out = tmp_path / "model.onnx"
    assert sr_main(["convert", src, str(out), "--verify-on", PHOTO]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert f"opset {OPSET}" in printed and "dB" in printed
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto)
    assert {p.key: p.value for p in proto.metadata_props}["opset"] == str(OPSET)
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    model = load_generator(src)
    photo = np.asarray(Image.open(PHOTO).convert("RGB")).astype(np.float32) / 255
    for top, left, height, width in ((40, 60, 44, 68), (100, 200, 76, 36)):
        x = np.ascontiguousarray(photo[top:top + height, left:left + width].transpose(2, 0, 1)[None])
        ours = session.run(["output"], {"input": x})[0]
        with torch.no_grad():
            reference = model(torch.from_numpy(x)).numpy()
        assert ours.shape == (1, 3, height * model.scale, width * model.scale)
        assert np.mean((reference > 0) & (reference < 1)) > 0.5
        assert _psnr(ours, reference) >= 60


def test_fp16_export_where_the_model_supports_it(tmp_path, capsys):
    src = _model("compact_x4", tmp_path)
    out = tmp_path / "half.onnx"
    assert sr_main(["convert", src, str(out), "--onnx-precision", "fp16", "--verify-on", PHOTO]) == 0
    assert onnx.load(str(out)).graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    swinir = save_spandrel("SwinIR", tmp_path)[0]  # spandrel: fp16 unsupported
    capsys.readouterr()
    assert sr_main(["convert", swinir, str(tmp_path / "s.onnx"), "--onnx-precision", "fp16",
                    "--verify-on", PHOTO]) == 2
    assert "does not support fp16" in capsys.readouterr().err
    assert not (tmp_path / "s.onnx").exists()


class _FrozenShape(torch.nn.Module):
    """Crops with Python ints taken from the traced input: the export works at the
    traced size only, which verification at two other sizes must catch."""

    scale = 1
    hparams = {"num_in_ch": 3, "num_out_ch": 3}
    arch_name = "frozen"

    def forward(self, x):
        h, w = int(x.shape[2]), int(x.shape[3])
        return x[:, :, : h // 2 * 2, : w // 2 * 2] * 0.5 + torch.zeros(1, 3, h, w)


def test_an_export_that_disagrees_is_not_written(tmp_path):
    photo = np.asarray(Image.open(PHOTO).convert("RGB"))
    out = tmp_path / "bad.onnx"
    with pytest.raises(ExportError, match="not|froze|could not run"):
        export_onnx(_FrozenShape(), str(out), [photo])
    assert not out.exists()
