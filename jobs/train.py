"""The training job: ``sr train`` / ``python -m jobs.train`` / ``accelerate launch -m jobs.train``.

Two stages of ESRGAN (and SRGAN, and the multi-head RRDBNet) on Accelerate: stage
``psnr`` trains the generator alone with a pixel loss; stage ``gan`` starts from that
generator and trains it against a discriminator with pixel + VGG19 perceptual +
adversarial losses. DDP by default, DeepSpeed ZeRO 0-2 by config; fp16 with dynamic
loss scaling on V100s, bf16 on Ampere and newer, fp32 on CPU.

The run lives in ``train.run_dir`` (any fsspec URL): ``config.yaml``, ``checkpoints/``,
``tb/`` (TensorBoard), and at the end ``model.safetensors`` / ``model_ema.safetensors``.
``--resume auto`` continues from the newest complete checkpoint (or starts fresh), so a
spot VM's startup command can always pass it; SIGTERM writes a checkpoint and exits 0.

The GPU paths (CUDA devices, NCCL, fp16/bf16) are written but not tested here: the test
machines have no GPU. CPU runs (gloo, fp32) are what the tests run.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import signal
import socket
import sys
import time
from bisect import bisect_right
from dataclasses import dataclass
from typing import Any

from jobs import config as config_module
from jobs.config import Config


# ---------------------------------------------------------------- arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The job's arguments (shared by ``python -m jobs.train`` and ``sr train``)."""
    parser.add_argument("args", nargs="*", metavar="[CONFIG] [section.field=value ...]",
                        help="an optional YAML or JSON config file, then dotted overrides applied over it "
                             "(e.g. train.run_dir=gs://bucket/runs/x4 data.batch_size=8)")
    parser.add_argument("--preset", default="default",
                        help=f"starting values: {', '.join(config_module.PRESETS)} (default: default)")
    parser.add_argument("--resume", default="", metavar="auto|CHECKPOINT",
                        help="'auto': continue from the run's newest complete checkpoint, or start fresh "
                             "when there is none; or a checkpoint folder URL (default: start fresh)")


def split_args(items: list[str]) -> tuple[str | None, list[str]]:
    """``[CONFIG] override...`` -> (config path or None, overrides)."""
    path, overrides = None, []
    for i, item in enumerate(items):
        if "=" not in item and i == 0:
            path = item
        elif "=" not in item:
            raise ValueError(f"{item!r}: expected section.field=value (only the first argument may be a config file)")
        else:
            overrides.append(item)
    return path, overrides


def load_job_config(args: argparse.Namespace) -> Config:
    """The validated config, with its inputs checked on storage: everything a bad
    command line can get wrong fails here, before any process or model starts."""
    path, overrides = split_args(args.args)
    config = config_module.load_config(path, overrides, preset=args.preset)
    config_module.check_inputs(config)
    return config


# ---------------------------------------------------------------- precision and schedule


def resolve_precision(requested: str, cuda: bool) -> str:
    """``auto``: by compute capability on CUDA (7.x / V100: fp16 — it has no bf16 tensor
    cores, though ``torch.cuda.is_bf16_supported()`` says True through emulation; 8.0+:
    bf16), fp32 on CPU."""
    import torch

    from sr_core.precision import choose_precision

    if requested == "auto":
        if not cuda:
            return "fp32"
        return choose_precision("cuda", torch.cuda.get_device_capability())
    if requested == "fp16" and not cuda:
        raise ValueError("train.precision=fp16 needs a GPU; use fp32 (or bf16) on CPU")
    return requested


def learning_rate(base: float, step: int, optim: config_module.OptimConfig) -> float:
    """The learning rate of optimizer step ``step`` (0-based): a function of the step and
    the schedule's own fields only, never of ``train.max_steps``."""
    warmup = min(1.0, (step + 1) / optim.warmup_steps) if optim.warmup_steps else 1.0
    if optim.schedule == "multistep":
        return base * warmup * optim.gamma ** bisect_right(optim.milestones, step)
    if optim.schedule == "cosine_restart":
        start = 0
        for period in optim.periods:
            if step < start + period:
                t = (step - start) / period
                return warmup * (optim.eta_min + (base - optim.eta_min) * 0.5 * (1 + math.cos(math.pi * t)))
            start += period
        return optim.eta_min
    return base * warmup


