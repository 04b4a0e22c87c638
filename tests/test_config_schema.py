"""The config's three parts: the schema's annotations and declared ranges read by one
generic check, the presets as YAML files shipped in the package (each citing its
source), and the DeepSpeed launch adopted into a new validated config."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import typing
from dataclasses import dataclass, field
from importlib import resources
from typing import Literal

import pytest

from jobs import config as config_module
from jobs.config import PRESETS, Config, TrainConfig, load_config
from jobs.config.typed import build, check_ranges, ranged


@dataclass
class _Inner:
    """A nested section."""

    ratio: float = ranged(0.5, low=0, high=1, low_open=True)
    """A ratio above 0 and at most 1."""


@dataclass
class _Sample:
    """A made-up schema: one field of each kind the generic check reads."""

    mode: Literal["a", "b"] = "a"
    """A choice."""

    level: Literal[0, 1, 2] = 1
    """A choice of integers."""

    count: int = ranged(3, low=1, high=10)
    """A bounded count."""

    pair: tuple[float, float] = ranged((0.1, 0.2), low=0, high=1, high_open=True)
    """Two numbers, each in [0, 1)."""

    weights: dict[str, float] = ranged(default_factory=dict, low=0, low_open=True, text="> 0 (a weight)")
    """Named weights."""

    inner: _Inner = field(default_factory=_Inner)
    """A nested section."""


@pytest.mark.parametrize("values, message", [
    ({"mode": "c"}, "mode must be one of a, b, got 'c'"),
    ({"level": True}, "level must be one of 0, 1, 2, got True"),  # True == 1, but is no choice
    ({"level": 1.0}, "level must be one of 0, 1, 2, got 1.0"),
    ({"count": "3"}, "count: expected an integer, got '3'"),
    ({"pair": [0.1]}, "pair: expected 2 values, got 1"),
    ({"inner": {"ratio": "x"}}, "inner.ratio: expected a number, got 'x'"),
    ({"inner": {"typo": 1}}, "unknown config key(s) inner.typo; _Inner has: ratio"),
])
def test_the_generic_check_reads_the_annotations(values, message):
    with pytest.raises(ValueError) as info:
        build(_Sample, values)
    assert str(info.value).startswith(message), str(info.value)


@pytest.mark.parametrize("values, message", [
    ({"count": 0}, "count must be from 1 to 10, got 0"),
    ({"count": 11}, "count must be from 1 to 10, got 11"),
    ({"pair": [0.5, 1.0]}, "pair[1] must be in [0, 1), got 1.0"),
    ({"weights": {"x": 1.0, "y": 0.0}}, "weights.y must be > 0 (a weight), got 0.0"),
    ({"inner": {"ratio": 0.0}}, "inner.ratio must be above 0 and at most 1, got 0.0"),
])
def test_ranges_declared_beside_the_fields_are_checked(values, message):
    sample = build(_Sample, values)  # the types are right: the ranges are checked after
    with pytest.raises(ValueError) as info:
        check_ranges(sample)
    assert str(info.value) == message
    check_ranges(_Sample())  # the defaults are in range


def test_choice_fields_are_literals_and_the_backends_are_listed_once():
    hints = typing.get_type_hints(TrainConfig)
    assert typing.get_args(hints["backend"]) == config_module.BACKENDS == ("ddp", "deepspeed")
    assert typing.get_args(hints["stage"]) == config_module.STAGES
    from jobs.engines import BACKENDS

    assert tuple(BACKENDS) == config_module.BACKENDS
    assert [cls.__name__ for cls in BACKENDS.values()] == ["DDPBackend", "DeepSpeedBackend"]


def test_presets_are_yaml_files_in_the_package_each_citing_its_source():
    folder = resources.files("jobs.config") / "presets"
    files = sorted(entry.name for entry in folder.iterdir() if entry.name.endswith(".yaml"))
    assert files == sorted(f"{name}.yaml" for name in PRESETS)
    for name in files:
        lines = (folder / name).read_text().splitlines()
        header = [line for line in lines[:3] if line.startswith("# ")]
        assert len(header) >= 1, f"{name} starts with no comment saying where its values come from"
    # `extends` resolves: x2 is x4's recipe with its own scale.
    assert PRESETS["esrgan_gan_x2"]["data"]["scale"] == 2
    assert PRESETS["esrgan_gan_x2"]["loss"] == PRESETS["esrgan_gan_x4"]["loss"]
    assert load_config(None, [], preset="demo_real_x2").data == load_config(None, [], preset="demo_x2").data


def test_a_new_preset_file_needs_nothing_else(tmp_path, monkeypatch):
    """What docs/TRAINING.md tells a newcomer: a YAML file under jobs/config/presets/ is a preset."""
    from jobs.config import loader

    real = loader._preset_files()
    (tmp_path / "mine_x2.yaml").write_text("# Source: a test.\nextends: demo_x2\ntrain:\n  max_steps: 7\n")
    monkeypatch.setattr(loader, "_preset_files", lambda: {**real, "mine_x2": tmp_path / "mine_x2.yaml"})
    presets = loader._read_presets()
    assert presets["mine_x2"]["train"]["max_steps"] == 7 and presets["mine_x2"]["model"]["generator"] == "srvgg_compact"


def test_the_deepspeed_launch_gives_a_new_validated_config(monkeypatch):
    from jobs.engines import adopt_deepspeed_launch

    config = load_config(None, [], preset="tiny")
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    assert adopt_deepspeed_launch(config) is config  # not launched with DeepSpeed: unchanged
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", "ds.json")
    adopted = adopt_deepspeed_launch(config)
    assert (adopted.train.backend, adopted.train.deepspeed_config) == ("deepspeed", "ds.json")
    assert (config.train.backend, config.train.deepspeed_config) == ("ddp", "")  # left as validated
    # The adopted config is validated: a config that is not valid is refused there.
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    bad = dataclasses.replace(config, train=dataclasses.replace(config.train, zero_stage=3))
    with pytest.raises(ValueError, match="train.zero_stage must be 0, 1 or 2"):
        adopt_deepspeed_launch(bad)


def test_python_m_jobs_config_prints_the_reference():
    out = subprocess.run([sys.executable, "-m", "jobs.config"], capture_output=True, text=True, check=True).stdout
    assert out.startswith("### `data`:") and config_module.reference_markdown() in out
    assert "| `train.backend` | ddp / deepspeed |" in out
    assert Config() == load_config(None, [])


def test_the_config_imports_no_torch():
    """`sr --help` lists the presets: reading the config package must not load torch."""
    code = "import sys, jobs.config; print(sorted(m for m in ('torch', 'accelerate', 'ray') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
