"""Training losses: pixel (L1, MSE, Charbonnier), VGG19 perceptual, and GAN losses.

GAN losses take raw logits (the discriminators return no sigmoid) and are computed in
float32 with ``softplus``/``binary_cross_entropy_with_logits``, so they stay finite for
large logits under fp16/bf16 autocast.

Registries are plain dicts from the config string to the implementation:
``PIXEL_LOSSES`` (name -> class) and ``GAN_LOSSES`` (kind -> its generator and
discriminator loss functions, used by ``GANLoss(kind)``).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from sr_core.archs.vgg19 import VGG19FeatureExtractor

REDUCTIONS = ("mean", "sum", "none")


def _reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


class _PixelLoss(nn.Module):
    def __init__(self, loss_weight: float = 1.0, reduction: str = "mean"):
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"{type(self).__name__}: unknown reduction {reduction!r}; use one of {REDUCTIONS}")
        self.loss_weight = loss_weight
        self.reduction = reduction

    def elementwise(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if pred.shape != target.shape:
            raise ValueError(f"{type(self).__name__}: prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
        return self.loss_weight * _reduce(self.elementwise(pred, target), self.reduction)


class L1Loss(_PixelLoss):
    """Mean absolute error (the PSNR-stage loss of ESRGAN)."""

    def elementwise(self, pred, target):
        return (pred - target).abs()


class MSELoss(_PixelLoss):
    """Mean squared error."""

    def elementwise(self, pred, target):
        return (pred - target) ** 2


class CharbonnierLoss(_PixelLoss):
    """``sqrt(d^2 + eps)``: a differentiable L1 (smooth at 0)."""

    def __init__(self, loss_weight: float = 1.0, reduction: str = "mean", eps: float = 1e-6):
        super().__init__(loss_weight, reduction)
        if eps <= 0:
            raise ValueError(f"CharbonnierLoss: eps must be positive, got {eps}")
        self.eps = eps

    def elementwise(self, pred, target):
        return torch.sqrt((pred - target) ** 2 + self.eps)


PIXEL_LOSSES: dict[str, type[_PixelLoss]] = {
    "l1": L1Loss,
    "mse": MSELoss,
    "charbonnier": CharbonnierLoss,
}


def build_pixel_loss(name: str, loss_weight: float = 1.0, reduction: str = "mean") -> nn.Module:
    if name not in PIXEL_LOSSES:
        raise ValueError(f"unknown pixel loss {name!r}; known: {', '.join(sorted(PIXEL_LOSSES))}")
    return PIXEL_LOSSES[name](loss_weight=loss_weight, reduction=reduction)


# ---------------------------------------------------------------- perceptual


class PerceptualLoss(nn.Module):
    """Distance between VGG19 features (before activation) of prediction and target.

    ``layer_weights`` maps VGG19 layer names (e.g. ``{"conv5_4": 1.0}``, ESRGAN's
    choice) to weights; the loss is ``perceptual_weight * sum(w * criterion(layer))``.
    ``weights`` is the torchvision VGG19 state-dict file (random VGG when None: only
    for tests). VGG is frozen; gradients reach the prediction only.
    """

    CRITERIA = ("l1", "l2")

    def __init__(
        self,
        layer_weights: dict[str, float],
        criterion: str = "l1",
        use_input_norm: bool = True,
        weights: str | None = None,
        perceptual_weight: float = 1.0,
    ):
        super().__init__()
        if criterion not in self.CRITERIA:
            raise ValueError(f"PerceptualLoss: unknown criterion {criterion!r}; use one of {self.CRITERIA}")
        if not layer_weights:
            raise ValueError("PerceptualLoss: layer_weights is empty; e.g. {'conv5_4': 1.0}")
        self.layer_weights = dict(layer_weights)
        self.criterion = criterion
        self.perceptual_weight = perceptual_weight
        self.vgg = VGG19FeatureExtractor(
            list(self.layer_weights), use_input_norm=use_input_norm, weights=weights, requires_grad=False
        )

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if pred.shape != target.shape:
            raise ValueError(f"PerceptualLoss: prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
        pred_features = self.vgg(pred)
        # The target is a constant of the G step: no graph through VGG for it.
        with torch.no_grad():
            target_features = self.vgg(target.detach())
        total = pred.new_zeros((), dtype=torch.float32)
        for name, weight in self.layer_weights.items():
            # float32: fp16 features of deep layers can be large; the distance must not overflow.
            a, b = pred_features[name].float(), target_features[name].float()
            distance = F.l1_loss(a, b) if self.criterion == "l1" else F.mse_loss(a, b)
            total = total + weight * distance
        return self.perceptual_weight * total


# ---------------------------------------------------------------- GAN
# Each kind: generator(fake, real) -> loss, discriminator(real, fake) -> loss, on logits.
# All compute in float32 (cast first): logits from an fp16 discriminator can be large.


def _vanilla_generator(fake: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
    # -log(sigmoid(fake)) = softplus(-fake): the non-saturating generator loss.
    return F.softplus(-fake).mean()


def _vanilla_discriminator(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    # -log(sigmoid(real)) - log(1 - sigmoid(fake)).
    return F.softplus(-real).mean() + F.softplus(fake).mean()


def _lsgan_generator(fake: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
    return ((fake - 1) ** 2).mean()


def _lsgan_discriminator(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    return ((real - 1) ** 2).mean() + (fake**2).mean()


def _hinge_generator(fake: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
    return -fake.mean()


def _hinge_discriminator(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    return F.relu(1 - real).mean() + F.relu(1 + fake).mean()


def _bce(logits: torch.Tensor, target_is_real: bool) -> torch.Tensor:
    target = torch.ones_like(logits) if target_is_real else torch.zeros_like(logits)
    return F.binary_cross_entropy_with_logits(logits, target)


def _ragan_generator(fake: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
    if real is None:
        raise ValueError("ragan: generator_loss needs real_logits (the discriminator's logits on the HR batch)")
    # The real logits depend only on D, not on G: detached, the G step builds no graph
    # through D for the HR batch and cannot leak gradients into D's parameters.
    real = real.detach()
    # ESRGAN: G wants real to look "less real than average fake" and fake "more real
    # than average real"; both halves averaged.
    return 0.5 * (_bce(real - fake.mean(), False) + _bce(fake - real.mean(), True))


def _ragan_discriminator(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    # Not detached: D's loss depends on its parameters through both batches. A loop that
    # back-propagates per forward (BasicSR, or a BatchNorm D under DDP) gets the same
    # total gradient from discriminator_loss(real, fake.detach()).backward() followed by
    # discriminator_loss(real.detach(), fake).backward().
    return 0.5 * (_bce(real - fake.mean(), True) + _bce(fake - real.mean(), False))


GanLossFn = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]

GAN_LOSSES: dict[str, tuple[GanLossFn, GanLossFn]] = {
    "vanilla": (_vanilla_generator, _vanilla_discriminator),
    "lsgan": (_lsgan_generator, _lsgan_discriminator),
    "hinge": (_hinge_generator, _hinge_discriminator),
    "ragan": (_ragan_generator, _ragan_discriminator),
}


class GANLoss(nn.Module):
    """Adversarial losses on discriminator logits.

    ``kind``: ``vanilla`` (non-saturating BCE), ``lsgan``, ``hinge`` or ``ragan``
    (relativistic average, ESRGAN's choice). ``loss_weight`` scales the generator loss
    only (it balances G's objectives); the discriminator loss is D's whole objective
    and is not scaled.

    - ``generator_loss(fake_logits, real_logits=None)``: ``ragan`` needs
      ``real_logits`` (D on the HR batch; detached inside); other kinds ignore it.
    - ``discriminator_loss(real_logits, fake_logits)``: pass ``fake_logits`` computed
      on the detached generator output.
    """

    def __init__(self, kind: str, loss_weight: float = 1.0):
        super().__init__()
        if kind not in GAN_LOSSES:
            raise ValueError(f"unknown GAN loss kind {kind!r}; known: {', '.join(sorted(GAN_LOSSES))}")
        self.kind = kind
        self.loss_weight = loss_weight
        self._generator, self._discriminator = GAN_LOSSES[kind]

    @property
    def relativistic(self) -> bool:
        """True when the generator loss needs the discriminator's logits on real images."""
        return self.kind == "ragan"

    def generator_loss(self, fake_logits: torch.Tensor, real_logits: torch.Tensor | None = None) -> torch.Tensor:
        real = real_logits.float() if real_logits is not None else None
        return self.loss_weight * self._generator(fake_logits.float(), real)

    def discriminator_loss(self, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
        return self._discriminator(real_logits.float(), fake_logits.float())
