"""The training config engine: sections, tuples and lists, the type-driven merge rule,
JSON files, presets, per-section validation, schedules; bad configs fail before any
process starts, naming the field."""

from __future__ import annotations

import json

import pytest

from jobs.config import (
    PRESETS,
    Config,
    DataConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    field_docs,
    from_dict,
    load_config,
    to_dict,
)
from jobs.train import learning_rate
from sr_cli.main import main as sr_main


def test_sections_tuples_lists_and_json(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({
        "optim": {"betas_g": [0.5, 0.9], "milestones": [10, 20]},
        "data": {"degradation_probs": {"jpeg": 0.5}},
    }))
    cfg = load_config(str(tmp_path / "c.json"), ["optim.lr_g=1e-3", "train.stage=psnr"], preset="tiny")
    assert cfg.optim.betas_g == (0.5, 0.9) and cfg.optim.milestones == [10, 20] and cfg.optim.lr_g == 1e-3
    assert cfg.model.generator_variant == "tiny" and cfg.data.scale == 2  # from the preset
    # Round trip through plain data (what RUN/config.yaml and checkpoints hold).
    assert from_dict(json.loads(json.dumps(to_dict(cfg)))) == cfg
    for cls in (ModelConfig, LossConfig, OptimConfig, TrainConfig, Config):
        docs = field_docs(cls)
        assert set(docs) == set(cls.__dataclass_fields__) and all(docs.values()), cls


def test_mappings_are_replaced_whole_and_sections_merged(tmp_path):
    """The merge rule comes from the field types: sections merge field by field, every
    other value (mappings included) is replaced whole, whatever its name."""
    (tmp_path / "c.yaml").write_text("loss:\n  perceptual_layers: {conv3_4: 0.5}\n"
                                     "data:\n  degradation_probs: {gaussian_noise: 0.2}\n")
    cfg = load_config(str(tmp_path / "c.yaml"), ["data.degradation_probs={jpeg: 0.1}"], preset="esrgan_psnr_x4")
    assert cfg.loss.perceptual_layers == {"conv3_4": 0.5}  # not merged with the default conv5_4
    assert cfg.data.degradation_probs == {"jpeg": 0.1}
    assert cfg.data.gt_size == 128 and cfg.optim.milestones == [200_000, 400_000, 600_000, 800_000]


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_is_valid(preset):
    cfg = load_config(None, ["train.pretrained=g.safetensors", "loss.vgg_weights=vgg19.pth"], preset=preset)
    assert cfg.data.gt_size % cfg.data.scale == 0


def test_published_values():
    gan = load_config(None, ["train.pretrained=g.safetensors", "loss.vgg_weights=v.pth"], preset="esrgan_gan_x4")
    assert (gan.optim.lr_g, gan.optim.milestones, gan.train.max_steps) == \
        (1e-4, [50_000, 100_000, 200_000, 300_000], 400_000)
    assert (gan.loss.pixel_weight, gan.loss.perceptual_weight, gan.loss.gan_weight, gan.loss.gan) == \
        (1e-2, 1.0, 5e-3, "ragan")
    psnr = load_config(None, [], preset="esrgan_psnr_x4")
    assert (psnr.optim.lr_g, psnr.optim.betas_g, psnr.data.batch_size, psnr.train.max_steps) == \
        (2e-4, (0.9, 0.99), 16, 1_000_000)


@pytest.mark.parametrize("overrides, field", [
    (["optim.betas_g=[0.9]"], "optim.betas_g"),
    (["optim.betas_g=[0.9, 1.5]"], "optim.betas_g"),
    (["optim.milestones=[10, x]"], "optim.milestones[1]"),
    (["optim.milestones=[20, 10]"], "optim.milestones"),
    (["train.stage=gann"], "train.stage"),
    (["train.backend=horovod"], "train.backend"),
    (["train.zero_stage=3"], "train.zero_stage"),
    (["model.generator=rrdb"], "model.generator"),
    (["model.generator_variant=huge"], "model.generator_variant"),
    (["loss.gan=wgan"], "loss.gan"),
    (["optim.schedule=cosine_restart"], "optim.periods"),
    (["train.lr=1"], "train.lr"),
])
def test_bad_values_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field.replace("[", r"\[")):
        load_config(None, overrides, preset="tiny")


