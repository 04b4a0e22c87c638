"""DDP or DeepSpeed: the one place where the two backends of the training job differ.

A backend (``BACKENDS[train.backend]``) makes the Accelerator, wraps each network with
its optimizer into a ``DDPNetwork`` or ``DeepSpeedNetwork``, names itself for the log,
and saves and restores what only it knows. The train loop runs the same code for both:

==================  ===================================  =================================
call                DDP (Accelerate)                     DeepSpeed engine
==================  ===================================  =================================
``accumulate()``    ``accelerator.accumulate``: DDP's    nothing (the engine counts
                    ``no_sync`` except on the last       micro-batches itself)
                    accumulated batch
``backward(loss)``  ``accelerator.backward``: loss / k   ``engine.backward(loss)`` then
                    (fp16: scaled by the GradScaler)     ``engine.step()`` (a real step only
                                                         at the accumulation boundary)
``step(clip)``      clip (unscaled), optimizer step,     nothing left to do; the grad norm
                    zero the gradients                   DeepSpeed measured
checkpoint          optimizers, discriminator and loss   the engines' own files under
                    scaler in rank 0's ``state.pt``      ``ds/rank_R/``, every rank its part
==================  ===================================  =================================

The job builds its DeepSpeed engines itself (``deepspeed.initialize`` once per network)
instead of through Accelerate's DeepSpeed plugin: one Accelerator takes one model under
DeepSpeed (two need its experimental multi-plugin mode), and the plugin imports the
transformers package. Its torch Adam replaces DeepSpeed's fused one, which is
JIT-compiled at first use (docs/PERFORMANCE.md).

The GPU paths (CUDA, NCCL, fp16 loss scaling, bf16) are written but not tested here:
the test machines have no GPU.
"""

from __future__ import annotations

import contextlib
import math
import os

import torch
from accelerate import Accelerator
from accelerate.utils import (
    DistributedDataParallelKwargs,
    GradientAccumulationPlugin,
    InitProcessGroupKwargs,
    broadcast,
)
from torch import nn

from jobs import checkpoint as ckpt
from jobs import config as config_module
from jobs.config import Config, read_config_file
from sr_core import storage
from sr_core.net import free_port
from sr_core.precision import choose_precision, cpu_bf16_flag


def resolve_precision(requested: str, cuda: bool, arch: str | None = None) -> str:
    """``auto``: by compute capability on CUDA (7.x / V100: fp16 — it has no bf16 tensor
    cores, though ``torch.cuda.is_bf16_supported()`` says True through emulation; 8.0+:
    bf16); on CPU bf16 where the CPU has bf16 hardware (AMX, AVX512-BF16) and the generator
    ``arch`` agrees with fp32 in bf16 (``sr_core.precision.BF16_CPU_ARCHS``), else fp32."""
    if requested == "auto":
        if cuda:
            return choose_precision("cuda", torch.cuda.get_device_capability())
        return choose_precision("cpu", arch=arch, cpu_bf16=cpu_bf16_flag())
    if requested == "fp16" and not cuda:
        raise ValueError("train.precision=fp16 needs a GPU; use fp32 (or bf16) on CPU")
    return requested


def adopt_deepspeed_launch(config: Config) -> Config:
    """Launched by ``accelerate launch`` with a DeepSpeed config (jobs/launch/deepspeed_*):
    the config to train with, DeepSpeed and that JSON, built and validated anew (``config``
    itself is left as it was validated). The job builds its two engines itself, so
    Accelerate must not install its own DeepSpeed plugin."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return config
    os.environ.pop("ACCELERATE_USE_DEEPSPEED")
    values = config_module.to_dict(config)
    values["train"]["backend"] = "deepspeed"
    if not config.train.deepspeed_config:
        values["train"]["deepspeed_config"] = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "")
    return config_module.from_dict(values)


def fp32_state_dict(module: nn.Module) -> dict:
    """A module's state as fp32 CPU tensors (DeepSpeed fp16/bf16 engines convert the
    module itself): what checkpoints and model files hold."""
    return {k: v.detach().float().cpu() if v.is_floating_point() else v.detach().cpu()
            for k, v in module.state_dict().items()}


def sync_buffers(accelerator: Accelerator, modules: list[nn.Module | None]) -> None:
    """Make buffers (BatchNorm statistics) equal on every rank: rank 0's. DDP runs with
    ``broadcast_buffers=False`` (see ``DDPBackend``), so they are made equal here, before
    they are validated or saved."""
    if accelerator.num_processes > 1:
        for module in modules:
            if module is not None:
                for buffer in module.buffers():
                    broadcast(buffer.data, from_process=0)


def _process_group_handlers(cuda: bool) -> list:
    # Under a launcher (WORLD_SIZE > 1) name the backend: Accelerate sets none for
    # DeepSpeed on CPU. A single process gets no process group from Accelerate.
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return [InitProcessGroupKwargs(backend="nccl" if cuda else "gloo")] if launched else []


# ---------------------------------------------------------------- one network


class _Network:
    """A network being trained: ``net(x)`` runs it (wrapped for DDP / DeepSpeed);
    ``module`` is the plain ``nn.Module`` (for the EMA, validation, saving)."""

    module: nn.Module
    optimizer: torch.optim.Optimizer

    @property
    def dtype(self) -> torch.dtype:
        """The parameters' dtype (DeepSpeed fp16/bf16 engines convert the module itself)."""
        return next(self.module.parameters()).dtype

    def plain(self, x: torch.Tensor) -> torch.Tensor:
        """The unwrapped module on ``x`` (no DDP/DeepSpeed hooks, so no gradient sync is
        armed), fp32 out."""
        return self.module(x.to(self.dtype)).float()

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def freeze(self, frozen: bool) -> None:
        self.module.requires_grad_(not frozen)


