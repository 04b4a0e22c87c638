"""RRDBNet: the ESRGAN generator (Wang et al., 2018), Residual-in-Residual Dense Blocks.

State-dict keys and shapes are exactly BasicSR's / Real-ESRGAN's (``conv_first``,
``body.N.rdbK.convM``, ``conv_body``, ``conv_up1``, ``conv_up2``, ``conv_hr``,
``conv_last``), so every public weight file in that layout loads with no conversion.
Scales 1 and 2 fold the input into channels with pixel-unshuffle first, as Real-ESRGAN
does, so the trunk always runs at 1/4 of the output resolution.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from sr_core.archs.limits import MAX_DEPTH, MAX_IMAGE_CHANNELS, MAX_WIDTH, check_choice, check_int, check_size, conv

# Residual scaling from the ESRGAN paper: adding 0.2 x the block output keeps a deep
# un-normalized trunk stable at initialization (no BatchNorm, which causes artifacts).
RESIDUAL_SCALE = 0.2
# ESRGAN initializes with Kaiming-normal scaled down by 0.1 for the same reason.
INIT_SCALE = 0.1

# Pixel-unshuffle factor applied at the input for each output scale.
UNSHUFFLE_FOR_SCALE = {1: 4, 2: 2, 4: 1, 8: 1}
# Number of x2 upsampling stages for each output scale.
UPSAMPLE_STAGES_FOR_SCALE = {1: 2, 2: 2, 4: 2, 8: 3}


UPSAMPLERS = ("nearest", "pixelshuffle")


def check_ranges(arch: str, hparams: dict) -> None:
    """The trunk's hyperparameters (shared with the multi-head variant)."""
    check_int(arch, "num_in_ch", hparams["num_in_ch"], 1, MAX_IMAGE_CHANNELS)
    check_int(arch, "num_out_ch", hparams["num_out_ch"], 1, MAX_IMAGE_CHANNELS)
    check_choice(arch, "scale", hparams["scale"], sorted(UNSHUFFLE_FOR_SCALE))
    check_int(arch, "num_feat", hparams["num_feat"], 1, MAX_WIDTH)
    check_int(arch, "num_block", hparams["num_block"], 0, MAX_DEPTH)
    check_int(arch, "num_grow_ch", hparams["num_grow_ch"], 1, MAX_WIDTH)
    check_choice(arch, "upsampler", hparams["upsampler"], UPSAMPLERS)


def trunk_parameters(hparams: dict) -> int:
    """Parameters of everything but ``conv_last``."""
    f, g = hparams["num_feat"], hparams["num_grow_ch"]
    dense_block = sum(conv(f + i * g, g, 3) for i in range(4)) + conv(f + 4 * g, f, 3)
    up_out = 4 * f if hparams["upsampler"] == "pixelshuffle" else f
    num_up = 3 if hparams["scale"] == 8 else 2
    return (conv(hparams["num_in_ch"] * UNSHUFFLE_FOR_SCALE[hparams["scale"]] ** 2, f, 3)
            + hparams["num_block"] * 3 * dense_block + conv(f, f, 3) + num_up * conv(f, up_out, 3) + conv(f, f, 3))


def check_hparams(hparams: dict) -> None:
    """Ranges, then the size estimate (``sr_core.archs.limits``), before any layer is built."""
    check_ranges("rrdbnet", hparams)
    check_size("rrdbnet", trunk_parameters(hparams) + conv(hparams["num_feat"], hparams["num_out_ch"], 3))


def scaled_kaiming_init(module: nn.Module, scale: float = INIT_SCALE) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight)
            m.weight.data.mul_(scale)
            if m.bias is not None:
                m.bias.data.zero_()


