"""Architectures, parametrized over the registries: every generator and discriminator
gets shape, finiteness, gradient and state-dict round-trip checks; the published
layouts are compared key by key and shape by shape with the reference fixture."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from sr_core.archs import DISCRIMINATORS, GENERATORS, VARIANTS, build_discriminator, build_generator
from sr_core.modelfile import load_generator, save_generator

FIXTURES = json.loads((Path(__file__).parent / "fixtures" / "keys_shapes.json").read_text())
COMPACT_FIXTURES = json.loads((Path(__file__).parent / "fixtures" / "compact_keys_shapes.json").read_text())

# Scales each generator supports, and extra hyperparameter variants worth covering.
# test_every_registry_entry_is_covered fails when a new entry is missing here.
GENERATOR_SCALES = {
    "rrdbnet": [1, 2, 4, 8],
    "multihead_rrdbnet": [1, 2, 4, 8],
    "srresnet": [2, 4, 8],
    "srvgg_compact": [1, 2, 3, 4],
}
GENERATOR_VARIANTS = {
    "rrdbnet": [{"upsampler": "nearest"}, {"upsampler": "pixelshuffle"}],
    "multihead_rrdbnet": [{"upsampler": "nearest"}, {"upsampler": "pixelshuffle"}, {"output_head": 2}],
    "srresnet": [{}],
    "srvgg_compact": [{"activation": "prelu"}, {"activation": "relu"}, {"activation": "leakyrelu"}],
}
# What a discriminator scores: one logit per image, or one per pixel.
DISCRIMINATOR_OUTPUT = {
    "vgg_style": "per_image",
    "vgg_style_any": "per_image",
    "srgan": "per_image",
    "unet_sn": "per_pixel",
}

GENERATOR_CASES = [
    pytest.param(name, scale, variant, id=f"{name}-x{scale}-{'-'.join(map(str, variant.values())) or 'default'}")
    for name, scales in GENERATOR_SCALES.items()
    for scale in scales
    for variant in GENERATOR_VARIANTS[name]
]


def seeded_input(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def discriminator_sizes(disc: nn.Module) -> list[tuple[int, int]]:
    """The fixed size, or the smallest accepted size plus a larger non-square one."""
    if disc.input_size is not None:
        return [(disc.input_size, disc.input_size)]
    smallest, multiple = disc.min_input_size, disc.size_multiple
    return [(smallest, smallest), (round_up(smallest + 13, multiple), round_up(smallest + 5, multiple))]


def state_dict_keys_and_shapes(model: nn.Module) -> dict[str, list[int]]:
    return {key: list(value.shape) for key, value in model.state_dict().items()}


def settle_batchnorm(model: nn.Module, channels: int, size: int) -> None:
    """Run train-mode forwards so BatchNorm running statistics move away from their
    initial values: a round trip that dropped buffers would then change outputs."""
    model.train()
    with torch.no_grad():
        for seed in range(2):
            model(seeded_input(2, channels, size, size, seed=10 + seed))
    model.eval()


# ---- registry --------------------------------------------------------------------


def test_every_registry_entry_is_covered_and_has_a_tiny_variant():
    assert set(GENERATOR_SCALES) == set(GENERATORS)
    assert set(GENERATOR_VARIANTS) == set(GENERATORS)
    assert set(DISCRIMINATOR_OUTPUT) == set(DISCRIMINATORS)
    assert not set(GENERATORS) & set(DISCRIMINATORS), "variants share one namespace"
    for name in [*GENERATORS, *DISCRIMINATORS]:
        assert "tiny" in VARIANTS[name], name
        model = build_generator(name, "tiny") if name in GENERATORS else build_discriminator(name, "tiny")
        assert model.arch_name == name
        # hparams must rebuild the same architecture (model files rely on it).
        json.dumps(model.hparams)
        assert type(model)(**model.hparams).hparams == model.hparams


@pytest.mark.parametrize(
    "build, args, named",
    [
        (build_generator, ("esrgan_plus",), "esrgan_plus"),
        (build_discriminator, ("patchgan",), "patchgan"),
        (build_discriminator, ("rrdbnet",), "rrdbnet"),  # a generator is not a discriminator
        (build_generator, ("rrdbnet", "huge"), "huge"),
        (build_generator, ("srresnet", "esrgan"), "esrgan"),
        (build_discriminator, ("unet_sn", "tiniest"), "tiniest"),
    ],
)
def test_unknown_name_or_variant_is_a_value_error_naming_it(build, args, named):
    with pytest.raises(ValueError, match=named):
        build(*args)


@pytest.mark.parametrize(
    "build, name, hparams, named",
    [
        (build_generator, "rrdbnet", {"num_blocks": 2}, "num_blocks"),  # typo of num_block
        (build_generator, "multihead_rrdbnet", {"heads": 2}, "heads"),
        (build_generator, "srresnet", {"upsampler": "nearest"}, "upsampler"),
        (build_generator, "srvgg_compact", {"upscale": 4}, "upscale"),  # Real-ESRGAN's name for scale
        (build_discriminator, "vgg_style_any", {"input_size": 128}, "input_size"),
        (build_discriminator, "srgan", {"skip_connection": True}, "skip_connection"),
        (build_discriminator, "unet_sn", {"num_feats": 8}, "num_feats"),
    ],
)
def test_unknown_hyperparameter_is_a_value_error_naming_it(build, name, hparams, named):
    with pytest.raises(ValueError, match=named):
        build(name, "tiny", **hparams)


@pytest.mark.parametrize(
    "build, name, hparams, named",
    [
        (build_generator, "rrdbnet", {"scale": 3}, "scale"),
        (build_generator, "rrdbnet", {"upsampler": "bicubic"}, "bicubic"),
        (build_generator, "multihead_rrdbnet", {"scale": 16}, "scale"),
        (build_generator, "multihead_rrdbnet", {"num_heads": 0}, "num_heads"),
        (build_generator, "multihead_rrdbnet", {"num_heads": 3, "output_head": 3}, "output_head"),
        (build_generator, "multihead_rrdbnet", {"output_head": -2}, "output_head"),
        (build_generator, "srresnet", {"scale": 1}, "scale"),
        (build_generator, "srvgg_compact", {"scale": 8}, "scale"),
        (build_generator, "srvgg_compact", {"activation": "gelu"}, "gelu"),
        (build_generator, "srvgg_compact", {"num_in_ch": 1}, "num_in_ch"),
        (build_discriminator, "vgg_style", {"input_size": 192}, "input_size"),
    ],
)
def test_bad_hyperparameter_value_is_a_value_error_naming_it(build, name, hparams, named):
    with pytest.raises(ValueError, match=named):
        build(name, "tiny", **hparams)


# ---- generators ------------------------------------------------------------------


@pytest.mark.parametrize("name, scale, variant", GENERATOR_CASES)
def test_generator_output_shape_finite_and_trainable(name, scale, variant):
    torch.manual_seed(0)
    model = build_generator(name, "tiny", scale=scale, **variant)
    assert model.scale == scale
    multiple = model.size_multiple
    # Odd, non-square sizes wherever the model takes any size; odd multiples otherwise.
    height, width = 7 * multiple, 5 * multiple
    x = seeded_input(2, 3, height, width)
    out = model(x)
    assert out.shape == (2, 3, height * scale, width * scale)
    assert torch.isfinite(out).all()
    # Each image is computed from its own input only (no mixing across the batch in eval).
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(x)[1:], model(x[1:]), atol=1e-5)

    # Every parameter must get a gradient from the training forward, or DDP fails.
    model.train()
    training_out = model(x, all_heads=True) if name == "multihead_rrdbnet" else [model(x)]
    sum(o.mean() for o in training_out).backward()
    unused = [key for key, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not unused


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_generator_round_trips_through_a_model_file(tmp_path, name):
    torch.manual_seed(0)
    variant = GENERATOR_VARIANTS[name][-1]
    model = build_generator(name, "tiny", scale=2, **variant)
    settle_batchnorm(model, channels=3, size=8 * model.size_multiple)
    url = str(tmp_path / f"{name}.safetensors")
    save_generator(model, url)

    loaded = load_generator(url)
    assert type(loaded) is type(model)
    assert loaded.hparams == model.hparams
    assert not loaded.training
    x = seeded_input(1, 3, 6 * model.size_multiple, 4 * model.size_multiple)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_rrdbnet_published_layouts_match_the_reference_keys_and_shapes():
    # The meta device builds the 16.7M-parameter models without allocating or
    # initializing weights: only names and shapes matter here.
    for scale in (4, 2, 1):
        with torch.device("meta"):
            model = build_generator("rrdbnet", "esrgan", scale=scale)
        assert state_dict_keys_and_shapes(model) == FIXTURES[f"rrdbnet_x{scale}_nf64_nb23_gc32"], scale


def test_multihead_trunk_has_rrdbnet_keys_and_heads_replace_conv_last():
    with torch.device("meta"):
        model = build_generator("multihead_rrdbnet", "esrgan", scale=4)
    reference = {k: v for k, v in FIXTURES["rrdbnet_x4_nf64_nb23_gc32"].items() if not k.startswith("conv_last.")}
    ours = state_dict_keys_and_shapes(model)
    trunk = {k: v for k, v in ours.items() if not k.startswith("heads.")}
    assert trunk == reference
    # Head k: k (9x9 conv, LReLU) blocks then a 9x9 conv to RGB.
    for k, head in enumerate(model.heads):
        convs = [m for m in head if isinstance(m, nn.Conv2d)]
        assert [c.kernel_size for c in convs] == [(9, 9)] * (k + 1)
        assert [c.out_channels for c in convs] == [64] * k + [3]
        assert sum(isinstance(m, nn.LeakyReLU) for m in head) == k


@pytest.mark.parametrize("scale", [2, 4])
def test_multihead_loads_a_trained_rrdbnet_trunk(scale):
    torch.manual_seed(0)
    rrdb = build_generator("rrdbnet", "tiny", scale=scale)
    multi = build_generator("multihead_rrdbnet", "tiny", scale=scale)
    trunk = {k: v for k, v in rrdb.state_dict().items() if not k.startswith("conv_last.")}
    result = multi.load_state_dict(trunk, strict=False)
    assert not result.unexpected_keys
    assert result.missing_keys and all(k.startswith("heads.") for k in result.missing_keys)
    assert torch.equal(multi.conv_first.weight, rrdb.conv_first.weight)


@pytest.mark.parametrize("num_heads", [1, 3, 4])
def test_multihead_all_heads_and_output_head_selection(num_heads):
    torch.manual_seed(0)
    model = build_generator("multihead_rrdbnet", "tiny", scale=2, num_heads=num_heads).eval()
    x = seeded_input(2, 3, 6, 10)
    with torch.no_grad():
        heads = model(x, all_heads=True)
        assert isinstance(heads, list) and len(heads) == num_heads
        assert all(h.shape == (2, 3, 12, 20) for h in heads)
        if num_heads > 1:
            assert not torch.allclose(heads[0], heads[1])

        assert model.output_head == -1  # the default: mean of all heads
        mean = model(x)
        assert torch.allclose(mean, torch.stack(heads).mean(0), atol=1e-6)
        for k in range(num_heads):
            model.select_head(k)
            assert model.hparams["output_head"] == k
            assert torch.equal(model(x), heads[k])
    with pytest.raises(ValueError, match="output_head"):
        model.select_head(num_heads)


def test_srresnet_has_the_srgan_layout():
    model = build_generator("srresnet", "srgan", scale=4)
    assert model.conv_first.kernel_size == (9, 9) and model.conv_last.kernel_size == (9, 9)
    assert len(model.body) == 16
    assert all(isinstance(block.bn1, nn.BatchNorm2d) and isinstance(block.prelu, nn.PReLU) for block in model.body)
    assert len(model.upsample) == 2
    assert all(stage.conv.out_channels == 4 * 64 for stage in model.upsample)


def test_srvgg_compact_published_layouts_match_the_reference_keys_and_shapes():
    for name, num_conv in (("realesr-general-x4v3", 32), ("realesr-animevideov3", 16)):
        variant = {32: "realesr_general", 16: "animevideo"}[num_conv]
        model = build_generator("srvgg_compact", variant, scale=4)
        assert state_dict_keys_and_shapes(model) == COMPACT_FIXTURES[name], name


def test_srvgg_compact_starts_from_nearest_neighbour_and_learns_only_the_difference():
    # With the last convolution zeroed the network outputs exactly the nearest-upscaled input.
    model = build_generator("srvgg_compact", "tiny", scale=3).eval()
    with torch.no_grad():
        model.body[-1].weight.zero_()
        model.body[-1].bias.zero_()
        x = seeded_input(1, 3, 5, 7)
        assert torch.equal(model(x), x.repeat_interleave(3, dim=2).repeat_interleave(3, dim=3))


# ---- discriminators --------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(DISCRIMINATORS))
def test_discriminator_output_shape_finite_and_trainable(name):
    torch.manual_seed(0)
    disc = build_discriminator(name, "tiny")
    for height, width in discriminator_sizes(disc):
        disc.zero_grad()
        real = seeded_input(2, 3, height, width, seed=1)
        fake = seeded_input(2, 3, height, width, seed=2).requires_grad_()
        real_logits, fake_logits = disc(real), disc(fake)
        expected = (2, 1) if DISCRIMINATOR_OUTPUT[name] == "per_image" else (2, 1, height, width)
        assert real_logits.shape == fake_logits.shape == expected, (height, width)
        assert torch.isfinite(real_logits).all() and torch.isfinite(fake_logits).all()
        # Two forwards then one backward, as the relativistic GAN loss does it (BatchNorm
        # and spectral norm update buffers in place in between).
        loss = (F.softplus(fake_logits - real_logits.mean()) + F.softplus(real_logits - fake_logits.mean())).mean()
        loss.backward()
        unused = [k for k, p in disc.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
        assert not unused
        # The generator learns through the discriminator's gradient w.r.t. its images.
        assert fake.grad is not None and fake.grad.abs().sum() > 0


@pytest.mark.parametrize("name", sorted(DISCRIMINATORS))
def test_discriminator_state_dict_round_trip(tmp_path, name):
    torch.manual_seed(0)
    disc = build_discriminator(name, "tiny")
    height, width = discriminator_sizes(disc)[-1]
    settle_batchnorm(disc, channels=3, size=max(height, width))  # also advances spectral-norm u, v
    path = tmp_path / "d.pt"
    torch.save(disc.state_dict(), path)
    torch.manual_seed(1)
    fresh = build_discriminator(name, **disc.hparams)
    fresh.load_state_dict(torch.load(path, weights_only=True))
    fresh.eval()
    x = seeded_input(2, 3, height, width)
    with torch.no_grad():
        assert torch.equal(fresh(x), disc(x))


@pytest.mark.parametrize(
    "name, hparams, size, named",
    [
        ("vgg_style", {}, (64, 64), "128x128"),
        ("vgg_style", {}, (128, 130), "vgg_style_any"),
        ("vgg_style", {"input_size": 256}, (128, 128), "256x256"),
        ("vgg_style_any", {}, (31, 64), "at least 32"),
        ("srgan", {}, (40, 15), "at least 16"),
        ("unet_sn", {}, (36, 32), "multiples of 8"),
    ],
)
def test_discriminator_refuses_inputs_of_the_wrong_size(name, hparams, size, named):
    disc = build_discriminator(name, "tiny", **hparams)
    with pytest.raises(ValueError, match=named):
        disc(seeded_input(1, 3, *size))


def test_vgg_style_published_layout_matches_the_reference_keys_and_shapes():
    disc = build_discriminator("vgg_style", "esrgan")
    assert state_dict_keys_and_shapes(disc) == FIXTURES["vggstyle_discriminator_128_nf64"]
    # The any-size variant keeps the same keys and shapes, so weights move between them.
    any_size = build_discriminator("vgg_style_any", "esrgan")
    any_size.load_state_dict(disc.state_dict(), strict=True)


def test_vgg_style_256_adds_one_stage():
    disc_128 = build_discriminator("vgg_style", "tiny")
    disc_256 = build_discriminator("vgg_style", "tiny", input_size=256)
    extra = set(disc_256.state_dict()) - set(disc_128.state_dict())
    assert {k.split(".")[0] for k in extra} == {"conv5_0", "bn5_0", "conv5_1", "bn5_1"}
    assert disc_256.conv5_1.stride == (2, 2)
    assert disc_256.linear1.in_features == disc_128.linear1.in_features == 8 * 8 * 4 * 4
    disc_256.eval()
    with torch.no_grad():
        assert disc_256(seeded_input(1, 3, 256, 256)).shape == (1, 1)


def test_unet_sn_published_layout_matches_the_reference_keys_and_shapes():
    disc = build_discriminator("unet_sn", "realesrgan")
    assert state_dict_keys_and_shapes(disc) == FIXTURES["unet_discriminator_sn_nf64"]
    assert disc.skip_connection


def test_unet_sn_skip_connections_change_the_output():
    torch.manual_seed(0)
    with_skips = build_discriminator("unet_sn", "tiny").eval()
    without = build_discriminator("unet_sn", "tiny", skip_connection=False).eval()
    without.load_state_dict(with_skips.state_dict())
    x = seeded_input(1, 3, 16, 24)
    with torch.no_grad():
        assert not torch.allclose(with_skips(x), without(x))


# ---- issue 27 #4: ranges and a size estimate before construction --------------------


@pytest.mark.parametrize("name", [*GENERATORS, *DISCRIMINATORS])
def test_the_size_estimate_is_the_parameter_count(name, monkeypatch):
    """check_hparams refuses exactly the models whose fp32 weights exceed the memory
    available: with exactly their size available they are built, one byte less refused."""
    import sr_core.memory
    from sr_core.archs import VARIANTS

    builder = build_generator if name in GENERATORS else build_discriminator
    for variant in VARIANTS[name]:
        for extra in ([{"scale": s} for s in (1, 2, 4, 8) if _accepts(name, s)] if name in GENERATORS else [{}]):
            model = builder(name, variant, **extra)
            size = 4 * sum(p.numel() for p in model.parameters())
            monkeypatch.setattr(sr_core.memory, "available_memory", lambda: size)
            builder(name, variant, **extra)
            monkeypatch.setattr(sr_core.memory, "available_memory", lambda: size - 1)
            with pytest.raises(ValueError, match="memory available"):
                builder(name, variant, **extra)
            monkeypatch.undo()


def _accepts(name: str, scale: int) -> bool:
    try:
        build_generator(name, "tiny", scale=scale)
    except ValueError:
        return False
    return True


@pytest.mark.parametrize("build, name, hparams, named", [
    (build_generator, "rrdbnet", {"num_feat": 0}, "num_feat must be from 1"),
    (build_generator, "rrdbnet", {"num_feat": -3}, "num_feat must be from 1"),
    (build_generator, "rrdbnet", {"num_grow_ch": 0}, "num_grow_ch"),
    (build_generator, "rrdbnet", {"num_block": -1}, "num_block"),
    (build_generator, "rrdbnet", {"num_in_ch": 0}, "num_in_ch"),
    (build_generator, "rrdbnet", {"num_block": 10**6}, "num_block must be from 0 to 1000"),
    (build_generator, "multihead_rrdbnet", {"num_heads": 10**6}, "num_heads"),
    (build_generator, "srresnet", {"num_feat": 0}, "num_feat"),
    (build_generator, "srvgg_compact", {"num_feat": 0}, "num_feat"),
    (build_generator, "srvgg_compact", {"num_conv": 10**8}, "num_conv must be from 0 to 1000"),
    (build_generator, "srvgg_compact", {"num_feat": 4096, "num_conv": 1000}, "memory available"),
    (build_generator, "srvgg_compact", {"num_feat": 2.5}, "num_feat must be an integer"),
    (build_discriminator, "vgg_style", {"num_feat": -1}, "num_feat"),
    (build_discriminator, "vgg_style_any", {"num_feat": 0}, "num_feat"),
    (build_discriminator, "srgan", {"num_linear_feat": 0}, "num_linear_feat"),
    (build_discriminator, "unet_sn", {"num_feat": -1}, "num_feat"),
    (build_discriminator, "unet_sn", {"skip_connection": "yes"}, "skip_connection"),
])
def test_hyperparameters_no_model_can_have_are_refused_before_any_layer(build, name, hparams, named, monkeypatch):
    def no_layer(*args, **kwargs):
        raise AssertionError("a layer was built before the hyperparameters were checked")

    for layer in (nn.Conv2d, nn.Linear, nn.PReLU, nn.BatchNorm2d):
        monkeypatch.setattr(layer, "__init__", no_layer)
    with pytest.raises(ValueError, match=named):
        build(name, "tiny", **hparams)


def test_the_writer_refuses_a_model_no_loader_would_accept(tmp_path):
    from sr_core import save_generator

    model = build_generator("rrdbnet", "tiny", scale=2)
    model.hparams["num_feat"] = 0  # what a hand-edited model would claim
    with pytest.raises(ValueError, match="num_feat"):
        save_generator(model, str(tmp_path / "m.safetensors"))
    assert not (tmp_path / "m.safetensors").exists()