class DDPNetwork(_Network):
    """Trained through the Accelerator: DDP across processes, automatic mixed precision
    with a loss scaler for fp16, gradient accumulation."""

    def __init__(self, module: nn.Module, optimizer, accelerator: Accelerator):
        self.module, self.accelerator = module, accelerator
        self.wrapped, self.optimizer = accelerator.prepare(module, optimizer)

    def __call__(self, x: torch.Tensor, **kwargs):
        return self.wrapped(x, **kwargs)

    def accumulate(self):
        """Context for one accumulated batch, forward and backward: gradients are
        all-reduced on the last of ``train.grad_accum_steps`` only."""
        return self.accelerator.accumulate(self.wrapped)

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def step(self, clip: float, want_norm: bool) -> float | None:
        """Finish the optimizer step; returns the gradient norm (before clipping) when it
        was measured (always with clipping, else only if ``want_norm``)."""
        norm = None
        if clip > 0 or want_norm:
            params = [p for p in self.module.parameters() if p.grad is not None]
            norm = float(self.accelerator.clip_grad_norm_(params, clip if clip > 0 else math.inf))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def step_was_skipped(self) -> bool:
        """fp16: the loss scaler found inf/NaN gradients, skipped the step and lowered its scale."""
        return bool(self.optimizer.step_was_skipped)

    def loss_scale(self) -> float:
        scaler = self.accelerator.scaler
        return float(scaler.get_scale()) if scaler is not None else 1.0


class DeepSpeedNetwork(_Network):
    """A DeepSpeed engine (ZeRO 0-2, its own loss scaling and accumulation)."""

    def __init__(self, module: nn.Module, engine):
        self.module, self.engine, self.optimizer = module, engine, engine.optimizer

    def __call__(self, x: torch.Tensor, **kwargs):
        return self.engine(x.to(self.dtype), **kwargs)

    def accumulate(self):
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)
        self.engine.step()

    def step(self, clip: float, want_norm: bool) -> float | None:
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    def step_was_skipped(self) -> bool:
        return not self.engine.was_step_applied()

    def loss_scale(self) -> float:
        scale = getattr(self.optimizer, "cur_scale", None) or getattr(self.optimizer, "loss_scale", None)
        return float(scale) if scale is not None else 1.0


# ---------------------------------------------------------------- the backends


class DDPBackend:
    """PyTorch DistributedDataParallel through Accelerate (the default)."""

    def __init__(self, config: Config, precision: str, cuda: bool):
        handlers = _process_group_handlers(cuda)
        # A BatchNorm discriminator runs real and fake in two forwards before one
        # backward: broadcasting buffers at the second forward would modify tensors saved
        # for backward. Buffers are made equal explicitly instead (sync_buffers).
        handlers.append(DistributedDataParallelKwargs(broadcast_buffers=False))
        self.accelerator = Accelerator(
            cpu=not cuda, mixed_precision={"fp32": "no", "fp16": "fp16", "bf16": "bf16"}[precision],
            # Passed as a plugin so that no ACCELERATE_GRADIENT_ACCUMULATION_STEPS in the
            # environment can disagree with the loop; our loader is not Accelerate's.
            gradient_accumulation_plugin=GradientAccumulationPlugin(
                num_steps=config.train.grad_accum_steps, sync_with_dataloader=False),
            kwargs_handlers=handlers)

    def network(self, module: nn.Module, optimizer) -> DDPNetwork:
        return DDPNetwork(module.to(self.accelerator.device), optimizer, self.accelerator)

    def describe(self) -> str:
        return "ddp"

    def save(self, networks: dict[str, DDPNetwork | None], writer: ckpt.CheckpointWriter) -> dict:
        """What rank 0's ``state.pt`` holds besides the generator and its EMA: the
        optimizers, the discriminator and the loss scaler (no files of its own)."""
        generator, discriminator = networks["g"], networks["d"]
        if not self.accelerator.is_main_process:
            return {}
        state = {"opt_g": generator.optimizer.state_dict()}
        if discriminator is not None:
            state["d"] = fp32_state_dict(discriminator.module)
            state["opt_d"] = discriminator.optimizer.state_dict()
        if self.accelerator.scaler is not None:
            state["scaler"] = self.accelerator.scaler.state_dict()
        return state

    def load(self, networks: dict[str, DDPNetwork | None], folder: str, state: dict) -> None:
        generator, discriminator = networks["g"], networks["d"]
        if "opt_g" not in state:
            raise ValueError(f"--resume {folder}: written by a DeepSpeed run; resume it with train.backend=deepspeed")
        generator.optimizer.load_state_dict(state["opt_g"])
        if discriminator is not None:
            if "d" not in state:
                raise ValueError(f"--resume {folder}: a psnr-stage checkpoint; the GAN stage starts from its "
                                 "exported model via train.pretrained, in a new run_dir")
            discriminator.module.load_state_dict(state["d"])
            discriminator.optimizer.load_state_dict(state["opt_d"])
        if self.accelerator.scaler is not None and "scaler" in state:
            self.accelerator.scaler.load_state_dict(state["scaler"])


