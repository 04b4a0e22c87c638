"""The SRGAN discriminator (Ledig et al., 2017), with a global-pooling head.

A 3x3 conv + LeakyReLU, then seven 3x3 conv-BN-LeakyReLU blocks whose stride
alternates 2, 1, 2, 1, ... while the channels double every second block (num_feat ->
8 x num_feat), then two dense layers (LeakyReLU between) to one logit. The paper
flattens a fixed 6x6 map into its 1024-unit dense layer; a global average pool
instead lets the same weights judge crops of any size.

Returns raw logits of shape (B, 1): the losses apply the sigmoid.
"""

from __future__ import annotations

import torch
from torch import nn

from sr_core.archs.limits import MAX_IMAGE_CHANNELS, MAX_WIDTH, check_int, check_size, conv, linear

# (channel multiplier of num_feat, stride) of the conv-BN-LReLU blocks after the first conv.
BLOCKS = [(1, 2), (2, 1), (2, 2), (4, 1), (4, 2), (8, 1), (8, 2)]


MAX_LINEAR_FEAT = 65536


def check_hparams(hparams: dict) -> None:
    """Ranges, then the size estimate (``sr_core.archs.limits``), before any layer is built."""
    arch = "srgan"
    check_int(arch, "num_in_ch", hparams["num_in_ch"], 1, MAX_IMAGE_CHANNELS)
    check_int(arch, "num_feat", hparams["num_feat"], 1, MAX_WIDTH)
    check_int(arch, "num_linear_feat", hparams["num_linear_feat"], 1, MAX_LINEAR_FEAT)
    f, total, channels = hparams["num_feat"], conv(hparams["num_in_ch"], hparams["num_feat"], 3), hparams["num_feat"]
    for multiplier, _stride in BLOCKS:
        total += conv(channels, f * multiplier, 3, bias=False) + 2 * f * multiplier
        channels = f * multiplier
    check_size(arch, total + linear(channels, hparams["num_linear_feat"]) + linear(hparams["num_linear_feat"], 1))


class ConvBNBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        # No bias: BatchNorm's shift makes it redundant.
        self.conv = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.lrelu = nn.LeakyReLU(negative_slope=0.2, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lrelu(self.bn(self.conv(x)))


class SRGANDiscriminator(nn.Module):
    """``forward`` takes BCHW crops of any size >= 16 and returns (B, 1) logits."""

    arch_name = "srgan"

    def __init__(self, num_in_ch: int = 3, num_feat: int = 64, num_linear_feat: int = 1024):
        super().__init__()
        self.hparams = dict(num_in_ch=num_in_ch, num_feat=num_feat, num_linear_feat=num_linear_feat)
        check_hparams(self.hparams)
        self.input_size: int | None = None
        self.size_multiple = 1
        # Four stride-2 blocks: below 16 pixels the last blocks see a single position.
        self.min_input_size = 2 ** sum(stride == 2 for _, stride in BLOCKS)

        self.conv_first = nn.Conv2d(num_in_ch, num_feat, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(negative_slope=0.2, inplace=True)
        blocks, channels = [], num_feat
        for multiplier, stride in BLOCKS:
            blocks.append(ConvBNBlock(channels, num_feat * multiplier, stride))
            channels = num_feat * multiplier
        self.body = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear1 = nn.Linear(channels, num_linear_feat)
        self.linear2 = nn.Linear(num_linear_feat, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if min(x.shape[-2:]) < self.min_input_size:
            raise ValueError(
                f"srgan: input is {x.shape[-2]}x{x.shape[-1]}; crops must be at least "
                f"{self.min_input_size}x{self.min_input_size}"
            )
        feat = self.body(self.lrelu(self.conv_first(x)))
        feat = self.pool(feat).flatten(1)
        return self.linear2(self.lrelu(self.linear1(feat)))


VARIANTS = {
    # The paper's widths: 64 to 512 channels, a 1024-unit dense layer.
    "srgan": dict(num_feat=64, num_linear_feat=1024),
    # A fast model for CPU tests and demos.
    "tiny": dict(num_feat=8, num_linear_feat=16),
}
