"""Small random-weight models of other projects' architectures, built with spandrel's own
architecture classes and saved in the layouts those projects publish (the wrapper key
their released files use; the keys inside are the architectures' own).

``SPECS`` maps a name to (builder, wrapper, file suffix): the wrapper is the key the
project's released ``.pth`` files keep the weights under (None: a bare state dict).
"""

from __future__ import annotations

import torch
from safetensors.torch import save_file

from sr_core.foreign import import_spandrel


def _swinir():
    from spandrel.architectures.SwinIR import SwinIR
    # SwinIR's classical-SR releases (001_classicalSR_*_SwinIR-M_x2.pth) hold {"params": ...}.
    return SwinIR(upscale=2, in_chans=3, img_size=16, window_size=8, img_range=1.0, depths=[2], embed_dim=12,
                  num_heads=[2], mlp_ratio=2.0, upsampler="pixelshuffle", resi_connection="1conv")


def _hat():
    from spandrel.architectures.HAT import HAT
    # HAT's releases (HAT_SRx4.pth, HAT-S_SRx2.pth) hold {"params_ema": ...}.
    return HAT(upscale=2, in_chans=3, img_size=16, window_size=8, embed_dim=12, depths=(1,), num_heads=(2,),
               compress_ratio=3, squeeze_factor=4, mlp_ratio=2.0, num_feat=16, upsampler="pixelshuffle")


def _dat():
    from spandrel.architectures.DAT import DAT
    # DAT's releases (DAT_x2.pth, DAT_light_x2.pth) hold {"params": ...}.
    return DAT(upscale=2, in_chans=3, img_size=16, embed_dim=32, split_size=[2, 4], depth=[2], num_heads=[2],
               expansion_factor=2.0, upsampler="pixelshuffle")


def _omnisr():
    from spandrel.architectures.OmniSR import OmniSR
    # Omni-SR's released checkpoints are bare state dicts.
    return OmniSR(num_in_ch=3, num_out_ch=3, num_feat=16, block_num=1, window_size=8, res_num=1, up_scale=2)


def _span():
    from spandrel.architectures.SPAN import SPAN
    # SPAN was trained with BasicSR; its releases hold {"params": ...}.
    return SPAN(num_in_ch=3, num_out_ch=3, feature_channels=8, upscale=2)


def _realcugan():
    from spandrel.architectures.RealCUGAN import UpCunet2x
    # Real-CUGAN's releases (up2x-latest-no-denoise.pth) are bare state dicts.
    return UpCunet2x(in_channels=3, out_channels=3)


SPECS = {
    "SwinIR": (_swinir, "params", ".pth"),
    "HAT": (_hat, "params_ema", ".pth"),
    "DAT": (_dat, "params", ".pth"),
    "OmniSR": (_omnisr, None, ".pth"),
    "SPAN": (_span, "params", ".safetensors"),
    "RealCUGAN": (_realcugan, None, ".pth"),
}
# Architectures with no path from the input to the output: random weights give outputs
# near 0, clamped away; a bias on the last convolution centres them (see ``build``).
NO_INPUT_PATH = ("OmniSR", "SPAN", "RealCUGAN")


def build(name: str, seed: int = 0) -> torch.nn.Module:
    import_spandrel()
    torch.manual_seed(seed)
    model = SPECS[name][0]().eval()
    with torch.no_grad():
        # Random weights made small, so outputs stay inside (0, 1) and clamping does not
        # hide differences (tests check that most output pixels are not clamped).
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(0.3)
        if name in NO_INPUT_PATH:
            convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
            convs[-1].bias.add_(0.45)
    return model


def save(name: str, folder, seed: int = 0) -> tuple[str, torch.nn.Module]:
    """Write a model as the project publishes it; returns (path, model)."""
    model = build(name, seed)
    _builder, wrapper, suffix = SPECS[name]
    path = f"{folder}/{name.lower()}{suffix}"
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    if suffix == ".safetensors":
        save_file(state, path)
    else:
        torch.save({wrapper: state} if wrapper else state, path)
    return path, model
