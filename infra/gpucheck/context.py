"""What every step is given: the sizes (the GPU's, or the CPU rehearsal's tiny ones), the
``Context`` of one step process, and the models and photographs the steps run on."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
"""The checkout: the commands the steps start run there (``jobs/launch/...`` paths)."""
PSNR_FLOOR_DB = 45.0
"""Output PSNR of fp16/bf16 (and of every other variant) against the fp32 output."""
FLAT_STD = 1.0
"""An fp32 output whose pixel standard deviation is below this (8-bit levels) says
nothing about precision (random weights can give a constant image): no PSNR then."""
COMPACT = "srvgg_compact"
OVERLAP = 16


@dataclass(frozen=True)
class Sizes:
    """What every step runs on. ``GPU`` fits the 8-minute budget on one V100-class GPU;
    ``REHEARSAL`` is for the CPU rehearsal of the tests."""

    variants: dict = field(default_factory=lambda: {"rrdbnet": "esrgan", COMPACT: "realesr_general"})
    """Generator variant per architecture (the published shapes)."""
    seed: int = 0
    """Seed of the random weights (0 gives the full RRDBNet a non-flat output)."""
    photo_crop: int = 384
    """The four photographs cropped to at most this side (input pixels)."""
    tile: int = 128
    """Fixed tile (input pixels) of the precision and tiles-per-forward rows."""
    repeats: int = 2
    """Timed passes after one warm-up pass; the best counts."""
    prepare: tuple = (192, 96)
    """``sr prepare --size --step`` of the training shards."""
    psnr_preset: str = "esrgan_psnr_x4"
    """``sr train --preset`` of the PSNR stage (the full RRDBNet x4, L1)."""
    gan_preset: str = "esrgan_gan_x4"
    """``sr train --preset`` of the GAN stage (RRDBNet vs the 128 px VGG-style discriminator, VGG19 conv5_4)."""
    train_overrides: tuple = ("data.batch_size=4", "data.num_workers=2")
    """Overrides of both stages (the published batch of 16 is cut to 4: the check wants steps, not samples)."""
    gan_overrides: tuple = ()
    """More overrides of the GAN stage."""
    checkpoint_every: int = 10
    """The preempted run gets SIGTERM once this step's checkpoint is complete."""
    steps_after_resume: int = 30
    """Steps the resumed PSNR-stage run trains past the step it was stopped at."""
    gan_steps: int = 30
    """Steps of the GAN stage (one straight run)."""
    batch_images: int = 300
    """Inputs of the ``sr batch`` step (crops of the photographs)."""
    batch_side: int = 128
    """Their side in pixels (x4: 512x512 outputs)."""


GPU = Sizes()
REHEARSAL = Sizes(
    variants={"rrdbnet": "small", COMPACT: "tiny"}, seed=1, photo_crop=32, tile=16, repeats=1,
    psnr_preset="tiny", gan_preset="tiny", train_overrides=("data.num_workers=0",),
    gan_overrides=("train.stage=gan",), checkpoint_every=2, steps_after_resume=6, gan_steps=3,
    batch_images=8, batch_side=24,
)


@dataclass
class Context:
    rehearsal: bool
    workdir: Path
    deadline: float
    """time.monotonic() by which the step must be done (its hard limit, less a margin)."""
    model_files: dict = field(default_factory=dict)
    vgg_weights: str = ""

    @property
    def sizes(self) -> Sizes:
        return REHEARSAL if self.rehearsal else GPU

    @property
    def device(self) -> str:
        return "cpu" if self.rehearsal else "cuda"

    def remaining(self) -> float:
        return max(1.0, self.deadline - time.monotonic())

    def capability(self) -> tuple[int, int] | None:
        import torch

        return None if self.rehearsal else torch.cuda.get_device_capability(0)

    def default_precision(self) -> str:
        from sr_core.precision import choose_precision

        return choose_precision(self.device, self.capability())

    def env(self, num_gpus: int = 1) -> dict:
        """The environment of the commands a step starts: the first ``num_gpus`` GPUs
        only (a local Ray or a launcher would take them all)."""
        env = dict(os.environ)
        env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
        env["PYTHONUNBUFFERED"] = "1"
        if self.rehearsal:
            env["OMP_NUM_THREADS"] = "1"
        else:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(visible_gpus()[:num_gpus])
        return env


def visible_gpus() -> list[str]:
    """The GPU ids this check may use: ``CUDA_VISIBLE_DEVICES`` as given, else all."""
    given = os.environ.get("CUDA_VISIBLE_DEVICES")
    if given is not None:
        return [g.strip() for g in given.split(",") if g.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def available(arch: str) -> bool:
    from sr_core.archs import GENERATORS

    return arch in GENERATORS


def build_model(ctx: Context, arch: str):
    """The generator of ``arch``: from ``--rrdb-model`` / ``--compact-model``, or the
    published shape with seeded random weights. Always on the CPU, in eval mode."""
    import torch

    from sr_core import build_generator, load_generator

    if ctx.model_files.get(arch):
        return load_generator(ctx.model_files[arch])
    torch.manual_seed(ctx.sizes.seed)
    return build_generator(arch, ctx.sizes.variants[arch], scale=4).eval()


def model_label(ctx: Context, arch: str) -> str:
    if ctx.model_files.get(arch):
        return f"{arch} x4 from {os.path.basename(ctx.model_files[arch])}"
    return f"{arch} {ctx.sizes.variants[arch]} x4, random weights (seed {ctx.sizes.seed})"


def model_file(ctx: Context, arch: str) -> str:
    """A model file for the commands: the one given, or the random model saved once."""
    if ctx.model_files.get(arch):
        return ctx.model_files[arch]
    from sr_core import save_generator

    path = ctx.workdir / "models" / f"{arch}-x4.safetensors"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        save_generator(build_model(ctx, arch), str(path), note="sr-cloud gpu check, random weights")
    return str(path)


def photos(ctx: Context):
    from infra.gpucheck.workloads import load_photos

    return load_photos(ctx.sizes.photo_crop)
