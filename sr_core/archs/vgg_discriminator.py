"""VGG-style discriminators: ESRGAN's (BasicSR's ``VGGStyleDiscriminator`` layout).

Stage 0 is a 3x3 conv (with bias) and a 4x4 stride-2 conv + BN; every later stage is
a 3x3 conv + BN and a 4x4 stride-2 conv + BN, channels doubling up to 8 x
``num_feat``; LeakyReLU(0.2) after each. The head is two linear layers on the final
4x4 map (``linear1``: 8 x num_feat x 4 x 4 -> 100, ``linear2``: 100 -> 1). State-dict
keys are BasicSR's (``conv0_0``, ``conv0_1``, ``bn0_1``, ``conv1_0``, ``bn1_0``, ...,
``linear1``, ``linear2``), so public ESRGAN discriminator weights load unchanged.

- ``vgg_style``: fixed crop size, 128 (5 stages) or 256 (6 stages), as in BasicSR.
- ``vgg_style_any``: the 128 layout (same keys and shapes, so weights move between
  the two) with an adaptive average pool to 4x4 before the head, for any crop >= 32.

Both return raw logits of shape (B, 1): the losses apply the sigmoid.
"""

from __future__ import annotations

import torch
from torch import nn

from sr_core.archs.limits import MAX_IMAGE_CHANNELS, MAX_WIDTH, check_int, check_size, conv, linear

# Number of stride-2 stages for each supported fixed input size: the last map is 4x4.
STAGES_FOR_INPUT_SIZE = {128: 5, 256: 6}
HEAD_MAP_SIZE = 4
LINEAR_FEAT = 100


def check_hparams(hparams: dict, arch: str = "vgg_style") -> None:
    """Ranges, then the size estimate (``sr_core.archs.limits``), before any layer is built."""
    input_size = hparams.get("input_size", 128)
    if input_size not in STAGES_FOR_INPUT_SIZE or isinstance(input_size, bool):
        raise ValueError(f"{arch}: input_size must be one of {sorted(STAGES_FOR_INPUT_SIZE)}, got {input_size!r} "
                         "(use the vgg_style_any discriminator for other crop sizes)")
    check_int(arch, "num_in_ch", hparams["num_in_ch"], 1, MAX_IMAGE_CHANNELS)
    check_int(arch, "num_feat", hparams["num_feat"], 1, MAX_WIDTH)
    f = hparams["num_feat"]
    total, channels = conv(hparams["num_in_ch"], f, 3) + conv(f, f, 4, bias=False) + 2 * f, f
    for i in range(1, STAGES_FOR_INPUT_SIZE[input_size]):
        out = f * min(2**i, 8)
        total += conv(channels, out, 3, bias=False) + conv(out, out, 4, bias=False) + 4 * out
        channels = out
    check_size(arch, total + linear(channels * HEAD_MAP_SIZE * HEAD_MAP_SIZE, LINEAR_FEAT) + linear(LINEAR_FEAT, 1))


class VGGStyleDiscriminator(nn.Module):
    """ESRGAN's discriminator for ``input_size`` x ``input_size`` crops; returns (B, 1) logits."""

    arch_name = "vgg_style"

    def __init__(self, num_in_ch: int = 3, num_feat: int = 64, input_size: int = 128):
        super().__init__()
        check_hparams(dict(num_in_ch=num_in_ch, num_feat=num_feat, input_size=input_size), self.arch_name)
        self.hparams = dict(num_in_ch=num_in_ch, num_feat=num_feat, input_size=input_size)
        self.input_size: int | None = input_size
        self.size_multiple = 1
        self.min_input_size = input_size
        self.num_stages = STAGES_FOR_INPUT_SIZE[input_size]

        self.conv0_0 = nn.Conv2d(num_in_ch, num_feat, 3, 1, 1, bias=True)
        self.conv0_1 = nn.Conv2d(num_feat, num_feat, 4, 2, 1, bias=False)
        self.bn0_1 = nn.BatchNorm2d(num_feat)
        # BasicSR names the later stages conv{i}_0/bn{i}_0 and conv{i}_1/bn{i}_1; keep them.
        channels = num_feat
        for i in range(1, self.num_stages):
            out_channels = num_feat * min(2**i, 8)
            self.add_module(f"conv{i}_0", nn.Conv2d(channels, out_channels, 3, 1, 1, bias=False))
            self.add_module(f"bn{i}_0", nn.BatchNorm2d(out_channels))
            self.add_module(f"conv{i}_1", nn.Conv2d(out_channels, out_channels, 4, 2, 1, bias=False))
            self.add_module(f"bn{i}_1", nn.BatchNorm2d(out_channels))
            channels = out_channels
        self.linear1 = nn.Linear(channels * HEAD_MAP_SIZE * HEAD_MAP_SIZE, LINEAR_FEAT)
        self.linear2 = nn.Linear(LINEAR_FEAT, 1)
        self.lrelu = nn.LeakyReLU(negative_slope=0.2, inplace=True)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.lrelu(self.conv0_0(x))
        feat = self.lrelu(self.bn0_1(self.conv0_1(feat)))
        for i in range(1, self.num_stages):
            feat = self.lrelu(getattr(self, f"bn{i}_0")(getattr(self, f"conv{i}_0")(feat)))
            feat = self.lrelu(getattr(self, f"bn{i}_1")(getattr(self, f"conv{i}_1")(feat)))
        return feat

    def head(self, feat: torch.Tensor) -> torch.Tensor:
        feat = self.lrelu(self.linear1(feat.flatten(1)))
        return self.linear2(feat)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.input_size, self.input_size):
            raise ValueError(
                f"vgg_style: input is {x.shape[-2]}x{x.shape[-1]}, but this discriminator takes exactly "
                f"{self.input_size}x{self.input_size} crops; crop to that size or use vgg_style_any"
            )
        return self.head(self.features(x))


class VGGStyleDiscriminatorAnySize(VGGStyleDiscriminator):
    """The 128 layout with an adaptive 4x4 average pool before the head: any crop >= 32."""

    arch_name = "vgg_style_any"

    def __init__(self, num_in_ch: int = 3, num_feat: int = 64):
        super().__init__(num_in_ch=num_in_ch, num_feat=num_feat, input_size=128)
        self.hparams = dict(num_in_ch=num_in_ch, num_feat=num_feat)
        self.input_size = None
        # Five stride-2 stages floor-halve the size; below 2**5 the last map is empty.
        self.min_input_size = 2**self.num_stages
        self.pool = nn.AdaptiveAvgPool2d(HEAD_MAP_SIZE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if min(x.shape[-2:]) < self.min_input_size:
            raise ValueError(
                f"vgg_style_any: input is {x.shape[-2]}x{x.shape[-1]}; crops must be at least "
                f"{self.min_input_size}x{self.min_input_size}"
            )
        return self.head(self.pool(self.features(x)))


VARIANTS = {
    # ESRGAN's discriminator for 128x128 GT crops.
    "esrgan": dict(num_feat=64, input_size=128),
    "esrgan_256": dict(num_feat=64, input_size=256),
    # A fast model for CPU tests and demos.
    "tiny": dict(num_feat=8, input_size=128),
}

VARIANTS_ANY_SIZE = {
    "esrgan": dict(num_feat=64),
    "tiny": dict(num_feat=8),
}
