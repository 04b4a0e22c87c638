"""SRResNet: the SRGAN generator (Ledig et al., 2017).

A 9x9 conv + PReLU, ``num_block`` residual blocks (conv-BN-PReLU-conv-BN), a conv-BN
closing the trunk with a long skip from the first features, one sub-pixel stage per
x2 (3x3 conv to 4x channels, PixelShuffle(2), PReLU), and a 9x9 conv to the image.
Unlike RRDBNet it keeps BatchNorm, as the paper does: use ``.eval()`` for inference.
"""

from __future__ import annotations

import torch
from torch import nn

from sr_core.archs.limits import MAX_DEPTH, MAX_IMAGE_CHANNELS, MAX_WIDTH, check_choice, check_int, check_size, conv

UPSAMPLE_STAGES_FOR_SCALE = {2: 1, 4: 2, 8: 3}


def check_hparams(hparams: dict) -> None:
    """Ranges, then the size estimate (``sr_core.archs.limits``), before any layer is built."""
    arch = "srresnet"
    check_int(arch, "num_in_ch", hparams["num_in_ch"], 1, MAX_IMAGE_CHANNELS)
    check_int(arch, "num_out_ch", hparams["num_out_ch"], 1, MAX_IMAGE_CHANNELS)
    check_choice(arch, "scale", hparams["scale"], sorted(UPSAMPLE_STAGES_FOR_SCALE))
    check_int(arch, "num_feat", hparams["num_feat"], 1, MAX_WIDTH)
    check_int(arch, "num_block", hparams["num_block"], 1, MAX_DEPTH)
    f = hparams["num_feat"]
    block = 2 * conv(f, f, 3) + 2 * 2 * f + f  # two conv-BN pairs and a PReLU
    stages = UPSAMPLE_STAGES_FOR_SCALE[hparams["scale"]] * (conv(f, 4 * f, 3) + f)
    check_size(arch, conv(hparams["num_in_ch"], f, 9) + f + hparams["num_block"] * block + conv(f, f, 3) + 2 * f
               + stages + conv(f, hparams["num_out_ch"], 9))


class ResidualBlock(nn.Module):
    def __init__(self, num_feat: int):
        super().__init__()
        self.conv1 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.bn1 = nn.BatchNorm2d(num_feat)
        self.prelu = nn.PReLU(num_feat)
        self.conv2 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.bn2 = nn.BatchNorm2d(num_feat)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.prelu(self.bn1(self.conv1(x)))
        return x + self.bn2(self.conv2(out))


class UpsampleStage(nn.Module):
    """x2 by sub-pixel convolution: conv to 4x channels, then PixelShuffle(2)."""

    def __init__(self, num_feat: int):
        super().__init__()
        self.conv = nn.Conv2d(num_feat, num_feat * 4, 3, 1, 1)
        self.shuffle = nn.PixelShuffle(2)
        self.prelu = nn.PReLU(num_feat)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.prelu(self.shuffle(self.conv(x)))


class SRResNet(nn.Module):
    """``forward`` takes BCHW in [0, 1] and returns BCHW x ``scale``; any input size."""

    arch_name = "srresnet"

    def __init__(
        self,
        num_in_ch: int = 3,
        num_out_ch: int = 3,
        scale: int = 4,
        num_feat: int = 64,
        num_block: int = 16,
    ):
        super().__init__()
        self.hparams = dict(num_in_ch=num_in_ch, num_out_ch=num_out_ch, scale=scale, num_feat=num_feat,
                            num_block=num_block)
        check_hparams(self.hparams)
        self.scale = scale
        self.size_multiple = 1

        self.conv_first = nn.Conv2d(num_in_ch, num_feat, 9, 1, 4)
        self.prelu_first = nn.PReLU(num_feat)
        self.body = nn.Sequential(*[ResidualBlock(num_feat) for _ in range(num_block)])
        self.conv_body = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.bn_body = nn.BatchNorm2d(num_feat)
        self.upsample = nn.Sequential(*[UpsampleStage(num_feat) for _ in range(UPSAMPLE_STAGES_FOR_SCALE[scale])])
        self.conv_last = nn.Conv2d(num_feat, num_out_ch, 9, 1, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.prelu_first(self.conv_first(x))
        feat = feat + self.bn_body(self.conv_body(self.body(feat)))
        return self.conv_last(self.upsample(feat))


VARIANTS = {
    # The paper's SRResNet: 64 features, 16 residual blocks.
    "srgan": dict(num_feat=64, num_block=16),
    # A fast model for CPU tests and demos.
    "tiny": dict(num_feat=8, num_block=1),
    "small": dict(num_feat=16, num_block=4),
}
