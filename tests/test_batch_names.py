"""File names that broke `sr batch` (issue 27, item 9): a name that is not UTF-8 beside a
good one, a name that would escape its folder, and output names of 243-253 bytes (legal
on the file systems here). Each is handled for that image (written, or reported in the
failures table) while the run writes its outputs, metrics, failures and summary, and a
rerun works. `sr batch` runs as a subprocess with its own local Ray, as a user runs it."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from batch.results import read_table
from events import run_in_session
from test_hostile_models import run_sr as run_sr_here

REPO = Path(__file__).resolve().parent.parent
SR = [sys.executable, "-m", "sr_cli"]
ENV = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "PYTHONPATH": str(REPO)}
LATIN1 = b"latin1-\xe9t\xe9.png"
ESCAPING = "x\\..\\..\\evil.png"  # a legal POSIX name; as a key, x\..\..\ climbs out of its folder


def save(path: Path, seed: int, size=(12, 10)) -> np.ndarray:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    with open(path, "wb") as f:
        Image.fromarray(pixels).save(f, "PNG")
    return pixels


def long_stems(folder: Path) -> list[str]:
    """Stems whose outputs (stem + '_sr.png') are 243 and 253 bytes long."""
    assert os.pathconf(folder, "PC_NAME_MAX") >= 253
    return ["L" * (243 - len("_sr.png")), "M" * (253 - len("_sr.png"))]


def batch(src: Path, out: Path, model: str, *extra: str):
    return run_in_session([*SR, "batch", str(src), str(out), "--model", model, "--num-cpus", "2", "-q", *extra],
                          cwd=REPO, env=ENV)


def test_odd_names_are_handled_per_image_and_a_rerun_works(tmp_path, model_file):
    src, hr, out = tmp_path / "in", tmp_path / "hr", tmp_path / "out"
    src.mkdir()
    hr.mkdir()
    save(src / "good.png", 1)
    save(os.path.join(os.fsencode(src), LATIN1), 2)
    save(src / ESCAPING, 3)
    stems = long_stems(src)
    for i, stem in enumerate(stems):
        save(src / f"{stem}.png", 10 + i)
    good_hr = np.kron(save(src / "good.png", 1), np.ones((2, 2, 1), np.uint8))
    Image.fromarray(good_hr).save(hr / "good.png")
    save(hr / ESCAPING, 4, size=(24, 20))  # an HR image whose name would escape --reference

    first = batch(src, out, model_file, "--reference", str(hr), "--run-id", "one")
    assert first.returncode == 1, first.stderr[-3000:]  # some inputs failed: not a refusal (2), not a crash
    assert "Traceback" not in first.stderr and "codec can't encode" not in first.stderr + first.stdout
    for stem in ["good", *stems]:
        assert Image.open(out / f"{stem}_sr.png").size == (24, 20), stem
    rows = read_table(str(out / "_sr_batch" / "one" / "metrics.parquet")).to_pandas().set_index("input")
    assert set(rows.index) == {str(src / f"{s}.png") for s in ["good", *stems]}
    good = rows.loc[str(src / "good.png")]
    assert good.reference == str(hr / "good.png") and np.isfinite(good.ref_psnr)
    failures = read_table(str(out / "_sr_batch" / "one" / "failures.parquet")).to_pandas().set_index("input")
    assert set(failures.index) == {str(src) + "/latin1-\\xe9t\\xe9.png", str(src / ESCAPING)}
    assert "not valid UTF-8" in failures.loc[str(src) + "/latin1-\\xe9t\\xe9.png"].error
    assert "unsafe relative path" in failures.loc[str(src / ESCAPING)].error
    summary = json.loads((out / "_sr_batch" / "one" / "summary.json").read_text())
    assert summary["done"] == 3 and summary["failed"] == 2

    again = batch(src, out, model_file, "--reference", str(hr), "--run-id", "two")
    assert again.returncode == 1, again.stderr[-3000:]
    summary = json.loads((out / "_sr_batch" / "two" / "summary.json").read_text())
    assert summary["done"] == 0 and summary["failed"] == 2 and summary["skipped"] == 3, summary


def test_upscale_writes_output_names_of_243_to_253_bytes(tmp_path, capsys, model_file):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    stems = long_stems(src)
    for i, stem in enumerate(stems):
        save(src / f"{stem}.png", i)
    code, err = run_sr_here(capsys, "upscale", str(src), "-o", str(out), "-m", model_file)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{s}_sr.png" for s in stems)
    assert all(Image.open(out / f"{s}_sr.png").size == (24, 20) for s in stems)
