"""Training configs built to crash or flood the parser: values nested tens of thousands
deep (in an override, a YAML file, a JSON file), YAML aliases that expand to billions
of values, integers past Python's 4300-digit limit, values megabytes long, a seed past
torch's range and negative perceptual-layer weights. Each is refused by `sr train`
before any process starts, in one line naming the field or the file, exit 2."""

from __future__ import annotations

import json

import pytest
from sr_cli.main import main as sr_main

from jobs.config import load_config

pytestmark = pytest.mark.faults_full


def _nested(depth: int, open_="[", close="]") -> str:
    return open_ * depth + close * depth


def _billion_laughs() -> str:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]")
    return "data:\n  degradation_probs:\n" + "".join(f"    {line}\n" for line in lines)


CASES = [
    ("override", "data.gt_size=" + _nested(20_000), "data.gt_size", "nested"),
    ("override", "data.gt_size=" + "{a: " * 10_000 + "1" + "}" * 10_000, "data.gt_size", "nested"),
    ("override", "model.generator_options=" + _nested(40), "model.generator_options", "nested"),
    ("override", "data.train_hr=" + "x" * 10_000_000, "data.train_hr", "characters"),
    ("override", "data.train_hr=" + "x" * 50_000, "data.train_hr", "characters"),
    ("override", "train.seed=" + "9" * 5000, "train.seed", "4300 digits"),
    ("override", f"train.seed={2**64}", "train.seed", "2**64 - 1"),
    ("override", "train.seed=-1", "train.seed", "2**64 - 1"),
    ("override", "loss.perceptual_layers={conv2_2: -1}", "loss.perceptual_layers.conv2_2", "> 0"),
    ("override", "loss.perceptual_layers={conv2_2: 0}", "loss.perceptual_layers.conv2_2", "> 0"),
    ("override", "data.gt_size=[" + ",".join(["1"] * 20_000) + "]", "data.gt_size", "expected an integer"),
    ("c.yaml", "data:\n  gt_size: " + _nested(100_000) + "\n", "c.yaml", "nested"),
    ("c.yaml", "data:\n  gt_size: " + _nested(20_000) + "\n", "c.yaml", "nested"),
    ("c.json", '{"data": {"gt_size": ' + _nested(100_000) + "}}", "c.json", "nested"),
    ("c.json", '{"data": {"gt_size": ' + _nested(50) + "}}", "data.gt_size", "nested"),
    ("c.yaml", _billion_laughs(), "c.yaml", "YAML aliases"),
    ("c.json", '{"train": {"seed": ' + "7" * 5000 + "}}", "c.json", "4300 digits"),
    ("c.yaml", "data:\n  train_hr: " + "y" * 5000 + "\n", "data.train_hr", "characters"),
]


@pytest.mark.parametrize("where, text, named, reason", CASES, ids=[f"{c[0]}-{c[3]}-{i}" for i, c in enumerate(CASES)])
def test_hostile_configs_are_one_line_in_sr_train(tmp_path, capsys, where, text, named, reason):
    if where == "override":
        args, overrides = [], [text]
    else:
        (tmp_path / where).write_text(text)
        args, overrides = [str(tmp_path / where)], []
    with pytest.raises(ValueError) as info:
        load_config(args[0] if args else None, overrides, preset="tiny")
    assert named in str(info.value) and reason in str(info.value), str(info.value)[:500]
    capsys.readouterr()
    code = sr_main(["train", "--preset", "tiny", *args, *overrides, f"train.run_dir={tmp_path}/run",
                    f"data.train_shards={tmp_path}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and named in err, err[:2000]
    assert len(err) < 700, err[:2000]
    assert not (tmp_path / "run").exists()


def test_a_legal_seed_and_nesting_still_load(tmp_path):
    config = load_config(None, [f"train.seed={2**64 - 1}", "loss.perceptual_layers={conv2_2: 0.5, conv5_4: 1}"],
                         preset="tiny")
    assert config.train.seed == 2**64 - 1 and config.loss.perceptual_layers == {"conv2_2": 0.5, "conv5_4": 1.0}
    (tmp_path / "c.json").write_text(json.dumps({"data": {"degradation_probs": {"jpeg": 0.5}}}))
    assert load_config(str(tmp_path / "c.json"), preset="tiny").data.degradation_probs == {"jpeg": 0.5}


@pytest.mark.parametrize("text, reason", [("[" * 100_000 + "]" * 100_000, "nested"), ("{not json", "not valid JSON"),
                                          ("[1, 2]", "top level must be a mapping")])
def test_a_hostile_deepspeed_config_file_is_one_line_naming_it(tmp_path, text, reason):
    from jobs.engines import deepspeed_config

    path = tmp_path / "ds.json"
    path.write_text(text)
    config = load_config(None, [f"train.deepspeed_config={path}"], preset="tiny")
    with pytest.raises(ValueError, match="ds.json") as info:
        deepspeed_config(config, "fp32")
    assert reason in str(info.value) and len(str(info.value)) < 400
