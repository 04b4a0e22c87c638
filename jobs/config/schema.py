"""The training job's config schema: one dataclass per section, each field with its type,
default, range and the docstring right below it (the config reference in docs/TRAINING.md
is generated from these: ``python -m jobs.config``).

Choice fields are ``Literal[...]``; numeric bounds are declared beside the field with
:func:`jobs.config.typed.ranged`. Registry names (generators, losses) stay ``str``: they
are checked against the registries in ``sr_core`` that define them. Checks that involve
several fields are in ``jobs/config/checks.py``.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Literal, Union

from jobs.config.typed import ranged
from sr_core.precision import PRECISIONS
from sr_core.realdegrade_options import SECOND_STAGE, RealDegradationOptions, StageOptions

Schedule = Literal["constant", "multistep", "cosine_restart"]
Stage = Literal["psnr", "gan"]
Backend = Literal["ddp", "deepspeed"]
Precision = Literal[PRECISIONS]  # ("auto", "fp32", "fp16", "bf16"), sr_core.precision's one list
SCHEDULES: tuple[str, ...] = typing.get_args(Schedule)
STAGES: tuple[str, ...] = typing.get_args(Stage)
BACKENDS: tuple[str, ...] = typing.get_args(Backend)
"""The training backends; ``jobs.engines.BACKENDS`` maps each to its class."""

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

MAX_LR = 1e30
"""Largest learning rate accepted: Adam turns it into float32 step sizes, which overflow
past it inside torch ("value cannot be converted to type float"). A large rate below
that makes the loss diverge, which the train loop's non-finite-loss stop reports."""

MAX_TORCH_SEED = 2**64 - 1
"""The largest seed ``torch.manual_seed`` takes."""

_PROBABILITY = "in [0, 1]"

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

    gt_size: int = ranged(128, low=1, high=MAX_CROP)
    """Side of the HR (ground-truth) crop in pixels; a multiple of ``scale``, at most 4096."""

    scale: int = ranged(4, low=1, high=8)
    """Upscaling factor: LR crops are ``gt_size / scale`` pixels. 1 to 8 (each generator
    takes some of these: RRDBNet 1, 2, 4, 8; compact 1-4; SRResNet 2, 4, 8)."""

    batch_size: int = ranged(16, low=1, high=MAX_BATCH)
    """Crops per batch on each rank (the global batch is this times the world size); 1 to 4096."""

    num_workers: int = ranged(4, low=0, high=MAX_WORKERS)
    """DataLoader worker processes per rank (0 reads in the training process); at most 256."""

    prefetch_factor: int = ranged(2, low=1, high=MAX_PREFETCH)
    """Batches each worker prepares ahead of the training loop; 1 to 64."""

    samples_per_transfer: int = ranged(32, low=1, high=MAX_BATCH)
    """Workers hand batches to the training process in groups of at least this many
    samples: each hand-over costs the training loop about a millisecond whatever its size,
    which matters only for small models (the crops and their order do not change). 1 to 4096."""

    seed: int = ranged(0, low=0, text=">= 0 (numpy seeds are non-negative)")
    """Seed of shard order, sample order, crops and augmentations: the stream of crops is
    a function of (seed, epoch, rank, world size)."""

    shuffle_window_shards: int = ranged(4, low=1)
    """Samples are shuffled within windows of this many consecutive shards of a rank, so
    a worker reads a few shards at a time instead of all of them at once. At least 1."""

    hflip_prob: float = ranged(0.5, low=0, high=1, text=_PROBABILITY)
    """Probability of a horizontal flip (applied to LR and HR alike)."""

    vflip_prob: float = ranged(0.5, low=0, high=1, text=_PROBABILITY)
    """Probability of a vertical flip (applied to LR and HR alike)."""

    transpose_prob: float = ranged(0.5, low=0, high=1, text=_PROBABILITY)
    """Probability of swapping height and width; with both flips this gives all eight
    rotations/reflections (rot90 = transpose + flip)."""

    degradation_probs: dict[str, float] = ranged(default_factory=dict, low=0, high=1, text=_PROBABILITY)
    """Probability of each LR-only degradation from ``sr_core.degradations`` (``jpeg``,
    ``gaussian_noise``, ``gaussian_blur``, ``coarse_dropout``); empty means the LR is
    plain bicubic, the published convention."""

    cache_dir: str = ""
    """Local folder where shards read from remote storage are cached (shared by the
    DataLoader workers). Empty means ``~/.cache/sr-cloud/shards``."""

    cache_max_gb: float = ranged(50.0, low=0, low_open=True)
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

    pixel_weight: float = ranged(1.0, low=0, high=MAX_LOSS_WEIGHT)
    """Weight of the pixel loss (ESRGAN's GAN stage: 1e-2); 0 to 1e4."""

    perceptual_weight: float = ranged(0.0, low=0, high=MAX_LOSS_WEIGHT)
    """Weight of the VGG19 perceptual loss, 0 to 1e4; 0 turns it off (ESRGAN's GAN stage: 1.0)."""

    perceptual_layers: dict[str, float] = ranged(
        default_factory=lambda: {"conv5_4": 1.0}, low=0, low_open=True,
        text="> 0 (a layer's weight; leave the layer out, or set loss.perceptual_weight=0 to turn the loss off)")
    """VGG19 layers (before activation) and their weights, each > 0; ESRGAN uses ``conv5_4``."""

    perceptual_criterion: Literal["l1", "l2"] = "l1"
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

    gan_weight: float = ranged(5e-3, low=0, high=MAX_LOSS_WEIGHT)
    """Weight of the adversarial term in the generator's loss, 0 to 1e4 (ESRGAN: 5e-3; SRGAN: 1e-3)."""