# ---------------------------------------------------------------- the job's parts


@dataclass
class Job:
    """Everything the train loop uses, built by :func:`build_job`."""

    config: Config
    accelerator: Any
    rank: int
    world_size: int
    device: Any
    precision: str
    g: Any  # engines.Trained
    d: Any  # engines.Trained or None (psnr stage)
    ema: Any  # nn.Module or None
    multihead: bool
    pixel_loss: Any
    perceptual: Any
    gan_loss: Any
    loader: Any
    val_set: Any
    tb: Any  # tblog.TensorBoardLog on rank 0, else None
    step: int = 0
    best_psnr: float = -math.inf
    bicubic_scores: dict | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def log(job_or_rank, message: str) -> None:
    rank = job_or_rank if isinstance(job_or_rank, int) else job_or_rank.rank
    if rank == 0:
        from tqdm import tqdm

        tqdm.write(message, file=sys.stderr)


def free_port() -> int:
    """A TCP port free on loopback now (for a launcher's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_accelerator(config: Config, cuda: bool, precision: str):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    # Under a launcher (WORLD_SIZE > 1) name the backend: Accelerate sets none for
    # DeepSpeed on CPU. A single process gets no process group from Accelerate.
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    handlers = [InitProcessGroupKwargs(backend="nccl" if cuda else "gloo")] if launched else []
    if config.train.backend == "deepspeed":
        # DeepSpeed wants a process group even for one process (else it asks for mpi4py).
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                           ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(free_port()))):
            os.environ.setdefault(key, value)
        # The engines do mixed precision themselves; Accelerate only sets up processes.
        return Accelerator(cpu=not cuda, kwargs_handlers=handlers)
    # A BatchNorm discriminator runs real and fake in two forwards before one backward:
    # broadcasting buffers at the second forward would modify tensors saved for backward.
    # Buffers are made equal explicitly instead (sync_buffers) before they are used.
    handlers.append(DistributedDataParallelKwargs(broadcast_buffers=False))
    mixed = {"fp32": "no", "fp16": "fp16", "bf16": "bf16"}[precision]
    return Accelerator(cpu=not cuda, mixed_precision=mixed, kwargs_handlers=handlers)


def deepspeed_config(config: Config, precision: str) -> dict:
    """DeepSpeed's config for one network: ``train.deepspeed_config`` (or a ZeRO stage),
    with batch sizes, accumulation, clipping and precision taken from our config."""
    import json

    from sr_core import storage

    t = config.train
    ds = json.loads(storage.read_bytes(t.deepspeed_config)) if t.deepspeed_config else {
        "zero_optimization": {"stage": t.zero_stage}}
    ds.update({
        "train_micro_batch_size_per_gpu": config.data.batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "gradient_clipping": config.optim.grad_clip,
        # Our torch Adam instead of DeepSpeed's fused one: no 85 s JIT build at start-up.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**12,
    })
    ds.pop("train_batch_size", None)
    ds.pop("optimizer", None)
    ds.pop("scheduler", None)
    fp16 = ds.get("fp16", {}) if precision == "fp16" else {}
    ds["fp16"] = {**{"loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000, "hysteresis": 2,
                     "min_loss_scale": 1}, **fp16, "enabled": precision == "fp16"}
    ds["bf16"] = {"enabled": precision == "bf16"}
    return ds


def build_job(config: Config, resume: str) -> Job:
    import torch

    from jobs import checkpoint as ckpt
    from jobs.data import build_train_loader, build_val_dataset
    from jobs.engines import Trained
    from sr_core import build_discriminator, build_generator, storage
    from sr_core.losses import GANLoss, PerceptualLoss, build_pixel_loss

    t, m, lo, o = config.train, config.model, config.loss, config.optim
    cuda = torch.cuda.is_available()
    precision = resolve_precision(t.precision, cuda)
    accelerator = make_accelerator(config, cuda, precision)
    rank, world_size, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    gan = t.stage == "gan"
    folder = ckpt.find_resume(t.run_dir, resume, config, rank, warn=lambda text: log(rank, text))

    # The networks (and a random VGG, when configured) are made from one seed in a fixed
    # order, so every rank and every resumed run builds the same ones.
    torch.manual_seed(t.seed)
    generator = build_generator(m.generator, m.generator_variant or None, scale=config.data.scale, **m.generator_options)
    if t.pretrained:
        ckpt.load_pretrained(generator, t.pretrained, m.generator_variant)
    discriminator = build_discriminator(m.discriminator, m.discriminator_variant or None,
                                        **m.discriminator_options) if gan else None
    perceptual = None
    if gan and lo.perceptual_weight > 0:
        perceptual = PerceptualLoss(lo.perceptual_layers, criterion=lo.perceptual_criterion,
                                    weights=None if lo.random_vgg else lo.vgg_weights).to(device).eval()
    generator.to(device)
    ema = copy.deepcopy(generator).eval().requires_grad_(False) if t.ema_decay > 0 else None

    def adam(module, lr, betas, weight_decay):
        return torch.optim.Adam(module.parameters(), lr=lr, betas=betas, weight_decay=weight_decay)

    opt_g = adam(generator, o.lr_g, o.betas_g, o.weight_decay_g)
    opt_d = adam(discriminator, o.lr_d, o.betas_d, o.weight_decay_d) if gan else None
    if t.backend == "deepspeed":
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
        ds_config = deepspeed_config(config, precision)

        def engine(module, optimizer):
            module.to(device)
            return deepspeed.initialize(model=module, optimizer=optimizer, config=ds_config)[0]

        g = Trained(generator, None, t.grad_accum_steps, engine=engine(generator, opt_g))
        d = Trained(discriminator, None, t.grad_accum_steps, engine=engine(discriminator, opt_d)) if gan else None
    else:
        g = Trained(generator, opt_g, t.grad_accum_steps, accelerator=accelerator)
        d = Trained(discriminator.to(device), opt_d, t.grad_accum_steps, accelerator=accelerator) if gan else None

    loader = build_train_loader(config.data, rank, world_size, device=str(device))
    job = Job(
        config=config, accelerator=accelerator, rank=rank, world_size=world_size, device=device,
        precision=precision, g=g, d=d, ema=ema, multihead=m.generator == "multihead_rrdbnet",
        pixel_loss=build_pixel_loss(lo.pixel), perceptual=perceptual,
        gan_loss=GANLoss(lo.gan, loss_weight=lo.gan_weight) if gan else None,
        loader=loader, val_set=build_val_dataset(config.data), tb=None,
    )
    if folder:
        load_checkpoint(job, folder)
    if job.is_main:
        import yaml

        storage.write_bytes(storage.join(t.run_dir, "config.yaml"),
                            yaml.safe_dump(config_module.to_dict(config), sort_keys=False).encode())
        from jobs.tblog import TensorBoardLog

        job.tb = TensorBoardLog(t.run_dir, t.sync_tensorboard_seconds)
    log_header(job, folder)
    return job


def log_header(job: Job, resumed_from: str | None) -> None:
    """The first lines of the log: what runs where, on what data."""
    import torch

    from accelerate.utils import gather_object

    c = job.config
    name = torch.cuda.get_device_name(job.device) if job.device.type == "cuda" else "cpu"
    devices = gather_object([f"{socket.gethostname()}:{job.device}({name})"]) if job.world_size > 1 else \
        [f"{socket.gethostname()}:{job.device}({name})"]
    ds = job.loader.dataset
    data = c.data.train_shards or f"{c.data.train_hr} + {c.data.train_lr}"
    effective = c.data.batch_size * job.world_size * c.train.grad_accum_steps
    backend = c.train.backend
    if backend == "deepspeed":
        stage = deepspeed_config(c, job.precision).get("zero_optimization", {}).get("stage", 0)
        backend = f"deepspeed ZeRO-{stage}" + (f" ({c.train.deepspeed_config})" if c.train.deepspeed_config else "")
    log(job, f"world size {job.world_size}, backend {backend}, precision {job.precision}, "
             f"distributed {job.accelerator.distributed_type}")
    log(job, f"devices: {', '.join(devices)}")
    log(job, f"effective batch {effective} = {c.data.batch_size} per rank x {job.world_size} ranks x "
             f"{c.train.grad_accum_steps} accumulated; GT {c.data.gt_size} px, x{c.data.scale}")
    log(job, f"data: {data} ({len(ds)} samples), validation: {c.data.val_folder or 'none'}")
    log(job, f"stage {c.train.stage}: {c.model.generator} ({c.model.generator_variant})"
             + (f" vs {c.model.discriminator} ({c.model.discriminator_variant})" if job.d else "")
             + f"; run {c.train.run_dir}; "
             + (f"resumed from {resumed_from} at step {job.step}" if resumed_from else "fresh start"))


# ---------------------------------------------------------------- checkpoints


def sync_buffers(job: Job) -> None:
    """Make buffers (BatchNorm statistics) equal on every rank: rank 0's. DDP runs with
    ``broadcast_buffers=False`` (see make_accelerator)."""
    if job.world_size == 1:
        return
    import torch.distributed as dist

    for module in (job.g.module, job.d.module if job.d else None, job.ema):
        if module is not None:
            for buffer in module.buffers():
                dist.broadcast(buffer.data, src=0)


def _state_dict_fp32(module) -> dict:
    return {k: v.detach().float().cpu() if v.is_floating_point() else v.detach().cpu()
            for k, v in module.state_dict().items()}


def weights_digest(job: Job) -> str:
    """SHA-256 of this rank's networks (G, D, EMA: parameters and buffers), saved per rank:
    every rank of a correct data-parallel run holds the same weights."""
    import hashlib

    digest = hashlib.sha256()
    for module in (job.g.module, job.d.module if job.d else None, job.ema):
        if module is not None:
            for name, tensor in sorted(module.state_dict().items()):
                digest.update(name.encode())
                digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def save_checkpoint(job: Job, step: int) -> str:
    """Every rank writes its part; rank 0 marks the folder complete after all have."""
    from jobs import checkpoint as ckpt

    t = job.config.train
    writer = ckpt.CheckpointWriter(t.run_dir, step, job.rank, job.config)
    folder = writer.folder
    sync_buffers(job)
    if t.backend == "deepspeed":
        with ckpt.LocalStaging() as local:
            for name, net in (("g", job.g), ("d", job.d)):
                if net is not None:
                    net.engine.save_checkpoint(os.path.join(local, name), tag="ckpt")
            writer.upload_folder(local, f"ds/rank_{job.rank}")
    writer.save_torch(f"rank_{job.rank}.pt", {"rng": ckpt.rng_state(), "loader": job.loader.state_dict(),
                                              "digest": weights_digest(job)})
    if job.is_main:
        state = {"step": step, "best_psnr": job.best_psnr, "g": _state_dict_fp32(job.g.module),
                 "ema": _state_dict_fp32(job.ema) if job.ema is not None else None,
                 "config": config_module.to_dict(job.config)}
        if t.backend == "ddp":
            state["opt_g"] = job.g.optimizer.state_dict()
            if job.d is not None:
                state["d"] = _state_dict_fp32(job.d.module)
                state["opt_d"] = job.d.optimizer.state_dict()
            if job.accelerator.scaler is not None:
                state["scaler"] = job.accelerator.scaler.state_dict()
        writer.save_torch("state.pt", state)
    writer.finish()  # every rank: COMPLETE, or all stop on one line
    if job.is_main:
        ckpt.prune(t.run_dir, t.keep_checkpoints)
        if job.tb:
            job.tb.sync()
    return folder


def load_checkpoint(job: Job, folder: str) -> None:
    from jobs import checkpoint as ckpt
    from sr_core import storage

    t = job.config.train
    state = ckpt.load_torch(f"{folder}/state.pt")
    job.g.module.load_state_dict(state["g"])
    if job.ema is not None and state["ema"] is not None:
        job.ema.load_state_dict(state["ema"])
    if t.backend == "deepspeed":
        if not storage.exists(f"{folder}/ds"):
            raise ValueError(f"--resume {folder}: written by a DDP run; resume it with train.backend=ddp")
        with ckpt.LocalStaging() as local:
            ckpt.download_folder(f"{folder}/ds", local)
            merged = os.path.join(local, "merged")
            for rank_name in sorted(os.listdir(local)):
                if rank_name.startswith("rank_"):
                    _merge_tree(os.path.join(local, rank_name), merged)
            for name, net in (("g", job.g), ("d", job.d)):
                if net is not None:
                    net.engine.load_checkpoint(os.path.join(merged, name), tag="ckpt")
    else:
        if "opt_g" not in state:
            raise ValueError(f"--resume {folder}: written by a DeepSpeed run; resume it with train.backend=deepspeed")
        job.g.optimizer.load_state_dict(state["opt_g"])
        if job.d is not None:
            if "d" not in state:
                raise ValueError(f"--resume {folder}: a psnr-stage checkpoint; the GAN stage starts from its "
                                 "exported model via train.pretrained, in a new run_dir")
            job.d.module.load_state_dict(state["d"])
            job.d.optimizer.load_state_dict(state["opt_d"])
        if job.accelerator.scaler is not None and "scaler" in state:
            job.accelerator.scaler.load_state_dict(state["scaler"])
    job.step = int(state["step"])
    job.best_psnr = float(state["best_psnr"])
    rank_file = f"{folder}/rank_{job.rank}.pt"
    if storage.exists(rank_file):
        mine = ckpt.load_torch(rank_file)
        job.loader.load_state_dict(mine["loader"])
        ckpt.set_rng_state(mine["rng"])
    else:  # more ranks than the checkpoint had: this one starts its data epoch over
        log(job, f"{rank_file} does not exist (the world size changed): rank {job.rank} restarts its epoch")


def _merge_tree(src: str, dst: str) -> None:
    for folder, _dirs, files in os.walk(src):
        target = os.path.join(dst, os.path.relpath(folder, src))
        os.makedirs(target, exist_ok=True)
        for name in files:
            os.replace(os.path.join(folder, name), os.path.join(target, name))


def export_models(run_dir: str, g_state: dict, ema_state: dict | None, config: Config, step: int) -> list[str]:
    """``RUN/model.safetensors`` (+ ``model_ema.safetensors``): self-describing files for
    ``sr upscale``."""
    from sr_core import build_generator, save_generator, storage

    m = config.model
    written = []
    for name, state in (("model.safetensors", g_state), ("model_ema.safetensors", ema_state)):
        if state is None:
            continue
        model = build_generator(m.generator, m.generator_variant or None, scale=config.data.scale, **m.generator_options)
        model.load_state_dict(state)
        url = storage.join(run_dir, name)
        save_generator(model, url, run=run_dir, step=step, stage=config.train.stage,
                       weights="ema" if "ema" in name else "generator")
        written.append(url)
    return written


def export_checkpoint(run_dir: str, step: int | None = None) -> list[str]:
    """``sr train export``: the models of checkpoint ``step`` (default: the newest)."""
    from jobs import checkpoint as ckpt

    folder = ckpt.export_source(run_dir, step, warn=lambda text: log(0, text))
    state = ckpt.load_torch(f"{folder}/state.pt")
    config = config_module.from_dict(state["config"])
    return export_models(run_dir, state["g"], state["ema"], config, ckpt.checkpoint_step(folder))


# ---------------------------------------------------------------- validation


def validate(job: Job, step: int) -> dict[str, float]:
    """PSNR/SSIM (Y channel, border = scale) of the EMA generator (or G without EMA) on the
    validation set, each rank scoring its share of the images, gathered; bicubic's scores
    of the same images once. Multi-head models report every head and the mean of heads."""
    import torch

    from accelerate.utils import gather_object
    from sr_core.metrics import psnr_torch, ssim_torch
    from sr_core.resize import imresize
    from sr_core.upscaler import Upscaler

    scale = job.config.data.scale
    model = job.ema if job.ema is not None else job.g.module
    if next(model.parameters()).dtype != torch.float32:  # DeepSpeed fp16/bf16 modules
        model = copy.deepcopy(model).float()
    upscaler = Upscaler(model, device=job.device, precision="fp32", tile=None)
    variants = [("", None)]
    if job.multihead:
        variants = [("", -1)] + [(f"_head{k}", k) for k in range(len(model.heads))]
    selected = getattr(model, "output_head", None)
    rows = []
    need_bicubic = job.bicubic_scores is None
    try:
        for index in range(job.rank, len(job.val_set), job.world_size):
            item = job.val_set[index]
            lr, gt = item["lr"][None].to(job.device), item["gt"][None].to(job.device)
            for suffix, head in variants:
                if head is not None:
                    model.select_head(head)
                sr = upscaler(lr)
                rows.append((suffix, float(psnr_torch(sr, gt, scale, True)), float(ssim_torch(sr, gt, scale, True))))
            if need_bicubic:
                bicubic = imresize(lr, scale=scale).clamp_(0, 1)
                rows.append(("_bicubic", float(psnr_torch(bicubic, gt, scale, True)),
                             float(ssim_torch(bicubic, gt, scale, True))))
    finally:
        if selected is not None:
            model.select_head(selected)
    if job.world_size > 1:
        rows = gather_object(rows)
    scores: dict[str, float] = {}
    for suffix in sorted({r[0] for r in rows}):
        mine = [r for r in rows if r[0] == suffix]
        psnr = sum(r[1] for r in mine) / len(mine)
        scores[f"psnr{suffix}"] = psnr
        scores[f"ssim{suffix}"] = sum(r[2] for r in mine) / len(mine)
        # MSE of the 8-bit Y channel, from the mean PSNR (what the multi-head report lists).
        scores[f"mse{suffix}"] = 255.0**2 / 10 ** (psnr / 10)
    if need_bicubic:
        job.bicubic_scores = {k: v for k, v in scores.items() if k.endswith("_bicubic")}
    scores = {k: v for k, v in scores.items() if not k.endswith("_bicubic")}
    if job.is_main and job.tb:
        job.tb.scalars(step, {f"val/{k}": v for k, v in scores.items()})
        job.tb.scalars(step, {f"val/{k}": v for k, v in job.bicubic_scores.items()})
        for index in range(min(job.config.train.num_val_images_logged, len(job.val_set))):
            job.tb.image(f"val_images/{index}", comparison_grid(upscaler, job.val_set[index], scale, job.device), step)
    return scores


def comparison_grid(upscaler, item: dict, scale: int, device, max_side: int = 256):
    """bicubic | SR | HR of a centre crop of a validation image (CHW floats in [0, 1])."""
    import torch

    from sr_core.resize import imresize

    lr = item["lr"]
    side_h, side_w = min(lr.shape[1], max_side // scale), min(lr.shape[2], max_side // scale)
    y, x = (lr.shape[1] - side_h) // 2, (lr.shape[2] - side_w) // 2
    lr = lr[:, y:y + side_h, x:x + side_w][None].to(device)
    gt = item["gt"][:, y * scale:(y + side_h) * scale, x * scale:(x + side_w) * scale].to(device)
    bicubic = imresize(lr, scale=scale).clamp_(0, 1)[0]
    sr = upscaler(lr)[0]
    return torch.cat([bicubic, sr, gt], dim=2).cpu()


# ---------------------------------------------------------------- the loop


class _Preemption:
    """SIGTERM (a spot VM being reclaimed) asks the loop to checkpoint and stop."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)


