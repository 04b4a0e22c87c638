"""One trained network and its optimizer, behind the few calls the train loop makes,
for both backends: DDP through an Accelerator, or a DeepSpeed engine.

The loop runs the same code for both; only these differ:

==================  ===================================  =================================
call                DDP (Accelerate)                     DeepSpeed engine
==================  ===================================  =================================
``sync(last)``      ``no_sync`` except on the last       nothing (the engine counts
                    accumulated batch                    micro-batches itself)
``backward(loss)``  ``accelerator.backward(loss / k)``   ``engine.backward(loss)`` then
                    (fp16: scaled by the GradScaler)     ``engine.step()`` (a real step only
                                                         at the accumulation boundary)
``step(clip)``      clip (unscaled), optimizer step,     nothing left to do; the grad norm
                    zero the gradients                   DeepSpeed measured
==================  ===================================  =================================
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn


class Trained:
    """A network being trained: ``net(x)`` runs it (wrapped for DDP / DeepSpeed);
    ``module`` is the plain ``nn.Module`` (for EMA, validation, saving)."""

    def __init__(self, module: nn.Module, optimizer, accum_steps: int, accelerator=None, engine=None):
        assert (accelerator is None) != (engine is None)
        self.accelerator, self.engine = accelerator, engine
        self.accum_steps = accum_steps
        if engine is not None:
            self.wrapped, self.optimizer = engine, engine.optimizer
        else:
            self.wrapped, self.optimizer = accelerator.prepare(module, optimizer)
        self.module = module

    @property
    def dtype(self) -> torch.dtype:
        """The parameters' dtype (DeepSpeed fp16/bf16 engines convert the module itself)."""
        return next(self.module.parameters()).dtype

    def __call__(self, x: torch.Tensor, **kwargs):
        if self.engine is not None:
            x = x.to(self.dtype)
        return self.wrapped(x, **kwargs)

    def plain(self, x: torch.Tensor) -> torch.Tensor:
        """The unwrapped module on ``x`` (no DDP/DeepSpeed hooks), fp32 out."""
        return self.module(x.to(self.dtype)).float()

    def sync(self, last: bool):
        """Context for one accumulated batch: gradients are all-reduced only on the last."""
        if self.engine is not None or last:
            return contextlib.nullcontext()
        return self.accelerator.no_sync(self.wrapped)

    def backward(self, loss: torch.Tensor) -> None:
        if self.engine is not None:
            self.engine.backward(loss)
            self.engine.step()
        else:
            self.accelerator.backward(loss / self.accum_steps)

    def step(self, clip: float, want_norm: bool) -> float | None:
        """Finish the optimizer step; returns the gradient norm (before clipping) when it
        was measured (always with clipping, else only if ``want_norm``)."""
        if self.engine is not None:
            norm = self.engine.get_global_grad_norm()
            return None if norm is None else float(norm)
        norm = None
        if clip > 0 or want_norm:
            params = [p for p in self.module.parameters() if p.grad is not None]
            norm = float(self.accelerator.clip_grad_norm_(params, clip if clip > 0 else math.inf))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def freeze(self, frozen: bool) -> None:
        self.module.requires_grad_(not frozen)

    def loss_scale(self) -> float:
        if self.engine is not None:
            optimizer = self.engine.optimizer
            scale = getattr(optimizer, "cur_scale", None) or getattr(optimizer, "loss_scale", None)
            return float(scale) if scale is not None else 1.0
        scaler = self.accelerator.scaler
        return float(scaler.get_scale()) if scaler is not None else 1.0
