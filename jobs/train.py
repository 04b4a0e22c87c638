"""The training job: ``sr train`` / ``python -m jobs.train`` / ``accelerate launch -m jobs.train``.

Two stages of ESRGAN (and SRGAN, and the multi-head RRDBNet) on Accelerate: stage
``psnr`` trains the generator alone with a pixel loss; stage ``gan`` starts from that
generator and trains it against a discriminator with pixel + VGG19 perceptual +
adversarial losses. DDP by default, DeepSpeed ZeRO 0-2 by config; fp16 with dynamic
loss scaling on V100s, bf16 on Ampere and newer, fp32 on CPU.

The run lives in ``train.run_dir`` (any fsspec URL): ``config.yaml``, ``checkpoints/``,
``tb/`` (TensorBoard), and at the end ``model.safetensors`` / ``model_ema.safetensors``.
``--resume auto`` continues from the newest intact complete checkpoint (or starts fresh),
so a spot VM's startup command can always pass it; SIGTERM writes a checkpoint and exits
0. One job at a time per run directory: :func:`run` holds its lease
(``jobs.checkpoint.run_lease``).

This file reads top-down: :func:`main` and :func:`run` (set-up, loop, export), then
the loop and its two optimizer steps. Elsewhere: the set-up and checkpoints of the
training state in ``jobs/state.py``, everything DDP-vs-DeepSpeed in
``jobs/engines.py``, validation in ``jobs/validation.py``, what is logged in
``jobs/progress.py``, SIGTERM in ``jobs/preemption.py``.

The GPU paths (CUDA devices, NCCL, fp16/bf16) are written but not tested here: the test
machines have no GPU. CPU runs (gloo, fp32) are what the tests run.
"""

from __future__ import annotations

import contextlib
import math
import sys
from bisect import bisect_right

import torch

from jobs import checkpoint as ckpt
from jobs import config as config_module
from jobs import preemption, validation
from jobs.arguments import job_parser
from jobs.config import Config, OptimConfig
from jobs.data import DataWaitMeter
from jobs.degrade import degraded_grid
from jobs.engines import adopt_deepspeed_launch, fp32_state_dict
from jobs.export import export_models
from jobs.progress import LogWindow, log, progress_bar
from jobs.state import TrainingState, build_state, save_checkpoint
from sr_core import storage


def main(argv: list[str] | None = None) -> int:
    # Intermixed: options may come between the overrides, as in a VM's command line
    # `... -m jobs.train CONFIG --resume auto train.run_dir=gs://...`.
    parser = job_parser("python -m jobs.train", __doc__.split("\n\n")[0])
    args = parser.parse_intermixed_args(argv)
    return run(load_job_config(args.args, args.preset), args.resume)


def load_job_config(items: list[str], preset: str) -> Config:
    """The validated config from ``[CONFIG] section.field=value ...``, its inputs checked
    on storage and its run directory writable: everything a bad command line can get
    wrong fails here, before any process or model starts."""
    path, overrides = config_module.split_config_args(items)
    config = config_module.load_config(path, overrides, preset=preset)
    config_module.check_inputs(config)
    check_run_dir(config.train.run_dir)
    return config


def check_run_dir(run_dir: str) -> None:
    """Refuse a run directory that cannot take files (read-only, full, a file) now, not
    at the first checkpoint."""
    try:
        storage.check_writable(run_dir)
    except ValueError as exc:
        raise ValueError(f"train.run_dir: {exc}") from None


def run(config: Config, resume: str = "") -> int:
    """Train with a validated config; returns the exit code (0 also after a preemption)."""
    previous_handler = preemption.install()
    try:
        config = adopt_deepspeed_launch(config)
        with ckpt.run_lease(config.train.run_dir):  # one job per run directory
            state = build_state(config, resume)
            try:
                outcome = train_loop(state)
                if outcome == "done" and state.is_main:
                    ema = fp32_state_dict(state.ema.module) if state.ema is not None else None
                    written = export_models(config.train.run_dir, fp32_state_dict(state.generator.module), ema,
                                            config, state.step)
                    log(state.accelerator, "exported " + ", ".join(written))
                if state.tb:
                    # A run without validation has no best PSNR: its hparams record holds no
                    # metric rather than a 0.0 that TensorBoard would show as a score.
                    best = {"hparam/best_val_psnr": state.best_psnr} if state.best_psnr > -math.inf else {}
                    state.tb.hparams(_hparams(config), best)
                    state.tb.close()
                state.accelerator.wait_for_everyone()
            except BaseException:
                if state.tb:  # best effort: the error that stopped the run is the one to report
                    with contextlib.suppress(Exception):
                        state.tb.close()
                raise
            finally:
                state.loader.close()
            state.accelerator.end_training()
    finally:
        preemption.restore(previous_handler)
        _forget_accelerate_state()
    return 0