def _any_rank(job: Job, flag: bool) -> bool:
    """True on every rank if ``flag`` is True on any (so all ranks stop at the same step)."""
    if job.world_size == 1:
        return flag
    import torch
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0], device=job.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _mean_over_ranks(job: Job, values: dict[str, float]) -> dict[str, float]:
    if job.world_size == 1 or not values:
        return values
    import torch
    import torch.distributed as dist

    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=job.device)
    dist.all_reduce(t)
    return {k: float(v) / job.world_size for k, v in zip(keys, t.tolist())}


def _memory_mb(device) -> float:
    import resource

    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def update_ema(ema, model, decay: float) -> None:
    """``ema = decay * ema + (1 - decay) * model`` for parameters; buffers are copied."""
    import torch

    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.mul_(decay).add_(p.detach().float(), alpha=1 - decay)
        for e, b in zip(ema.buffers(), model.buffers()):
            e.copy_(b)


def _forever(loader):
    while True:
        yield from loader


def train_loop(job: Job) -> str:
    """Train from ``job.step`` to ``train.max_steps``: per step, the G step (D frozen)
    then the D step, each over ``grad_accum_steps`` batches; then logging, validation and
    checkpoints. Returns ``"done"`` or ``"preempted"`` (a checkpoint was written)."""
    import torch
    from tqdm import tqdm

    from jobs import checkpoint as ckpt
    from jobs.data import DataWaitMeter

    c = job.config
    t, o, lo = c.train, c.optim, c.loss
    gan = job.d is not None
    accum = t.grad_accum_steps
    meter = DataWaitMeter()
    batches = meter.wrap(_forever(job.loader))
    preemption = _Preemption()
    sums: dict[str, torch.Tensor] = {}
    norms: dict[str, float] = {}
    window_start, window_steps = time.perf_counter(), 0
    last_checkpoint = job.step
    bar = tqdm(total=t.max_steps, initial=job.step, unit="step", dynamic_ncols=True, file=sys.stderr,
               disable=not (job.is_main and t.progress), desc=f"train {t.stage}")

    def add(name: str, value: torch.Tensor) -> None:
        sums[name] = sums.get(name, 0.0) + value.detach().float() / accum

    try:
        while job.step < t.max_steps:
            step = job.step
            log_now = (step + 1) % t.log_every == 0
            job.g.set_lr(learning_rate(o.lr_g, step, o))

            # ---- G step: D is frozen, so G's loss puts no gradient into D's parameters.
            if gan:
                job.d.freeze(True)
            fakes = []
            for micro in range(accum):
                batch = next(batches)
                lr, gt = batch["lr"], batch["gt"]
                with job.g.sync(micro == accum - 1):
                    out = job.g(lr, all_heads=True) if job.multihead else job.g(lr)
                    heads = [h.float() for h in (out if isinstance(out, list) else [out])]
                    # Every head of a multi-head model gets the loss; D judges their mean
                    # (what the model returns at inference by default).
                    fake = heads[0] if len(heads) == 1 else torch.stack(heads).mean(dim=0)
                    loss_pixel = lo.pixel_weight * sum(job.pixel_loss(h, gt) for h in heads)
                    total = loss_pixel
                    add("loss/g_pixel", loss_pixel)
                    if gan:
                        if job.perceptual is not None:
                            loss_perceptual = lo.perceptual_weight * sum(job.perceptual(h, gt) for h in heads)
                            total = total + loss_perceptual
                            add("loss/g_perceptual", loss_perceptual)
                        # The plain module (not the DDP wrapper): no gradient sync is
                        # armed for D in G's step. Real logits need no graph at all.
                        fake_logits = job.d.plain(fake)
                        real_logits = None
                        if job.gan_loss.relativistic:
                            with torch.no_grad():
                                real_logits = job.d.plain(gt)
                        loss_gan = job.gan_loss.generator_loss(fake_logits, real_logits)
                        total = total + loss_gan
                        add("loss/g_gan", loss_gan)
                    add("loss/g_total", total)
                    job.g.backward(total)
                if gan:
                    fakes.append((fake.detach(), gt))
            norm = job.g.step(o.grad_clip, want_norm=log_now)
            if norm is not None:
                norms["grad_norm/g"] = norm
            if job.ema is not None:
                update_ema(job.ema, job.g.module, t.ema_decay)

            # ---- D step: real and the (detached) fakes of this step's G outputs.
            if gan:
                job.d.freeze(False)
                job.d.set_lr(learning_rate(o.lr_d, step, o))
                for micro, (fake, gt) in enumerate(fakes):
                    with job.d.sync(micro == accum - 1):
                        real_logits = job.d(gt)
                        fake_logits = job.d(fake)
                        loss_d = job.gan_loss.discriminator_loss(real_logits, fake_logits)
                        job.d.backward(loss_d)
                    add("loss/d", loss_d)
                    add("d_logits/real", real_logits.float().mean())
                    add("d_logits/fake", fake_logits.float().mean())
                norm = job.d.step(o.grad_clip, want_norm=log_now)
                if norm is not None:
                    norms["grad_norm/d"] = norm

            job.step = step = step + 1
            window_steps += 1
            bar.update(1)

            if log_now:
                elapsed = time.perf_counter() - window_start
                values = {k: float(v) / window_steps for k, v in sums.items()}
                values.update(norms)
                values = _mean_over_ranks(job, values)
                samples = window_steps * accum * c.data.batch_size * job.world_size
                values.update({
                    "lr/g": learning_rate(o.lr_g, step - 1, o),
                    "loss_scale/g": job.g.loss_scale(),
                    "perf/samples_per_s": samples / elapsed,
                    "perf/output_mpx_per_s": samples * c.data.gt_size**2 / elapsed / 1e6,
                    "perf/data_wait_fraction": meter.fraction(),
                    "perf/step_time_s": elapsed / window_steps,
                    "perf/memory_mb": _memory_mb(job.device),
                })
                if gan:
                    values["lr/d"] = learning_rate(o.lr_d, step - 1, o)
                    values["loss_scale/d"] = job.d.loss_scale()
                if job.tb:
                    job.tb.scalars(step, values)
                    job.tb.maybe_sync()
                bar.set_postfix(loss=f"{values['loss/g_total']:.4g}")
                sums.clear()
                norms.clear()
                meter.reset()
                window_start, window_steps = time.perf_counter(), 0

            new_best = False
            if job.val_set is not None and (step % t.val_every == 0 or step == t.max_steps):
                sync_buffers(job)
                scores = validate(job, step)
                new_best = scores["psnr"] > job.best_psnr
                if new_best:
                    job.best_psnr = scores["psnr"]
                which = "EMA generator" if job.ema is not None else "generator"
                log(job, f"step {step}: validation ({which}) PSNR-Y {scores['psnr']:.2f} dB, SSIM {scores['ssim']:.4f} "
                         f"(bicubic: {job.bicubic_scores['psnr_bicubic']:.2f} dB, "
                         f"{job.bicubic_scores['ssim_bicubic']:.4f})" + (" best" if new_best else ""))
            preempted = _any_rank(job, preemption.requested)
            if preempted or new_best or step % t.checkpoint_every == 0 or step == t.max_steps:
                folder = save_checkpoint(job, step)
                last_checkpoint = step
                if new_best and job.is_main:
                    ckpt.write_best(t.run_dir, step, job.best_psnr)
                if preempted:
                    log(job, f"SIGTERM: checkpoint {folder} written at step {step}; exiting")
                    return "preempted"
        if last_checkpoint != job.step:  # resumed at or beyond max_steps
            save_checkpoint(job, job.step)
        return "done"
    finally:
        bar.close()
        preemption.restore()


