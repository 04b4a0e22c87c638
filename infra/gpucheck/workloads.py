"""Workloads shared by the GPU check and the benchmarks in bench/: the photographs of
assets/images, the FLOP model of a generator's convolutions, the straightforward tiling
loop that popular upscalers use (the reference the Upscaler is compared with), and
crops of the photographs as a folder of small inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np

IMAGES = Path(__file__).resolve().parents[2] / "assets" / "images"
PHOTOS = ["astronaut.png", "camera.png", "chelsea.png", "coffee.png"]


def conv_flops_per_input_pixel(model, num_channels: int = 3, side: int = 16) -> float:
    """FLOP per input pixel of ``model``'s convolutions: 2 x the multiply-accumulates of
    every Conv2d, counted on a probe input (activations, upsampling and concatenations
    are not counted). The full ESRGAN generator gives 35.85 MFLOP."""
    import torch
    from torch import nn

    macs = 0

    def count(module, _inputs, output):
        nonlocal macs
        in_per_group = module.in_channels // module.groups
        macs += output.numel() * in_per_group * module.kernel_size[0] * module.kernel_size[1]

    handles = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.inference_mode():
            model(torch.zeros(1, num_channels, side, side))
    finally:
        for h in handles:
            h.remove()
    return 2 * macs / (side * side)


def load_photos(crop: int | None) -> list[np.ndarray]:
    from PIL import Image

    images = []
    for name in PHOTOS:
        img = np.asarray(Image.open(IMAGES / name).convert("RGB"))
        if crop:
            img = img[:crop, :crop]
        images.append(np.ascontiguousarray(img))
    return images


def reference_loop(model, image: np.ndarray, tile: int, overlap: int, device: str = "cpu") -> np.ndarray:
    """One tile at a time, the way popular upscalers do it (NCHW fp32, full-frame
    float32 output on the model's device, conversion to uint8 at the very end)."""
    import torch
    from torch.nn import functional as F

    scale, multiple = model.scale, model.size_multiple
    x = torch.from_numpy(image).to(device).permute(2, 0, 1).float().div(255)[None]
    height, width = x.shape[-2:]
    x = F.pad(x, (0, -width % multiple, 0, -height % multiple), mode="reflect")
    _, channels, ph, pw = x.shape
    out = torch.zeros(1, channels, ph * scale, pw * scale, device=device)
    for y0 in range(0, ph, tile):
        for x0 in range(0, pw, tile):
            y1, x1 = min(y0 + tile, ph), min(x0 + tile, pw)
            cy0, cx0 = max(y0 - overlap, 0), max(x0 - overlap, 0)
            cy1, cx1 = min(y1 + overlap, ph), min(x1 + overlap, pw)
            patch = x[..., cy0:cy1, cx0:cx1]
            # Popular loops pad each tile up to the size multiple here too.
            pad_h, pad_w = -patch.shape[-2] % multiple, -patch.shape[-1] % multiple
            if pad_h or pad_w:
                patch = F.pad(patch, (0, pad_w, 0, pad_h), mode="reflect")
            with torch.no_grad():
                result = model(patch)
            oy, ox = (y0 - cy0) * scale, (x0 - cx0) * scale
            out[..., y0 * scale:y1 * scale, x0 * scale:x1 * scale] = result[
                ..., oy:oy + (y1 - y0) * scale, ox:ox + (x1 - x0) * scale]
    out = out[..., :height * scale, :width * scale]
    return (out[0].clamp(0, 1).permute(1, 2, 0) * 255).round().to(torch.uint8).cpu().numpy()


def make_inputs(folder: Path, count: int, side: int) -> list[Path]:
    """``count`` PNGs of ``side`` px under ``folder`` (three subfolders): different
    crops of the photographs, resized, so an encoder does not see repeats."""
    from PIL import Image

    photos = sorted(IMAGES.glob("*.png"))
    files = []
    for i in range(count):
        img = Image.open(photos[i % len(photos)]).convert("RGB")
        # different crops of the photographs, so the encoder does not see repeats
        w, h = img.size
        x, y = (i * 37) % max(1, w - 2 * side), (i * 53) % max(1, h - 2 * side)
        img = img.crop((x, y, x + 2 * side, y + 2 * side)).resize((side, side), Image.Resampling.BICUBIC)
        path = folder / f"g{i % 3}" / f"img{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path)
        files.append(path)
    return files
