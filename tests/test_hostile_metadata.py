"""Model-file metadata built to hang or crash the loader: counts that a padding tensor
makes look plausible (a zero-element or a large 1-D tensor beside the real weights),
JSON nested far deeper than any real metadata, and values megabytes long. Each is
refused by our own loaders in bounded time with one line naming the file, before the
model the metadata describes is built."""

from __future__ import annotations

import io
import json
import resource
import time

import pytest
import torch
from safetensors.torch import save_file
from test_hostile_models import one_line_error, run_sr, tiny

from sr_core import build_generator, load_generator
from sr_core.archs import GENERATORS, VARIANTS
from sr_core.modelfile import PTH_METADATA_KEY, ModelFileError, read_metadata

pytestmark = pytest.mark.faults_full

PADDING = {
    "zero-element": torch.zeros(0, 1_000_000),
    "2 MB 1-D": torch.zeros(500_000),
}
"""Tensors that lift a bound taken from the largest dimension in the file."""


def _meta(model, **claimed) -> dict[str, str]:
    return {"format": "sr-cloud", "format_version": "1", "arch": model.arch_name,
            "hparams": json.dumps({**model.hparams, **claimed}), "scale": str(model.scale)}


def _bomb(path, model, padding, as_pth=False, meta=None, **claimed) -> str:
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state["padding"] = padding
    meta = meta or _meta(model, **claimed)
    if as_pth:
        buf = io.BytesIO()
        torch.save({"params": state, PTH_METADATA_KEY: meta}, buf)
        path.write_bytes(buf.getvalue())
    else:
        save_file(state, str(path), metadata=meta)
    return str(path)


def _compact():
    torch.manual_seed(0)
    return build_generator("srvgg_compact", num_feat=8, num_conv=2, scale=2).eval()


@pytest.mark.parametrize("padding", sorted(PADDING))
@pytest.mark.parametrize("arch, claimed", [("srvgg_compact", {"num_conv": 10**6}),
                                           ("srvgg_compact", {"num_conv": 10**8}),
                                           ("srvgg_compact", {"num_conv": 1000}),
                                           ("rrdbnet", {"num_block": 10**6})])
@pytest.mark.parametrize("as_pth", [False, True])
def test_a_count_lifted_by_a_padding_tensor_is_refused_in_milliseconds(tmp_path, padding, arch, claimed, as_pth):
    model = _compact() if arch == "srvgg_compact" else tiny()
    path = _bomb(tmp_path / ("bomb.pth" if as_pth else "bomb.safetensors"), model, PADDING[padding],
                 as_pth=as_pth, **claimed)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with pytest.raises(ModelFileError, match="bomb") as info:
        load_generator(path)
    assert time.perf_counter() - start < 2.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # KiB
    # refused by the architecture's own range (a count above 1000) or by the tensors present
    message = str(info.value)
    assert ("does not describe these weights" in message or "must be from" in message) and len(message) < 600


def test_the_bomb_through_the_commands_is_one_line(tmp_path, capsys):
    path = _bomb(tmp_path / "bomb.safetensors", _compact(), PADDING["zero-element"], num_conv=10**6)
    from PIL import Image
    Image.new("RGB", (8, 8)).save(tmp_path / "in.png")
    start = time.perf_counter()
    one_line_error(run_sr(capsys, "upscale", str(tmp_path / "in.png"), "-o", str(tmp_path / "o"), "-m", path),
                   "bomb.safetensors")
    one_line_error(run_sr(capsys, "convert", path, str(tmp_path / "c.safetensors")), "bomb.safetensors")
    assert time.perf_counter() - start < 20.0  # the minutes it took were building 10^6 layers
    assert not (tmp_path / "c.safetensors").exists()


def test_an_honest_file_with_an_extra_tensor_is_still_refused_by_its_keys(tmp_path):
    """The padding alone (honest metadata): an unexpected tensor, named."""
    path = _bomb(tmp_path / "extra.safetensors", _compact(), PADDING["2 MB 1-D"])
    with pytest.raises(ModelFileError, match="unexpected 1 .*padding"):
        load_generator(path)


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("field", ["hparams", "provenance"])
@pytest.mark.parametrize("depth", [200_000, 900])
def test_deeply_nested_metadata_is_one_line_in_every_command(tmp_path, capsys, field, depth):
    model = tiny()
    meta = _meta(model)
    meta[field] = '{"deep": ' + _nested(depth) + "}"
    path = tmp_path / "deep.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata=meta)
    from PIL import Image
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (16, 16)).save(tmp_path / "imgs" / "a.png")
    for args in (["upscale", str(tmp_path / "imgs"), "-o", str(tmp_path / "o"), "-m", str(path)],
                 ["convert", str(path), str(tmp_path / "c.safetensors")],
                 ["eval", str(tmp_path / "imgs"), "--model", str(path)]):
        one_line_error(run_sr(capsys, *args), "deep.safetensors", field, "nested")
    with pytest.raises(ModelFileError, match=f"{field} .*nested"):
        read_metadata(str(path))


def test_a_megabyte_hparam_value_is_not_echoed_whole(tmp_path):
    model = tiny()
    path = tmp_path / "long.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata=_meta(model, upsampler="x" * 10_000_000))
    with pytest.raises(ModelFileError, match="long.safetensors") as info:
        load_generator(str(path))
    assert len(str(info.value)) < 600


@pytest.mark.parametrize("arch", sorted(GENERATORS))
def test_every_generator_still_loads_under_the_bound(tmp_path, arch):
    """Honest files of every registered generator load (some register parameters they
    drop again: the bound leaves room for that)."""
    from sr_core import save_generator

    torch.manual_seed(0)
    model = build_generator(arch, "tiny" if "tiny" in VARIANTS.get(arch, {}) else None, scale=2)
    path = str(tmp_path / f"{arch}.safetensors")
    save_generator(model, path)
    loaded = load_generator(path)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
