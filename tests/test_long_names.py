"""Output names at the file system's limit: a name it accepts is written (the atomic
write's temporary name used to be ~30 bytes longer than the name asked for), a name it
refuses is one line, exit 2, with nothing written; and a write that fails names the
file asked for, never our temporary file."""

from __future__ import annotations

import os

import pytest
from PIL import Image
from test_hostile_models import one_line_error, run_sr, tiny

from sr_core import load_generator, save_generator, storage

pytestmark = pytest.mark.faults_full


def _limit(folder) -> int:
    return os.pathconf(folder, "PC_NAME_MAX")


def _leftovers(folder) -> list[str]:
    return [p.name for p in folder.rglob("*") if p.name.startswith(storage.TMP_PREFIX)]


@pytest.fixture
def model(tmp_path):
    path = tmp_path / "m.safetensors"
    save_generator(tiny(scale=2), str(path))
    return str(path)


def test_names_the_file_system_accepts_are_written(tmp_path, capsys, model):
    out = tmp_path / "out"
    out.mkdir()
    limit = _limit(out)
    longest = "c" * (limit - len(".safetensors")) + ".safetensors"
    assert run_sr(capsys, "convert", model, str(out / longest))[0] == 0
    assert load_generator(str(out / longest)).scale == 2
    blend = "i" * (limit - len(".safetensors")) + ".safetensors"
    assert run_sr(capsys, "interpolate", model, model, "-o", str(out / blend))[0] == 0
    # sr upscale: the output is the input's stem + "_sr.png"; at the limit exactly.
    (tmp_path / "in").mkdir()
    src = tmp_path / "in" / ("u" * (limit - len("_sr.png")) + ".png")
    Image.new("RGB", (8, 8)).save(src)
    code, err = run_sr(capsys, "upscale", str(src), "-o", str(out), "-m", model)
    assert code == 0, err
    assert (out / (src.stem + "_sr.png")).exists()
    storage.write_bytes(str(out / ("w" * limit)), b"x")  # the helper itself, at the limit
    assert (out / ("w" * limit)).read_bytes() == b"x"
    assert not _leftovers(tmp_path)


def test_names_it_refuses_are_one_line(tmp_path, capsys, model):
    out = tmp_path / "out"
    out.mkdir()
    too_long = "x" * (_limit(out) + 1 - len(".safetensors")) + ".safetensors"
    one_line_error(run_sr(capsys, "convert", model, str(out / too_long)), too_long, "shorter name")
    one_line_error(run_sr(capsys, "interpolate", model, model, "-o", str(out / too_long)), too_long, "shorter")
    one_line_error(run_sr(capsys, "convert", model, str(out / ("d" * 300) / "m.safetensors")), "shorter names")
    assert sorted(p.name for p in out.iterdir()) == []
    assert not _leftovers(tmp_path)
    with pytest.raises(ValueError, match="shorter name"):
        storage.write_bytes(str(out / ("w" * (_limit(out) + 1))), b"x")


def test_a_failed_write_names_the_file_asked_for(tmp_path, capsys, model):
    """sysfs takes no new files (permission denied, or read-only in a container)."""
    target = "/sys/m.safetensors"
    err = one_line_error(run_sr(capsys, "convert", model, target), target)
    assert storage.TMP_PREFIX not in err, err
    with pytest.raises(OSError) as info:
        storage.write_bytes(target, b"x")
    assert info.value.filename == target and storage.TMP_PREFIX not in str(info.value)