@dataclass
class OptimConfig:
    """Adam for both networks and a learning-rate schedule that is a function of the step
    alone (so raising ``train.max_steps`` and resuming continues the same curve)."""

    lr_g: float = ranged(2e-4, low=0, high=MAX_LR, low_open=True)
    """Generator learning rate, above 0 and at most 1e30 (float32 holds its steps)."""

    lr_d: float = ranged(1e-4, low=0, high=MAX_LR, low_open=True)
    """Discriminator learning rate (GAN stage), above 0 and at most 1e30."""

    betas_g: tuple[float, float] = ranged((0.9, 0.99), low=0, high=1, high_open=True)
    """Adam betas of the generator, each in [0, 1) (BasicSR: 0.9, 0.99)."""

    betas_d: tuple[float, float] = ranged((0.9, 0.99), low=0, high=1, high_open=True)
    """Adam betas of the discriminator."""

    weight_decay_g: float = ranged(0.0, low=0, high=1)
    """Adam weight decay of the generator, 0 to 1."""

    weight_decay_d: float = ranged(0.0, low=0, high=1)
    """Adam weight decay of the discriminator, 0 to 1."""

    schedule: Schedule = "multistep"
    """``constant``, ``multistep`` (multiply by ``gamma`` at each of ``milestones``) or
    ``cosine_restart`` (cosine from the lr to ``eta_min`` over each of ``periods``)."""

    milestones: list[int] = field(default_factory=list)
    """Steps at which ``multistep`` multiplies the learning rates by ``gamma`` (increasing,
    positive)."""

    gamma: float = ranged(0.5, low=0, high=1, low_open=True,
                          text="above 0 and at most 1 (it lowers the learning rates)")
    """Factor applied at each milestone, above 0 and at most 1."""

    periods: list[int] = field(default_factory=list)
    """Lengths of the ``cosine_restart`` cycles, in steps, each at least 1 (after the last one
    the lr stays at ``eta_min``)."""

    eta_min: float = ranged(1e-7, low=0, high=1, text="from 0 to 1")
    """Lowest learning rate of ``cosine_restart``: 0 up to the learning rates themselves."""

    warmup_steps: int = ranged(0, low=0, high=MAX_STEPS)
    """Linear warm-up from 0 over this many steps (0: none; at most 999,999,999)."""

    grad_clip: float = ranged(0.0, low=0)
    """Clip each network's gradient norm to this value (>= 0); 0 disables clipping (ESRGAN does not clip)."""


@dataclass
class TrainConfig:
    """The run: where it lives, how long it is, how it is distributed and checkpointed."""

    run_dir: str = ""
    """Folder of the run (any fsspec URL, e.g. ``gs://bucket/runs/esrgan-psnr``): config.yaml,
    checkpoints/, tb/ and the exported models go there."""

    stage: Stage = "psnr"
    """``psnr`` (generator only, pixel loss) or ``gan`` (generator + discriminator)."""

    max_steps: int = ranged(1000, low=1, high=MAX_STEPS)
    """Optimizer steps to train, 1 to 999,999,999 (checkpoint folders are named with nine
    digits); raise it and resume to continue a finished run."""

    pretrained: str = ""
    """Generator file the run starts from (the GAN stage starts from the PSNR stage's
    ``model.safetensors``); empty starts from random weights."""

    grad_accum_steps: int = ranged(1, low=1, high=MAX_BATCH)
    """Batches whose gradients are accumulated per optimizer step (effective batch =
    ``data.batch_size`` x world size x this); 1 to 4096."""

    ema_decay: float = ranged(0.999, low=0, high=1, high_open=True)
    """Decay of the exponential moving average of the generator (BasicSR: 0.999); 0 turns
    the EMA off."""

    seed: int = ranged(0, low=0, high=MAX_TORCH_SEED,
                       text="in [0, 2**64 - 1] (torch's seed is 64-bit unsigned)")
    """Seed of the networks' initialisation, 0 to 2**64 - 1 (torch's seed is 64-bit unsigned;
    ``data.seed`` seeds the data)."""

    checkpoint_every: int = ranged(5000, low=1)
    """Steps between checkpoints, at least 1 (a checkpoint is also written at the end and on SIGTERM)."""

    keep_checkpoints: int = ranged(3, low=1)
    """Complete checkpoints kept, at least 1 (the best by validation PSNR is kept as well)."""

    val_every: int = ranged(5000, low=1)
    """Steps between validations on ``data.val_folder`` (and at the end), at least 1."""

    log_every: int = ranged(100, low=1)
    """Steps between TensorBoard scalar logs, at least 1."""

    num_val_images_logged: int = ranged(3, low=0, high=MAX_IMAGES_LOGGED)
    """Validation images shown in TensorBoard as bicubic | SR | HR grids, 0 to 64."""

    sync_tensorboard_seconds: float = ranged(60.0, low=0, low_open=True)
    """How often TensorBoard files written locally are copied to ``RUN/tb`` on remote storage
    (seconds, above 0)."""

    backend: Backend = "ddp"
    """``ddp`` (PyTorch DistributedDataParallel) or ``deepspeed`` (ZeRO, see ``zero_stage``)."""

    zero_stage: int = ranged(2, low=0, high=2, text="0, 1 or 2 (ZeRO-3 shards parameters; the EMA and "
                                                    "validation need them whole)")
    """DeepSpeed ZeRO stage (0, 1 or 2) when ``backend`` is ``deepspeed``."""

    deepspeed_config: str = ""
    """A DeepSpeed JSON file used for both networks (overrides ``zero_stage``; batch sizes,
    accumulation, clipping and precision are filled in from this config)."""

    precision: Precision = "auto"
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

    num_images_logged: int = ranged(4, low=0)
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
