"""SRVGGNetCompact: Real-ESRGAN's compact generator (``realesr-animevideov3``,
``realesr-general-x4v3``, ``realesr-general-wdn-x4v3``).

A plain stack of 3x3 convolutions at the input's resolution, each followed by an
activation, then one convolution to ``3 * scale**2`` channels and a pixel shuffle; the
nearest-neighbour upscaled input is added to the result. The network therefore starts
at nearest-neighbour quality and only learns a correction, which is why it beats
bicubic within minutes of CPU training where a narrow RRDBNet (no input-to-output path)
is still learning interpolation. Every convolution runs on the LR grid, so its cost per
output pixel is a small fraction of RRDBNet's.

State-dict keys and shapes are exactly Real-ESRGAN's (``realesrgan/archs/srvgg_arch.py``):
one ``body`` list holding, in order, conv, activation, conv, activation, ..., conv. With
PReLU the activations hold one slope per channel (``body.{odd}.weight``); ReLU and
LeakyReLU hold nothing, but keep their places in the list, so the convolutions are
``body.0``, ``body.2``, ... whatever the activation.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from sr_core.archs.limits import MAX_DEPTH, MAX_IMAGE_CHANNELS, MAX_WIDTH, check_choice, check_int, check_size, conv

ACTIVATIONS = ("prelu", "relu", "leakyrelu")
# Real-ESRGAN's compact generator uses slope 0.1 for LeakyReLU (RRDBNet uses 0.2).
LEAKY_SLOPE = 0.1
SCALES = (1, 2, 3, 4)


def check_hparams(hparams: dict) -> None:
    """Ranges, then the size estimate (``sr_core.archs.limits``), before any layer is built."""
    arch = "srvgg_compact"
    check_choice(arch, "scale", hparams["scale"], SCALES)
    check_choice(arch, "activation", hparams["activation"], ACTIVATIONS)
    check_int(arch, "num_in_ch", hparams["num_in_ch"], 1, MAX_IMAGE_CHANNELS)
    check_int(arch, "num_out_ch", hparams["num_out_ch"], 1, MAX_IMAGE_CHANNELS)
    check_int(arch, "num_feat", hparams["num_feat"], 1, MAX_WIDTH)
    check_int(arch, "num_conv", hparams["num_conv"], 0, MAX_DEPTH)
    if hparams["num_in_ch"] != hparams["num_out_ch"]:
        # The nearest-upscaled input is added to the output channel by channel.
        raise ValueError(f"{arch}: num_in_ch ({hparams['num_in_ch']}) must equal num_out_ch "
                         f"({hparams['num_out_ch']}): the upscaled input is added to the output")
    f = hparams["num_feat"]
    slopes = f if hparams["activation"] == "prelu" else 0
    check_size(arch, conv(hparams["num_in_ch"], f, 3) + slopes + hparams["num_conv"] * (conv(f, f, 3) + slopes)
               + conv(f, hparams["num_out_ch"] * hparams["scale"] ** 2, 3))


def make_activation(activation: str, num_feat: int) -> nn.Module:
    if activation == "prelu":
        # One learned slope per channel (PyTorch's default init, 0.25), as Real-ESRGAN.
        return nn.PReLU(num_parameters=num_feat)
    if activation == "relu":
        return nn.ReLU(inplace=True)
    return nn.LeakyReLU(negative_slope=LEAKY_SLOPE, inplace=True)


class SRVGGNetCompact(nn.Module):
    """``forward`` takes BCHW in [0, 1] and returns BCHW x ``scale``; any input size.

    ``num_conv`` counts the body's feature-to-feature convolutions; the first (image to
    features) and the last (features to ``num_out_ch * scale**2``) come on top, as in
    Real-ESRGAN, so the network has ``num_conv + 2`` convolutions.
    """

    arch_name = "srvgg_compact"

    def __init__(
        self,
        num_in_ch: int = 3,
        num_out_ch: int = 3,
        scale: int = 4,
        num_feat: int = 64,
        num_conv: int = 16,
        activation: str = "prelu",
    ):
        super().__init__()
        self.hparams = dict(num_in_ch=num_in_ch, num_out_ch=num_out_ch, scale=scale, num_feat=num_feat,
                            num_conv=num_conv, activation=activation)
        check_hparams(self.hparams)
        self.scale = scale
        self.size_multiple = 1

        # One list, in Real-ESRGAN's order, so that its keys (body.0, body.1, ...) match.
        self.body = nn.ModuleList()
        self.body.append(nn.Conv2d(num_in_ch, num_feat, 3, 1, 1))
        self.body.append(make_activation(activation, num_feat))
        for _ in range(num_conv):
            self.body.append(nn.Conv2d(num_feat, num_feat, 3, 1, 1))
            self.body.append(make_activation(activation, num_feat))
        self.body.append(nn.Conv2d(num_feat, num_out_ch * scale * scale, 3, 1, 1))
        self.upsampler = nn.PixelShuffle(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for layer in self.body:
            out = layer(out)
        # The network predicts the difference from nearest-neighbour upscaling of its input.
        return self.upsampler(out) + F.interpolate(x, scale_factor=self.scale, mode="nearest")


VARIANTS = {
    # realesr-general-x4v3 (and its -wdn twin): 64 features, 32 body convolutions.
    "realesr_general": dict(num_feat=64, num_conv=32),
    # realesr-animevideov3: 64 features, 16 body convolutions.
    "animevideo": dict(num_feat=64, num_conv=16),
    # Beats bicubic within minutes of CPU training at x2 (the demo's generator).
    "small": dict(num_feat=32, num_conv=8),
    # A fast model for CPU tests.
    "tiny": dict(num_feat=16, num_conv=4),
}