def _forget_accelerate_state() -> None:
    """Accelerate keeps the first Accelerator's settings (mixed precision above all) for the
    life of the process and refuses an Accelerator with others: a second run in the same
    process (a notebook, a sweep, the tests) with another precision would fail. The process
    group (PartialState) stays: it belongs to the launch, not to one run. Accelerate's own
    test cases reset the same two states between runs."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()


# ---------------------------------------------------------------- the loop


def train_loop(state: TrainingState) -> str:
    """Train from ``state.step`` to ``train.max_steps``. Per step: the generator's
    optimizer step (discriminator frozen), then the discriminator's, each over
    ``train.grad_accum_steps`` batches, and the EMA; then one check on every rank
    (SIGTERM, a non-finite loss), logging, validation and checkpoints. Returns
    ``"done"`` or ``"preempted"`` (a checkpoint was written)."""
    config = state.config
    train = config.train
    meter = DataWaitMeter()
    batches = meter.wrap(_forever(state.loader))
    window = LogWindow(train.grad_accum_steps, train.grad_accum_steps * config.data.batch_size
                       * state.accelerator.num_processes, config.data.gt_size**2, meter)
    last_checkpoint = state.step
    with progress_bar(state.accelerator, train.max_steps, state.step, train.progress, train.stage) as bar:
        while state.step < train.max_steps:
            index, step = state.step, state.step + 1  # the step's 0-based index, and its number
            log_now = step % train.log_every == 0
            fakes, generator_loss = generator_step(state, batches, window, index, log_now)
            diverged = _diverged(state.generator, generator_loss)
            if state.discriminator is not None:
                discriminator_loss = discriminator_step(state, fakes, window, index, log_now)
                diverged = diverged or _diverged(state.discriminator, discriminator_loss)
            if state.ema is not None:
                _update_ema(state)
            state.step = step
            window.step_done()
            bar.update(1)

            stop = stop_reason(state.accelerator, diverged)
            if stop == "diverged":
                raise ValueError(_diverged_message(state, step))
            if log_now:
                values = _scalars(state, window, index)
                if state.tb:
                    state.tb.scalars(step, values)
                    state.tb.maybe_sync()
                bar.set_postfix(loss=f"{values['loss/g_total']:.4g}", refresh=False)  # shown at the next redraw
            if stop == "preempted":
                folder = save_checkpoint(state, step)
                log(state.accelerator, f"SIGTERM: checkpoint {folder} written at step {step}; exiting")
                return "preempted"
            new_best = False
            if state.val_set is not None and (step % train.val_every == 0 or step == train.max_steps):
                new_best = _validate(state, step)
            if state.tb and state.degrader is not None and (step % train.val_every == 0 or step == train.max_steps):
                _log_degraded(state, step)
            if new_best or step % train.checkpoint_every == 0 or step == train.max_steps:
                save_checkpoint(state, step)
                last_checkpoint = step
                if new_best and state.is_main:
                    ckpt.write_best(train.run_dir, step, state.best_psnr)
    if last_checkpoint != state.step:  # resumed at or beyond max_steps
        save_checkpoint(state, state.step)
    return "done"


def generator_step(state: TrainingState, batches, window: LogWindow, index: int,
                   want_norm: bool) -> tuple[list, torch.Tensor]:
    """One optimizer step of the generator, the discriminator frozen (so the GAN loss
    puts no gradient into it). Returns this step's outputs (detached) with their HR
    crops, for the discriminator's step, and the step's total loss."""
    loss, optim = state.config.loss, state.config.optim
    generator, discriminator = state.generator, state.discriminator
    generator.set_lr(learning_rate(optim.lr_g, index, optim))
    if discriminator is not None:
        discriminator.freeze(True)
    fakes, step_loss = [], torch.zeros((), device=state.accelerator.device)
    for micro in range(state.config.train.grad_accum_steps):
        batch = next(batches)
        if state.degrader is not None:  # the LR is made here, on the device (degradation.enabled)
            batch = state.degrader(batch, index, micro)
        # The pixel and perceptual losses may aim at a sharpened GT; the discriminator
        # always sees the GT itself (Real-ESRGAN's l1/percep_gt_usm, not gan_gt_usm).
        lr, hr, target = batch["lr"], batch["gt"], batch.get("gt_sharp", batch["gt"])
        with generator.accumulate():
            out = generator(lr, all_heads=True) if state.multihead else generator(lr)
            heads = [h.float() for h in (out if isinstance(out, list) else [out])]
            # Every head of a multi-head model gets the loss; the discriminator judges
            # their mean (what the model returns at inference by default).
            fake = heads[0] if len(heads) == 1 else torch.stack(heads).mean(dim=0)
            terms = {"loss/g_pixel": loss.pixel_weight * sum(state.pixel_loss(h, target) for h in heads)}
            if discriminator is not None:
                if state.perceptual_loss is not None:
                    terms["loss/g_perceptual"] = loss.perceptual_weight * sum(
                        state.perceptual_loss(h, target) for h in heads)
                # The plain module (not the DDP wrapper): no gradient sync is armed for
                # the discriminator in the generator's step. Real logits need no graph.
                fake_logits, real_logits = discriminator.plain(fake), None
                if state.gan_loss.relativistic:
                    with torch.no_grad():
                        real_logits = discriminator.plain(hr)
                terms["loss/g_gan"] = state.gan_loss.generator_loss(fake_logits, real_logits)
            total = sum(terms.values())
            generator.backward(total)
        window.add({**terms, "loss/g_total": total})
        step_loss = step_loss + total.detach()
        if discriminator is not None:
            fakes.append((fake.detach(), hr))
    window.norm("grad_norm/g", generator.step(optim.grad_clip, want_norm))
    return fakes, step_loss


def discriminator_step(state: TrainingState, fakes: list, window: LogWindow, index: int,
                       want_norm: bool) -> torch.Tensor:
    """One optimizer step of the discriminator on real HR crops and the generator's
    outputs of this step; returns the step's loss."""
    optim, discriminator = state.config.optim, state.discriminator
    discriminator.freeze(False)
    discriminator.set_lr(learning_rate(optim.lr_d, index, optim))
    step_loss = torch.zeros((), device=state.accelerator.device)
    for fake, hr in fakes:
        with discriminator.accumulate():
            real_logits, fake_logits = discriminator(hr), discriminator(fake)
            loss = state.gan_loss.discriminator_loss(real_logits, fake_logits)
            discriminator.backward(loss)
        window.add({"loss/d": loss, "d_logits/real": real_logits.float().mean(),
                    "d_logits/fake": fake_logits.float().mean()})
        step_loss = step_loss + loss.detach()
    window.norm("grad_norm/d", discriminator.step(optim.grad_clip, want_norm))
    return step_loss


