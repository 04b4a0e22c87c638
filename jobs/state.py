"""The training state — networks, EMA, losses, data, TensorBoard, the step — built from a
config (the job's set-up), and saved to and restored from a checkpoint.

Set-up, in order (every rank): the backend and its Accelerator (processes, devices,
precision); the checkpoint to resume from (rank 0 picks it for every rank: its model
checked against the config and its files against COMPLETE, before any model is built);
the networks, made from ``train.seed`` in a fixed order so that every rank
and every resumed run builds the same ones, the EMA of the generator and the losses;
the training loader and the validation set, every validation image checked and scored
against bicubic; the resumed checkpoint's state; then on rank 0 ``RUN/config.yaml`` and
the TensorBoard writer, and the log's header.

Checkpoint layout (``jobs.checkpoint``): rank 0's ``state.pt`` holds the step, the
best validation PSNR, the generator and EMA weights (fp32), the config, and what the
backend adds (``jobs.engines``); every rank's ``rank_R.pt`` holds its RNG states, its
loader position and a digest of its weights (a correct data-parallel run has the same
digest on every rank). Every file goes through one ``ckpt.CheckpointWriter``, the
backend's included, so rank 0's COMPLETE records the size and SHA-256 of all of them,
and a write that fails on any rank stops every rank on one line. What Accelerate's
``save_state`` would do instead is not used: it pickles RNG states and writes local
paths only, while checkpoints here are read with ``weights_only=True`` from any fsspec
URL; and the loader's position is ours (a stream that is a function of seed, epoch,
rank and position, see ``jobs.data``), resumed without reading the batches before it.
"""

from __future__ import annotations

import hashlib
import math
import socket
from dataclasses import dataclass

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from jobs import checkpoint as ckpt
from jobs import config as config_module
from jobs import validation
from jobs.config import Config
from jobs.data import TrainLoader, ValidationDataset, build_train_loader, build_val_dataset
from jobs.degrade import DeviceDegradation
from jobs.engines import (
    BACKENDS,
    DDPBackend,
    DDPNetwork,
    DeepSpeedBackend,
    DeepSpeedNetwork,
    fp32_state_dict,
    resolve_precision,
    sync_buffers,
)
from jobs.progress import log
from jobs.tblog import TensorBoardLog
from sr_core import build_discriminator, build_generator, storage
from sr_core.losses import GANLoss, PerceptualLoss, build_pixel_loss

Network = DDPNetwork | DeepSpeedNetwork


@dataclass
class TrainingState:
    """Everything the train loop works on, built by :func:`build_state`."""

    config: Config
    backend: DDPBackend | DeepSpeedBackend
    accelerator: Accelerator
    precision: str
    generator: Network
    discriminator: Network | None
    """None in the ``psnr`` stage."""
    ema: AveragedModel | None
    """Exponential moving average of the generator (``train.ema_decay`` > 0)."""
    multihead: bool
    pixel_loss: torch.nn.Module
    perceptual_loss: torch.nn.Module | None
    gan_loss: GANLoss | None
    loader: TrainLoader
    val_set: ValidationDataset | None
    bicubic_scores: dict[str, float] | None
    """Bicubic's validation scores, the baseline printed beside the model's."""
    tb: TensorBoardLog | None
    """Rank 0's TensorBoard writer; None on other ranks."""
    degrader: DeviceDegradation | None = None
    """The second-order degradation made in the step (``degradation.enabled``)."""
    step: int = 0
    """Optimizer steps done."""
    best_psnr: float = -math.inf

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def networks(self) -> dict[str, Network | None]:
        """The trained networks by their checkpoint names."""
        return {"g": self.generator, "d": self.discriminator}

    def modules(self) -> list[torch.nn.Module | None]:
        """The plain modules of the generator, the discriminator and the EMA."""
        return [self.generator.module, self.discriminator.module if self.discriminator else None,
                self.ema.module if self.ema is not None else None]