def test_bad_configs_fail_before_any_process_starts(tmp_path, capsys):
    """`sr train --processes 2` with a bad config exits 2 with one line naming the field,
    without starting the launcher."""
    shards = tmp_path / "missing"
    cases = [
        (["data.gt_sise=64"], "data.gt_sise"),
        (["data.batch_size=two"], "data.batch_size"),
        (["train.stage=gan", "train.pretrained="], "train.pretrained"),
        (["train.stage=gan", f"train.pretrained={tmp_path}/g.safetensors", "model.discriminator="],
         "model.discriminator"),
        (["data.gt_size=63"], "data.gt_size"),
        ([f"data.train_shards={shards}"], "data.train_shards"),
        (["data.train_shards="], "data.train_shards"),
        (["data.train_shards=x"], "train.run_dir"),  # checked first: where would it write?
        (["train.stage=gan", f"train.pretrained={tmp_path}/nope.safetensors"], "train.pretrained"),
        (["train.stage=gan", f"train.pretrained={tmp_path}/g.safetensors", "loss.random_vgg=false",
          "loss.perceptual_weight=1"], "loss.vgg_weights"),
    ]
    (tmp_path / "g.safetensors").write_bytes(b"")
    (tmp_path / "index.json").write_text("{}")
    for overrides, field in cases:
        base = [f"data.train_shards={tmp_path}"]
        if field != "train.run_dir":
            base.append(f"train.run_dir={tmp_path}/run")
        code = sr_main(["train", "--processes", "2", "--preset", "tiny", *base, *overrides])
        err = capsys.readouterr().err.strip()
        assert code == 2 and field in err and len(err.splitlines()) == 1, (overrides, err)
    assert not (tmp_path / "run").exists()


def test_schedules_are_functions_of_the_step_only():
    o = OptimConfig(schedule="multistep", milestones=[10, 20], gamma=0.5)
    assert [learning_rate(1.0, s, o) for s in (0, 9, 10, 19, 20, 10**6)] == [1, 1, 0.5, 0.5, 0.25, 0.25]
    o = OptimConfig(schedule="cosine_restart", periods=[10, 10], eta_min=0.0)
    assert learning_rate(1.0, 0, o) == 1.0 and learning_rate(1.0, 10, o) == 1.0
    assert learning_rate(1.0, 5, o) == pytest.approx(0.5) and learning_rate(1.0, 25, o) == 0.0
    o = OptimConfig(schedule="constant", warmup_steps=4)
    assert [learning_rate(2.0, s, o) for s in range(5)] == [0.5, 1.0, 1.5, 2.0, 2.0]


def test_data_config_alone_still_loads():
    cfg = load_config(None, ["data.gt_size=96"])
    assert isinstance(cfg.data, DataConfig) and cfg.data.gt_size == 96


def test_training_docs_hold_the_generated_config_reference():
    from pathlib import Path

    from jobs.config import reference_markdown

    text = (Path(__file__).resolve().parent.parent / "docs" / "TRAINING.md").read_text()
    assert reference_markdown() in text, "regenerate the reference: python -m jobs.config"


@pytest.mark.parametrize("where, text, field", [
    ("c.json", '{"optim": {"lr_g": Infinity}}', "optim.lr_g"),
    ("c.json", '{"optim": {"betas_d": [0.9, NaN]}}', "optim.betas_d[1]"),
    ("c.json", '{"loss": {"perceptual_layers": {"conv5_4": -Infinity}}}', "loss.perceptual_layers.conv5_4"),
    ("c.yaml", "optim:\n  lr_g: .inf\n", "optim.lr_g"),
    ("c.yaml", "data:\n  degradation_probs: {jpeg: .nan}\n", "data.degradation_probs.jpeg"),
    ("c.yaml", "model:\n  generator_options: {num_feat: .inf}\n", "model.generator_options.num_feat"),
    ("override", "optim.lr_d=1e999", "optim.lr_d"),  # a string YAML 1.1 leaves, read as a float
    ("override", "optim.grad_clip=-.inf", "optim.grad_clip"),
])
def test_non_finite_numbers_are_refused_naming_the_field(tmp_path, capsys, where, text, field):
    """Issue 17 #10: Infinity/NaN anywhere in a config is refused naming the field (it
    used to train "successfully" to a NaN model); one line, exit 2."""
    if where == "override":
        args, overrides = [], [text]
    else:
        (tmp_path / where).write_text(text)
        args, overrides = [str(tmp_path / where)], []
    with pytest.raises(ValueError, match=field.replace("[", r"\[").replace(".", r"\.") + ".*finite"):
        load_config(args[0] if args else None, overrides, preset="tiny")
    code = sr_main(["train", "--preset", "tiny", *args, *overrides, f"train.run_dir={tmp_path}/run",
                    f"data.train_shards={tmp_path}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and field in err, err


def test_a_config_of_many_unknown_keys_gives_a_short_line(tmp_path):
    """Issue 17, minor: 300k unknown keys gave a 4.4 MB error line; the names listed are
    capped, with the count of the rest."""
    (tmp_path / "c.yaml").write_text("optim:\n" + "".join(f"  k{i}: 1\n" for i in range(300_000)))
    with pytest.raises(ValueError) as info:
        load_config(str(tmp_path / "c.yaml"), preset="tiny")
    text = str(info.value)
    assert len(text) < 1000 and "optim.k0" in text and "299" in text and "\n" not in text, text[:2000]
