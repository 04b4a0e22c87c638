"""Checkpoints of a training run, under ``RUN/checkpoints/step_NNNNNNNNN/``.

A checkpoint is a folder written by every rank:

- ``state.pt`` (rank 0): step, generator, discriminator, EMA, optimizers, loss scaler,
  best validation score; with DeepSpeed the engines' own files go to ``ds/`` instead of
  the networks' optimizer states (every rank writes its partition there).
- ``rank_R.pt`` (each rank R): that rank's RNG states and data-loader position.
- ``COMPLETE`` (rank 0, last, after every rank has finished writing): only folders with
  it are ever resumed from, so a checkpoint cut short by a preemption or a crash is
  never picked up. Older complete checkpoints beyond ``keep`` are deleted (the best by
  validation PSNR is kept too).

Files are written with ``sr_core.storage.write_bytes`` (atomic on local disks, one
upload on object stores) and read back with ``torch.load(weights_only=True)``: nothing
is unpickled. DeepSpeed's own files (``ds/``) are read by DeepSpeed's loader, which
unpickles them: resume only from run folders you wrote.
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import shutil
import tempfile

import numpy as np
import torch

from sr_core import storage

CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"
BEST = "best.json"
_STEP_DIR = re.compile(r"^step_(\d{9})$")


def step_dir(run_dir: str, step: int) -> str:
    return storage.join(run_dir, CHECKPOINTS, f"step_{step:09d}")


def save_torch(url: str, obj) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    storage.write_bytes(url, buffer.getvalue())


def load_torch(url: str):
    return torch.load(io.BytesIO(storage.read_bytes(url)), map_location="cpu", weights_only=True)


def complete_steps(run_dir: str) -> list[int]:
    """Steps of the complete checkpoints of a run, oldest first."""
    root = storage.join(run_dir, CHECKPOINTS)
    fs, path = storage.get_fs(root)
    try:
        names = [os.path.basename(p.rstrip("/")) for p in fs.ls(path, detail=False)]
    except FileNotFoundError:
        return []
    steps = []
    for name in names:
        match = _STEP_DIR.match(name)
        if match and storage.exists(storage.join(root, name, COMPLETE)):
            steps.append(int(match.group(1)))
    return sorted(steps)


def find_resume(run_dir: str, resume: str) -> str | None:
    """The checkpoint folder to resume from: ``auto`` = the newest complete one of this run
    (None when there is none: a fresh start), else ``resume`` itself (a checkpoint folder)."""
    if not resume:
        return None
    if resume == "auto":
        steps = complete_steps(run_dir)
        return step_dir(run_dir, steps[-1]) if steps else None
    if not storage.exists(storage.join(resume, COMPLETE)):
        raise ValueError(f"--resume {resume}: not a complete checkpoint folder (no {COMPLETE} file in it)")
    return resume


# ---------------------------------------------------------------- RNG


def rng_state() -> dict:
    """Every RNG this process draws from (torch CPU and CUDA, numpy's global, Python's)."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "python": random.getstate(),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


# ---------------------------------------------------------------- DeepSpeed files


def download_folder(url: str, local: str) -> None:
    """Copy every file below ``url`` into the local folder ``local``."""
    for file_url in storage.list_files(url):
        rel = storage.relative_key(url, file_url)
        path = os.path.join(local, *rel.split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(storage.read_bytes(file_url))


class LocalStaging:
    """A local scratch folder for DeepSpeed's checkpoint files (its engines write and read
    local paths only); removed on exit."""

    def __enter__(self) -> str:
        self.path = tempfile.mkdtemp(prefix="sr-ds-ckpt-")
        return self.path

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


# ---------------------------------------------------------------- bookkeeping


def mark_complete(folder: str, step: int) -> None:
    storage.write_bytes(storage.join(folder, COMPLETE), json.dumps({"step": step}).encode())


def read_best(run_dir: str) -> dict | None:
    url = storage.join(run_dir, CHECKPOINTS, BEST)
    return json.loads(storage.read_bytes(url)) if storage.exists(url) else None


def write_best(run_dir: str, step: int, psnr: float) -> None:
    storage.write_bytes(storage.join(run_dir, CHECKPOINTS, BEST), json.dumps({"step": step, "psnr": psnr}).encode())


def prune(run_dir: str, keep: int) -> list[int]:
    """Delete complete checkpoints older than the newest ``keep``, except the best one;
    returns the deleted steps. Incomplete folders older than the newest complete one are
    leftovers of interrupted writes and go too."""
    steps = complete_steps(run_dir)
    best = read_best(run_dir)
    protected = set(steps[-keep:]) | ({best["step"]} if best else set())
    root = storage.join(run_dir, CHECKPOINTS)
    fs, path = storage.get_fs(root)
    deleted = []
    newest = steps[-1] if steps else -1
    for name in fs.ls(path, detail=False):
        match = _STEP_DIR.match(os.path.basename(name.rstrip("/")))
        if not match:
            continue
        step = int(match.group(1))
        if step in protected or (step not in steps and step >= newest):
            continue
        fs.rm(name, recursive=True)
        deleted.append(step)
    return sorted(deleted)
