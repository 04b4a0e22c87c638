"""Checkpoints of a training run, under ``RUN/checkpoints/step_NNNNNNNNN/``.

A checkpoint is a folder written by every rank:

- ``state.pt`` (rank 0): step, generator, discriminator, EMA, optimizers, loss scaler,
  best validation score; with DeepSpeed the engines' own files go to ``ds/`` instead of
  the networks' optimizer states (every rank writes its partition there).
- ``rank_R.pt`` (each rank R): that rank's RNG states and data-loader position.
- ``COMPLETE`` (rank 0, last, after every rank has finished writing): the size and
  SHA-256 of every file of the folder (all ranks'), the step, and the run's config. Only
  folders with it are ever resumed from, so a checkpoint cut short by a preemption or a
  crash is never picked up. Older complete checkpoints beyond ``keep`` are deleted (the
  best by validation PSNR is kept too).

A write that fails on any rank (a full disk, a storage outage) fails on every rank at
the same point: the partial folder is removed and one line says which checkpoint is
kept. Resuming checks the checkpoint's model against the config before any model is
built, then every file against COMPLETE: a damaged checkpoint (a truncated or altered
file under its marker) is marked ``DAMAGED`` (kept for inspection) and the previous
complete one is used, with a warning; ``sr train export`` falls back the same way
(without marking). A COMPLETE that is not a JSON object naming the folder's step and
recording ``state.pt`` and ``rank_0.pt`` is damage too (so a rank's RNG and loader
state is never silently lost); checkpoints written before COMPLETE held checksums are
checked only for those two files being present and ``state.pt`` loading.

Files are written with ``sr_core.storage.write_bytes`` (atomic on local disks, one
upload on object stores) and read back with ``torch.load(weights_only=True)``: nothing
is unpickled. DeepSpeed's own files (``ds/``) are read by DeepSpeed's loader, which
unpickles them: resume only from run folders you wrote.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import re
import shutil
import tempfile

import numpy as np
import torch
import torch.distributed as dist

from jobs import config as config_module
from sr_core import load_generator, storage
from sr_core.errors import short_reason
from sr_core.lease import Lease

CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"
DAMAGED = "DAMAGED"
BEST = "best.json"
# `sr train --processes N` holds the run directory's lease in the launching process; its
# children (the ranks) find the run directory here and do not take it again.
LEASE_HELD_ENV = "SR_RUN_DIR_LEASE_HELD"
# ... and rank 0 adopts that lease by its token, so that it lives as long as rank 0 does
# (the process that marks checkpoints complete), whatever happens to the launcher.
LEASE_TOKEN_ENV = "SR_RUN_DIR_LEASE_TOKEN"
_STEP_DIR = re.compile(r"^step_(\d{9})$")


def step_dir(run_dir: str, step: int) -> str:
    return storage.join(run_dir, CHECKPOINTS, f"step_{step:09d}")


def load_torch(url: str):
    data = storage.read_bytes(url)
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any damage: torch raises several types
        # torch's messages about such files advise retrying with weights_only=False, which
        # would unpickle (run) whatever the file holds: never shown.
        reason = short_reason(exc, None) or type(exc).__name__
        if "weights_only" in reason or "Weights only" in reason:
            reason = "it holds objects that are not plain tensors and numbers"
        raise ValueError(f"{url}: not a readable checkpoint file ({reason[:200]}); it is damaged or not ours: "
                         "use another checkpoint") from None


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


def find_resume(run_dir: str, resume: str, config=None, rank: int = 0, warn=None) -> str | None:
    """The checkpoint folder to resume from: ``auto`` = the newest intact complete one of
    this run (None when there is none: a fresh start), else ``resume`` itself (a
    checkpoint folder). Before any model is built: the checkpoint's model must be the one
    ``config`` asks for, and its files those COMPLETE records. A damaged checkpoint is
    marked ``DAMAGED`` (by rank 0) and the previous one is used, with a ``warn``ing; with
    none intact left, or a named one damaged, a ``ValueError`` says so."""
    if not resume:
        return _on_rank0(lambda: refuse_to_replace(run_dir))
    # Rank 0 decides (and marks) for every rank: one reading of the files, one verdict.
    return _on_rank0(lambda: _find_resume(run_dir, resume, config, rank, warn))


def earlier_run(run_dir: str) -> str:
    """What of an earlier run the run directory holds that a fresh start would replace or
    mix with (complete checkpoints, best.json, exported models), described; '' if none."""
    found = []
    steps = complete_steps(run_dir)
    if steps:
        found.append(f"checkpoints up to step {steps[-1]}")
    for name in (storage.join(CHECKPOINTS, BEST), "model.safetensors", "model_ema.safetensors"):
        if storage.exists(storage.join(run_dir, name)):
            found.append(name)
    return ", ".join(found)


def refuse_to_replace(run_dir: str) -> None:
    """A fresh start (no ``--resume``) in a run directory holding an earlier run would
    replace its models and early checkpoints while its later ones stay, so that a later
    ``--resume auto`` continues the old run: refused, naming what is there."""
    found = earlier_run(run_dir)
    if found:
        raise ValueError(f"train.run_dir: {run_dir} holds an earlier run ({found}); continue it with --resume auto, "
                         "or start over in another train.run_dir (or delete that folder first)")


def _find_resume(run_dir: str, resume: str, config, rank: int, warn) -> str | None:
    if resume != "auto":
        if not storage.exists(storage.join(resume, COMPLETE)):
            raise ValueError(f"--resume {resume}: not a complete checkpoint folder (no {COMPLETE} file in it)")
        marker = read_marker(resume)
        damage = marker_damage(resume, marker)
        if damage:
            raise ValueError(f"--resume {resume}: the checkpoint is damaged ({damage}); resume from another one")
        check_compatible(resume, marker, config, "--resume " + resume)
        damage = verify(resume, marker)
        if damage:
            raise ValueError(f"--resume {resume}: the checkpoint is damaged ({damage}); resume from another one")
        return resume
    return _newest_intact(run_dir, config, warn, "resuming from", mark=rank == 0)


def _newest_intact(run_dir: str, config, warn, doing: str, mark: bool, steps: list[int] | None = None) -> str | None:
    """The newest of ``steps`` (default: every complete one) whose files match COMPLETE;
    one ``warn`` line per damaged newer one, naming what is used instead."""
    steps = complete_steps(run_dir) if steps is None else steps
    damaged: list[tuple[str, str]] = []
    for step in reversed(steps):
        folder = step_dir(run_dir, step)
        try:
            marker = read_marker(folder)
        except FileNotFoundError:  # marked damaged meanwhile (by another job)
            damaged.append((folder, "marked damaged"))
            continue
        damage = marker_damage(folder, marker)
        if damage is None and config is not None:
            try:
                check_compatible(folder, marker, config, "--resume auto")
            except ValueError as exc:
                if marker.get("config") is not None:
                    raise  # another model: refused, not passed over
                damage = str(exc)  # an old marker and a state.pt that does not load
        if damage is None:
            damage = verify(folder, marker)
        if damage is None:
            if warn is not None:
                for bad, why in damaged:
                    warn(f"warning: {bad} is damaged ({why}); {doing} step {step} instead ({folder})"
                         + (f"; the damaged folder is kept, marked {DAMAGED}" if mark else ""))
            return folder
        damaged.append((folder, damage))
        if mark:
            mark_damaged(folder, marker, damage)
    if damaged:
        listed = "; ".join(f"{os.path.basename(f)}: {why}" for f, why in damaged[:5])
        raise ValueError(f"{storage.join(run_dir, CHECKPOINTS)}: no intact checkpoint left ({listed}); restore the "
                         "files, or start over in another train.run_dir")
    return None


def export_source(run_dir: str, step: int | None = None, warn=None) -> str:
    """The checkpoint ``sr train export`` reads: ``step``'s (which must be intact), or the
    newest intact one, with a ``warn``ing for each damaged newer one."""
    steps = complete_steps(run_dir)
    if not steps:
        raise ValueError(f"{run_dir}: no complete checkpoint under {storage.join(run_dir, CHECKPOINTS)}")
    if step is None:
        return _newest_intact(run_dir, None, warn, "exporting", mark=False, steps=steps)
    if step not in steps:
        raise ValueError(f"{run_dir}: no complete checkpoint at step {step}; there are: {', '.join(map(str, steps))}")
    folder = step_dir(run_dir, step)
    marker = read_marker(folder)
    damage = marker_damage(folder, marker) or verify(folder, marker)
    if damage:
        others = ", ".join(str(s) for s in steps if s != step) or "none"
        raise ValueError(f"{folder}: the checkpoint is damaged ({damage}); export another step (--step; complete "
                         f"ones: {others})")
    return folder


def read_marker(folder: str) -> dict:
    """The COMPLETE marker of a checkpoint folder (``{"step": N}`` in checkpoints written
    before it recorded files and config)."""
    data = storage.read_bytes(storage.join(folder, COMPLETE))
    try:
        marker = json.loads(data)
    except ValueError:
        marker = None
    return marker if isinstance(marker, dict) else {}


# What every checkpoint holds, whatever its world size and backend: without rank 0's
# RNG and loader state a resume would silently start its data epoch over.
REQUIRED_FILES = ("state.pt", "rank_0.pt")


def marker_damage(folder: str, marker: dict) -> str | None:
    """What makes a COMPLETE marker unusable, checked before any file is read: not a JSON
    object, no step or another step than the folder's, or no record of the files every
    checkpoint has (a marker of the old ``{"step": N}`` form only needs them present).
    None when it is usable."""
    if not marker:
        return f"{COMPLETE} is empty or not a JSON object"
    step = marker.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step != _folder_step(folder):
        return f"{COMPLETE} names step {step!r}, not the folder's"
    files = marker.get("files")
    if files is None:  # written before COMPLETE recorded files: they must at least be there
        for rel in REQUIRED_FILES:
            if not storage.exists(storage.join(folder, rel)):
                return f"{rel} is missing"
        return None
    if not isinstance(files, dict) or not all(
            isinstance(rec, dict) and isinstance(rec.get("bytes"), int) and isinstance(rec.get("sha256"), str)
            for rec in files.values()):
        return f"{COMPLETE}'s list of files is malformed"
    missing = [rel for rel in REQUIRED_FILES if rel not in files]
    if missing:
        return f"{COMPLETE} records no {missing[0]}"
    return None


def _folder_step(folder: str) -> int | None:
    match = _STEP_DIR.match(os.path.basename(folder.rstrip("/")))
    return int(match.group(1)) if match else None


def verify(folder: str, marker: dict) -> str | None:
    """What is wrong with the folder's files against the sizes and SHA-256s COMPLETE
    records (None: nothing, or nothing recorded). Reads every file once."""
    for rel, want in sorted((marker.get("files") or {}).items()):
        fs, path = storage.get_fs(storage.join(folder, rel))
        digest, size = hashlib.sha256(), 0
        try:
            with fs.open(path, "rb") as f:
                while chunk := f.read(8 * 1024 * 1024):
                    digest.update(chunk)
                    size += len(chunk)
        except FileNotFoundError:
            return f"{rel} is missing"
        if size != want["bytes"]:
            return f"{rel} has {size} bytes, {COMPLETE} records {want['bytes']}"
        if digest.hexdigest() != want["sha256"]:
            return f"{rel}: its checksum differs from the one {COMPLETE} records"
    return None


def mark_damaged(folder: str, marker: dict, reason: str) -> None:
    """Take a damaged checkpoint out of the complete ones, keeping it (and why) for
    inspection; a later checkpoint of the same step replaces it."""
    storage.write_bytes(storage.join(folder, DAMAGED), json.dumps({"reason": reason, "complete": marker}).encode())
    fs, path = storage.get_fs(storage.join(folder, COMPLETE))
    with contextlib.suppress(FileNotFoundError):
        fs.rm(path)


def describe_model(config: dict) -> str:
    """``rrdbnet (tiny) x2`` (+ options, + the discriminator in the GAN stage), from a
    config as plain data."""
    m, stage = config.get("model", {}), config.get("train", {}).get("stage", "psnr")
    variant = f" ({m['generator_variant']})" if m.get("generator_variant") else ""
    text = f"{m.get('generator')}{variant} x{config.get('data', {}).get('scale')}"
    if m.get("generator_options"):
        text += f" {m['generator_options']}"
    if stage == "gan":
        variant = f" ({m['discriminator_variant']})" if m.get("discriminator_variant") else ""
        text += f", stage gan against {m.get('discriminator')}{variant}"
        if m.get("discriminator_options"):
            text += f" {m['discriminator_options']}"
    else:
        text += f", stage {stage}"
    return text


def check_compatible(folder: str, marker: dict, config, what: str) -> None:
    """Refuse a checkpoint of another architecture, scale or stage than ``config`` asks
    for (its networks would not load), naming both."""
    if config is None:
        return
    saved = marker.get("config")
    if saved is None:  # written before COMPLETE held the config
        saved = load_torch(storage.join(folder, "state.pt")).get("config", {})
    ours = config_module.to_dict(config)
    theirs_text, ours_text = describe_model(saved), describe_model(ours)
    if theirs_text != ours_text:
        raise ValueError(f"{what}: {folder} holds {theirs_text}, but the config asks for {ours_text}; resume "
                         "with the checkpoint's model.*, data.scale and train.stage, or use another train.run_dir")


def checkpoint_step(folder: str) -> int:
    """The step of a checkpoint folder (``.../step_NNNNNNNNN``)."""
    match = _STEP_DIR.match(os.path.basename(folder.rstrip("/")))
    if not match:
        raise ValueError(f"{folder}: not a checkpoint folder (expected .../step_NNNNNNNNN)")
    return int(match.group(1))


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


class CheckpointWriter:
    """One rank's share of the checkpoint of ``step``: files are recorded with their
    size and SHA-256; :meth:`finish` (every rank calls it) gathers what every rank wrote
    and rank 0 marks the folder COMPLETE with that list and ``config``. A failed write is
    held until :meth:`finish`, so that every rank stops there together: rank 0 removes
    the partial folder and every rank raises one line saying which checkpoint is kept
    (a ``ValueError``, or a ``StorageError`` for an outage: exit 2 or 75)."""

    def __init__(self, run_dir: str, step: int, rank: int, config=None):
        self.run_dir, self.step, self.rank = run_dir, step, rank
        self.folder = step_dir(run_dir, step)
        self.config = config_module.to_dict(config) if config is not None else None
        self.files: dict[str, dict] = {}
        self.error: tuple[str, str, bool] | None = None  # (file, reason, storage outage?)

    def write(self, rel: str, data: bytes) -> None:
        if self.error is not None:
            return
        try:
            storage.write_bytes(storage.join(self.folder, rel), data)
        except OSError as exc:  # a full disk, a read-only one, storage down past the retries
            reason = exc.strerror if exc.errno is not None and exc.strerror else short_reason(exc, 300)
            self.error = (rel, reason, isinstance(exc, storage.StorageError))
            return
        self.files[rel] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    def save_torch(self, rel: str, obj) -> None:
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        self.write(rel, buffer.getvalue())

    def upload_folder(self, local: str, rel: str) -> None:
        """Every file below the local folder ``local``, under ``rel/`` (same relative paths)."""
        for path, sub in storage.local_files(local):
            with open(path, "rb") as f:
                self.write(f"{rel}/{sub}", f.read())

    def finish(self) -> None:
        """Collective: mark the folder COMPLETE, or stop every rank on one line."""
        shares = _all_gather((self.files, self.error))
        error = next((e for _files, e in shares if e is not None), None)
        if self.rank == 0:
            if error is None:
                files = {rel: rec for share, _e in shares for rel, rec in share.items()}
                marker = {"step": self.step, "files": files, "config": self.config}
                try:
                    storage.write_bytes(storage.join(self.folder, COMPLETE), json.dumps(marker).encode())
                    fs, path = storage.get_fs(storage.join(self.folder, DAMAGED))
                    if fs.exists(path):  # this step was damaged before: written anew now
                        fs.rm(path)
                except OSError as exc:
                    reason = exc.strerror if exc.errno is not None and exc.strerror else short_reason(exc, 300)
                    error = (COMPLETE, reason, isinstance(exc, storage.StorageError))
            if error is not None:
                fs, path = storage.get_fs(self.folder)
                with contextlib.suppress(OSError):
                    fs.rm(path, recursive=True)
        if len(shares) > 1:
            # Rank 0's verdict, after its clean-up: a launcher stops the other ranks as soon
            # as one exits, so no rank leaves before the partial folder is gone.
            error = _all_gather(error)[0]
        if error is not None:
            raise self._failure(*error)

    def _failure(self, rel: str, reason: str, outage: bool) -> Exception:
        steps = [s for s in complete_steps(self.run_dir) if s != self.step]
        if steps:
            kept = (f"kept: step {steps[-1]}, the last complete checkpoint ({step_dir(self.run_dir, steps[-1])}); "
                    f"{'' if outage else 'free space there, then '}rerun with --resume auto to continue from step "
                    f"{steps[-1]}")
        else:
            kept = "no complete checkpoint was written before: a rerun starts from step 0"
        text = (f"{self.folder}: checkpoint of step {self.step} not written ({rel}: {reason}); the partial folder "
                f"was removed; {kept}")
        return storage.StorageError(text) if outage else ValueError(text)


def _on_rank0(compute):
    """``compute()`` on rank 0; its result, or the exception it raised, on every rank."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return compute()
    box: list = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = (True, compute())
        except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
            box[0] = (False, exc)
    dist.broadcast_object_list(box, src=0)  # NCCL: from the current CUDA device (untested here: no GPU)
    ok, value = box[0]
    if not ok:
        raise value
    return value


