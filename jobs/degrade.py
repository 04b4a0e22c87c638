"""The second-order degradation inside the training step (``degradation.enabled``): the
loader delivers GT crops only; on the training device each batch's LR is made by
``sr_core.realdegrade.RealDegradation`` and passed through a pool of pairs, as
Real-ESRGAN's ``feed_data`` does (degradation on the GPU under no_grad, then its
``_dequeue_and_enqueue``).

Exact resume: every draw of a step comes from a ``torch.Generator`` seeded by
``(data.seed, rank, step index, accumulation index)``, so it needs no saved RNG state;
the pool's contents (uint8: the LR is on the 8-bit grid and the GT comes from uint8
crops) and fill level are saved in each rank's checkpoint file. The sharpened GT is
recomputed from the GT after the pool (it is a fixed function of it), so the pool holds
two tensors, not three.
"""

from __future__ import annotations

import numpy as np
import torch

from sr_core.realdegrade import RealDegradation, usm_sharpen


def step_generator(seed: int, rank: int, index: int, micro: int, device) -> torch.Generator:
    """The generator of one micro-batch's draws, a function of its place in the run only."""
    words = np.random.SeedSequence([seed, rank, index, micro]).generate_state(2, dtype=np.uint32)
    return torch.Generator(device=device).manual_seed(int(words[0]) << 32 | int(words[1]))


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return (x * 255).round().clamp(0, 255).to(torch.uint8)


class PairPool:
    """Real-ESRGAN's training-pair queue: while it fills, batches pass through and are
    stored; once full, it is shuffled, its first ``b`` pairs are handed out and the new
    batch takes their place. Pairs stay on the device, as uint8."""

    def __init__(self, size: int):
        self.size = size
        self.lr: torch.Tensor | None = None
        self.gt: torch.Tensor | None = None
        self.filled = 0

    def exchange(self, lr: torch.Tensor, gt: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        b = lr.shape[0]
        if self.size == 0:
            return lr, gt
        if self.lr is None:
            self.lr = torch.zeros((self.size, *lr.shape[1:]), dtype=torch.uint8, device=lr.device)
            self.gt = torch.zeros((self.size, *gt.shape[1:]), dtype=torch.uint8, device=gt.device)
        if self.filled < self.size:
            self.lr[self.filled:self.filled + b] = _to_uint8(lr)
            self.gt[self.filled:self.filled + b] = _to_uint8(gt)
            self.filled += b
            return lr, gt
        order = torch.randperm(self.size, generator=generator, device=generator.device).to(lr.device)
        self.lr, self.gt = self.lr[order], self.gt[order]
        out_lr, out_gt = self.lr[:b].float() / 255, self.gt[:b].float() / 255
        self.lr[:b], self.gt[:b] = _to_uint8(lr), _to_uint8(gt)
        return out_lr, out_gt

    def state_dict(self) -> dict:
        if self.lr is None:
            return {"filled": 0}
        return {"filled": self.filled, "lr": self.lr.cpu(), "gt": self.gt.cpu()}

    def load_state_dict(self, state: dict, device) -> None:
        self.filled = int(state["filled"])
        if "lr" in state:
            self.lr, self.gt = state["lr"].to(device), state["gt"].to(device)


class DeviceDegradation:
    """``degrade(batch, index, micro)``: a loader batch (``gt`` on the device) with its
    ``lr`` made by the second-order model, through the pool, and ``gt_sharp`` (the target
    of the pixel and perceptual losses) added."""

    def __init__(self, config, rank: int, device):
        self.pipeline = RealDegradation(config.degradation.options(config.data.scale))
        self.pool = PairPool(config.degradation.pool_size)
        self.seed, self.rank, self.device = config.data.seed, rank, device
        self.last: dict | None = None  # the last batch handed out, for TensorBoard's grid

    def __call__(self, batch: dict, index: int, micro: int = 0) -> dict:
        generator = step_generator(self.seed, self.rank, index, micro, self.device)
        gt = batch["gt"]
        lr, _ = self.pipeline(gt, generator)
        lr, gt = self.pool.exchange(lr, gt, generator)
        gt_sharp = usm_sharpen(gt) if self.pipeline.options.usm_gt else gt
        out = {**batch, "lr": lr, "gt": gt, "gt_sharp": gt_sharp}
        self.last = out
        return out

    def state_dict(self) -> dict:
        return {"pool": self.pool.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.pool.load_state_dict(state["pool"], self.device)


def degraded_grid(lr: torch.Tensor, output: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """One CHW image: the degraded LR (nearest-upscaled to the GT's size) | the model's
    output | the GT, side by side, for TensorBoard."""
    scale = gt.shape[-1] // lr.shape[-1]
    lr_big = lr.repeat_interleave(scale, -1).repeat_interleave(scale, -2)
    return torch.cat([lr_big, output.clamp(0, 1), gt], dim=-1).float().cpu()
