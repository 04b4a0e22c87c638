"""Real-ESRGAN's U-Net discriminator with spectral normalization (Wang et al., 2021).

An encoder of three 4x4 stride-2 convs (num_feat -> 8 x num_feat), a decoder of
bilinear x2 upsampling + 3x3 convs back to num_feat with skip connections from the
encoder, two more 3x3 convs and a 3x3 conv to one channel: a realness logit per
pixel, so the generator gets local feedback instead of one score per crop. Spectral
norm on every conv but the first and last keeps the bigger D stable without BN.

State-dict keys are Real-ESRGAN's (``conv0``, ``conv1.weight_orig`` /
``weight_u`` / ``weight_v``, ..., ``conv9``): ``torch.nn.utils.spectral_norm`` (the
hook-based one, not the newer parametrization, which names its tensors differently)
is what produces that layout, so public Real-ESRGAN discriminator weights load.

Returns raw logits of shape (B, 1, H, W): the losses apply the sigmoid.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import spectral_norm

from sr_core.archs.limits import MAX_IMAGE_CHANNELS, MAX_WIDTH, check_int, check_size, conv

# Three stride-2 convs down, three x2 upsamplings back: H and W must divide by 8 so
# the skip connections line up.
SIZE_MULTIPLE = 8


def check_hparams(hparams: dict) -> None:
    """Ranges, then the size estimate (``sr_core.archs.limits``), before any layer is built."""
    arch = "unet_sn"
    check_int(arch, "num_in_ch", hparams["num_in_ch"], 1, MAX_IMAGE_CHANNELS)
    check_int(arch, "num_feat", hparams["num_feat"], 1, MAX_WIDTH)
    if not isinstance(hparams["skip_connection"], bool):
        raise ValueError(f"{arch}: skip_connection must be true or false, got {hparams['skip_connection']!r}")
    f = hparams["num_feat"]
    down = conv(f, 2 * f, 4, False) + conv(2 * f, 4 * f, 4, False) + conv(4 * f, 8 * f, 4, False)
    up = conv(8 * f, 4 * f, 3, False) + conv(4 * f, 2 * f, 3, False) + conv(2 * f, f, 3, False)
    check_size(arch, conv(hparams["num_in_ch"], f, 3) + down + up + 2 * conv(f, f, 3, False) + conv(f, 1, 3))


class UNetDiscriminatorSN(nn.Module):
    """``forward`` takes BCHW with H, W multiples of 8 and returns (B, 1, H, W) logits."""

    arch_name = "unet_sn"

    def __init__(self, num_in_ch: int = 3, num_feat: int = 64, skip_connection: bool = True):
        super().__init__()
        self.hparams = dict(num_in_ch=num_in_ch, num_feat=num_feat, skip_connection=skip_connection)
        check_hparams(self.hparams)
        self.input_size: int | None = None
        self.size_multiple = SIZE_MULTIPLE
        self.min_input_size = SIZE_MULTIPLE
        self.skip_connection = skip_connection

        self.conv0 = nn.Conv2d(num_in_ch, num_feat, 3, 1, 1)
        # Encoder.
        self.conv1 = spectral_norm(nn.Conv2d(num_feat, num_feat * 2, 4, 2, 1, bias=False))
        self.conv2 = spectral_norm(nn.Conv2d(num_feat * 2, num_feat * 4, 4, 2, 1, bias=False))
        self.conv3 = spectral_norm(nn.Conv2d(num_feat * 4, num_feat * 8, 4, 2, 1, bias=False))
        # Decoder.
        self.conv4 = spectral_norm(nn.Conv2d(num_feat * 8, num_feat * 4, 3, 1, 1, bias=False))
        self.conv5 = spectral_norm(nn.Conv2d(num_feat * 4, num_feat * 2, 3, 1, 1, bias=False))
        self.conv6 = spectral_norm(nn.Conv2d(num_feat * 2, num_feat, 3, 1, 1, bias=False))
        # Extra convs at full resolution.
        self.conv7 = spectral_norm(nn.Conv2d(num_feat, num_feat, 3, 1, 1, bias=False))
        self.conv8 = spectral_norm(nn.Conv2d(num_feat, num_feat, 3, 1, 1, bias=False))
        self.conv9 = nn.Conv2d(num_feat, 1, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        if height % SIZE_MULTIPLE or width % SIZE_MULTIPLE:
            raise ValueError(
                f"unet_sn: input is {height}x{width}; height and width must be multiples of "
                f"{SIZE_MULTIPLE} (crop or pad the images)"
            )
        x0 = F.leaky_relu(self.conv0(x), negative_slope=0.2)
        x1 = F.leaky_relu(self.conv1(x0), negative_slope=0.2)
        x2 = F.leaky_relu(self.conv2(x1), negative_slope=0.2)
        x3 = F.leaky_relu(self.conv3(x2), negative_slope=0.2)

        x3 = F.interpolate(x3, scale_factor=2, mode="bilinear", align_corners=False)
        x4 = F.leaky_relu(self.conv4(x3), negative_slope=0.2)
        if self.skip_connection:
            x4 = x4 + x2
        x4 = F.interpolate(x4, scale_factor=2, mode="bilinear", align_corners=False)
        x5 = F.leaky_relu(self.conv5(x4), negative_slope=0.2)
        if self.skip_connection:
            x5 = x5 + x1
        x5 = F.interpolate(x5, scale_factor=2, mode="bilinear", align_corners=False)
        x6 = F.leaky_relu(self.conv6(x5), negative_slope=0.2)
        if self.skip_connection:
            x6 = x6 + x0

        out = F.leaky_relu(self.conv7(x6), negative_slope=0.2)
        out = F.leaky_relu(self.conv8(out), negative_slope=0.2)
        return self.conv9(out)


VARIANTS = {
    # Real-ESRGAN's discriminator.
    "realesrgan": dict(num_feat=64, skip_connection=True),
    # A fast model for CPU tests and demos.
    "tiny": dict(num_feat=8, skip_connection=True),
}
