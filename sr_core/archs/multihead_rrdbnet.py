"""Multi-head RRDBNet: the ESRGAN trunk with several output heads of growing depth.

The trunk (``conv_first``, ``body``, ``conv_body``, ``conv_up*``, ``conv_hr``) has
exactly RRDBNet's keys and shapes, so a trained RRDBNet's trunk loads into it
(``load_state_dict(..., strict=False)`` leaves only the heads to train). RRDBNet's
single 3x3 ``conv_last`` is replaced by ``num_heads`` heads working at the output
resolution: head k is k blocks of (9x9 conv, LeakyReLU) followed by a final 9x9 conv
to the output channels, so head 0 is one 9x9 conv, head 1 is conv-LReLU-conv, ...

Training calls ``forward(x, all_heads=True)`` and sums the losses of all heads, so the
shared trunk learns features that serve shallow and deep reconstructions alike;
inference returns the head chosen by ``output_head`` (or the mean of all heads).
"""

from __future__ import annotations

import torch
from torch import nn

from sr_core.archs import rrdbnet
from sr_core.archs.limits import check_int, check_size, conv
from sr_core.archs.rrdbnet import RRDBNet

HEAD_KERNEL = 9
# output_head value meaning "average all heads" (an ensemble at the price of all heads).
MEAN_OF_HEADS = -1


# Head k has k + 1 convolutions of 9x9 at the output resolution: more than a few heads
# cost more than the whole trunk.
MAX_HEADS = 16


def check_hparams(hparams: dict) -> None:
    """Ranges of the trunk and the heads, then the size estimate, before any layer is built."""
    arch = "multihead_rrdbnet"
    rrdbnet.check_ranges(arch, hparams)
    check_int(arch, "num_heads", hparams["num_heads"], 1, MAX_HEADS)
    check_int(arch, "output_head", hparams["output_head"], MEAN_OF_HEADS, hparams["num_heads"] - 1)
    f, out = hparams["num_feat"], hparams["num_out_ch"]
    heads = sum(depth * conv(f, f, HEAD_KERNEL) + conv(f, out, HEAD_KERNEL) for depth in range(hparams["num_heads"]))
    check_size(arch, rrdbnet.trunk_parameters(hparams) + heads)


def make_head(num_feat: int, num_out_ch: int, depth: int) -> nn.Sequential:
    """``depth`` blocks of (9x9 conv, LeakyReLU), then a 9x9 conv to ``num_out_ch``."""
    pad = HEAD_KERNEL // 2
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Conv2d(num_feat, num_feat, HEAD_KERNEL, 1, pad), nn.LeakyReLU(0.2, inplace=True)]
    layers.append(nn.Conv2d(num_feat, num_out_ch, HEAD_KERNEL, 1, pad))
    return nn.Sequential(*layers)


class MultiHeadRRDBNet(RRDBNet):
    """``forward(x)`` takes BCHW in [0, 1] and returns BCHW x ``scale`` from the head
    selected by ``output_head``; ``forward(x, all_heads=True)`` returns the list of all
    ``num_heads`` outputs, shallowest head first."""

    arch_name = "multihead_rrdbnet"

    def __init__(
        self,
        num_in_ch: int = 3,
        num_out_ch: int = 3,
        scale: int = 4,
        num_feat: int = 64,
        num_block: int = 23,
        num_grow_ch: int = 32,
        upsampler: str = "nearest",
        num_heads: int = 3,
        output_head: int = MEAN_OF_HEADS,
    ):
        check_hparams(dict(num_in_ch=num_in_ch, num_out_ch=num_out_ch, scale=scale, num_feat=num_feat,
                           num_block=num_block, num_grow_ch=num_grow_ch, upsampler=upsampler,
                           num_heads=num_heads, output_head=output_head))
        # The trunk is RRDBNet's, module for module, so its keys and shapes stay compatible.
        super().__init__(num_in_ch, num_out_ch, scale, num_feat, num_block, num_grow_ch, upsampler)
        del self.conv_last
        self.hparams.update(num_heads=num_heads, output_head=output_head)
        self.heads = nn.ModuleList([make_head(num_feat, num_out_ch, depth) for depth in range(num_heads)])
        self.select_head(output_head)

    def select_head(self, output_head: int) -> None:
        """Switch the head ``forward`` returns (kept in ``hparams`` so a saved file keeps it)."""
        if not (output_head == MEAN_OF_HEADS or 0 <= output_head < len(self.heads)):
            raise ValueError(
                f"multihead_rrdbnet: output_head must be {MEAN_OF_HEADS} (mean of all heads) or a head index "
                f"0..{len(self.heads) - 1}, got {output_head}"
            )
        self.output_head = output_head
        self.hparams["output_head"] = output_head

    def forward(self, x: torch.Tensor, all_heads: bool = False) -> torch.Tensor | list[torch.Tensor]:
        feat = self.features(x)
        if all_heads or self.output_head == MEAN_OF_HEADS:
            outputs = [head(feat) for head in self.heads]
            return outputs if all_heads else torch.stack(outputs).mean(dim=0)
        # Only the selected head runs: the deep heads are costly at output resolution.
        return self.heads[self.output_head](feat)


VARIANTS = {
    # The ESRGAN trunk at its published size, with three heads.
    "esrgan": dict(num_feat=64, num_block=23, num_grow_ch=32, num_heads=3),
    # A fast model for CPU tests and demos.
    "tiny": dict(num_feat=8, num_block=1, num_grow_ch=4, num_heads=3),
    "small": dict(num_feat=16, num_block=2, num_grow_ch=8, num_heads=3),
}