# ---------------------------------------------------------------- main


def adopt_deepspeed_launch(config: Config) -> None:
    """Launched by ``accelerate launch`` with a DeepSpeed config (jobs/launch/deepspeed_*):
    train with DeepSpeed and that JSON. The job builds its two engines itself, so
    Accelerate must not install its own DeepSpeed plugin (one Accelerator takes one model
    under DeepSpeed, and its plugin imports the transformers package)."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return
    os.environ.pop("ACCELERATE_USE_DEEPSPEED")
    config.train.backend = "deepspeed"
    if not config.train.deepspeed_config:
        config.train.deepspeed_config = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "")


def run(config: Config, resume: str = "") -> int:
    """Train with a validated config; returns the exit code (0 also after a preemption)."""
    from jobs import checkpoint as ckpt

    adopt_deepspeed_launch(config)
    with ckpt.run_lease(config.train.run_dir):  # one job per run directory
        job = build_job(config, resume)
        try:
            outcome = train_loop(job)
            if outcome == "done" and job.is_main:
                ema = _state_dict_fp32(job.ema) if job.ema is not None else None
                written = export_models(config.train.run_dir, _state_dict_fp32(job.g.module), ema, config, job.step)
                log(job, "exported " + ", ".join(written))
            if job.tb:
                best = job.best_psnr if job.best_psnr > -math.inf else 0.0
                job.tb.hparams(_hparams(config), {"hparam/best_val_psnr": best})
            job.accelerator.wait_for_everyone()
        finally:
            if job.tb:
                job.tb.close()
            job.loader.close()
        job.accelerator.end_training()
        return 0


def _hparams(config: Config) -> dict:
    flat = {}
    for section, values in config_module.to_dict(config).items():
        for key, value in values.items():
            if isinstance(value, (int, float, str, bool)):
                flat[f"{section}.{key}"] = value
            else:
                flat[f"{section}.{key}"] = str(value)
    return flat


def build_parser(prog: str = "python -m jobs.train") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    # Intermixed: options may come between the overrides, as in a VM's command line
    # `... -m jobs.train CONFIG --resume auto train.run_dir=gs://...`.
    return build_parser().parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run(load_job_config(args), args.resume)


if __name__ == "__main__":
    # What training VMs run: the same exit codes as `sr train` (75 for storage outages,
    # which a managed job restarts on; 2 for a bad config, one line).
    from sr_core.errors import run_command

    sys.exit(run_command("jobs.train", main))
