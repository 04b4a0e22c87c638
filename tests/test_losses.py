"""Pixel, perceptual and GAN losses; the VGG19 feature extractor and its weight loading."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch.nn import functional as F

from sr_core.archs.vgg19 import LAYER_INDEX, VGG19FeatureExtractor
from sr_core.losses import (
    GAN_LOSSES,
    PIXEL_LOSSES,
    CharbonnierLoss,
    GANLoss,
    L1Loss,
    MSELoss,
    PerceptualLoss,
    build_pixel_loss,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures"
LOG2 = math.log(2.0)


# ---------------------------------------------------------------- pixel losses


def test_pixel_losses_known_values():
    pred = torch.tensor([[1.0, -2.0], [3.0, 4.0]])
    target = torch.zeros(2, 2)
    assert L1Loss()(pred, target).item() == pytest.approx(2.5)
    assert L1Loss(reduction="sum")(pred, target).item() == pytest.approx(10.0)
    assert L1Loss(loss_weight=2.0)(pred, target).item() == pytest.approx(5.0)
    torch.testing.assert_close(L1Loss(reduction="none")(pred, target), pred.abs())
    assert MSELoss()(pred, target).item() == pytest.approx((1 + 4 + 9 + 16) / 4)
    charbonnier = CharbonnierLoss(reduction="none", eps=1e-6)(pred, target)
    torch.testing.assert_close(charbonnier, torch.sqrt(pred**2 + 1e-6))
    # At zero difference it is sqrt(eps), not 0: smooth, with a finite gradient.
    assert CharbonnierLoss(eps=1e-6)(target, target).item() == pytest.approx(1e-3)


def test_pixel_registry_and_errors():
    pred, target = torch.rand(2, 3, 4, 4), torch.rand(2, 3, 4, 4)
    for name, cls in PIXEL_LOSSES.items():
        loss = build_pixel_loss(name, loss_weight=0.5)
        assert isinstance(loss, cls)
        assert loss(pred, target).item() > 0
    with pytest.raises(ValueError, match="unknown pixel loss 'l3'.*charbonnier, l1, mse"):
        build_pixel_loss("l3")
    with pytest.raises(ValueError, match="reduction"):
        L1Loss(reduction="avg")
    with pytest.raises(ValueError, match=r"\(2, 3, 4, 4\).*\(2, 3, 4, 5\)"):
        L1Loss()(pred, torch.rand(2, 3, 4, 5))


# ---------------------------------------------------------------- GAN losses


def test_vanilla_known_values():
    gan = GANLoss("vanilla")
    zero = torch.zeros(4, 1)
    assert gan.generator_loss(zero).item() == pytest.approx(LOG2)
    assert gan.discriminator_loss(zero, zero).item() == pytest.approx(2 * LOG2)
    assert gan.generator_loss(torch.full((2, 1), -50.0)).item() == pytest.approx(50.0)
    assert gan.generator_loss(torch.full((2, 1), 50.0)).item() == pytest.approx(0.0, abs=1e-12)
    assert GANLoss("vanilla", loss_weight=0.005).generator_loss(zero).item() == pytest.approx(0.005 * LOG2)


def test_lsgan_and_hinge_known_values():
    ls = GANLoss("lsgan")
    assert ls.generator_loss(torch.ones(3)).item() == 0
    assert ls.generator_loss(torch.zeros(3)).item() == 1
    assert ls.discriminator_loss(torch.ones(3), torch.zeros(3)).item() == 0
    hinge = GANLoss("hinge")
    # Margins satisfied: real >= 1, fake <= -1 -> zero loss (and zero gradient).
    real = torch.tensor([1.0, 3.0], requires_grad=True)
    fake = torch.tensor([-1.0, -5.0], requires_grad=True)
    loss = hinge.discriminator_loss(real, fake)
    assert loss.item() == 0
    loss.backward()
    assert real.grad.abs().sum() == 0 and fake.grad.abs().sum() == 0
    assert hinge.discriminator_loss(torch.tensor([0.0]), torch.tensor([0.5])).item() == pytest.approx(1 + 1.5)
    assert hinge.generator_loss(torch.tensor([2.0, 4.0])).item() == -3


def test_ragan_known_and_symmetric_cases():
    ragan = GANLoss("ragan")
    assert ragan.relativistic and not GANLoss("vanilla").relativistic
    same = torch.full((4, 1), 3.0)
    # Real and fake indistinguishable: every relative logit is 0 -> log 2.
    assert ragan.generator_loss(same, same).item() == pytest.approx(LOG2)
    assert ragan.discriminator_loss(same, same).item() == pytest.approx(LOG2)
    # D confident and right by a margin of 4: both halves are softplus(-4).
    real, fake = torch.full((2,), 2.0), torch.full((2,), -2.0)
    assert ragan.discriminator_loss(real, fake).item() == pytest.approx(math.log1p(math.exp(-4)), rel=1e-5)
    assert ragan.generator_loss(fake, real).item() == pytest.approx(math.log1p(math.exp(4)), rel=1e-5)
    # G's loss is D's with the roles of real and fake swapped.
    a, b = torch.randn(5), torch.randn(5)
    assert ragan.generator_loss(a, b).item() == pytest.approx(ragan.discriminator_loss(a, b).item(), rel=1e-6)
    with pytest.raises(ValueError, match="real_logits"):
        ragan.generator_loss(a)


def test_ragan_generator_gradient_reaches_fake_not_real():
    gen = torch.nn.Conv2d(3, 3, 3, padding=1)
    disc = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(1))
    lr_batch, hr_batch = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)
    disc(hr_batch)  # materialize the lazy layer
    output = gen(lr_batch)
    output.retain_grad()
    real_logits = disc(hr_batch)
    real_logits.retain_grad()
    loss = GANLoss("ragan", loss_weight=0.1).generator_loss(disc(output), real_logits)
    loss.backward()
    assert output.grad is not None and output.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gen.parameters())
    assert real_logits.grad is None  # the real branch was detached inside


@pytest.mark.parametrize("kind", sorted(GAN_LOSSES))
def test_split_discriminator_backward_equals_joint(kind):
    """Per-forward backward (BasicSR style) gives the same D gradient as one backward."""
    gan = GANLoss(kind)
    real0, fake0 = torch.randn(6), torch.randn(6)
    real, fake = real0.clone().requires_grad_(), fake0.clone().requires_grad_()
    gan.discriminator_loss(real, fake).backward()
    real_s, fake_s = real0.clone().requires_grad_(), fake0.clone().requires_grad_()
    gan.discriminator_loss(real_s, fake_s.detach()).backward()
    gan.discriminator_loss(real_s.detach(), fake_s).backward()
    torch.testing.assert_close(real_s.grad, real.grad)
    torch.testing.assert_close(fake_s.grad, fake.grad)
    assert real.grad.abs().sum() > 0 and fake.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", sorted(GAN_LOSSES))
def test_gan_losses_finite_under_cpu_autocast(kind, dtype):
    disc = torch.nn.Linear(4, 1)
    with torch.no_grad():
        disc.weight.fill_(1000.0)  # logits of magnitude ~1e4: sigmoid saturates in fp16
    gan = GANLoss(kind)
    x_real = torch.rand(8, 4) + 3
    x_fake = (-torch.rand(8, 4) - 3).requires_grad_()
    with torch.autocast("cpu", dtype=dtype):
        real_logits, fake_logits = disc(x_real), disc(x_fake)
        assert fake_logits.dtype == dtype
        fake_logits.retain_grad()
        g_loss = gan.generator_loss(fake_logits, real_logits)
        d_loss = gan.discriminator_loss(real_logits, fake_logits)
    assert torch.isfinite(g_loss) and torch.isfinite(d_loss)
    g_loss.backward()
    # The gradient at the logits, in the autocast dtype (what reaches D's backward).
    assert fake_logits.grad.dtype == dtype and torch.isfinite(fake_logits.grad).all()
    assert fake_logits.grad.abs().sum() > 0


def test_unknown_gan_kind():
    with pytest.raises(ValueError, match="unknown GAN loss kind 'wgan'.*hinge, lsgan, ragan, vanilla"):
        GANLoss("wgan")


# ---------------------------------------------------------------- VGG19 and perceptual loss


def fixture_layers() -> dict:
    return json.loads((FIXTURES / "vgg19_features.json").read_text())["layers"]


def test_vgg19_layout_matches_torchvision_fixture():
    layers = fixture_layers()
    assert LAYER_INDEX == {name: spec["index"] for name, spec in layers.items()}
    full = VGG19FeatureExtractor(["pool5"])
    expected = {}
    for spec in layers.values():
        if "weight" in spec:
            expected[f"features.{spec['index']}.weight"] = tuple(spec["weight"])
            expected[f"features.{spec['index']}.bias"] = tuple(spec["bias"])
    assert {k: tuple(v.shape) for k, v in full.state_dict().items()} == expected
    assert all(not p.requires_grad for p in full.parameters())
    # Truncated after the last requested layer.
    assert len(VGG19FeatureExtractor(["relu2_1", "conv1_2"]).features) == LAYER_INDEX["relu2_1"] + 1


def random_torchvision_state(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for spec in fixture_layers().values():
        if "weight" in spec:
            state[f"features.{spec['index']}.weight"] = torch.randn(spec["weight"], generator=gen) * 0.05
            state[f"features.{spec['index']}.bias"] = torch.randn(spec["bias"], generator=gen) * 0.05
    state["classifier.0.weight"] = torch.randn(8, 16, generator=gen)  # ignored (real: 4096 x 25088)
    return state


def test_vgg19_loads_torchvision_state_dict_files(tmp_path):
    state = random_torchvision_state()
    pth = tmp_path / "vgg19.pth"
    torch.save(state, pth)
    extractor = VGG19FeatureExtractor(["conv3_1"], weights=str(pth))
    loaded = extractor.state_dict()
    assert set(loaded) == {f"features.{i}.{p}" for i in (0, 2, 5, 7, 10) for p in ("weight", "bias")}
    for key, value in loaded.items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)
    # The same weights from a .safetensors file, through an fsspec URL.
    st = tmp_path / "vgg19.safetensors"
    save_file(state, str(st))
    from_st = VGG19FeatureExtractor(["conv3_1"], weights=f"file://{st}")
    x = torch.rand(1, 3, 16, 16)
    torch.testing.assert_close(from_st(x)["conv3_1"], extractor(x)["conv3_1"])


def test_vgg19_bad_weight_files(tmp_path):
    state = random_torchvision_state()
    incomplete = {k: v for k, v in state.items() if k != "features.7.weight"}
    torch.save(incomplete, tmp_path / "incomplete.pth")
    with pytest.raises(ValueError, match=r"incomplete\.pth.*features\.7\.weight"):
        VGG19FeatureExtractor(["conv2_2"], weights=str(tmp_path / "incomplete.pth"))
    # Keys beyond the truncation point are not needed.
    VGG19FeatureExtractor(["conv2_1"], weights=str(tmp_path / "incomplete.pth"))
    wrong = dict(state, **{"features.0.weight": torch.zeros(64, 1, 3, 3)})
    torch.save(wrong, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match=r"features\.0\.weight has shape \(64, 1, 3, 3\)"):
        VGG19FeatureExtractor(["conv1_1"], weights=str(tmp_path / "wrong.pth"))
    torch.save({"conv_first.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not a torchvision VGG19"):
        VGG19FeatureExtractor(["conv1_1"], weights=str(tmp_path / "other.pth"))
    with pytest.raises(FileNotFoundError):
        VGG19FeatureExtractor(["conv1_1"], weights=str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="unknown layer.*conv6_1"):
        VGG19FeatureExtractor(["conv6_1"])


def test_vgg19_features_before_activation_and_normalization():
    torch.manual_seed(0)
    extractor = VGG19FeatureExtractor(["conv1_1", "relu1_1", "conv2_1"])
    x = torch.rand(2, 3, 16, 16)
    out = extractor(x)
    assert out["conv2_1"].shape == (2, 128, 8, 8)
    assert (out["conv1_1"] < 0).any()  # the conv output, not overwritten by the ReLU
    torch.testing.assert_close(out["relu1_1"], out["conv1_1"].clamp(min=0))
    raw = VGG19FeatureExtractor(["conv2_1"], use_input_norm=False)
    raw.load_state_dict(extractor.state_dict())
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(raw((x - mean) / std)["conv2_1"], out["conv2_1"])


def test_perceptual_loss():
    torch.manual_seed(0)
    loss_fn = PerceptualLoss({"conv1_2": 1.0, "conv2_1": 0.5}, perceptual_weight=2.0)
    assert len(loss_fn.vgg.features) == LAYER_INDEX["conv2_1"] + 1
    target = torch.rand(2, 3, 16, 16, requires_grad=True)
    assert loss_fn(target.detach(), target.detach()).item() == 0
    pred = (target.detach() + 0.1 * torch.randn(2, 3, 16, 16)).requires_grad_()
    loss = loss_fn(pred, target)
    features_pred, features_target = loss_fn.vgg(pred), loss_fn.vgg(target)
    expected = 2.0 * (
        F.l1_loss(features_pred["conv1_2"], features_target["conv1_2"])
        + 0.5 * F.l1_loss(features_pred["conv2_1"], features_target["conv2_1"])
    )
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert loss.item() > 0
    loss.backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0
    assert target.grad is None  # the target's features are computed without grad
    assert all(p.grad is None for p in loss_fn.vgg.parameters())
    l2 = PerceptualLoss({"conv1_2": 1.0}, criterion="l2")
    l2.vgg.load_state_dict(loss_fn.vgg.state_dict(), strict=False)
    with torch.no_grad():
        expected_l2 = F.mse_loss(l2.vgg(pred)["conv1_2"], l2.vgg(target)["conv1_2"])
    assert l2(pred, target).item() == pytest.approx(expected_l2.item(), rel=1e-5)
    with pytest.raises(ValueError, match="unknown layer.*conv9_9"):
        PerceptualLoss({"conv9_9": 1.0})
    with pytest.raises(ValueError, match="criterion"):
        PerceptualLoss({"conv1_1": 1.0}, criterion="cosine")


def test_perceptual_loss_finite_under_bf16_autocast():
    torch.manual_seed(0)
    loss_fn = PerceptualLoss({"conv3_4": 1.0})
    pred = torch.rand(1, 3, 32, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_fn(pred, torch.rand(1, 3, 32, 32))
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert torch.isfinite(pred.grad).all()