def stop_reason(accelerator, diverged: bool) -> str | None:
    """``"diverged"``, ``"preempted"`` or None, the same on every rank: a SIGTERM or a
    non-finite loss on any rank stops them all at this step. Accelerate's trigger costs
    one all-reduce per step; why it fired is asked only when it did."""
    if preemption.requested() or diverged:
        accelerator.set_trigger()
    if not accelerator.check_trigger():
        return None
    anywhere = accelerator.reduce(torch.tensor(float(diverged), device=accelerator.device), reduction="sum")
    return "diverged" if anywhere.item() > 0 else "preempted"


def learning_rate(base: float, index: int, optim: OptimConfig) -> float:
    """The learning rate of optimizer step ``index`` (0-based): a function of the step and
    the schedule's own fields only, never of ``train.max_steps``."""
    warmup = min(1.0, (index + 1) / optim.warmup_steps) if optim.warmup_steps else 1.0
    if optim.schedule == "multistep":
        return base * warmup * optim.gamma ** bisect_right(optim.milestones, index)
    if optim.schedule == "cosine_restart":
        start = 0
        for period in optim.periods:
            if index < start + period:
                progress = (index - start) / period
                return warmup * (optim.eta_min + (base - optim.eta_min) * 0.5 * (1 + math.cos(math.pi * progress)))
            start += period
        return optim.eta_min
    return base * warmup