def _all_gather(value) -> list:
    """``value`` of every rank, in rank order ([value] without a process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [value]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)  # NCCL: on the current CUDA device (untested here: no GPU)
    return out


def run_lease(run_dir: str):
    """The run directory's lease (``sr_core.lease``), taken by rank 0 only (or by the
    launching process, see LEASE_HELD_ENV): a second job on the same run directory is
    refused naming this one. A holder on another host is waited for until it beats or
    goes stale (at most ``sr_core.lease.MAX_WAIT_SECONDS``, 150 s, whatever its file
    claims): a spot VM that vanished without SIGTERM leaves its lease behind, and its
    replacement must take it over rather than fail. SIGTERM ends that wait at once."""
    if int(os.environ.get("RANK", "0")) != 0:
        return contextlib.nullcontext()
    if os.environ.get(LEASE_HELD_ENV) == run_dir:
        token = os.environ.get(LEASE_TOKEN_ENV, "")
        return Lease(run_dir, "sr train", adopt=token) if token else contextlib.nullcontext()
    from jobs import preemption

    return Lease(run_dir, "sr train", wait_for_stale=True, interrupted=preemption.requested)


def load_pretrained(generator, url: str, variant: str = "") -> None:
    """``train.pretrained`` into ``generator``; a file of another architecture or scale
    is refused naming both."""
    try:
        start = load_generator(url)
    except ValueError as exc:
        raise ValueError(f"train.pretrained: {exc}") from None
    theirs, mine = dict(start.hparams), dict(generator.hparams)
    if (start.arch_name, theirs) != (generator.arch_name, mine):
        differs = [f"{k} {theirs.get(k)} vs {mine.get(k)}" for k in sorted(set(theirs) | set(mine))
                   if theirs.get(k) != mine.get(k)]
        raise ValueError(f"train.pretrained: {url} holds {start.arch_name} x{start.scale}, but the run trains "
                         f"{generator.arch_name}{f' ({variant})' if variant else ''} x{generator.scale} "
                         f"(file vs run: {', '.join(differs) or 'architecture'}); use a file of the same "
                         "model.generator, variant and data.scale, or set those to the file's")
    generator.load_state_dict(start.state_dict())


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
