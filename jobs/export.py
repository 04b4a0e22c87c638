"""Model files of a run: ``RUN/model.safetensors`` and ``RUN/model_ema.safetensors``,
self-describing files for ``sr upscale`` (architecture, scale and provenance in their
metadata), written at the end of a run and by ``sr train export RUN [--step N]`` from
any complete checkpoint whose files match its COMPLETE record."""

from __future__ import annotations

import sys

from jobs import checkpoint as ckpt
from jobs import config as config_module
from jobs.config import Config
from sr_core import build_generator, save_generator, storage


def export_models(run_dir: str, generator_state: dict, ema_state: dict | None, config: Config, step: int) -> list[str]:
    """Write the generator (and its EMA) of ``step``; returns the URLs written."""
    model = config.model
    written = []
    for name, state in (("model.safetensors", generator_state), ("model_ema.safetensors", ema_state)):
        if state is None:
            continue
        generator = build_generator(model.generator, model.generator_variant or None, scale=config.data.scale,
                                    **model.generator_options)
        generator.load_state_dict(state)
        url = storage.join(run_dir, name)
        save_generator(generator, url, run=run_dir, step=step, stage=config.train.stage,
                       weights="ema" if "ema" in name else "generator")
        written.append(url)
    return written


def export_checkpoint(run_dir: str, step: int | None = None) -> list[str]:
    """``sr train export``: the models of checkpoint ``step`` (default: the newest intact
    one; a damaged newer one is named in a warning on stderr)."""
    folder = ckpt.export_source(run_dir, step, warn=lambda text: print(text, file=sys.stderr))
    state = ckpt.load_torch(f"{folder}/state.pt")
    return export_models(run_dir, state["g"], state["ema"], config_module.from_dict(state["config"]),
                         ckpt.checkpoint_step(folder))
