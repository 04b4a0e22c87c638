"""Typed configuration for the training job.

Each section is a dataclass whose fields carry their documentation as a docstring
right below them (read back by :func:`field_docs`). A config is built from a preset,
then a YAML file, then dotted overrides from the command line (``data.gt_size=128``),
in that order. An unknown key or a value of the wrong type is a ``ValueError`` that
names the field; nothing is silently defaulted.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import re
import textwrap
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Union

from sr_core.errors import MAX_SHOWN, shown
from sr_core.precision import PRECISIONS
from sr_core.realdegrade import SECOND_STAGE, RealDegradationOptions, StageOptions


@dataclass
class DataConfig:
    """Where training crops come from and how they are made."""

    train_shards: str = ""
    """Prefix written by ``sr prepare`` (holds ``index.json`` and the shards), any fsspec
    URL. Leave empty when training from paired folders (``train_hr`` + ``train_lr``)."""

    train_hr: str = ""
    """Folder or prefix of HR images for paired training (with ``train_lr``)."""

    train_lr: str = ""
    """Folder or prefix of LR images matching ``train_hr`` by name (DIV2K layout:
    ``X4/0001x4.png`` beside ``0001.png``; ``0001.png`` also matches)."""

    gt_size: int = 128
    """Side of the HR (ground-truth) crop in pixels; a multiple of ``scale``, at most 4096."""

    scale: int = 4
    """Upscaling factor: LR crops are ``gt_size / scale`` pixels. 1 to 8 (each generator
    takes some of these: RRDBNet 1, 2, 4, 8; compact 1-4; SRResNet 2, 4, 8)."""

    batch_size: int = 16
    """Crops per batch on each rank (the global batch is this times the world size); 1 to 4096."""

    num_workers: int = 4
    """DataLoader worker processes per rank (0 reads in the training process); at most 256."""

    prefetch_factor: int = 2
    """Batches each worker prepares ahead of the training loop; 1 to 64."""

    samples_per_transfer: int = 32
    """Workers hand batches to the training process in groups of at least this many
    samples: each hand-over costs the training loop about a millisecond whatever its size,
    which matters only for small models (the crops and their order do not change). 1 to 4096."""

    seed: int = 0
    """Seed of shard order, sample order, crops and augmentations: the stream of crops is
    a function of (seed, epoch, rank, world size)."""

    shuffle_window_shards: int = 4
    """Samples are shuffled within windows of this many consecutive shards of a rank, so
    a worker reads a few shards at a time instead of all of them at once. At least 1."""

    hflip_prob: float = 0.5
    """Probability of a horizontal flip (applied to LR and HR alike)."""

    vflip_prob: float = 0.5
    """Probability of a vertical flip (applied to LR and HR alike)."""

    transpose_prob: float = 0.5
    """Probability of swapping height and width; with both flips this gives all eight
    rotations/reflections (rot90 = transpose + flip)."""

    degradation_probs: dict[str, float] = field(default_factory=dict)
    """Probability of each LR-only degradation from ``sr_core.degradations`` (``jpeg``,
    ``gaussian_noise``, ``gaussian_blur``, ``coarse_dropout``); empty means the LR is
    plain bicubic, the published convention."""

    cache_dir: str = ""
    """Local folder where shards read from remote storage are cached (shared by the
    DataLoader workers). Empty means ``~/.cache/sr-cloud/shards``."""

    cache_max_gb: float = 50.0
    """Size limit of the shard cache (above 0); least recently used shards are evicted beyond it."""

    val_folder: str = ""
    """Folder or prefix of HR validation images (Set5/Set14/BSD100/DIV2K-valid layouts:
    just the HR images); LR is made by bicubic downscaling. Empty means no validation."""

    val_center_crop: int = 0
    """Validate on centre crops of this size, a positive multiple of ``scale`` up to 16384
    (0: whole images, cropped to a multiple of ``scale``)."""


@dataclass
class ModelConfig:
    """Which generator (and, for the GAN stage, discriminator) is trained."""

    generator: str = "rrdbnet"
    """Generator registry name (``sr_core.archs.GENERATORS``): ``rrdbnet``,
    ``multihead_rrdbnet``, ``srresnet`` or ``srvgg_compact``. Its scale is ``data.scale``."""

    generator_variant: str = "esrgan"
    """Named hyperparameter set of the generator (``sr_core.archs.VARIANTS``: ``esrgan``,
    ``small``, ``tiny``, ``srgan``, ``realesr_general``...; not to be confused with
    ``sr train --preset``)."""

    generator_options: dict[str, Union[bool, int, float, str]] = field(default_factory=dict)
    """Generator hyperparameters that override the variant (e.g. ``{num_block: 4}``)."""

    discriminator: str = "vgg_style"
    """Discriminator registry name (``sr_core.archs.DISCRIMINATORS``), used by the GAN
    stage: ``vgg_style`` (128 px crops, ESRGAN's), ``vgg_style_any``, ``srgan``, ``unet_sn``."""

    discriminator_variant: str = "esrgan"
    """Named hyperparameter set of the discriminator (``sr_core.archs.VARIANTS``)."""

    discriminator_options: dict[str, Union[bool, int, float, str]] = field(default_factory=dict)
    """Discriminator hyperparameters that override its variant."""


@dataclass
class LossConfig:
    """The generator's objective: ``pixel_weight * pixel + perceptual_weight * VGG +
    gan_weight * adversarial`` (the last two in the GAN stage only)."""

    pixel: str = "l1"
    """Pixel loss: ``l1`` (ESRGAN), ``mse`` (SRResNet/SRGAN) or ``charbonnier``."""

    pixel_weight: float = 1.0
    """Weight of the pixel loss (ESRGAN's GAN stage: 1e-2); 0 to 1e4."""

    perceptual_weight: float = 0.0
    """Weight of the VGG19 perceptual loss, 0 to 1e4; 0 turns it off (ESRGAN's GAN stage: 1.0)."""

    perceptual_layers: dict[str, float] = field(default_factory=lambda: {"conv5_4": 1.0})
    """VGG19 layers (before activation) and their weights, each > 0; ESRGAN uses ``conv5_4``."""

    perceptual_criterion: str = "l1"
    """Distance between VGG features: ``l1`` (ESRGAN) or ``l2`` (SRGAN)."""

    vgg_weights: str = ""
    """Path or URL of torchvision's ImageNet VGG19 state dict (``vgg19-dcbb9e9d.pth``), needed
    whenever ``perceptual_weight`` > 0."""

    random_vgg: bool = False
    """Use a randomly initialised VGG19 instead of ``vgg_weights``: only for tests and
    demos (the perceptual loss then means nothing)."""

    gan: str = "ragan"
    """Adversarial loss: ``ragan`` (relativistic average, ESRGAN), ``vanilla`` (SRGAN),
    ``lsgan`` or ``hinge``."""

    gan_weight: float = 5e-3
    """Weight of the adversarial term in the generator's loss, 0 to 1e4 (ESRGAN: 5e-3; SRGAN: 1e-3)."""


@dataclass
class OptimConfig:
    """Adam for both networks and a learning-rate schedule that is a function of the step
    alone (so raising ``train.max_steps`` and resuming continues the same curve)."""

    lr_g: float = 2e-4
    """Generator learning rate, above 0 and at most 1e30 (float32 holds its steps)."""

    lr_d: float = 1e-4
    """Discriminator learning rate (GAN stage), above 0 and at most 1e30."""

    betas_g: tuple[float, float] = (0.9, 0.99)
    """Adam betas of the generator, each in [0, 1) (BasicSR: 0.9, 0.99)."""

    betas_d: tuple[float, float] = (0.9, 0.99)
    """Adam betas of the discriminator."""

    weight_decay_g: float = 0.0
    """Adam weight decay of the generator, 0 to 1."""

    weight_decay_d: float = 0.0
    """Adam weight decay of the discriminator, 0 to 1."""

    schedule: str = "multistep"
    """``constant``, ``multistep`` (multiply by ``gamma`` at each of ``milestones``) or
    ``cosine_restart`` (cosine from the lr to ``eta_min`` over each of ``periods``)."""

    milestones: list[int] = field(default_factory=list)
    """Steps at which ``multistep`` multiplies the learning rates by ``gamma`` (increasing,
    positive)."""

    gamma: float = 0.5
    """Factor applied at each milestone, above 0 and at most 1."""

    periods: list[int] = field(default_factory=list)
    """Lengths of the ``cosine_restart`` cycles, in steps, each at least 1 (after the last one
    the lr stays at ``eta_min``)."""

    eta_min: float = 1e-7
    """Lowest learning rate of ``cosine_restart``: 0 up to the learning rates themselves."""

    warmup_steps: int = 0
    """Linear warm-up from 0 over this many steps (0: none; at most 999,999,999)."""

    grad_clip: float = 0.0
    """Clip each network's gradient norm to this value (>= 0); 0 disables clipping (ESRGAN does not clip)."""


@dataclass
class TrainConfig:
    """The run: where it lives, how long it is, how it is distributed and checkpointed."""

    run_dir: str = ""
    """Folder of the run (any fsspec URL, e.g. ``gs://bucket/runs/esrgan-psnr``): config.yaml,
    checkpoints/, tb/ and the exported models go there."""

    stage: str = "psnr"
    """``psnr`` (generator only, pixel loss) or ``gan`` (generator + discriminator)."""

    max_steps: int = 1000
    """Optimizer steps to train, 1 to 999,999,999 (checkpoint folders are named with nine
    digits); raise it and resume to continue a finished run."""

    pretrained: str = ""
    """Generator file the run starts from (the GAN stage starts from the PSNR stage's
    ``model.safetensors``); empty starts from random weights."""

    grad_accum_steps: int = 1
    """Batches whose gradients are accumulated per optimizer step (effective batch =
    ``data.batch_size`` x world size x this); 1 to 4096."""

    ema_decay: float = 0.999
    """Decay of the exponential moving average of the generator (BasicSR: 0.999); 0 turns
    the EMA off."""

    seed: int = 0
    """Seed of the networks' initialisation, 0 to 2**64 - 1 (torch's seed is 64-bit unsigned;
    ``data.seed`` seeds the data)."""

    checkpoint_every: int = 5000
    """Steps between checkpoints, at least 1 (a checkpoint is also written at the end and on SIGTERM)."""

    keep_checkpoints: int = 3
    """Complete checkpoints kept, at least 1 (the best by validation PSNR is kept as well)."""

    val_every: int = 5000
    """Steps between validations on ``data.val_folder`` (and at the end), at least 1."""

    log_every: int = 100
    """Steps between TensorBoard scalar logs, at least 1."""

    num_val_images_logged: int = 3
    """Validation images shown in TensorBoard as bicubic | SR | HR grids, 0 to 64."""

    sync_tensorboard_seconds: float = 60.0
    """How often TensorBoard files written locally are copied to ``RUN/tb`` on remote storage
    (seconds, above 0)."""

    backend: str = "ddp"
    """``ddp`` (PyTorch DistributedDataParallel) or ``deepspeed`` (ZeRO, see ``zero_stage``)."""

    zero_stage: int = 2
    """DeepSpeed ZeRO stage (0, 1 or 2) when ``backend`` is ``deepspeed``."""

    deepspeed_config: str = ""
    """A DeepSpeed JSON file used for both networks (overrides ``zero_stage``; batch sizes,
    accumulation, clipping and precision are filled in from this config)."""

    precision: str = "auto"
    """``auto`` (fp16 with dynamic loss scaling on V100 / compute capability 7.x, bf16 on 8.0+;
    on CPUs with bf16 hardware, AMX or AVX512-BF16, bf16 for the compact generator
    (``srvgg_compact``); fp32 otherwise), ``fp32``, ``fp16`` or ``bf16``. Losses and metrics run in fp32."""

    progress: bool = True
    """Show a progress bar with ETA on rank 0."""


@dataclass
class RealDegradationConfig:
    """Real-ESRGAN's second-order degradation (``sr_core.realdegrade``), made from the GT
    batch on the training device inside the step, with a pool of pairs that mixes
    batches. The defaults are Real-ESRGAN x4plus's published values."""

    enabled: bool = False
    """Make the LR by the second-order model instead of bicubic downscaling (the loader
    then delivers GT crops only; ``data.degradation_probs`` must be empty)."""

    first: StageOptions = field(default_factory=StageOptions)
    """The first blur -> resize -> noise -> JPEG pass (fields: ``blur_prob``,
    ``kernel_prob``, ``sinc_prob``, ``blur_sigma``, ``betag``, ``betap``, ``resize_prob``,
    ``resize_range``, ``gaussian_noise_prob``, ``noise_range``, ``poisson_scale_range``,
    ``gray_noise_prob``, ``jpeg_range``; e.g. ``degradation.first.noise_range=[1,30]``)."""

    second: StageOptions = field(default_factory=lambda: SECOND_STAGE)
    """The second pass, same fields (published: blur_prob 0.8, sigma 0.2-1.5, resize
    0.3/0.4/0.3 over 0.3-1.2, noise sigma 1-25, Poisson 0.05-2.5)."""

    kernel_sizes: tuple[int, ...] = (7, 9, 11, 13, 15, 17, 19, 21)
    """Odd blur kernel sizes, drawn uniformly."""

    final_sinc_prob: float = 0.8
    """Probability of the final sinc filter (per sample)."""

    usm_gt: bool = True
    """Sharpen the GT by unsharp masking for the pixel and perceptual losses (the
    discriminator sees the unsharpened GT)."""

    pool_size: int = 180
    """Degraded pairs kept to mix batches (Real-ESRGAN's queue); a multiple of
    ``data.batch_size``; 0 turns the pool off. It is saved in every checkpoint (uint8)
    so that a resumed run continues exactly."""

    num_images_logged: int = 4
    """Crops shown in TensorBoard's ``degraded/`` grid (LR | output | GT) at each
    validation; 0 for none."""

    def options(self, scale: int) -> RealDegradationOptions:
        return RealDegradationOptions(scale=scale, first=self.first, second=self.second,
                                      kernel_sizes=tuple(self.kernel_sizes), final_sinc_prob=self.final_sinc_prob,
                                      usm_gt=self.usm_gt)


@dataclass
class Config:
    """The training job's configuration."""

    data: DataConfig = field(default_factory=DataConfig)
    """Training and validation data."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """Generator and discriminator."""

    loss: LossConfig = field(default_factory=LossConfig)
    """Loss terms and weights."""

    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizers and learning-rate schedules."""

    train: TrainConfig = field(default_factory=TrainConfig)
    """The run itself."""

    degradation: RealDegradationConfig = field(default_factory=RealDegradationConfig)
    """Real-ESRGAN's second-order degradation of the training pairs (off by default)."""


# Presets are plain override dicts applied before the config file. The published ones
# carry the papers' and BasicSR's reference values (options/train/ESRGAN/*.yml,
# options/train/SRResNet_SRGAN/*.yml).
_ESRGAN_GAN = {
    # ESRGAN (Wang et al. 2018), section 4.1, and BasicSR train_ESRGAN_x4.yml: 400k
    # iterations from the PSNR-oriented weights, Adam lr 1e-4 for G and D, betas
    # (0.9, 0.99), lr halved at 50k/100k/200k/300k.
    "train.stage": "gan",
    "train.max_steps": 400_000,
    "train.ema_decay": 0.999,
    "data.gt_size": 128,
    "data.batch_size": 16,
    "model.generator": "rrdbnet",
    "model.generator_variant": "esrgan",
    # VGG-style discriminator on 128 px crops (BasicSR VGGStyleDiscriminator, num_feat 64).
    "model.discriminator": "vgg_style",
    "model.discriminator_variant": "esrgan",
    "optim.lr_g": 1e-4,
    "optim.lr_d": 1e-4,
    "optim.betas_g": [0.9, 0.99],
    "optim.betas_d": [0.9, 0.99],
    "optim.schedule": "multistep",
    "optim.milestones": [50_000, 100_000, 200_000, 300_000],
    "optim.gamma": 0.5,
    # L = L_percep + lambda * L_G^Ra + eta * L_1 with lambda = 5e-3, eta = 1e-2; the
    # perceptual loss on VGG19 conv5_4 before activation, L1 distance, weight 1.
    "loss.pixel": "l1",
    "loss.pixel_weight": 1e-2,
    "loss.perceptual_weight": 1.0,
    "loss.perceptual_layers": {"conv5_4": 1.0},
    "loss.perceptual_criterion": "l1",
    "loss.gan": "ragan",
    "loss.gan_weight": 5e-3,
    "train.checkpoint_every": 5000,
    "train.val_every": 5000,
}

PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    # Seconds per step on a CPU: a tiny RRDBNet x2 on 64 px crops, both stages offline
    # (the GAN stage uses a random VGG, so nothing is downloaded).
    "tiny": {
        "data.gt_size": 64,
        "data.scale": 2,
        "data.batch_size": 4,
        "data.num_workers": 2,
        "data.cache_max_gb": 1.0,
        "model.generator_variant": "tiny",
        "model.discriminator": "vgg_style_any",
        "model.discriminator_variant": "tiny",
        "optim.lr_g": 1e-3,
        "optim.lr_d": 1e-3,
        "loss.random_vgg": True,
        # The GAN stage's perceptual term on an early VGG layer: the published code path
        # at a fraction of conv5_4's cost.
        "loss.perceptual_weight": 1.0,
        "loss.perceptual_layers": {"conv2_2": 1.0},
        "train.max_steps": 200,
        "train.checkpoint_every": 100,
        "train.val_every": 100,
        "train.log_every": 10,
        "train.ema_decay": 0.99,
    },
    # Real-ESRGAN's compact generator at realesr-general-x4v3's size (64 features, 32
    # convolutions), PSNR stage. Real-ESRGAN publishes no training options for its
    # compact models, so the values are those of its published PSNR stage,
    # options/train_realesrnet_x4plus.yml: L1, Adam 2e-4 betas (0.9, 0.99), EMA 0.999,
    # 256 px GT crops, batch 12 per GPU on 4 GPUs, 1M iterations, lr halved at 1M (i.e.
    # constant). LR crops are plain bicubic here (data.degradation_probs adds degradations;
    # Real-ESRGAN's second-order pipeline is not reproduced).
    "compact_x4": {
        "train.stage": "psnr",
        "train.max_steps": 1_000_000,
        "train.ema_decay": 0.999,
        "data.gt_size": 256,
        "data.scale": 4,
        "data.batch_size": 12,
        "model.generator": "srvgg_compact",
        "model.generator_variant": "realesr_general",
        "optim.lr_g": 2e-4,
        "optim.betas_g": [0.9, 0.99],
        "optim.schedule": "multistep",
        "optim.milestones": [1_000_000],
        "optim.gamma": 0.5,
        "loss.pixel": "l1",
        "loss.pixel_weight": 1.0,
        "train.checkpoint_every": 5000,
        "train.val_every": 5000,
    },
    # The CPU demo: Real-ESRGAN's compact generator (`small`: 32 features, 8 convolutions)
    # at x2 beats bicubic on held-out photographs within minutes on 2 cores, because it
    # starts from nearest-neighbour upscaling and learns only the difference. L1 and
    # Adam betas (0.9, 0.99) as BasicSR; the learning rate, step count and EMA decay were
    # chosen by measurement (docs/TRAINING.md). The GAN stage (train.stage=gan) is the
    # `tiny` preset's offline one: a random VGG on conv2_2, a small any-size D.
    "demo_x2": {
        "train.stage": "psnr",
        "data.gt_size": 64,
        "data.scale": 2,
        "data.batch_size": 16,
        "data.num_workers": 2,
        "data.cache_max_gb": 1.0,
        "model.generator": "srvgg_compact",
        "model.generator_variant": "small",
        "model.discriminator": "vgg_style_any",
        "model.discriminator_variant": "tiny",
        # Measured on the demo's data (docs/TRAINING.md): at 1e-3 the held-out PSNR-Y
        # passes bicubic by step 500 and levels off at ~32.9 dB by step 2,000; 5e-4
        # needs 3,000 steps for 32.75 dB; 2e-3 is ~0.1 dB ahead early and equal by 2,000.
        "optim.lr_g": 1e-3,
        "optim.lr_d": 1e-3,
        "optim.betas_g": [0.9, 0.99],
        "optim.schedule": "constant",
        "loss.pixel": "l1",
        "loss.random_vgg": True,
        "loss.perceptual_weight": 1.0,
        "loss.perceptual_layers": {"conv2_2": 1.0},
        "train.max_steps": 2000,
        # BasicSR's 0.999 suits runs of 10^5-10^6 steps; after a few thousand steps such
        # an average still holds much of the random initialisation (measured at lr 5e-4:
        # 29.8 dB at step 1,500 against 0.99's 32.3 dB; the generators were the same, the
        # EMA does not feed back into training).
        "train.ema_decay": 0.99,
        "train.checkpoint_every": 500,
        "train.val_every": 250,
        "train.log_every": 50,
    },
    # ESRGAN's PSNR-oriented RRDB (BasicSR train_RRDBNet_PSNR_x4.yml): L1, Adam 2e-4
    # betas (0.9, 0.99), batch 16 of 128 px GT crops, 1M iterations; the paper halves the
    # lr every 200k iterations (BasicSR's file uses cosine restarts of 250k instead).
    "esrgan_psnr_x4": {
        "train.stage": "psnr",
        "train.max_steps": 1_000_000,
        "data.gt_size": 128,
        "data.scale": 4,
        "data.batch_size": 16,
        "model.generator": "rrdbnet",
        "model.generator_variant": "esrgan",
        "optim.lr_g": 2e-4,
        "optim.betas_g": [0.9, 0.99],
        "optim.schedule": "multistep",
        "optim.milestones": [200_000, 400_000, 600_000, 800_000],
        "optim.gamma": 0.5,
        "loss.pixel": "l1",
        "loss.pixel_weight": 1.0,
        "train.checkpoint_every": 5000,
        "train.val_every": 5000,
    },
    "esrgan_gan_x4": {**_ESRGAN_GAN, "data.scale": 4},
    # The same recipe at x2 / x8 (the generator's x2 input is pixel-unshuffled, BasicSR's
    # RRDBNet convention); GT crops stay 128 px for the 128 px discriminator.
    "esrgan_gan_x2": {**_ESRGAN_GAN, "data.scale": 2},
    "esrgan_gan_x8": {**_ESRGAN_GAN, "data.scale": 8},
    # SRResNet MSE pre-training (Ledig et al. 2017, section 3.2): 1e6 iterations at lr
    # 1e-4, batch 16 of 96 px HR crops, Adam beta1 0.9.
    "srresnet_mse_x4": {
        "train.stage": "psnr",
        "train.max_steps": 1_000_000,
        "data.gt_size": 96,
        "data.scale": 4,
        "data.batch_size": 16,
        "model.generator": "srresnet",
        "model.generator_variant": "srgan",
        "optim.lr_g": 1e-4,
        "optim.betas_g": [0.9, 0.999],
        "optim.schedule": "constant",
        "loss.pixel": "mse",
        "loss.pixel_weight": 1.0,
        "train.ema_decay": 0.0,
    },
    # SRGAN from the SRResNet MSE weights: VGG54 content loss (MSE of features rescaled by
    # 1/12.75, i.e. a weight of 12.75^-2) + 1e-3 vanilla adversarial loss; 1e5 iterations
    # at lr 1e-4 then 1e5 at 1e-5; SRGAN's own discriminator.
    "srgan_x4": {
        "train.stage": "gan",
        "train.max_steps": 200_000,
        "data.gt_size": 96,
        "data.scale": 4,
        "data.batch_size": 16,
        "model.generator": "srresnet",
        "model.generator_variant": "srgan",
        "model.discriminator": "srgan",
        "model.discriminator_variant": "srgan",
        "optim.lr_g": 1e-4,
        "optim.lr_d": 1e-4,
        "optim.betas_g": [0.9, 0.999],
        "optim.betas_d": [0.9, 0.999],
        "optim.schedule": "multistep",
        "optim.milestones": [100_000],
        "optim.gamma": 0.1,
        "loss.pixel": "mse",
        "loss.pixel_weight": 0.0,
        "loss.perceptual_weight": 1 / 12.75**2,
        "loss.perceptual_layers": {"conv5_4": 1.0},
        "loss.perceptual_criterion": "l2",
        "loss.gan": "vanilla",
        "loss.gan_weight": 1e-3,
        "train.ema_decay": 0.0,
    },
    # The multi-head RRDBNet, PSNR stage with ESRGAN's settings: every head gets the L1
    # loss; validation reports each head and the mean of the heads.
    "multihead_x4": {
        "train.stage": "psnr",
        "train.max_steps": 1_000_000,
        "data.gt_size": 128,
        "data.scale": 4,
        "data.batch_size": 16,
        "model.generator": "multihead_rrdbnet",
        "model.generator_variant": "esrgan",
        "optim.lr_g": 2e-4,
        "optim.betas_g": [0.9, 0.99],
        "optim.schedule": "multistep",
        "optim.milestones": [200_000, 400_000, 600_000, 800_000],
        "optim.gamma": 0.5,
        "loss.pixel": "l1",
    },
}


