"""Hostile model files and model-taking commands: lying metadata, odd provenance,
pickles, folders as outputs, devices that are not there. Each is refused (or handled)
with one line naming the file, before any large allocation, and never runs code."""

from __future__ import annotations

import json
import os
import resource
import time

import pytest
import torch
from safetensors.torch import save_file

from sr_core import build_generator, load_generator, save_generator
from sr_cli.main import main as sr_main
from sr_core.modelfile import ModelFileError, read_metadata

pytestmark = pytest.mark.faults_full

def tiny(scale=4, seed=0):
    torch.manual_seed(seed)
    return build_generator("rrdbnet", "tiny", scale=scale).eval()


def save_claiming(path, model, meta_extra=None, **claimed):
    """Our format with metadata that says something other than the tensors."""
    meta = {"format": "sr-cloud", "format_version": "1", "arch": model.arch_name,
            "hparams": json.dumps({**model.hparams, **claimed}), "scale": str(model.scale)}
    meta.update(meta_extra or {})
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata=meta)
    return str(path)


def run_sr(capsys, *args):
    """``sr ARGS`` in this process (an exception escaping it fails the test: that
    would have been a traceback); returns (exit code, stderr)."""
    capsys.readouterr()
    code = sr_main(list(args))
    return code, capsys.readouterr().err


def one_line_error(result, *needles):
    """Exit 2, one line on stderr naming every needle."""
    code, err = result
    err = err.strip()
    assert code == 2, (code, err[-2000:])
    assert len(err.splitlines()) == 1, err[-2000:]
    for needle in needles:
        assert needle in err, (needle, err)
    return err


# ---- defect 1: claimed hyperparameters are checked against the tensors first ---------


@pytest.mark.parametrize("claimed, reason", [
    ({"num_block": 10**8}, "claims num_block=100000000"),
    ({"num_feat": 10**9}, "claims num_feat=1000000000"),
    ({"num_grow_ch": 10**12}, "claims num_grow_ch"),
    ({"num_feat": -8}, "num_feat must be from 1 to 4096, got -8"),
    ({"num_feat": "64"}, "num_feat must be an integer"),
    ({"num_block": 1.5}, "num_block must be an integer"),
    ({"num_block": True}, "num_block must be an integer"),
    ({"upsampler": 3}, "upsampler must be a string"),
])
def test_lying_hyperparameters_are_refused_in_milliseconds(tmp_path, claimed, reason):
    path = save_claiming(tmp_path / "liar.safetensors", tiny(), **claimed)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with pytest.raises(ModelFileError, match="liar.safetensors") as info:
        load_generator(path)
    assert reason in str(info.value)
    assert time.perf_counter() - start < 2.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # KiB


def test_foreign_file_whose_keys_claim_a_huge_block_count_is_refused(tmp_path):
    state = tiny().state_dict()
    # one key renamed to block 10^8: the inferred num_block would build 10^8 blocks
    state = {k.replace("body.0.rdb3.conv5", "body.99999999.rdb3.conv5"): v for k, v in state.items()}
    path = tmp_path / "keys-lie.pth"
    torch.save({"params_ema": state}, path)
    start = time.perf_counter()
    with pytest.raises(ModelFileError, match="num_block=100000000"):
        load_generator(str(path))
    assert time.perf_counter() - start < 2.0


def test_lying_metadata_through_the_commands_is_one_line(tmp_path, capsys):
    path = save_claiming(tmp_path / "liar.safetensors", tiny(), num_block=10**8)
    img = tmp_path / "in.png"
    from PIL import Image
    Image.new("RGB", (8, 8)).save(img)
    one_line_error(run_sr(capsys, "upscale", str(img), "-o", str(tmp_path / "out"), "-m", path),
                   "liar.safetensors", "num_block=100000000")
    one_line_error(run_sr(capsys, "convert", path, str(tmp_path / "c.safetensors")), "liar.safetensors")


# ---- defect 2: provenance of any shape converts -----------------------------------