class DeepSpeedBackend:
    """DeepSpeed ZeRO 0-2, one engine per network."""

    def __init__(self, config: Config, precision: str, cuda: bool):
        import deepspeed  # only DeepSpeed runs pay its import (about a second, and a log line)

        self.deepspeed = deepspeed
        self.config, self.ds_config = config, deepspeed_config(config, precision)
        # DeepSpeed wants a process group even for one process (else it asks for mpi4py).
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                           ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(free_port()))):
            os.environ.setdefault(key, value)
        # The engines do mixed precision themselves; Accelerate only sets up processes.
        self.accelerator = Accelerator(cpu=not cuda, kwargs_handlers=_process_group_handlers(cuda))
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")

    def network(self, module: nn.Module, optimizer) -> DeepSpeedNetwork:
        module.to(self.accelerator.device)
        engine = self.deepspeed.initialize(model=module, optimizer=optimizer, config=self.ds_config)[0]
        return DeepSpeedNetwork(module, engine)

    def describe(self) -> str:
        stage = self.ds_config.get("zero_optimization", {}).get("stage", 0)
        path = self.config.train.deepspeed_config
        return f"deepspeed ZeRO-{stage}" + (f" ({path})" if path else "")

    def save(self, networks: dict[str, DeepSpeedNetwork | None], writer: ckpt.CheckpointWriter) -> dict:
        """Every rank writes its engines' files (its partition of the optimizer states)
        under ``ds/rank_R``, through ``writer`` (so COMPLETE records their checksums);
        nothing goes into ``state.pt``."""
        with ckpt.LocalStaging() as local:  # the engines write local paths only
            for name, network in networks.items():
                if network is not None:
                    network.engine.save_checkpoint(os.path.join(local, name), tag="ckpt")
            writer.upload_folder(local, f"ds/rank_{self.accelerator.process_index}")
        return {}

    def load(self, networks: dict[str, DeepSpeedNetwork | None], folder: str, state: dict) -> None:
        if not storage.exists(f"{folder}/ds"):
            raise ValueError(f"--resume {folder}: written by a DDP run; resume it with train.backend=ddp")
        with ckpt.LocalStaging() as local:
            ckpt.download_folder(f"{folder}/ds", local)
            merged = os.path.join(local, "merged")  # every rank's files in one tree
            for rank_name in sorted(os.listdir(local)):
                if rank_name.startswith("rank_"):
                    _merge_tree(os.path.join(local, rank_name), merged)
            for name, network in networks.items():
                if network is not None:
                    network.engine.load_checkpoint(os.path.join(merged, name), tag="ckpt")


# Keyed by the config's one list of backend names (train.backend's Literal), in its order.
BACKENDS = dict(zip(config_module.BACKENDS, (DDPBackend, DeepSpeedBackend), strict=True))


def deepspeed_config(config: Config, precision: str) -> dict:
    """DeepSpeed's config for one network: ``train.deepspeed_config`` (or a ZeRO stage),
    with batch sizes, accumulation, clipping and precision taken from our config."""
    train = config.train
    # read_config_file: a damaged or hostile file is one line naming it, not a traceback per rank.
    ds = read_config_file(train.deepspeed_config) if train.deepspeed_config else {
        "zero_optimization": {"stage": train.zero_stage}}
    ds.update({
        "train_micro_batch_size_per_gpu": config.data.batch_size,
        "gradient_accumulation_steps": train.grad_accum_steps,
        "gradient_clipping": config.optim.grad_clip,
        "zero_allow_untested_optimizer": True,  # our torch Adam (see the module docstring)
        "steps_per_print": 10**12,
    })
    for key in ("train_batch_size", "optimizer", "scheduler"):
        ds.pop(key, None)
    fp16 = ds.get("fp16", {}) if precision == "fp16" else {}
    ds["fp16"] = {**{"loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000, "hysteresis": 2,
                     "min_loss_scale": 1}, **fp16, "enabled": precision == "fp16"}
    ds["bf16"] = {"enabled": precision == "bf16"}
    return ds


def _merge_tree(src: str, dst: str) -> None:
    for folder, _dirs, files in os.walk(src):
        target = os.path.join(dst, os.path.relpath(folder, src))
        os.makedirs(target, exist_ok=True)
        for name in files:
            os.replace(os.path.join(folder, name), os.path.join(target, name))
