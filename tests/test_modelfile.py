"""Model files: our self-describing safetensors, foreign ESRGAN/Real-ESRGAN layouts,
bad files, and the `sr convert` / `sr interpolate` commands."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from sr_core import build_generator, load_generator, save_generator
from sr_cli.main import main as sr_main
from sr_core.modelfile import ModelFileError, interpolate_generators, read_metadata


def tiny(scale=4, seed=0, **hp):
    torch.manual_seed(seed)
    return build_generator("rrdbnet", "tiny", scale=scale, **hp).eval()


def same_outputs(a, b, size=12):
    x = torch.rand(1, a.hparams["num_in_ch"], size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return torch.equal(a(x), b(x))


# ---- foreign layouts, written the way their projects write them -------------------


def to_esrgan_repo_layout(state):
    out = {}
    for k, v in state.items():
        k = re.sub(r"^body\.(\d+)\.rdb(\d)\.", r"RRDB_trunk.\1.RDB\2.", k)
        k = k.replace("conv_body.", "trunk_conv.").replace("conv_hr.", "HRconv.")
        k = re.sub(r"^conv_up(\d)\.", r"upconv\1.", k)
        out[k] = v
    return out


def to_oldest_layout(state, num_up):
    # model.0 conv_first; model.1.sub.N RRDBs + trunk conv; per x2 stage (upsample,
    # conv, act) from index 2; then HR conv, act, last conv.
    names = {"conv_first": 0}
    names.update({f"conv_up{i + 1}": 3 + 3 * i for i in range(num_up)})
    names["conv_hr"] = 2 + 3 * num_up
    names["conv_last"] = 4 + 3 * num_up
    num_block = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("body."))
    out = {}
    for k, v in state.items():
        if m := re.match(r"^body\.(\d+)\.rdb(\d)\.conv(\d)\.(weight|bias)$", k):
            out[f"model.1.sub.{m[1]}.RDB{m[2]}.conv{m[3]}.0.{m[4]}"] = v
        elif k.startswith("conv_body."):
            out[f"model.1.sub.{num_block}.{k.split('.')[1]}"] = v
        else:
            layer, kind = k.split(".")
            out[f"model.{names[layer]}.{kind}"] = v
    return out


@pytest.mark.parametrize("scale", [1, 2, 4, 8])
def test_ours_round_trip_keeps_outputs_and_metadata(tmp_path, scale):
    model = tiny(scale)
    path = str(tmp_path / "g.safetensors")
    save_generator(model, path, run="unit", step=7)
    loaded = load_generator(path)
    assert loaded.hparams == model.hparams
    assert same_outputs(model, loaded)
    meta = read_metadata(path)
    assert meta["arch"] == "rrdbnet" and meta["scale"] == str(scale)
    assert meta["provenance"] == {"run": "unit", "step": 7}


@pytest.mark.parametrize("scale", [1, 2, 4, 8])
@pytest.mark.parametrize("wrapper", ["params_ema", "params", "bare", "module_prefix"])
def test_basicsr_pth_imports_to_identical_outputs(tmp_path, scale, wrapper):
    model = tiny(scale, num_block=2)
    state = model.state_dict()
    if wrapper == "params_ema":
        # EMA weights must win over the raw ones when both are present.
        decoy = {k: torch.zeros_like(v) for k, v in state.items()}
        obj = {"params": decoy, "params_ema": state}
    elif wrapper == "params":
        obj = {"params": state}
    elif wrapper == "module_prefix":
        obj = {"module." + k: v for k, v in state.items()}
    else:
        obj = dict(state)
    path = tmp_path / "net.pth"
    torch.save(obj, path)
    loaded = load_generator(str(path))
    assert loaded.hparams == model.hparams
    assert same_outputs(model, loaded)


@pytest.mark.parametrize("scale", [4, 8])
def test_esrgan_repository_layout_imports(tmp_path, scale):
    model = tiny(scale, num_block=2)
    path = tmp_path / "RRDB_ESRGAN_x4.pth"
    torch.save(to_esrgan_repo_layout(model.state_dict()), path)
    loaded = load_generator(str(path))
    assert loaded.hparams == model.hparams
    assert same_outputs(model, loaded)


@pytest.mark.parametrize("scale,num_up", [(4, 2), (8, 3)])
def test_oldest_model_n_layout_imports(tmp_path, scale, num_up):
    model = tiny(scale, num_block=3)
    path = tmp_path / "RRDB_ESRGAN_x4_old_arch.pth"
    torch.save(to_oldest_layout(model.state_dict(), num_up), path)
    loaded = load_generator(str(path))
    assert loaded.hparams == model.hparams
    assert same_outputs(model, loaded)


def test_bare_safetensors_state_dict_and_pixelshuffle_inferred(tmp_path):
    model = tiny(4, upsampler="pixelshuffle", num_in_ch=1, num_out_ch=1)
    path = str(tmp_path / "bare.safetensors")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    loaded = load_generator(path)
    assert loaded.hparams == model.hparams
    assert same_outputs(model, loaded)


def test_full_size_esrgan_shapes_infer_published_hparams(tmp_path):
    # The published x4 generator: the inference must recover nf 64 / nb 23 / gc 32.
    model = build_generator("rrdbnet", "esrgan", scale=4)
    path = tmp_path / "RealESRGAN_x4plus.pth"
    torch.save({"params_ema": model.state_dict()}, path)
    loaded = load_generator(str(path))
    assert loaded.hparams == dict(model.hparams)
    assert sum(p.numel() for p in loaded.parameters()) == 16_697_987


# ---- bad files --------------------------------------------------------------------


class _RunsCodeWhenUnpickled:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_pickle_that_runs_code_is_refused_and_runs_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pth"
    torch.save({"params_ema": {"conv_first.weight": _RunsCodeWhenUnpickled()}}, path)
    with pytest.raises(ModelFileError, match="evil.pth"):
        load_generator(str(path))
    assert not (tmp_path / "PWNED").exists()


def test_truncated_and_junk_files_get_clear_errors(tmp_path):
    model = tiny()
    good_st = tmp_path / "good.safetensors"
    save_generator(model, str(good_st))
    good_pth = tmp_path / "good.pth"
    torch.save({"params_ema": model.state_dict()}, good_pth)

    cases = {
        "empty.safetensors": b"",
        "trunc.safetensors": good_st.read_bytes()[: good_st.stat().st_size // 2],
        "trunc.pth": good_pth.read_bytes()[: good_pth.stat().st_size // 2],
        "photo.pth": b"\x89PNG\r\n\x1a\n" + b"\0" * 100,
        "text.safetensors": b"hello, this is not a model at all",
    }
    for name, data in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(ModelFileError, match=re.escape(name)):
            load_generator(str(path))

    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_generator(str(tmp_path / "missing.pth"))


def test_state_dict_of_something_else_is_named_unrecognized(tmp_path):
    path = tmp_path / "classifier.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(ModelFileError, match="unrecognized weight layout"):
        load_generator(str(path))


def save_with_claimed_hparams(path, model, **claimed):
    """Our file format, but with metadata claiming other hyperparameters than the tensors have."""
    meta = {"format": "sr-cloud", "format_version": "1", "arch": model.arch_name,
            "hparams": json.dumps({**model.hparams, **claimed}), "scale": str(model.scale)}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path, metadata=meta)


def test_tampered_metadata_is_reported(tmp_path):
    path = str(tmp_path / "bad-meta.safetensors")
    save_with_claimed_hparams(path, tiny(), num_feat=9)
    with pytest.raises(ModelFileError, match="do not fit"):
        load_generator(path)


# ---- interpolation ----------------------------------------------------------------


def test_interpolation_blends_weights_linearly():
    a, b = tiny(seed=1), tiny(seed=2)
    mixed = interpolate_generators(a, b, 0.8)
    for key, w in mixed.state_dict().items():
        expected = 0.2 * a.state_dict()[key] + 0.8 * b.state_dict()[key]
        assert torch.allclose(w, expected, atol=1e-6), key
    assert same_outputs(interpolate_generators(a, b, 0.0), a)


def test_interpolation_refuses_mismatched_architectures():
    with pytest.raises(ValueError, match="different architectures"):
        interpolate_generators(tiny(4), tiny(2), 0.5)
    with pytest.raises(ValueError, match="alpha"):
        interpolate_generators(tiny(), tiny(), 1.5)


# ---- the commands -----------------------------------------------------------------


def test_sr_convert_to_basicsr_and_back(tmp_path, capsys):
    model = tiny(2)
    ours = str(tmp_path / "model.safetensors")
    save_generator(model, ours)
    pth = str(tmp_path / "model.pth")
    assert sr_main(["convert", ours, pth]) == 0
    # What BasicSR / Real-ESRGAN load: a params_ema dict of plain tensors in their keys
    # (our metadata rides beside it as plain strings, which they do not read).
    obj = torch.load(pth, weights_only=True)
    assert set(obj) == {"params_ema", "sr_cloud_metadata"} and set(obj["params_ema"]) == set(model.state_dict())
    assert all(isinstance(v, str) for v in obj["sr_cloud_metadata"].values())
    back = str(tmp_path / "back.safetensors")
    assert sr_main(["convert", pth, back]) == 0
    assert same_outputs(model, load_generator(back))
    assert read_metadata(back)["provenance"]["converted_from"] == pth
    # Refuses to clobber without --overwrite, and says how.
    assert sr_main(["convert", pth, back]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert sr_main(["convert", pth, back, "--overwrite"]) == 0


def test_sr_interpolate_command(tmp_path, capsys):
    a, b = str(tmp_path / "psnr.safetensors"), str(tmp_path / "gan.safetensors")
    save_generator(tiny(seed=1), a)
    save_generator(tiny(seed=2), b)
    out = str(tmp_path / "interp.safetensors")
    assert sr_main(["interpolate", a, b, "--alpha", "0.8", "-o", out]) == 0
    expected = interpolate_generators(load_generator(a), load_generator(b), 0.8)
    assert same_outputs(expected, load_generator(out))
    other = str(tmp_path / "x2.safetensors")
    save_generator(tiny(2), other)
    assert sr_main(["interpolate", a, other, "-o", str(tmp_path / "no.safetensors")]) == 2
    assert "different architectures" in capsys.readouterr().err
    assert not (tmp_path / "no.safetensors").exists()


def test_sr_entry_point_runs_as_a_real_command(tmp_path):
    src = tmp_path / "in.pth"
    torch.save({"params_ema": tiny().state_dict()}, src)
    sr = os.path.join(os.path.dirname(sys.executable), "sr")
    done = subprocess.run([sr, "convert", str(src), str(tmp_path / "out.safetensors")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out.safetensors").exists()
    bad = subprocess.run([sr, "convert", str(tmp_path / "nope.pth"), str(tmp_path / "x.safetensors")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "nope.pth" in bad.stderr and "Traceback" not in bad.stderr


def test_metadata_claiming_a_huge_model_is_refused_before_allocating_it(tmp_path):
    import resource

    path = str(tmp_path / "claims-huge.safetensors")
    # 1M features would be terabytes of weights if built for real.
    save_with_claimed_hparams(path, tiny(), num_feat=1_000_000)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ModelFileError, match="claims num_feat=1000000"):
        load_generator(path)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB


def test_unknown_architecture_in_metadata_is_reported(tmp_path):
    path = str(tmp_path / "future.safetensors")
    meta = {"format": "sr-cloud", "format_version": "1", "arch": "swinir", "hparams": "{}", "scale": "4"}
    save_file({"w": torch.zeros(1)}, path, metadata=meta)
    with pytest.raises(ModelFileError, match="bad sr-cloud metadata.*unknown generator 'swinir'"):
        load_generator(path)



def test_saving_a_discriminator_is_refused(tmp_path):
    from sr_core import build_discriminator

    with pytest.raises(ValueError, match="not a registered generator"):
        save_generator(build_discriminator("vgg_style", "tiny"), str(tmp_path / "d.safetensors"))
    assert not (tmp_path / "d.safetensors").exists()