# Real-ESRGAN's recipes (Wang et al. 2021; options/train_realesrnet_x4plus.yml and
# options/train_realesrgan_x4plus.yml): the second-order degradation with its published
# values (RealDegradationConfig's defaults) on 256 px GT crops, batch 12 per GPU on 4
# GPUs, a pool of 180 pairs, the GT sharpened by USM for the pixel and perceptual losses,
# Adam betas (0.9, 0.99), EMA 0.999, lr halved at the last step (i.e. constant).
_REAL_ESRGAN_DATA = {
    "degradation.enabled": True,
    "degradation.pool_size": 180,
    "data.gt_size": 256,
    "data.scale": 4,
    "data.batch_size": 12,
    "train.ema_decay": 0.999,
    "optim.betas_g": [0.9, 0.99],
    "optim.betas_d": [0.9, 0.99],
    "optim.schedule": "multistep",
    "optim.gamma": 0.5,
    "loss.pixel": "l1",
    "loss.pixel_weight": 1.0,
    "train.checkpoint_every": 5000,
    "train.val_every": 5000,
}
# RealESRNet: L1 only, lr 2e-4, 1M iterations, from ESRGAN's x4 weights (set
# train.pretrained to ESRGAN_SRx4_DF2KOST_official-ff704c30.pth or our esrgan_psnr_x4 run).
_REAL_PSNR = {**_REAL_ESRGAN_DATA, "train.stage": "psnr", "train.max_steps": 1_000_000,
              "optim.lr_g": 2e-4, "optim.milestones": [1_000_000]}