def build_state(config: Config, resume: str) -> TrainingState:
    """The job's set-up (see the module docstring); ``resume`` is ``''``, ``auto`` or a
    checkpoint folder."""
    train, model, loss, optim = config.train, config.model, config.loss, config.optim
    cuda = torch.cuda.is_available()
    precision = resolve_precision(train.precision, cuda, model.generator)
    backend = BACKENDS[train.backend](config, precision, cuda)
    accelerator = backend.accelerator
    device = accelerator.device
    gan = train.stage == "gan"
    # Before any model is built: a checkpoint of another model is refused in a second, and
    # a damaged one is passed over for the previous intact one (with a warning).
    folder = ckpt.find_resume(train.run_dir, resume, config, accelerator.process_index,
                              warn=lambda text: log(accelerator, text))

    torch.manual_seed(train.seed)
    generator = build_generator(model.generator, model.generator_variant or None, scale=config.data.scale,
                                **model.generator_options)
    if train.pretrained:
        ckpt.load_pretrained(generator, train.pretrained, model.generator_variant)
    discriminator = build_discriminator(model.discriminator, model.discriminator_variant or None,
                                        **model.discriminator_options) if gan else None
    perceptual_loss = None
    if gan and loss.perceptual_weight > 0:
        perceptual_loss = PerceptualLoss(loss.perceptual_layers, criterion=loss.perceptual_criterion,
                                         weights=None if loss.random_vgg else loss.vgg_weights).to(device).eval()
    generator.to(device)
    ema = None
    if train.ema_decay > 0:
        # Made before a DeepSpeed engine converts the generator to fp16/bf16: the average
        # stays fp32. The first update copies the start weights (torch's EMA convention);
        # every later one is ema = decay * ema + (1 - decay) * weights.
        ema = AveragedModel(generator, multi_avg_fn=get_ema_multi_avg_fn(train.ema_decay)).eval()
        ema.requires_grad_(False)
        ema.update_parameters(generator)

    def adam(module, lr, betas, weight_decay):
        return torch.optim.Adam(module.parameters(), lr=lr, betas=betas, weight_decay=weight_decay)

    generator_net = backend.network(generator, adam(generator, optim.lr_g, optim.betas_g, optim.weight_decay_g))
    discriminator_net = backend.network(
        discriminator, adam(discriminator, optim.lr_d, optim.betas_d, optim.weight_decay_d)) if gan else None

    loader = build_train_loader(config.data, accelerator.process_index, accelerator.num_processes, device=str(device),
                                gt_only=config.degradation.enabled)
    val_set = build_val_dataset(config.data)
    state = TrainingState(
        config=config, backend=backend, accelerator=accelerator, precision=precision,
        generator=generator_net, discriminator=discriminator_net, ema=ema,
        multihead=model.generator == "multihead_rrdbnet",
        pixel_loss=build_pixel_loss(loss.pixel), perceptual_loss=perceptual_loss,
        gan_loss=GANLoss(loss.gan, loss_weight=loss.gan_weight) if gan else None,
        loader=loader, val_set=val_set, bicubic_scores=None, tb=None,
        degrader=DeviceDegradation(config, accelerator.process_index, device) if config.degradation.enabled else None,
    )
    try:
        if val_set is not None:
            state.bicubic_scores = validation.bicubic_baseline(val_set, accelerator)
        if folder:
            load_checkpoint(state, folder)
        if state.is_main:
            storage.write_bytes(storage.join(train.run_dir, "config.yaml"),
                                yaml.safe_dump(config_module.to_dict(config), sort_keys=False).encode())
            state.tb = TensorBoardLog(train.run_dir, train.sync_tensorboard_seconds)
    except BaseException:
        loader.close()
        raise
    log_header(state, folder)
    return state