@pytest.mark.parametrize("provenance, kept", [
    (json.dumps(["a", "list"]), {"original_provenance": '["a", "list"]'}),
    ("not json {", {"original_provenance": "not json {"}),
    (json.dumps({"url": "http://x", "model": "m", "run": "r"}), {"url": "http://x", "model": "m", "run": "r"}),
])
def test_convert_keeps_provenance_of_any_shape(tmp_path, capsys, provenance, kept):
    src = save_claiming(tmp_path / "odd.safetensors", tiny(), {"provenance": provenance})
    out = str(tmp_path / "out.safetensors")
    assert sr_main(["convert", src, out]) == 0, capsys.readouterr().err
    assert read_metadata(out)["provenance"] == {**kept, "converted_from": src}
    assert torch.equal(load_generator(out).conv_first.weight, tiny().conv_first.weight)


# ---- defect 4: a folder as OUT ----------------------------------------------------


@pytest.mark.parametrize("command", ["convert", "interpolate"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_an_existing_folder_as_output_is_named_a_folder(tmp_path, capsys, command, overwrite):
    model = str(tmp_path / "m.safetensors")
    save_generator(tiny(), model)
    folder = tmp_path / "existing"
    folder.mkdir()
    (folder / "keep.txt").write_text("x")
    args = [command, model, str(folder)] if command == "convert" else [command, model, model, "-o", str(folder)]
    one_line_error(run_sr(capsys, *args, *(["--overwrite"] if overwrite else [])), str(folder), "is a folder")
    assert (folder / "keep.txt").read_text() == "x"


# ---- defect 5: devices that are not there, pickles that want code ---------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a CPU-only torch")
def test_device_cuda_on_cpu_torch_is_one_line(tmp_path, capsys):
    model = str(tmp_path / "m.safetensors")
    save_generator(tiny(), model)
    from PIL import Image
    Image.new("RGB", (8, 8)).save(tmp_path / "in.png")
    base = ["upscale", str(tmp_path / "in.png"), "-o", str(tmp_path / "o"), "-m", model]
    one_line_error(run_sr(capsys, *base, "--device", "cuda"), "--device cuda", "--device cpu")
    one_line_error(run_sr(capsys, *base, "--device", "cuda:3"), "--device cuda:3")
    one_line_error(run_sr(capsys, *base, "--device", "tpu9"), "unknown device 'tpu9'")


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_pickle_refusal_never_suggests_the_unsafe_option(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pth"
    torch.save({"params_ema": {"conv_first.weight": _RunsCode()}}, path)
    from PIL import Image
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (16, 16)).save(tmp_path / "imgs" / "a.png")
    imgs = str(tmp_path / "imgs")
    for args in (["convert", str(path), str(tmp_path / "o.safetensors")],
                 ["interpolate", str(path), str(path), "-o", str(tmp_path / "i.safetensors")],
                 ["upscale", imgs, "-o", str(tmp_path / "o"), "-m", str(path)],
                 ["eval", imgs, "--model", str(path)]):
        err = one_line_error(run_sr(capsys, *args), "evil.pth", "sr convert")
        assert "weights_only=False" not in err
        assert "posix.system" in err
    assert not (tmp_path / "PWNED").exists()


# ---- weights that are not a generator, or not numbers ---------------------------------


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_inf_weights_are_refused_naming_a_tensor(tmp_path, value):
    model = tiny()
    with torch.no_grad():
        model.conv_body.weight[0, 0, 0, 0] = value
    path = str(tmp_path / "diverged.safetensors")
    save_generator(model, path)
    with pytest.raises(ModelFileError, match=r"diverged.safetensors: 1 weight tensor\(s\) hold NaN .*conv_body.weight"):
        load_generator(path)


def test_a_discriminator_passed_as_a_generator_is_refused(tmp_path, capsys):
    from sr_core import build_discriminator

    path = tmp_path / "netD.pth"
    torch.save({"params": build_discriminator("vgg_style", "tiny").state_dict()}, path)
    one_line_error(run_sr(capsys, "convert", str(path), str(tmp_path / "g.safetensors")),
                   "netD.pth", "unrecognized weight layout")