# RealESRGAN: from RealESRNet, + perceptual (VGG19 before activation, L1: conv1_2 0.1,
# conv2_2 0.1, conv3_4/4_4/5_4 1.0) + vanilla GAN 0.1 against the U-Net discriminator
# with spectral norm; lr 1e-4 for G and D, 400k iterations.
_REAL_GAN = {**_REAL_ESRGAN_DATA, "train.stage": "gan", "train.max_steps": 400_000,
             "optim.lr_g": 1e-4, "optim.lr_d": 1e-4, "optim.milestones": [400_000],
             "model.discriminator": "unet_sn", "model.discriminator_variant": "realesrgan",
             "loss.perceptual_weight": 1.0, "loss.perceptual_criterion": "l1",
             "loss.perceptual_layers": {"conv1_2": 0.1, "conv2_2": 0.1, "conv3_4": 1.0, "conv4_4": 1.0,
                                        "conv5_4": 1.0},
             "loss.gan": "vanilla", "loss.gan_weight": 0.1}
REAL_PRESETS: dict[str, dict[str, Any]] = {
    "realesrnet_x4plus": {**_REAL_PSNR, "model.generator": "rrdbnet", "model.generator_variant": "esrgan"},
    "realesrgan_x4plus": {**_REAL_GAN, "model.generator": "rrdbnet", "model.generator_variant": "esrgan"},
    # The compact counterpart (realesr-general-x4v3's size) with the same degradations and
    # stages; Real-ESRGAN publishes no options for it, so these are the x4plus values.
    "realesr_general_x4": {**_REAL_PSNR, "model.generator": "srvgg_compact",
                           "model.generator_variant": "realesr_general"},
    "realesr_general_gan_x4": {**_REAL_GAN, "model.generator": "srvgg_compact",
                               "model.generator_variant": "realesr_general"},
    # The CPU demo for real photographs: demo_x2 (the compact `small` x2, 64 px crops,
    # batch 16, lr 1e-3, EMA 0.99) trained on the second-order degradation; chosen by
    # measurement (docs/TRAINING.md, "How demo_real_x2 was chosen").
    # The published ranges are made for x4 on 256-400 px crops: on 64 px x2 crops they
    # destroy most of the image and the model learns to smear (27.5 dB against bicubic's
    # 28.3); these milder ranges (sigma <= 1.2, noise <= 8 then 5, JPEG 50-95, a weak
    # second pass, sinc 0.2, no USM: its sharpened target costs PSNR against the photo)
    # pass bicubic and demo_x2 on the two blurred held-out chains by step 500, on all three
    # by step 1,000, and level off there.
    "demo_real_x2": {
        **PRESETS["demo_x2"],
        "degradation.enabled": True,
        "degradation.pool_size": 192,
        "degradation.usm_gt": False,
        "degradation.final_sinc_prob": 0.2,
        "degradation.first.blur_sigma": [0.2, 1.2],
        "degradation.first.resize_prob": [0.2, 0.4, 0.4],
        "degradation.first.resize_range": [0.7, 1.3],
        "degradation.first.noise_range": [1.0, 8.0],
        "degradation.first.poisson_scale_range": [0.05, 0.6],
        "degradation.first.jpeg_range": [50, 95],
        "degradation.second.blur_prob": 0.3,
        "degradation.second.blur_sigma": [0.2, 0.8],
        "degradation.second.resize_range": [0.8, 1.2],
        "degradation.second.noise_range": [1.0, 5.0],
        "degradation.second.poisson_scale_range": [0.05, 0.4],
        "degradation.second.jpeg_range": [50, 95],
        "train.max_steps": 1000,
    },
}
PRESETS.update(REAL_PRESETS)


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of dataclass ``cls``."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for stmt, nxt in zip(body, body[1:]):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


