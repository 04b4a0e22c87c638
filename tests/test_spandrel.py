"""Other projects' architectures through spandrel: small random-weight SwinIR, HAT, DAT,
OmniSR, SPAN and Real-CUGAN models, built with spandrel's own classes and saved as those
projects publish them, run by `sr upscale`, `sr batch` and `sr eval` with outputs equal
to a plain forward of the model; tiling, awkward sizes, precision, conversion, and
hostile files with spandrel in the path."""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from spandrel_models import SPECS, build, save
from sr_cli.main import main as sr_main
from sr_core import codecs, foreign, metrics
from sr_core.modelfile import ModelFileError, load_generator, read_model_file
from sr_core.upscaler import Upscaler

PHOTO = os.path.join(os.path.dirname(__file__), "..", "assets", "images", "coffee.png")


def photo(height: int, width: int, top: int = 150, left: int = 250) -> np.ndarray:
    return np.asarray(Image.open(PHOTO).convert("RGB"))[top:top + height, left:left + width].copy()


def plain_forward(model: torch.nn.Module, image: np.ndarray) -> np.ndarray:
    """The model itself on the whole uint8 image: clamp, round to uint8."""
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        y = model(x).clamp(0, 1)
    return (y[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def run_sr(capsys, *args):
    capsys.readouterr()
    code = sr_main([str(a) for a in args])
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("spandrel")
    return {name: save(name, folder) for name in SPECS}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Two photograph crops every model takes as they are (Real-CUGAN needs 32 px)."""
    folder = tmp_path_factory.mktemp("imgs")
    for name, (h, w) in {"a.png": (32, 40), "b.png": (36, 33)}.items():
        Image.fromarray(photo(h, w)).save(folder / name)
    return folder


@pytest.mark.parametrize("name", SPECS)
def test_loads_as_the_architecture_spandrel_names(models, name):
    path, _ = models[name]
    model = load_generator(path)
    assert model.arch_name == f"spandrel:{name}"
    assert model.scale == 2 and model.hparams["num_in_ch"] == 3


@pytest.mark.parametrize("name", SPECS)
def test_sr_upscale_equals_a_plain_forward(models, images, tmp_path, capsys, name):
    path, model = models[name]
    code, err = run_sr(capsys, "upscale", images, "-o", tmp_path / "out", "-m", path, "--device", "cpu")
    assert code == 0, err
    for image in ("a", "b"):
        src = codecs.read_image(str(images / f"{image}.png"))
        expected = plain_forward(model, src)
        out = codecs.read_image(str(tmp_path / "out" / f"{image}_sr.png"))
        # Not degenerate: most output pixels are inside (0, 255), so equality means something.
        assert np.mean((expected > 0) & (expected < 255)) > 0.5
        np.testing.assert_array_equal(out, expected)


def test_sr_eval_compares_architectures_side_by_side(models, images, tmp_path, capsys):
    from sr_core.resize import imresize, mod_crop

    names = ["SwinIR", "SPAN", "RealCUGAN"]
    args = ["eval", images, "--json", tmp_path / "r.json", "--device", "cpu", "--figures", "0"]
    for name in names:
        args += ["--model", models[name][0]]
    code, err = run_sr(capsys, *args)
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    definitions = {m["name"]: m["definition"] for m in report["methods"] if m["kind"] == "model"}
    summary = report["sets"][0]["summary"]
    for name in names:
        label = os.path.basename(models[name][0])
        assert definitions[label] == f"spandrel:{name} x2"
        # The score is that of the model's plain forward on sr eval's own LR (MATLAB
        # bicubic of the HR), averaged over the two images.
        scores = []
        for image in ("a", "b"):
            hr = mod_crop(codecs.read_image(str(images / f"{image}.png")), 2)
            lr = imresize(hr, scale=0.5)
            scores.append(metrics.psnr(_spandrel_call(models[name][0], lr), hr, crop_border=2, y_channel=True))
        assert summary[label]["psnr"] == pytest.approx(np.mean(scores), abs=1e-6)


def _spandrel_call(path: str, image: np.ndarray) -> np.ndarray:
    """spandrel's own pad -> run -> crop on the whole image, as uint8."""
    state, _ = read_model_file(path)
    descriptor = foreign.import_spandrel().ModelLoader().load_from_state_dict(state)
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        return (descriptor(x)[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()


@pytest.mark.parametrize("name", [n for n in SPECS if n != "RealCUGAN"])
def test_tiled_output_matches_untiled(models, name):
    path, _ = models[name]
    image = photo(96, 80)
    whole = Upscaler.from_file(path, device="cpu", tile=0)(image)
    tiled_upscaler = Upscaler.from_file(path, device="cpu", tile=32, overlap=16)
    assert tiled_upscaler.tile_for(96, 80) == 32
    assert psnr(whole, tiled_upscaler(image)) > 45


def test_realcugan_tiled_output_matches_untiled(models):
    path, _ = models["RealCUGAN"]
    image = photo(80, 72)
    whole = Upscaler.from_file(path, device="cpu", tile=0)(image)
    assert psnr(whole, Upscaler.from_file(path, device="cpu", tile=40, overlap=16)(image)) > 45


@pytest.mark.parametrize("name", ["OmniSR", "SwinIR"])
@pytest.mark.parametrize("size", [(17, 23), (13, 1), (1, 29), (31, 31), (7, 7)])
def test_a_window_8_model_takes_awkward_sizes(models, name, size):
    """Window-8 models with a 16 px minimum: odd, prime and 1 px wide inputs are padded
    as spandrel pads them and cropped back, equal to spandrel's own run."""
    path, _ = models[name]
    assert load_generator(path).size_minimum == 16
    image = photo(*size)
    expected = _spandrel_call(path, image)
    out = Upscaler.from_file(path, device="cpu")(image)
    assert out.shape == (size[0] * 2, size[1] * 2, 3)
    np.testing.assert_array_equal(out, expected)


def test_a_model_without_fp16_runs_fp32_and_says_so(models):
    path, _ = models["SwinIR"]
    model = load_generator(path)
    assert model.supports_half is False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        up = Upscaler(model, device="cpu", precision="fp16")
    assert up.precision == "fp32"
    assert any("does not support fp16" in str(w.message) for w in caught)


def test_a_model_that_discourages_tiling_gets_larger_tiles(models):
    swinir = Upscaler.from_file(models["SwinIR"][0], device="cpu", memory_budget=2**22)
    span = Upscaler.from_file(models["SPAN"][0], device="cpu", memory_budget=2**22)
    assert swinir.tiling == "discouraged" and span.tiling == "supported"
    span_like = Upscaler(load_generator(models["SwinIR"][0]), device="cpu", memory_budget=2**22)
    span_like.tiling = "supported"
    assert swinir.tile_for(4000, 4000) > span_like.tile_for(4000, 4000) > 0


def test_a_model_that_must_not_be_tiled_runs_whole_or_is_refused(models):
    up = Upscaler.from_file(models["SPAN"][0], device="cpu", tile=8, memory_budget=2**20)
    up.tiling = "internal"  # as spandrel marks models that tile inside themselves
    image = photo(20, 24)
    assert up.tile_for(20, 24) == 0
    np.testing.assert_array_equal(up(image), plain_forward(models["SPAN"][1], image))
    with pytest.raises(ValueError, match="must not be tiled"):
        up.tile_for(5000, 5000)


@pytest.mark.parametrize("name", ["HAT", "SPAN"])
def test_convert_writes_our_file_naming_the_architecture(models, tmp_path, capsys, name):
    path, model = models[name]
    out = tmp_path / "m.safetensors"
    code, err = run_sr(capsys, "convert", path, out)
    assert code == 0, err
    _, meta = read_model_file(str(out))
    assert meta["arch"] == f"spandrel:{name}"
    assert meta["requires"] == f"spandrel=={foreign.spandrel_version()}"
    assert json.loads(meta["provenance"])["converted_from"] == str(path)
    image = photo(32, 40)
    np.testing.assert_array_equal(Upscaler.from_file(str(out), device="cpu")(image), plain_forward(model, image))
    # As .pth: the layout its project publishes, which spandrel's own file loader reads.
    pth = tmp_path / "m.pth"
    assert run_sr(capsys, "convert", out, pth)[0] == 0
    descriptor = foreign.import_spandrel().ModelLoader().load_from_file(str(pth))
    assert descriptor.architecture.id == name
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        assert torch.equal(descriptor(x), model(x).clamp(0, 1))


def test_metadata_naming_another_architecture_is_refused(models, tmp_path):
    from safetensors.torch import save_file

    state, _ = read_model_file(models["SPAN"][0])
    path = tmp_path / "liar.safetensors"
    save_file(state, str(path), metadata={"format": "sr-cloud", "format_version": "1", "arch": "spandrel:HAT",
                                           "hparams": "{}", "scale": "2"})
    with pytest.raises(ModelFileError, match="names spandrel:HAT, but the tensors are spandrel:SPAN"):
        load_generator(str(path))


def test_interpolating_two_spandrel_models(models, tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, model_a = save("SPAN", tmp_path / "a", seed=1)
    b, model_b = save("SPAN", tmp_path / "b", seed=2)
    out = tmp_path / "mix.safetensors"
    code, err = run_sr(capsys, "interpolate", a, b, "--alpha", "0.25", "-o", out)
    assert code == 0, err
    mixed = load_generator(str(out))
    key = next(k for k, v in model_a.state_dict().items() if v.is_floating_point())
    expected = 0.75 * model_a.state_dict()[key] + 0.25 * model_b.state_dict()[key]
    assert torch.allclose(mixed.native_state_dict()[key], expected)


# ---- hostile files with spandrel in the path ----------------------------------------


def _commands(model: str, imgs, tmp_path):
    return [["convert", model, tmp_path / "o.safetensors"],
            ["convert", model, tmp_path / "o.onnx"],
            ["interpolate", model, model, "-o", tmp_path / "i.safetensors"],
            ["upscale", imgs, "-o", tmp_path / "up", "-m", model, "--device", "cpu"],
            ["eval", imgs, "--model", model]]


def _one_line(code, err, *needles):
    err = err.strip()
    assert code == 2, (code, err[-2000:])
    assert len(err.splitlines()) == 1, err[-2000:]
    for needle in needles:
        assert needle in err, (needle, err)


def test_torchscript_and_pickles_never_run_with_spandrel_in_the_path(images, tmp_path, monkeypatch, capsys):
    """spandrel's own loader tries torch.jit.load on .pt files; ours reads every file as
    plain tensors (weights_only) and hands spandrel the dict, so neither a TorchScript
    archive nor a pickle payload runs, in any command."""
    monkeypatch.chdir(tmp_path)

    class Payload:
        def __reduce__(self):
            return (os.system, ("touch PWNED",))

    scripted = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.trace(build("SPAN"), torch.rand(1, 3, 16, 16)), str(scripted))
    evil = tmp_path / "evil.pt"
    torch.save({"params": {"conv_1.sk.weight": Payload()}}, evil)
    for path in (scripted, evil):
        for args in _commands(str(path), images, tmp_path):
            code, err = run_sr(capsys, *args)
            _one_line(code, err, path.name)
    assert not (tmp_path / "PWNED").exists()
    assert not list(tmp_path.glob("o.*")) and not (tmp_path / "i.safetensors").exists()


def test_broken_spandrel_files_are_one_line(models, images, tmp_path, capsys):
    state, _ = read_model_file(models["SPAN"][0])
    from safetensors.torch import save_file

    # A recognized architecture with one tensor of the wrong shape.
    wrong = dict(state)
    key = next(k for k, v in state.items() if v.ndim == 4)
    wrong[key] = torch.zeros(*wrong[key].shape[:-1], wrong[key].shape[-1] + 2)
    save_file(wrong, str(tmp_path / "wrong.safetensors"))
    # Truncated, and a header that lies about its length.
    data = open(models["SPAN"][0], "rb").read()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "header.safetensors").write_bytes((10**12).to_bytes(8, "little") + data[8:])
    # Keys nobody knows.
    save_file({"foo.weight": torch.zeros(3, 3)}, str(tmp_path / "unknown.safetensors"))
    cases = {"wrong.safetensors": "", "cut.safetensors": "", "header.safetensors": "",
             "unknown.safetensors": "unrecognized weight layout"}
    for name, needle in cases.items():
        for args in _commands(str(tmp_path / name), images, tmp_path):
            code, err = run_sr(capsys, *args)
            _one_line(code, err, name, needle)


def test_output_extensions_a_command_cannot_write_are_refused_first(models, tmp_path, capsys):
    path, _ = models["SPAN"]
    for args in (["convert", path, tmp_path / "x.gif"],
                 ["convert", path, tmp_path / "x"],
                 ["convert", path, tmp_path / "x.safetensors", "--to", "onnx"],
                 ["interpolate", path, path, "-o", tmp_path / "blend.onnx"],
                 ["interpolate", path, path, "-o", tmp_path / "blend.gif"]):
        code, err = run_sr(capsys, *args)
        _one_line(code, err, os.path.basename(str(args[2] if args[0] == "convert" else args[-1])))
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("suffix", [".pth", ".pt"])
def test_pth_and_pt_outputs_hold_torch_bytes(model_file, tmp_path, capsys, suffix):
    converted, blended = tmp_path / f"m{suffix}", tmp_path / f"blend{suffix}"
    assert run_sr(capsys, "convert", model_file, converted)[0] == 0
    assert run_sr(capsys, "interpolate", model_file, model_file, "-o", blended)[0] == 0
    for out in (converted, blended):
        assert out.read_bytes()[:2] == b"PK"  # torch.save's zip, not safetensors
        obj = torch.load(out, weights_only=True)
        assert "params_ema" in obj


# ---- sr batch -------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for this module's batch runs (started once: its start costs seconds)."""
    import ray

    from batch import localray

    if ray.is_initialized():
        yield
        return
    ray.init(num_cpus=2, include_dashboard=False, _system_config=localray.SYSTEM_CONFIG, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.parametrize("name", SPECS)
def test_sr_batch_equals_a_plain_forward_and_records_the_architecture(local_ray, models, images, tmp_path,
                                                                     capsys, name):
    path, model = models[name]
    dst = tmp_path / "out"
    code, err = run_sr(capsys, "batch", images, dst, "--model", path, "--run-id", "r", "-q")
    assert code == 0, err
    summary = json.loads((dst / "_sr_batch" / "r" / "summary.json").read_text())
    assert summary["model"]["architecture"] == f"spandrel:{name}"
    assert summary["done"] == 2 and summary["failed"] == 0
    for image in ("a", "b"):
        out = codecs.read_image(str(next(dst.glob(f"{image}*.png"))))
        np.testing.assert_array_equal(out, plain_forward(model, codecs.read_image(str(images / f"{image}.png"))))


# ---- files whose keys or shapes would make spandrel build something huge -------------


def _swinir_state(models):
    state, _ = read_model_file(models["SwinIR"][0])
    return dict(state)


def test_a_key_claiming_a_huge_sequence_is_refused_before_building(models, images, tmp_path, capsys):
    """spandrel takes a sequence's length from its largest key index: one key at index
    10^8 would build 10^8 layers."""
    from safetensors.torch import save_file

    state = _swinir_state(models)
    key = "layers.0.residual_group.blocks.0.norm1.weight"
    state[key.replace("layers.0", "layers.99999999")] = state.pop(key)
    path = tmp_path / "index-bomb.safetensors"
    save_file(state, str(path))
    code, err = run_sr(capsys, "upscale", images, "-o", tmp_path / "o", "-m", path, "--device", "cpu")
    _one_line(code, err, "index-bomb.safetensors", "sequence index of 99999999")


def test_a_huge_dimension_is_refused_while_building(models, tmp_path, capsys):
    """spandrel takes widths from tensor shapes: a zero-element (200000, 0, 3, 3) tensor
    makes SwinIR's width 200000 (hundreds of GB of layers) with a file of kilobytes."""
    import resource
    import time

    from safetensors.torch import save_file

    state = _swinir_state(models)
    state["conv_first.weight"] = torch.zeros(200000, 0, 3, 3)
    path = tmp_path / "width-bomb.safetensors"
    save_file(state, str(path))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    code, err = run_sr(capsys, "convert", path, tmp_path / "out.safetensors")
    _one_line(code, err, "width-bomb.safetensors", "MiB to build")
    assert time.perf_counter() - start < 30
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 1_000_000  # KiB
    assert not (tmp_path / "out.safetensors").exists()


def test_torchvision_placeholders_do_not_outlive_the_import():
    """Where torchvision cannot be imported, spandrel's registry imports beside
    placeholders, which are gone afterwards: no other code takes them for torchvision."""
    import sys

    spandrel = foreign.import_spandrel()
    assert "SwinIR" in {a.architecture.id for a in spandrel.MAIN_REGISTRY.architectures()}
    for name in ("torchvision", "torchvision.transforms", "torchvision.transforms.functional"):
        assert name not in sys.modules or getattr(sys.modules[name], "__file__", None), name


def test_an_rgba_model_upscales_colour_and_alpha_together(tmp_path):
    """A 4-channel model (here OmniSR, RGBA in and out) gets the RGBA image whole; an RGB
    image gets an opaque alpha, dropped again from the output."""
    foreign.import_spandrel()  # spandrel's package imports only beside the torchvision placeholders
    from spandrel.architectures.OmniSR import OmniSR

    torch.manual_seed(3)
    model = OmniSR(num_in_ch=4, num_out_ch=4, num_feat=16, block_num=1, window_size=8, res_num=1, up_scale=2).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(0.3)
        [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)][-1].bias.add_(0.45)
    path = tmp_path / "rgba.pth"
    torch.save(model.state_dict(), path)
    up = Upscaler.from_file(str(path), device="cpu", tile=0)
    assert up.num_channels == 4
    rgba = np.concatenate([photo(20, 24), np.linspace(0, 255, 20 * 24).reshape(20, 24, 1).astype(np.uint8)], axis=2)
    np.testing.assert_array_equal(up(rgba), plain_forward(model, rgba))
    rgb = photo(20, 24)
    opaque = np.concatenate([rgb, np.full((20, 24, 1), 255, np.uint8)], axis=2)
    np.testing.assert_array_equal(up(rgb), plain_forward(model, opaque)[..., :3])


def test_an_x1_restoration_model_runs_and_an_inpainting_model_is_refused(images, tmp_path, capsys):
    """DnCNN (spandrel purpose "Restoration", x1) runs like any model; LaMa (inpainting:
    it needs a mask, which no command gives) is refused in one line, naming what it is."""
    foreign.import_spandrel()
    from spandrel.architectures.DnCNN import DnCNN
    from spandrel.architectures.LaMa import LaMa

    torch.manual_seed(4)
    dncnn = DnCNN(in_nc=3, out_nc=3, nc=16, nb=5).eval()
    path = tmp_path / "dncnn.pth"
    torch.save({"params": dncnn.state_dict()}, path)
    code, err = run_sr(capsys, "upscale", images, "-o", tmp_path / "out", "-m", path, "--device", "cpu")
    assert code == 0, err
    src = codecs.read_image(str(images / "a.png"))
    out = codecs.read_image(str(tmp_path / "out" / "a_sr.png"))
    assert out.shape == src.shape
    np.testing.assert_array_equal(out, plain_forward(dncnn, src))

    lama = tmp_path / "lama.pth"
    torch.save(LaMa().state_dict(), lama)
    code, err = run_sr(capsys, "upscale", images, "-o", tmp_path / "out2", "-m", lama, "--device", "cpu")
    _one_line(code, err, "lama.pth", "a LaMa model is for inpainting")
    assert not (tmp_path / "out2").exists() or not list((tmp_path / "out2").iterdir())


def test_hostile_model_files_through_sr_batch(local_ray, models, images, tmp_path, monkeypatch, capsys):
    """The same files through `sr batch`: refused in one line by the driver's check,
    before any worker loads them."""
    from safetensors.torch import save_file

    monkeypatch.chdir(tmp_path)

    class Payload:
        def __reduce__(self):
            return (os.system, ("touch PWNED",))

    torch.save({"params": {"conv_1.sk.weight": Payload()}}, tmp_path / "evil.pt")
    torch.jit.save(torch.jit.trace(build("SPAN"), torch.rand(1, 3, 16, 16)), str(tmp_path / "scripted.pt"))
    data = open(models["SPAN"][0], "rb").read()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    state = _swinir_state(models)
    key = "layers.0.residual_group.blocks.0.norm1.weight"
    state[key.replace("layers.0", "layers.99999999")] = state.pop(key)
    save_file(state, str(tmp_path / "index-bomb.safetensors"))
    for name in ("evil.pt", "scripted.pt", "cut.safetensors", "index-bomb.safetensors"):
        dst = tmp_path / f"out-{name}"
        code, err = run_sr(capsys, "batch", images, dst, "--model", tmp_path / name, "-q")
        _one_line(code, err, name)
        assert not dst.exists() or not list(dst.rglob("*.png"))
    assert not (tmp_path / "PWNED").exists()