def log_header(state: TrainingState, resumed_from: str | None) -> None:
    """The first lines of the log: what runs where, on what data."""
    config, accelerator, device = state.config, state.accelerator, state.accelerator.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    devices = gather_object([f"{socket.gethostname()}:{device}({name})"])
    world = accelerator.num_processes
    effective = config.data.batch_size * world * config.train.grad_accum_steps
    data = config.data.train_shards or f"{config.data.train_hr} + {config.data.train_lr}"
    validation_set = "none"
    if state.val_set is not None:
        validation_set = (f"{config.data.val_folder} ({len(state.val_set)} images, bicubic PSNR-Y "
                          f"{state.bicubic_scores['psnr_bicubic']:.2f} dB)")
    lines = [
        f"world size {world}, backend {state.backend.describe()}, precision {state.precision}, "
        f"distributed {accelerator.distributed_type}",
        f"devices: {', '.join(devices)}",
        f"effective batch {effective} = {config.data.batch_size} per rank x {world} ranks x "
        f"{config.train.grad_accum_steps} accumulated; GT {config.data.gt_size} px, x{config.data.scale}",
        f"data: {data} ({len(state.loader.dataset)} samples), validation: {validation_set}",
        f"stage {config.train.stage}: {config.model.generator} ({config.model.generator_variant})"
        + (f" vs {config.model.discriminator} ({config.model.discriminator_variant})" if state.discriminator else "")
        + f"; run {config.train.run_dir}; "
        + (f"resumed from {resumed_from} at step {state.step}" if resumed_from else "fresh start"),
    ]
    for line in lines:
        log(accelerator, line)


# ---------------------------------------------------------------- checkpoints


def weights_digest(state: TrainingState) -> str:
    """SHA-256 of this rank's networks (G, D, EMA: parameters and buffers), saved per rank:
    every rank of a correct data-parallel run holds the same weights."""
    digest = hashlib.sha256()
    for module in state.modules():
        if module is not None:
            for name, tensor in sorted(module.state_dict().items()):
                digest.update(name.encode())
                digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def save_checkpoint(state: TrainingState, step: int) -> str:
    """Every rank writes its part; rank 0 marks the folder complete after all have (or,
    when a write failed anywhere, every rank raises the same one line)."""
    train = state.config.train
    rank = state.accelerator.process_index
    writer = ckpt.CheckpointWriter(train.run_dir, step, rank, state.config)
    sync_buffers(state.accelerator, state.modules())
    backend_state = state.backend.save(state.networks, writer)
    mine = {"rng": ckpt.rng_state(), "loader": state.loader.state_dict(), "digest": weights_digest(state)}
    if state.degrader is not None:  # the pair pool: part of the data position
        mine["degradation"] = state.degrader.state_dict()
    writer.save_torch(f"rank_{rank}.pt", mine)
    if state.is_main:
        writer.save_torch("state.pt", {
            "step": step, "best_psnr": state.best_psnr, "g": fp32_state_dict(state.generator.module),
            "ema": fp32_state_dict(state.ema.module) if state.ema is not None else None,
            "config": config_module.to_dict(state.config), **backend_state})
    writer.finish()  # collective: COMPLETE, or every rank stops on one line
    if state.is_main:
        ckpt.prune(train.run_dir, train.keep_checkpoints)
        if state.tb:
            state.tb.sync()
    return writer.folder


def load_checkpoint(state: TrainingState, folder: str) -> None:
    saved = ckpt.load_torch(f"{folder}/state.pt")
    state.generator.module.load_state_dict(saved["g"])
    if state.ema is not None and saved["ema"] is not None:
        state.ema.module.load_state_dict(saved["ema"])
    state.backend.load(state.networks, folder, saved)
    state.step = int(saved["step"])
    state.best_psnr = float(saved["best_psnr"])
    rank = state.accelerator.process_index
    rank_file = f"{folder}/rank_{rank}.pt"
    if storage.exists(rank_file):
        mine = ckpt.load_torch(rank_file)
        state.loader.load_state_dict(mine["loader"])
        ckpt.set_rng_state(mine["rng"])
        if state.degrader is not None and "degradation" in mine:
            state.degrader.load_state_dict(mine["degradation"])
    else:  # more ranks than the checkpoint had: this one starts its data epoch over
        log(state.accelerator, f"{rank_file} does not exist (the world size changed): rank {rank} restarts its epoch")