_EXPONENT_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _check_value(value: Any, hint: Any, name: str) -> Any:
    """Return ``value`` converted to ``hint`` when that is lossless (int -> float),
    else raise ``ValueError`` naming the field."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        if isinstance(value, float) and not math.isfinite(value):
            return _check_value(value, float, name)  # its own message, not "matches none of"
        for option in typing.get_args(hint):
            try:
                return _check_value(value, option, name)
            except ValueError:
                pass
        raise ValueError(f"{name}: {shown(value)} matches none of {hint}")
    if hint is type(None):
        if value is None:
            return None
        raise ValueError(f"{name}: expected null, got {shown(value)}")
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ValueError(f"{name}: expected a mapping of {hint.__name__} fields, got {shown(value)}")
        return _build(hint, value, name + ".")
    if origin is dict:
        key_type, value_type = typing.get_args(hint)
        if not isinstance(value, dict):
            raise ValueError(f"{name}: expected a mapping, got {shown(value)}")
        return {_check_value(k, key_type, f"{name} key"): _check_value(v, value_type, f"{name}.{k}")
                for k, v in value.items()}
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{name}: expected a list of {len(args)} values, got {shown(value)}")
        if len(args) == 2 and args[1] is Ellipsis:
            args = (args[0],) * len(value)
        if len(value) != len(args):
            raise ValueError(f"{name}: expected {len(args)} values, got {len(value)} ({shown(value)})")
        return tuple(_check_value(v, t, f"{name}[{i}]") for i, (v, t) in enumerate(zip(value, args)))
    if origin is list:
        (item_type,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ValueError(f"{name}: expected a list, got {shown(value)}")
        return [_check_value(v, item_type, f"{name}[{i}]") for i, v in enumerate(value)]
    if hint is float:
        # PyYAML follows YAML 1.1, which reads 1e-4 (no dot) as a string.
        if isinstance(value, str) and _EXPONENT_NUMBER.fullmatch(value.strip()):
            value = float(value)  # 1e999 overflows to inf: checked below
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name}: expected a number, got {shown(value)}")
        # JSON's Infinity/NaN and YAML's .inf/.nan: a NaN learning rate trains "fine" to a
        # NaN model, so no config number may be non-finite.
        if not math.isfinite(value):
            raise ValueError(f"{name}: {value} is not a finite number; give a finite value")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name}: expected an integer, got {shown(value)}")
        return value
    if hint in (str, bool):
        if not isinstance(value, hint):
            raise ValueError(f"{name}: expected {hint.__name__}, got {shown(value)}")
        return value
    raise AssertionError(f"config field {name} has an unsupported type {hint}")


_MAX_NAMES_LISTED = 10


def _build(cls: type, values: dict[str, Any], prefix: str = ""):
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known, key=str)
    if unknown:
        # A file of 300k stray keys must not make a megabyte-long error line.
        listed = ", ".join(prefix + str(k)[:80] for k in unknown[:_MAX_NAMES_LISTED])
        more = f" and {len(unknown) - _MAX_NAMES_LISTED} more" if len(unknown) > _MAX_NAMES_LISTED else ""
        raise ValueError(f"unknown config key(s) {listed}{more}; {cls.__name__} has: {', '.join(sorted(known))}")
    kwargs = {k: _check_value(v, hints[k], prefix + k) for k, v in values.items()}
    return cls(**kwargs)


def _nest(flat: dict[str, Any], name_for_errors: str) -> dict[str, Any]:
    """``{"data.gt_size": 64}`` -> ``{"data": {"gt_size": 64}}``."""
    tree: dict[str, Any] = {}
    for dotted, value in flat.items():
        parts = dotted.split(".")
        if not all(parts):
            raise ValueError(f"{name_for_errors}: malformed key {shown(dotted)}")
        node = tree
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"{name_for_errors}: {shown(dotted)} sets a field inside a non-section")
        node[parts[-1]] = value
    return tree


def _merge(base: dict[str, Any], update: dict[str, Any], cls: type) -> dict[str, Any]:
    """``update`` over ``base`` for dataclass ``cls``: a section (a dataclass-typed field)
    is merged field by field; every other value, mappings and lists included, is replaced
    whole (a file's ``degradation_probs: {jpeg: 0.3}`` means exactly that mapping)."""
    hints = typing.get_type_hints(cls)
    out = dict(base)
    for key, value in update.items():
        hint = hints.get(key)  # unknown keys pass through: _build names them
        if (hint is not None and dataclasses.is_dataclass(hint) and isinstance(value, dict)
                and isinstance(out.get(key), dict)):
            out[key] = _merge(out[key], value, hint)
        else:
            out[key] = value
    return out


MAX_DEPTH = 32
"""Deepest nesting of lists and mappings in a config file or an override value. Real
configs nest three levels (section, field, a mapping or list); a value nested
thousands deep is built to exhaust the parser's stack."""

MAX_NODES = 1_000_000
"""Most values and keys (counted through YAML aliases) in a config file or an override;
real configs have about a hundred, and aliases can make a small file describe billions."""

MAX_STRING = 4096
"""Longest string a config value may be (URLs and paths are far shorter)."""

MAX_FILE = 16 << 20
"""Largest config file read (bytes): a config is a few kilobytes; YAML reads about a
megabyte a second."""

MAX_OVERRIDE = 1 << 16
"""Longest ``section.field=value`` override read (characters)."""

MAX_TORCH_SEED = 2**64 - 1
"""The largest seed ``torch.manual_seed`` takes."""


def _check_parsed(value: Any, where: str) -> Any:
    """``value`` as parsed from a file or an override, refused when it nests deeper than
    ``MAX_DEPTH``, holds more than ``MAX_NODES`` values or a string longer than
    ``MAX_STRING`` (walked without recursion)."""
    stack, nodes = [(value, 0, where)], 0
    while stack:
        item, depth, name = stack.pop()
        nodes += 1
        if nodes > MAX_NODES:
            raise ValueError(f"{where}: more than {MAX_NODES} values and keys (YAML aliases expanding?); a "
                             "config has about a hundred")
        if depth > MAX_DEPTH:
            raise ValueError(f"{name}: nested more than {MAX_DEPTH} levels deep; a config nests three")
        if isinstance(item, str) and len(item) > MAX_STRING:
            raise ValueError(f"{name}: a value of {len(item)} characters; config values are at most {MAX_STRING}")
        if isinstance(item, dict):
            stack.extend((v, depth + 1, f"{name}.{str(k)[:80]}") for k, v in item.items())
            stack.extend((k, depth + 1, f"{name} key") for k in item)
        elif isinstance(item, list):
            stack.extend((v, depth + 1, f"{name}[{i}]") for i, v in enumerate(item))
    return value


def _load_text(load, data, what: str, syntax_error: type[Exception], language: str):
    """``load(data)`` (a YAML or JSON parser), every way the text can fail turned into one
    ValueError naming ``what``: a syntax error, nesting past Python's stack, an integer
    past Python's 4300-digit limit."""
    try:
        return load(data)
    except RecursionError:
        raise ValueError(f"{what}: nested too deeply to parse (configs nest three levels)") from None
    except syntax_error as exc:
        raise ValueError(f"{what}: not valid {language} ({' '.join(str(exc).split())[:MAX_SHOWN]})") from None
    except ValueError as exc:  # int() of a number past 4300 digits; the advice after ';' is Python's
        raise ValueError(f"{what}: {str(exc).split(';')[0][:MAX_SHOWN]}") from None


def parse_override(text: str) -> tuple[str, Any]:
    """``"data.gt_size=128"`` -> ``("data.gt_size", 128)``; the value is read as YAML
    (so ``true``, ``0.5``, ``[a, b]`` and ``{jpeg: 0.3}`` mean what they say)."""
    import yaml

    if "=" not in text:
        raise ValueError(f"override {shown(text)} must look like section.field=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if len(key) > MAX_SHOWN:
        raise ValueError(f"override key {shown(key)}: no config field has a name that long")
    if len(raw) > MAX_OVERRIDE:
        raise ValueError(f"override {key}: a value of {len(raw)} characters; config values are at most {MAX_STRING}")
    value = _load_text(yaml.safe_load, raw, f"override {key}", yaml.YAMLError, "YAML") if raw.strip() else ""
    return key, _check_parsed(value, key)


def read_config_file(path: str) -> dict[str, Any]:
    """The mapping in a YAML (``.yaml``/``.yml``) or JSON (``.json``) file, any fsspec URL."""
    import json

    import yaml

    from sr_core import storage

    try:
        data = storage.read_bytes(path)
    except FileNotFoundError:
        raise ValueError(f"config file {path} does not exist") from None
    if len(data) > MAX_FILE:
        raise ValueError(f"{path}: {len(data)} bytes; a config file is a few kilobytes (at most {MAX_FILE})")
    if path.lower().endswith(".json"):
        loaded = _load_text(json.loads, data, path, json.JSONDecodeError, "JSON")
    else:
        loaded = _load_text(yaml.safe_load, data, path, yaml.YAMLError, "YAML") or {}
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: the top level must be a mapping of sections")
    _check_parsed(loaded, path)
    return loaded


def split_config_args(items: list[str]) -> tuple[str | None, list[str]]:
    """``[CONFIG] section.field=value ...`` (what ``sr train`` and ``python -m jobs.train``
    take) -> (the config file or None, the overrides)."""
    path, overrides = None, []
    for i, item in enumerate(items):
        if "=" not in item and i == 0:
            path = item
        elif "=" not in item:
            raise ValueError(f"{shown(item)}: expected section.field=value (only the first argument may be a config file)")
        else:
            overrides.append(item)
    return path, overrides


def load_config(path: str | None = None, overrides: list[str] = (), preset: str = "default") -> Config:
    """Build the config from ``preset``, then the YAML or JSON file at ``path`` (any
    fsspec URL), then ``overrides`` (``section.field=value`` strings)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {shown(preset)}; known: {', '.join(sorted(PRESETS))}")
    values = _merge({}, _nest(PRESETS[preset], f"preset {preset}"), Config)
    if path:
        values = _merge(values, read_config_file(path), Config)
    values = _merge(values, _nest(dict(parse_override(o) for o in overrides), "overrides"), Config)
    config = _build(Config, values)
    validate(config)
    return config


def to_dict(config) -> dict[str, Any]:
    """A config as plain YAML/JSON-safe data (tuples become lists); ``_build`` reads it back."""
    def plain(value):
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(config))


def from_dict(values: dict[str, Any]) -> Config:
    """Inverse of :func:`to_dict` (validated)."""
    config = _build(Config, values)
    validate(config)
    return config


# Upper bounds of counts and sizes: far above any real run, low enough that a typo
# (1e8 workers, a 10^6 px crop) is refused in one line instead of failing deep in torch.
MAX_STEPS = 999_999_999  # checkpoint folders are step_NNNNNNNNN: nine digits
MAX_BATCH = 4096
MAX_CROP = 4096
MAX_VAL_CROP = 16384
MAX_WORKERS = 256
MAX_PREFETCH = 64
MAX_LOSS_WEIGHT = 1e4
MAX_IMAGES_LOGGED = 64


def _check_range(name: str, value, low, high) -> None:
    """``low <= value <= high``, else one line naming the field and its range."""
    if not low <= value <= high:
        raise ValueError(f"{name} must be from {low:,} to {high:,}, got {value!r}")


def validate(config) -> None:
    """Checks that involve several fields or value ranges, section by section."""
    for check in (validate_data, validate_model, validate_loss, validate_optim, validate_train,
                  validate_degradation):
        check(config)


def validate_data(config) -> None:
    d = config.data
    _check_range("data.scale", d.scale, 1, 8)
    if d.gt_size <= 0 or d.gt_size % d.scale:
        raise ValueError(f"data.gt_size ({d.gt_size}) must be a positive multiple of data.scale ({d.scale})")
    _check_range("data.gt_size", d.gt_size, d.scale, MAX_CROP)
    _check_range("data.batch_size", d.batch_size, 1, MAX_BATCH)
    _check_range("data.samples_per_transfer", d.samples_per_transfer, 1, MAX_BATCH)
    if d.seed < 0:
        raise ValueError(f"data.seed must be >= 0 (numpy seeds are non-negative), got {d.seed}")
    _check_range("data.num_workers", d.num_workers, 0, MAX_WORKERS)
    # DataLoader asserts prefetch_factor > 0 (with workers); 0 would be its traceback.
    _check_range("data.prefetch_factor", d.prefetch_factor, 1, MAX_PREFETCH)
    if d.shuffle_window_shards < 1:
        raise ValueError(f"data.shuffle_window_shards must be >= 1, got {d.shuffle_window_shards}")
    if not d.cache_max_gb > 0:
        raise ValueError(f"data.cache_max_gb must be above 0, got {d.cache_max_gb}")
    if d.val_center_crop and (d.val_center_crop % d.scale or not 0 < d.val_center_crop <= MAX_VAL_CROP):
        raise ValueError(f"data.val_center_crop must be 0 (whole images) or a positive multiple of data.scale "
                         f"({d.scale}) up to {MAX_VAL_CROP}, got {d.val_center_crop}")
    for name in ("hflip_prob", "vflip_prob", "transpose_prob"):
        p = getattr(d, name)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"data.{name} must be in [0, 1], got {p}")
    from sr_core.degradations import PROBABILITY_FIELDS

    unknown = sorted(set(d.degradation_probs) - set(PROBABILITY_FIELDS))
    if unknown:
        raise ValueError(f"data.degradation_probs: unknown degradation(s) {unknown}; "
                         f"known: {', '.join(PROBABILITY_FIELDS)}")
    for name, p in d.degradation_probs.items():
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"data.degradation_probs.{name} must be in [0, 1], got {p}")
    if d.train_shards and (d.train_hr or d.train_lr):
        raise ValueError("set either data.train_shards or data.train_hr + data.train_lr, not both")
    if bool(d.train_hr) != bool(d.train_lr):
        raise ValueError("paired training needs both data.train_hr and data.train_lr")


def validate_model(config) -> None:
    from sr_core.archs import DISCRIMINATORS, GENERATORS, VARIANTS

    m = config.model
    for kind, name, variant, registry in (("generator", m.generator, m.generator_variant, GENERATORS),
                                          ("discriminator", m.discriminator, m.discriminator_variant, DISCRIMINATORS)):
        if kind == "discriminator" and config.train.stage != "gan":
            continue
        if not name:
            who = "the GAN stage needs a" if kind == "discriminator" else "the run needs a"
            raise ValueError(f"model.{kind} is empty; {who} {kind}: one of {', '.join(sorted(registry))}")
        if name not in registry:
            raise ValueError(f"model.{kind}: unknown {kind} {name!r}; known: {', '.join(sorted(registry))}")
        if variant and variant not in VARIANTS.get(name, {}):
            raise ValueError(f"model.{kind}_variant: {name} has no variant {variant!r}; known: "
                             f"{', '.join(sorted(VARIANTS.get(name, {})))}")
    if "scale" in m.generator_options:
        raise ValueError("model.generator_options.scale: the scale is data.scale")
    # Every hyperparameter's range and the networks' size, before any process starts
    # (torch would fail on a width of 0 with its own traceback, or build for minutes).
    from sr_core.archs import check_hparams

    checks = [("model.generator_options", m.generator, m.generator_variant,
               {"scale": config.data.scale, **m.generator_options})]
    if config.train.stage == "gan":
        checks.append(("model.discriminator_options", m.discriminator, m.discriminator_variant,
                       m.discriminator_options))
    for field_name, name, variant, options in checks:
        try:
            check_hparams(name, variant or None, **options)
        except ValueError as exc:
            raise ValueError(f"{field_name}: {exc}") from None
    if config.train.stage == "gan":
        d_hparams = {**VARIANTS.get(m.discriminator, {}).get(m.discriminator_variant, {}), **m.discriminator_options}
        input_size = d_hparams.get("input_size")
        if input_size is not None and input_size != config.data.gt_size:
            raise ValueError(f"model.discriminator {m.discriminator!r} ({m.discriminator_variant}) takes "
                             f"{input_size} px crops but data.gt_size is {config.data.gt_size}; use vgg_style_any "
                             "or a matching gt_size")


def validate_loss(config) -> None:
    from sr_core.archs.vgg19 import LAYER_INDEX
    from sr_core.losses import GAN_LOSSES, PIXEL_LOSSES

    lo = config.loss
    if lo.pixel not in PIXEL_LOSSES:
        raise ValueError(f"loss.pixel: unknown pixel loss {lo.pixel!r}; known: {', '.join(sorted(PIXEL_LOSSES))}")
    if lo.gan not in GAN_LOSSES:
        raise ValueError(f"loss.gan: unknown GAN loss {lo.gan!r}; known: {', '.join(sorted(GAN_LOSSES))}")
    for name in ("pixel_weight", "perceptual_weight", "gan_weight"):
        _check_range(f"loss.{name}", getattr(lo, name), 0, MAX_LOSS_WEIGHT)
    if lo.perceptual_criterion not in ("l1", "l2"):
        raise ValueError(f"loss.perceptual_criterion must be l1 or l2, got {lo.perceptual_criterion!r}")
    unknown = sorted(set(lo.perceptual_layers) - set(LAYER_INDEX))
    if unknown:
        raise ValueError(f"loss.perceptual_layers: unknown VGG19 layer(s) {shown(unknown)} (e.g. conv5_4)")
    for layer, weight in lo.perceptual_layers.items():
        if not weight > 0:
            raise ValueError(f"loss.perceptual_layers.{layer} must be > 0 (a layer's weight; leave the layer "
                             f"out, or set loss.perceptual_weight=0 to turn the loss off), got {weight}")
    gan = config.train.stage == "gan"
    if gan and lo.perceptual_weight > 0:
        if not lo.perceptual_layers:
            raise ValueError("loss.perceptual_layers is empty but loss.perceptual_weight > 0")
        if not lo.vgg_weights and not lo.random_vgg:
            raise ValueError("loss.vgg_weights: the perceptual loss needs torchvision's ImageNet VGG19 weights "
                             "(a path or URL of vgg19-dcbb9e9d.pth); set loss.random_vgg=true only for tests")
    if not gan and lo.pixel_weight <= 0:
        raise ValueError("loss.pixel_weight must be > 0 in the psnr stage (it is the only loss there)")


def validate_degradation(config) -> None:
    deg, d = config.degradation, config.data
    try:
        deg.options(d.scale)
    except ValueError as exc:
        raise ValueError(str(exc).replace("degradation ", "degradation.", 1)) from None
    if deg.pool_size < 0 or (deg.enabled and deg.pool_size and deg.pool_size % d.batch_size):
        raise ValueError(f"degradation.pool_size ({deg.pool_size}) must be 0 or a multiple of data.batch_size "
                         f"({d.batch_size})")
    if deg.num_images_logged < 0:
        raise ValueError(f"degradation.num_images_logged must be >= 0, got {deg.num_images_logged}")
    if deg.enabled and d.degradation_probs:
        raise ValueError("degradation.enabled makes the LR itself: leave data.degradation_probs empty")
    if deg.enabled and d.train_lr:
        raise ValueError("degradation.enabled makes the LR from the GT: train from data.train_shards, "
                         "not paired folders (data.train_lr)")


SCHEDULES = ("constant", "multistep", "cosine_restart")


MAX_LR = 1e30
"""Largest learning rate accepted: float32 arithmetic holds its steps."""


def validate_optim(config) -> None:
    o = config.optim
    # Adam turns these into float32 step sizes: past MAX_LR they overflow inside torch
    # ("value cannot be converted to type float"). A large rate below that makes the
    # loss diverge, which the train loop's non-finite-loss stop reports, keeping the
    # last good checkpoint.
    for name in ("lr_g", "lr_d"):
        if not 0 < getattr(o, name) <= MAX_LR:
            raise ValueError(f"optim.{name} must be above 0 and at most {MAX_LR:g}, got {getattr(o, name)}")
    for name in ("weight_decay_g", "weight_decay_d"):
        _check_range(f"optim.{name}", getattr(o, name), 0, 1)
    for name in ("betas_g", "betas_d"):
        if not all(0.0 <= b < 1.0 for b in getattr(o, name)):
            raise ValueError(f"optim.{name} must be two numbers in [0, 1), got {list(getattr(o, name))}")
    if o.schedule not in SCHEDULES:
        raise ValueError(f"optim.schedule must be one of {', '.join(SCHEDULES)}, got {o.schedule!r}")
    if sorted(o.milestones) != list(o.milestones) or any(not 0 < m <= MAX_STEPS for m in o.milestones):
        raise ValueError(f"optim.milestones must be increasing positive steps (at most {MAX_STEPS:,}), "
                         f"got {o.milestones}")
    if o.schedule == "cosine_restart" and (not o.periods or any(not 0 < p <= MAX_STEPS for p in o.periods)):
        raise ValueError(f"optim.periods must be positive cycle lengths (at most {MAX_STEPS:,}) for "
                         f"cosine_restart, got {o.periods}")
    if not 0 < o.gamma <= 1:
        raise ValueError(f"optim.gamma must be above 0 and at most 1 (it lowers the learning rates), got {o.gamma}")
    _check_range("optim.warmup_steps", o.warmup_steps, 0, MAX_STEPS)
    if o.grad_clip < 0:
        raise ValueError(f"optim.grad_clip must be >= 0, got {o.grad_clip}")
    # The cosine runs from each learning rate down to eta_min: above them it would climb.
    top = min(o.lr_g, o.lr_d) if config.train.stage == "gan" else o.lr_g
    if o.schedule == "cosine_restart" and not 0 <= o.eta_min <= top:
        raise ValueError(f"optim.eta_min must be from 0 to the learning rate ({top:g}), got {o.eta_min}")
    if not 0 <= o.eta_min <= 1:
        raise ValueError(f"optim.eta_min must be from 0 to 1, got {o.eta_min}")


STAGES = ("psnr", "gan")
BACKENDS = ("ddp", "deepspeed")


def validate_train(config) -> None:
    t = config.train
    if t.stage not in STAGES:
        raise ValueError(f"train.stage must be one of {', '.join(STAGES)}, got {t.stage!r}")
    if t.stage == "gan" and not t.pretrained:
        raise ValueError("train.pretrained: the GAN stage starts from the PSNR stage's generator; set it to "
                         "that run's model.safetensors")
    if t.backend not in BACKENDS:
        raise ValueError(f"train.backend must be one of {', '.join(BACKENDS)}, got {t.backend!r}")
    if t.precision not in PRECISIONS:
        raise ValueError(f"train.precision must be one of {', '.join(PRECISIONS)}, got {t.precision!r}")
    if t.zero_stage not in (0, 1, 2):
        raise ValueError(f"train.zero_stage must be 0, 1 or 2 (ZeRO-3 shards parameters; the EMA and "
                         f"validation need them whole), got {t.zero_stage}")
    for name in ("max_steps", "grad_accum_steps", "checkpoint_every", "val_every", "log_every", "keep_checkpoints"):
        if getattr(t, name) < 1:
            raise ValueError(f"train.{name} must be >= 1, got {getattr(t, name)}")
    _check_range("train.max_steps", t.max_steps, 1, MAX_STEPS)
    _check_range("train.grad_accum_steps", t.grad_accum_steps, 1, MAX_BATCH)
    if not 0.0 <= t.ema_decay < 1.0:
        raise ValueError(f"train.ema_decay must be in [0, 1), got {t.ema_decay}")
    if not 0 <= t.seed <= MAX_TORCH_SEED:
        raise ValueError(f"train.seed must be in [0, 2**64 - 1] (torch's seed is 64-bit unsigned), "
                         f"got {shown(t.seed)}")
    _check_range("train.num_val_images_logged", t.num_val_images_logged, 0, MAX_IMAGES_LOGGED)
    if not t.sync_tensorboard_seconds > 0:
        raise ValueError(f"train.sync_tensorboard_seconds must be above 0, got {t.sync_tensorboard_seconds}")


def check_inputs(config) -> None:
    """Checks that read storage: the training data, validation folder, pretrained file and
    VGG weights exist (run before any training process starts)."""
    from sr_core import storage

    d, t, lo = config.data, config.train, config.loss
    if not t.run_dir:
        raise ValueError("train.run_dir is required (a folder or URL such as gs://bucket/runs/NAME)")
    if not d.train_shards and not d.train_hr:
        raise ValueError("data.train_shards is empty: point it at the output of `sr prepare` "
                         "(or set data.train_hr + data.train_lr)")
    if d.train_shards:
        index = d.train_shards if d.train_shards.endswith("index.json") else storage.join(d.train_shards, "index.json")
        if not storage.exists(index):
            raise ValueError(f"data.train_shards: {index} does not exist; run `sr prepare SRC {d.train_shards}` first")
    for name, url in (("data.train_hr", d.train_hr), ("data.train_lr", d.train_lr), ("data.val_folder", d.val_folder),
                      ("train.pretrained", t.pretrained),
                      ("loss.vgg_weights", lo.vgg_weights if t.stage == "gan" and lo.perceptual_weight > 0
                       and not lo.random_vgg else "")):
        if url and not storage.exists(url):
            raise ValueError(f"{name}: {url} does not exist")


def reference_markdown() -> str:
    """The config reference (every section's fields, types, defaults and docstrings) as
    Markdown, for docs/TRAINING.md: ``python -m jobs.config``."""
    lines = []
    defaults = Config()
    for section in dataclasses.fields(Config):
        cls = typing.get_type_hints(Config)[section.name]
        lines += [f"### `{section.name}`: {' '.join((cls.__doc__ or '').split())}", "",
                  "| field | type | default | meaning |", "|---|---|---|---|"]
        lines += _reference_rows(cls, getattr(defaults, section.name), section.name)
        lines.append("")
    return "\n".join(lines)


def _reference_rows(cls: type, values, prefix: str) -> list[str]:
    """One table row per field of dataclass ``cls``; a nested section (a dataclass-typed
    field, e.g. ``degradation.first``) gives one row per field of its own."""
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        value, hint = getattr(values, f.name), hints[f.name]
        if dataclasses.is_dataclass(hint):
            rows += _reference_rows(hint, value, f"{prefix}.{f.name}")
            continue
        default = repr(list(value) if isinstance(value, tuple) else value).replace("|", "\\|")
        name = getattr(hint, "__name__", None) if not typing.get_args(hint) else str(hint).replace("typing.", "")
        rows.append(f"| `{prefix}.{f.name}` | {str(name).replace('|', 'or')} | `{default}` | "
                    f"{docs.get(f.name, '').replace('|', '/')} |")
    return rows


if __name__ == "__main__":
    print(reference_markdown())
