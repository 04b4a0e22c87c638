"""Issue 27 (items 1, 5, 7, 8, 10, 13), the training side: a damaged COMPLETE marker is
passed over like a damaged file; a run without validation logs no best PSNR; a run
directory holding an earlier run is not silently replaced; config values that are
finite but useless are refused naming the field; one run directory never has two
writers, whatever signal reaches `sr train --processes 2`."""

from __future__ import annotations

import json
import os

import pytest

from jobs import checkpoint as ckpt
from jobs.train import main as train_main
from sr_cli.main import main as sr_main
from test_train import COMMON, data, scalars  # noqa: F401  (data: the fixture)

pytestmark = pytest.mark.faults_full


def _two_steps(data, run) -> list[str]:
    args = [*COMMON, f"data.train_shards={data['shards']}", "data.batch_size=2", "train.checkpoint_every=1"]
    assert train_main([*args, f"train.run_dir={run}", "train.max_steps=2"]) == 0
    assert ckpt.complete_steps(str(run)) == [1, 2]
    return args


def _damage(folder: str, marker: bytes, remove: str | None) -> None:
    with open(f"{folder}/{ckpt.COMPLETE}", "wb") as f:
        f.write(marker)
    if remove:
        os.remove(f"{folder}/{remove}")
    else:
        blob = open(f"{folder}/state.pt", "rb").read()
        open(f"{folder}/state.pt", "wb").write(blob[: len(blob) // 2])


@pytest.mark.parametrize("marker, remove", [
    (b"\x00garbage\xff", None),  # not JSON, and state.pt truncated below it
    (b"{}", "rank_0.pt"),  # an empty marker and rank 0's RNG and loader state gone
    (b'{"step": 2}', "rank_0.pt"),  # the old marker form, without rank 0's file
])
def test_a_damaged_complete_marker_falls_back_to_the_previous_step(data, tmp_path, capsys, marker, remove):
    run = tmp_path / "run"
    args = _two_steps(data, run)
    folder = ckpt.step_dir(str(run), 2)
    _damage(folder, marker, remove)
    capsys.readouterr()
    assert sr_main(["train", *args, f"train.run_dir={run}", "train.max_steps=3", "--resume", "auto"]) == 0
    err = capsys.readouterr().err
    assert f"resumed from {ckpt.step_dir(str(run), 1)} at step 1" in err, err[-3000:]
    assert "world size changed" not in err and "not a readable checkpoint" not in err, err[-3000:]
    warning = [ln for ln in err.splitlines() if "step_000000002" in ln and "damaged" in ln]
    assert len(warning) == 1 and "step 1" in warning[0], err[-3000:]
    assert ckpt.complete_steps(str(run)) == [1, 2, 3]  # step 2 written anew
    # Named explicitly, the damaged checkpoint is refused on one line (exit 2).
    _damage(folder, marker, remove)
    capsys.readouterr()
    assert sr_main(["train", *args, f"train.run_dir={run}", "train.max_steps=3", "--resume", folder]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "damaged" in err and (ckpt.COMPLETE in err or "rank_0.pt" in err), err


def test_a_run_without_validation_logs_no_best_psnr(data, tmp_path):
    run = tmp_path / "run"
    _two_steps(data, run)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = []
    for folder, _dirs, files in os.walk(run / "tb"):
        if any(name.startswith("events.") for name in files):
            acc = EventAccumulator(folder, size_guidance={"scalars": 0})
            acc.Reload()
            tags += acc.Tags()["scalars"]
    assert "loss/g_total" in tags  # the files were read
    assert "hparam/best_val_psnr" not in tags