# ---------------------------------------------------------------- helpers of the loop


def _forever(loader):
    while True:
        yield from loader


class _Float32View:
    """A module's tensors as fp32, for ``AveragedModel.update_parameters`` (it reads
    ``parameters()`` and ``buffers()`` and needs one dtype): DeepSpeed fp16/bf16 engines
    convert the generator, the EMA stays fp32. (A GPU path: untested here, where
    DeepSpeed runs fp32.)"""

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def parameters(self):
        return (p.float() for p in self.module.parameters())

    def buffers(self):
        return (b.float() if b.is_floating_point() else b for b in self.module.buffers())


def _update_ema(state: TrainingState) -> None:
    module = state.generator.module
    state.ema.update_parameters(module if state.generator.dtype == torch.float32 else _Float32View(module))


def _diverged(network, step_loss: torch.Tensor) -> bool:
    """The step's loss is not finite, and no loss scaler took care of it: fp16's scaler
    skips a step whose gradients overflow and lowers its scale; below a scale of 1 it
    cannot help any more (DeepSpeed's default minimum)."""
    if bool(torch.isfinite(step_loss)):
        return False
    return not (network.step_was_skipped() and network.loss_scale() >= 1.0)


def _diverged_message(state: TrainingState, step: int) -> str:
    run_dir = state.config.train.run_dir
    steps = ckpt.complete_steps(run_dir)
    kept = (f"the last good checkpoint, step {steps[-1]} ({ckpt.step_dir(run_dir, steps[-1])}), is kept and "
            "--resume auto continues from it" if steps else "no checkpoint was written")
    return (f"step {step}: the loss is not finite (the run diverged); stopped without saving this step: {kept}; "
            "lower optim.lr_g / optim.lr_d (or check the data and loss weights)")


def _scalars(state: TrainingState, window: LogWindow, index: int) -> dict[str, float]:
    """The TensorBoard scalars of a log step: the window's, learning rates, loss scales."""
    optim = state.config.optim
    values = window.values(state.accelerator, state.accelerator.device)
    values.update({"lr/g": learning_rate(optim.lr_g, index, optim), "loss_scale/g": state.generator.loss_scale()})
    if state.discriminator is not None:
        values.update({"lr/d": learning_rate(optim.lr_d, index, optim),
                       "loss_scale/d": state.discriminator.loss_scale()})
    return values


def _validate(state: TrainingState, step: int) -> bool:
    """Validate, log the line, return whether it is a new best."""
    scores = validation.validate(state, step)
    new_best = scores["psnr"] > state.best_psnr
    if new_best:
        state.best_psnr = scores["psnr"]
    which = "EMA generator" if state.ema is not None else "generator"
    bicubic = state.bicubic_scores
    log(state.accelerator, f"step {step}: validation ({which}) PSNR-Y {scores['psnr']:.2f} dB, SSIM "
                           f"{scores['ssim']:.4f} (bicubic: {bicubic['psnr_bicubic']:.2f} dB, "
                           f"{bicubic['ssim_bicubic']:.4f})" + (" best" if new_best else ""))
    return new_best


def _log_degraded(state: TrainingState, step: int) -> None:
    """TensorBoard's ``degraded/N`` images: what the model is taught (degraded LR |
    the generator's output | GT) on crops of the last training batch."""
    batch = state.degrader.last
    count = min(state.config.degradation.num_images_logged, batch["lr"].shape[0])
    if count == 0:
        return
    module = state.generator.module
    with torch.no_grad():
        out = module(batch["lr"][:count].to(next(module.parameters()).dtype))
    out = (out[0] if isinstance(out, list) else out).float()
    for i in range(count):
        state.tb.image(f"degraded/{i}", degraded_grid(batch["lr"][i], out[i], batch["gt"][i]), step)


def _hparams(config: Config) -> dict:
    flat = {}
    for section, values in config_module.to_dict(config).items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


if __name__ == "__main__":
    # What training VMs run: the same exit codes as `sr train` (75 for storage outages,
    # which a managed job restarts on; 2 for a bad config, one line).
    from sr_core.errors import run_command

    sys.exit(run_command("jobs.train", main))