class ResidualDenseBlock(nn.Module):
    """Five 3x3 convs, each seeing the block input and every earlier output."""

    def __init__(self, num_feat: int, num_grow_ch: int):
        super().__init__()
        self.conv1 = nn.Conv2d(num_feat, num_grow_ch, 3, 1, 1)
        self.conv2 = nn.Conv2d(num_feat + num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv3 = nn.Conv2d(num_feat + 2 * num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv4 = nn.Conv2d(num_feat + 3 * num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv5 = nn.Conv2d(num_feat + 4 * num_grow_ch, num_feat, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(negative_slope=0.2, inplace=True)
        scaled_kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.lrelu(self.conv1(x))
        x2 = self.lrelu(self.conv2(torch.cat((x, x1), 1)))
        x3 = self.lrelu(self.conv3(torch.cat((x, x1, x2), 1)))
        x4 = self.lrelu(self.conv4(torch.cat((x, x1, x2, x3), 1)))
        x5 = self.conv5(torch.cat((x, x1, x2, x3, x4), 1))
        return x + RESIDUAL_SCALE * x5


class RRDB(nn.Module):
    """Three dense blocks with an outer residual connection."""

    def __init__(self, num_feat: int, num_grow_ch: int):
        super().__init__()
        self.rdb1 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb2 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb3 = ResidualDenseBlock(num_feat, num_grow_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.rdb3(self.rdb2(self.rdb1(x)))
        return x + RESIDUAL_SCALE * out


class RRDBNet(nn.Module):
    """ESRGAN generator. ``forward`` takes BCHW in [0, 1] and returns BCHW x ``scale``."""

    arch_name = "rrdbnet"

    def __init__(
        self,
        num_in_ch: int = 3,
        num_out_ch: int = 3,
        scale: int = 4,
        num_feat: int = 64,
        num_block: int = 23,
        num_grow_ch: int = 32,
        upsampler: str = "nearest",
    ):
        super().__init__()
        self.hparams = dict(
            num_in_ch=num_in_ch, num_out_ch=num_out_ch, scale=scale, num_feat=num_feat,
            num_block=num_block, num_grow_ch=num_grow_ch, upsampler=upsampler,
        )
        check_hparams(self.hparams)
        self.scale = scale
        self.upsampler = upsampler
        self.unshuffle = UNSHUFFLE_FOR_SCALE[scale]
        # Inputs must be divisible by the unshuffle factor; the Upscaler pads to this.
        self.size_multiple = self.unshuffle

        self.conv_first = nn.Conv2d(num_in_ch * self.unshuffle**2, num_feat, 3, 1, 1)
        self.body = nn.Sequential(*[RRDB(num_feat, num_grow_ch) for _ in range(num_block)])
        self.conv_body = nn.Conv2d(num_feat, num_feat, 3, 1, 1)

        # "nearest": nearest x2 then 3x3 conv (ESRGAN; no checkerboard artifacts).
        # "pixelshuffle": 3x3 conv to 4x channels then PixelShuffle(2) (sub-pixel conv).
        up_out = num_feat * 4 if upsampler == "pixelshuffle" else num_feat
        self.conv_up1 = nn.Conv2d(num_feat, up_out, 3, 1, 1)
        self.conv_up2 = nn.Conv2d(num_feat, up_out, 3, 1, 1)
        if scale == 8:
            self.conv_up3 = nn.Conv2d(num_feat, up_out, 3, 1, 1)
        self.conv_hr = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_last = nn.Conv2d(num_feat, num_out_ch, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(negative_slope=0.2, inplace=True)

    def _up(self, conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        if self.upsampler == "pixelshuffle":
            return self.lrelu(F.pixel_shuffle(conv(x), 2))
        return self.lrelu(conv(F.interpolate(x, scale_factor=2, mode="nearest")))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Everything up to ``conv_last``: HR-resolution features (shared with the
        multi-head variant, whose heads replace ``conv_last``)."""
        if self.unshuffle > 1:
            x = F.pixel_unshuffle(x, self.unshuffle)
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        feat = self._up(self.conv_up1, feat)
        feat = self._up(self.conv_up2, feat)
        if self.scale == 8:
            feat = self._up(self.conv_up3, feat)
        return self.lrelu(self.conv_hr(feat))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_last(self.features(x))


VARIANTS = {
    # The published ESRGAN / Real-ESRGAN generator.
    "esrgan": dict(num_feat=64, num_block=23, num_grow_ch=32),
    # A fast model for CPU tests and demos.
    "tiny": dict(num_feat=8, num_block=1, num_grow_ch=4),
    # The smallest that learns something useful in minutes on a CPU.
    "small": dict(num_feat=16, num_block=2, num_grow_ch=8),
}
