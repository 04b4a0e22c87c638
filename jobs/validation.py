"""Validation during training, on ``data.val_folder``.

Scores are PSNR, SSIM and MSE on the Y channel of 8-bit-quantized images with ``scale``
border pixels cropped (the papers' convention), each rank scoring its share of the
images, gathered. What is reported for a set is the mean over its images of each
score (the MSE is the mean of the images' MSEs, not the MSE of the mean PSNR).

- :func:`bicubic_baseline`, at start-up: every validation image is read, decoded and
  scored once against bicubic upscaling. A broken image stops the job there, naming it,
  instead of after the first training stretch; the bicubic scores are the baseline
  every later validation is printed beside.
- :func:`validate`: the EMA generator (or the generator without EMA); multi-head models
  report every head and the mean of heads; TensorBoard gets the scores and bicubic |
  SR | HR grids of the first ``train.num_val_images_logged`` images.
"""

from __future__ import annotations

import copy

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from jobs.data import ValidationDataset
from jobs.engines import sync_buffers
from sr_core.errors import strip_url
from sr_core.metrics import mse_torch, psnr_torch, ssim_torch
from sr_core.resize import imresize
from sr_core.upscaler import Upscaler

METRICS = ("psnr", "ssim", "mse")


def score(sr: torch.Tensor, hr: torch.Tensor, scale: int) -> tuple[float, float, float]:
    """PSNR, SSIM and MSE of one BCHW [0, 1] pair (Y channel, border = scale, 8-bit)."""
    return (float(psnr_torch(sr, hr, scale, True)), float(ssim_torch(sr, hr, scale, True)),
            float(mse_torch(sr, hr, scale, True)))


def mean_scores(rows: list[tuple]) -> dict[str, float]:
    """``(suffix, psnr, ssim, mse)`` rows, one per image and variant -> the mean of each
    score per variant: ``{"psnr<suffix>": ..., "ssim<suffix>": ..., "mse<suffix>": ...}``."""
    scores = {}
    for suffix in sorted({row[0] for row in rows}):
        mine = [row[1:] for row in rows if row[0] == suffix]
        for i, metric in enumerate(METRICS):
            scores[f"{metric}{suffix}"] = sum(values[i] for values in mine) / len(mine)
    return scores


def bicubic_baseline(val_set: ValidationDataset, accelerator: Accelerator) -> dict[str, float]:
    """Read and score every validation image against bicubic upscaling (each rank its
    share); ``{"psnr_bicubic": ..., "ssim_bicubic": ..., "mse_bicubic": ...}``. Images
    that cannot be used are a ``ValueError`` on every rank, naming them."""
    rows, broken = [], []
    for index in range(accelerator.process_index, len(val_set), accelerator.num_processes):
        url = val_set.files[index]
        try:
            item = val_set[index]
        except (ValueError, OSError) as exc:
            broken.append(f"{url}: {strip_url(exc, url)}")
            continue
        lr, hr = item["lr"][None].to(accelerator.device), item["gt"][None].to(accelerator.device)
        rows.append(("_bicubic", *score(imresize(lr, scale=val_set.scale).clamp_(0, 1), hr, val_set.scale)))
    rows, broken = gather_object(rows), sorted(gather_object(broken))
    if broken:
        shown = "; ".join(broken[:3]) + (f"; and {len(broken) - 3} more" if len(broken) > 3 else "")
        raise ValueError(f"data.val_folder: {len(broken)} of {len(val_set)} validation images cannot be used "
                         f"({shown}); remove or replace them, or set data.val_folder to another folder")
    return mean_scores(rows)


def validate(state, step: int) -> dict[str, float]:
    """Scores of the EMA generator (or the generator) at ``step``, the same on every rank;
    rank 0 logs them to TensorBoard with the bicubic baseline and comparison grids."""
    val_set, scale, device = state.val_set, state.config.data.scale, state.accelerator.device
    sync_buffers(state.accelerator, state.modules())
    model = state.ema.module if state.ema is not None else state.generator.module
    if next(model.parameters()).dtype != torch.float32:  # DeepSpeed fp16/bf16 modules
        model = copy.deepcopy(model).float()
    upscaler = Upscaler(model, device=device, precision="fp32", tile=None)
    variants = [("", None)]
    if state.multihead:
        variants = [("", -1)] + [(f"_head{k}", k) for k in range(len(model.heads))]
    selected = getattr(model, "output_head", None)
    rows = []
    try:
        for index in range(state.accelerator.process_index, len(val_set), state.accelerator.num_processes):
            item = val_set[index]
            lr, hr = item["lr"][None].to(device), item["gt"][None].to(device)
            for suffix, head in variants:
                if head is not None:
                    model.select_head(head)
                rows.append((suffix, *score(upscaler(lr), hr, scale)))
    finally:
        if selected is not None:
            model.select_head(selected)
    scores = mean_scores(gather_object(rows))
    if state.is_main and state.tb:
        state.tb.scalars(step, {f"val/{k}": v for k, v in scores.items()})
        state.tb.scalars(step, {f"val/{k}": v for k, v in state.bicubic_scores.items()})
        for index in range(min(state.config.train.num_val_images_logged, len(val_set))):
            state.tb.image(f"val_images/{index}", comparison_grid(upscaler, val_set[index], scale, device), step)
    return scores


def comparison_grid(upscaler: Upscaler, item: dict, scale: int, device, max_side: int = 256) -> torch.Tensor:
    """bicubic | SR | HR of a centre crop of a validation image (CHW floats in [0, 1])."""
    lr = item["lr"]
    side_h, side_w = min(lr.shape[1], max_side // scale), min(lr.shape[2], max_side // scale)
    y, x = (lr.shape[1] - side_h) // 2, (lr.shape[2] - side_w) // 2
    lr = lr[:, y:y + side_h, x:x + side_w][None].to(device)
    hr = item["gt"][:, y * scale:(y + side_h) * scale, x * scale:(x + side_w) * scale].to(device)
    bicubic = imresize(lr, scale=scale).clamp_(0, 1)[0]
    return torch.cat([bicubic, upscaler(lr)[0], hr], dim=2).cpu()
