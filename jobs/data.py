"""Training and validation data: random crops from ``sr prepare`` shards (or paired
LR/HR folders), LR made by MATLAB-bicubic downscaling, paired augmentation, LR-only
degradations, deterministic distributed order, and a meter of the time the train loop
waits for data. The process-safe local shard cache and the shard reader are in
``jobs/data_shards.py``.

Order of an epoch (the stream is a function of seed, epoch, rank and world size):

1. the shards are permuted by ``(seed, epoch)`` and dealt to the ranks so that sample
   counts balance (each shard goes to exactly one rank: disjoint, complete);
2. a rank walks its shards in that order, shuffling samples within windows of
   ``window_shards`` consecutive shards (a few shards are hot at a time, so a worker
   reads from a few cached files, not all of them);
3. ranks with fewer samples repeat the start of their own stream, so that all ranks
   take the same number of steps (DistributedSampler pads the same way);
4. the crop and augmentation of stream position ``p`` use an RNG seeded by
   ``(seed, epoch, rank, p)``: independent of the number of DataLoader workers and of
   where a resumed run starts.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler

# The shard cache and reader (jobs/data_shards.py) are also imported from here.
from jobs.data_shards import DEFAULT_CACHE_DIR, ShardCache, _FileReader  # noqa: F401
from jobs.preemption import ignore_sigterm
from jobs.prepare import read_index
from sr_core import codecs, datasets, storage
from sr_core.degradations import apply_degradations
from sr_core.errors import exit_code
from sr_core.resize import imresize, mod_crop


# --------------------------------------------------------------------------- augmentation

@dataclass
class Augment:
    """Paired geometric augmentation and LR-only degradations, with probabilities."""

    hflip_prob: float = 0.5
    vflip_prob: float = 0.5
    transpose_prob: float = 0.5
    degradation_probs: dict | None = None

    def geometric(self, rng: np.random.Generator, *images: np.ndarray) -> list[np.ndarray]:
        # Draw all decisions first so LR and HR get the same ones.
        hflip = rng.random() < self.hflip_prob
        vflip = rng.random() < self.vflip_prob
        transpose = rng.random() < self.transpose_prob
        out = []
        for img in images:
            if hflip:
                img = img[:, ::-1]
            if vflip:
                img = img[::-1]
            if transpose:
                img = img.transpose(1, 0, 2)
            out.append(np.ascontiguousarray(img))
        return out

    def degrade(self, rng: np.random.Generator, lr: np.ndarray) -> np.ndarray:
        if not self.degradation_probs:
            return lr
        return apply_degradations(lr, self.degradation_probs, rng)


def _to_tensor(img: np.ndarray) -> torch.Tensor:
    """HWC uint8 array -> CHW uint8 tensor (a quarter of float32's bytes to move between
    processes and to the GPU; :class:`TrainLoader` makes floats at the destination)."""
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))


def _to_float(img: np.ndarray) -> torch.Tensor:
    return _to_tensor(img).float().div_(255.0)


def _random_crop(rng: np.random.Generator, h: int, w: int, size: int) -> tuple[int, int]:
    return int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))


def _rng_for(key) -> tuple[int, np.random.Generator]:
    """``key`` is a sample index, or ``(index, seed_words)`` from :class:`ShardSampler`."""
    if isinstance(key, tuple):
        index, words = key
        return int(index), np.random.default_rng(list(words))
    return int(key), np.random.default_rng(int(key))


# --------------------------------------------------------------------------- datasets

class SubImageDataset(Dataset):
    """Random ``gt_size`` crops of the sub-images written by ``sr prepare``; LR by
    ``sr_core.resize.imresize`` (MATLAB bicubic, the published convention).

    Items are ``{"lr": (3, gt/scale, gt/scale), "gt": (3, gt, gt)}`` uint8 tensors plus
    the sample's ``index``; :class:`TrainLoader` batches them as float32 in [0, 1].
    Sub-images smaller than ``gt_size`` (small edge tiles) are left out.
    """

    def __init__(self, shards_url: str, gt_size: int, scale: int, augment: Augment | None = None,
                 cache: ShardCache | None = None, gt_only: bool = False):
        if gt_size % scale:
            raise ValueError(f"gt_size {gt_size} must be a multiple of scale {scale}")
        self.shards_url, self.gt_size, self.scale = shards_url, gt_size, scale
        self.gt_only = gt_only
        """No LR: the training step makes it (``degradation.enabled``); items carry an
        empty ``lr``."""
        self.augment = augment or Augment()
        self.index = read_index(shards_url)
        root = shards_url[: -len("/index.json")] if shards_url.endswith("/index.json") else shards_url
        self.shards = [(storage.join(root, s["name"]), s["bytes"], s["sha256"]) for s in self.index["shards"]]
        self.raw = self.index["settings"].get("format", "png") == "raw"
        self.samples: list[tuple[int, int, int, int, int]] = []  # (shard, offset, size, height, width)
        self.names: list[str] = []
        self.groups: list[list[int]] = []  # sample indices of each shard
        self.num_too_small = 0
        for shard_id, shard in enumerate(self.index["shards"]):
            group = []
            for name, offset, size, height, width in shard["members"]:
                if min(height, width) < gt_size:
                    self.num_too_small += 1
                    continue
                group.append(len(self.samples))
                self.samples.append((shard_id, offset, size, height, width))
                self.names.append(name)
            self.groups.append(group)
        if not self.samples:
            raise ValueError(f"{shards_url}: no sub-image is at least gt_size={gt_size} pixels on both sides "
                             "(prepare with a larger --size, or lower data.gt_size)")
        if cache is None and not storage.is_local(root):
            cache = ShardCache()
        self.reader = _FileReader(cache)

    def __len__(self) -> int:
        return len(self.samples)

    def read_subimage(self, index: int, rows: tuple[int, int] | None = None) -> np.ndarray:
        """The sub-image (or, for raw shards, just ``rows`` of it) as RGB uint8."""
        try:
            return self._read_subimage(index, rows)
        except ValueError:
            url, _, sha = self.shards[self.samples[index][0]]
            if not self.reader.discard_if_corrupt(url, sha):
                raise
        return self._read_subimage(index, rows)  # from a fresh copy of a damaged cached one

    def _read_subimage(self, index: int, rows: tuple[int, int] | None) -> np.ndarray:

        shard_id, offset, size, height, width = self.samples[index]
        url, nbytes, sha = self.shards[shard_id]
        try:
            if not self.raw:
                data = self.reader.read(url, offset, size, size=nbytes, sha256=sha)
                return codecs.decode_rgb8(data, self.names[index])
            first, end = rows or (0, height)
            row = width * 3
            data = self.reader.read(url, offset + first * row, (end - first) * row, size=nbytes, sha256=sha)
            return np.frombuffer(data, dtype=np.uint8).reshape(end - first, width, 3)
        except ValueError as exc:
            text = str(exc)
            if text.startswith(url + ": "):  # about the whole shard (size, checksum)
                raise
            text = text[len(self.names[index]) + 2:] if text.startswith(self.names[index] + ": ") else text
            fix = "" if "sr prepare" in text else "; the shard is damaged: re-run `sr prepare`"
            raise ValueError(f"{url}: member {self.names[index]}: {text}{fix}") from None

    def __getitem__(self, key) -> dict[str, torch.Tensor]:
        index, rng = _rng_for(key)
        height, width = self.samples[index][3:]
        y, x = _random_crop(rng, height, width, self.gt_size)
        if self.raw:  # read only the crop's rows
            hr = self.read_subimage(index, (y, y + self.gt_size))[:, x:x + self.gt_size]
        else:
            hr = self.read_subimage(index)[y:y + self.gt_size, x:x + self.gt_size]
        (gt,) = self.augment.geometric(rng, hr)
        if self.gt_only:
            return {"lr": _to_tensor(gt[:0, :0]), "gt": _to_tensor(gt), "index": index}
        lr = imresize(gt, scale=1 / self.scale)
        lr = self.augment.degrade(rng, lr)
        return {"lr": _to_tensor(lr), "gt": _to_tensor(gt), "index": index}


def pair_folders(hr_url: str, lr_url: str, scale: int) -> list[tuple[str, str]]:
    """Match LR to HR images by name: ``0001x4.png`` (DIV2K) or ``0001.png`` beside
    ``0001.png``; LR may be in any image format. Every HR image needs its LR."""
    hr_files = storage.list_files(hr_url, codecs.INPUT_EXTENSIONS)
    lr_by_key = {}
    for url in storage.list_files(lr_url, codecs.INPUT_EXTENSIONS):
        lr_by_key.setdefault(datasets.hr_key(storage.relative_key(lr_url, url), scale), url)
    pairs = []
    for url in hr_files:
        stem = datasets.hr_key(storage.relative_key(hr_url, url))
        lr = lr_by_key.get(stem)
        if lr is None:
            raise ValueError(f"{url}: no LR image for it in {lr_url} (expected {stem}x{scale}.png or {stem}.png)")
        pairs.append((url, lr))
    if not pairs:
        raise ValueError(f"{hr_url}: no HR images found")
    return pairs


class PairedImageDataset(Dataset):
    """Aligned random crops from paired LR/HR folders (DIV2K's ``X4/0001x4.png``
    beside ``0001.png``). Whole images are decoded per crop: for big data sets,
    ``sr prepare`` + :class:`SubImageDataset` is much faster."""

    def __init__(self, hr_url: str, lr_url: str, gt_size: int, scale: int,
                 augment: Augment | None = None, cache: ShardCache | None = None):
        if gt_size % scale:
            raise ValueError(f"gt_size {gt_size} must be a multiple of scale {scale}")
        self.pairs = pair_folders(hr_url, lr_url, scale)
        self.gt_size, self.scale = gt_size, scale
        self.augment = augment or Augment()
        self.groups = [[i] for i in range(len(self.pairs))]
        if cache is None and not (storage.is_local(hr_url) and storage.is_local(lr_url)):
            cache = ShardCache()
        self.reader = _FileReader(cache)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, key) -> dict[str, torch.Tensor]:

        index, rng = _rng_for(key)
        hr_url, lr_url = self.pairs[index]
        hr = codecs.decode_rgb8(self.reader.read(hr_url), hr_url)
        lr = codecs.decode_rgb8(self.reader.read(lr_url), lr_url)
        s, lq = self.scale, self.gt_size // self.scale
        if lr.shape[0] * s > hr.shape[0] or lr.shape[1] * s > hr.shape[1] or \
                hr.shape[0] - lr.shape[0] * s >= s or hr.shape[1] - lr.shape[1] * s >= s:
            raise ValueError(f"{lr_url}: {lr.shape[1]}x{lr.shape[0]} is not {hr_url} "
                             f"({hr.shape[1]}x{hr.shape[0]}) divided by scale {s}")
        if min(lr.shape[:2]) < lq:
            raise ValueError(f"{lr_url}: smaller than the LR crop ({lq} px); lower data.gt_size")
        y, x = _random_crop(rng, lr.shape[0], lr.shape[1], lq)
        lr_crop = lr[y:y + lq, x:x + lq]
        gt_crop = hr[y * s:(y + lq) * s, x * s:(x + lq) * s]
        lr_crop, gt_crop = self.augment.geometric(rng, lr_crop, gt_crop)
        lr_crop = self.augment.degrade(rng, lr_crop)
        return {"lr": _to_tensor(lr_crop), "gt": _to_tensor(gt_crop), "index": index}


class ValidationDataset(Dataset):
    """HR images from a folder or prefix (Set5/Set14/BSD100/DIV2K-valid layouts), each
    cropped to a multiple of ``scale`` (or to a centre crop), LR by MATLAB bicubic.
    Items: ``{"name", "lr", "gt"}`` with float32 CHW tensors in [0, 1]; sizes differ, so
    use batch size 1."""

    def __init__(self, folder: str, scale: int, center_crop: int = 0):

        if center_crop and center_crop % scale:
            raise ValueError(f"validation centre crop {center_crop} must be a multiple of scale {scale}")
        self.folder, self.scale, self.center_crop = folder, scale, center_crop
        self.skipped: list[tuple[str, str]] = []
        """(URL, reason) of named pipes, sockets and devices in the folder: never opened
        (reading a FIFO blocks forever), reported once here."""
        self.files = storage.list_files(folder, codecs.INPUT_EXTENSIONS, special=self.skipped)
        for url, reason in self.skipped:
            logging.getLogger(__name__).warning("validation: skipped %s: %s", storage.printable(url), reason)
        if not self.files:
            raise ValueError(f"{folder}: no validation images found")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        url = self.files[index]
        hr = codecs.decode_rgb8(storage.read_bytes(url), url)
        h, w = hr.shape[:2]
        if self.center_crop:
            c = self.center_crop
            if min(h, w) < c:
                raise ValueError(f"{url}: {w}x{h} is smaller than the validation centre crop {c}")
            y, x = (h - c) // 2, (w - c) // 2
            hr = hr[y:y + c, x:x + c]
        else:
            if min(h, w) < self.scale:
                raise ValueError(f"{url}: {w}x{h} is smaller than the scale {self.scale}; remove it from "
                                 "the validation folder")
            hr = mod_crop(hr, self.scale)
        lr = imresize(hr, scale=1 / self.scale)
        return {"name": storage.relative_key(self.folder, url), "lr": _to_float(lr), "gt": _to_float(hr)}


# --------------------------------------------------------------------------- order

def assign_groups(group_sizes: list[int], world_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Deal groups (shards) to ranks: permuted by (seed, epoch), each to the rank that
    has the fewest samples so far. Returns each rank's groups in reading order."""
    # a shard whose sub-images are all smaller than gt_size gives a rank nothing to read
    nonempty = sum(1 for n in group_sizes if n > 0)
    if nonempty < world_size:
        raise ValueError(f"{nonempty} shards with samples cannot be split over {world_size} ranks; "
                         "re-run `sr prepare` with a smaller --images-per-shard")
    order = np.random.default_rng([seed, epoch]).permutation(len(group_sizes))
    ranks: list[list[int]] = [[] for _ in range(world_size)]
    counts = [0] * world_size
    for g in order:
        r = min(range(world_size), key=lambda i: (counts[i], i))
        ranks[r].append(int(g))
        counts[r] += group_sizes[g]
    return ranks


class ShardSampler(Sampler):
    """This rank's stream of ``(sample_index, rng_seed_words)`` for one epoch; see the
    module docstring. ``set_epoch(epoch, start)`` picks the epoch and the stream
    position to start from (mid-epoch resume)."""

    def __init__(self, groups: list[list[int]], rank: int, world_size: int, seed: int = 0,
                 window_shards: int = 4):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if window_shards < 1:
            raise ValueError(f"window_shards must be >= 1, got {window_shards}")
        self.groups, self.rank, self.world_size = groups, rank, world_size
        self.seed, self.window_shards = seed, window_shards
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def epoch_indices(self, epoch: int) -> list[int]:
        """All sample indices this rank reads in ``epoch``, padded to the common length."""
        sizes = [len(g) for g in self.groups]
        assignment = assign_groups(sizes, self.world_size, self.seed, epoch)
        length = max(sum(sizes[g] for g in mine) for mine in assignment)
        mine = assignment[self.rank]
        indices: list[int] = []
        for w in range(0, len(mine), self.window_shards):
            window = [i for g in mine[w:w + self.window_shards] for i in self.groups[g]]
            rng = np.random.default_rng([self.seed, epoch, self.rank, w])
            indices.extend(window[i] for i in rng.permutation(len(window)))
        if not indices:
            raise ValueError(f"rank {self.rank} got no samples (all its shards are empty)")
        while len(indices) < length:  # pad with the rank's own stream, from its start
            indices.extend(indices[: length - len(indices)])
        return indices

    def __len__(self) -> int:
        sizes = [len(g) for g in self.groups]
        assignment = assign_groups(sizes, self.world_size, self.seed, self.epoch)
        return max(sum(sizes[g] for g in mine) for mine in assignment) - self.start

    def __iter__(self):
        indices = self.epoch_indices(self.epoch)
        for position in range(self.start, len(indices)):
            yield indices[position], (self.seed, self.epoch, self.rank, position)


# --------------------------------------------------------------------------- loader

def collate_packed(items: list[dict]) -> tuple[torch.Tensor, int, tuple, tuple]:
    """Batch items into ONE uint8 buffer (indices, then LR, then GT). Every tensor that
    crosses from a worker to the training process costs a shared-memory segment and a
    socket round trip: at a small model's step time, three per batch were a visible
    share of the step (docs/PERFORMANCE.md)."""
    b = len(items)
    lr_shape, gt_shape = tuple(items[0]["lr"].shape), tuple(items[0]["gt"].shape)
    n_lr, n_gt = items[0]["lr"].numel(), items[0]["gt"].numel()
    buffer = torch.empty(8 * b + b * (n_lr + n_gt), dtype=torch.uint8)
    buffer[: 8 * b].view(torch.int64).copy_(torch.tensor([item["index"] for item in items], dtype=torch.int64))
    lr = buffer[8 * b: 8 * b + b * n_lr].view(b, *lr_shape)
    gt = buffer[8 * b + b * n_lr:].view(b, *gt_shape)
    for i, item in enumerate(items):
        lr[i] = item["lr"]
        gt[i] = item["gt"]
    return buffer, b, lr_shape, gt_shape


def unpack_batch(packed, device: str | torch.device = "cpu", batch_size: int | None = None):
    """The inverse of :func:`collate_packed`, on ``device``: yields batches of
    ``batch_size`` (default: all) with float32 LR/GT in [0, 1]; a partial last batch is
    dropped. Floats are made per batch, when it is handed out."""
    buffer, n, lr_shape, gt_shape = packed
    buffer = buffer.to(device, non_blocking=True)
    n_lr = n * int(np.prod(lr_shape))
    index = buffer[: 8 * n].view(torch.int64)
    lr = buffer[8 * n: 8 * n + n_lr].view(n, *lr_shape)
    gt = buffer[8 * n + n_lr:].view(n, *gt_shape)
    b = batch_size or n
    for start in range(0, n - b + 1, b):
        yield {
            "index": index[start:start + b],
            "lr": lr[start:start + b].float().div_(255.0),
            "gt": gt[start:start + b].float().div_(255.0),
        }


class TrainLoader:
    """One rank's batches, epoch after epoch, with a position the training job saves.

    Iterating gives the rest of the current epoch, from the saved position; the position
    counts samples the loop has received (not those prefetched by workers), so
    ``state_dict()`` taken after a step resumes right after that step's batch.
    """

    def __init__(self, dataset, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 window_shards: int = 4, num_workers: int = 0, prefetch_factor: int = 2,
                 pin_memory: bool = False, device: str | torch.device = "cpu", samples_per_transfer: int = 32):
        self.dataset, self.batch_size, self.device = dataset, batch_size, device
        # Each hand-over from a worker costs the training process time (a queue read, a
        # shared-memory mapping) whatever its size, so workers make several batches at a time.
        self.batches_per_transfer = max(1, -(-samples_per_transfer // batch_size))
        self.sampler = ShardSampler(dataset.groups, rank, world_size, seed, window_shards)
        self.epoch, self.position = 0, 0
        per_rank = len(self.sampler)
        if per_rank < batch_size:
            raise ValueError(f"each of {world_size} rank(s) gets {per_rank} samples per epoch, fewer than "
                             f"batch size {batch_size}: lower data.batch_size or prepare more images")
        self.loader = DataLoader(
            dataset,
            batch_sampler=BatchSampler(self.sampler, batch_size * self.batches_per_transfer, drop_last=False),
            collate_fn=collate_packed,
            num_workers=num_workers,
            pin_memory=pin_memory,
            persistent_workers=num_workers > 0,
            worker_init_fn=ignore_sigterm,
            prefetch_factor=prefetch_factor if num_workers > 0 else None,
        )

    def __len__(self) -> int:
        """Batches left in the current epoch."""
        self.sampler.set_epoch(self.epoch, self.position)
        return len(self.sampler) // self.batch_size

    def __iter__(self):
        self.sampler.set_epoch(self.epoch, self.position)
        for packed in _worker_errors_as_raised(self.loader):
            # a last partial batch of the epoch is dropped (same shapes every step)
            for batch in unpack_batch(packed, self.device, self.batch_size):
                self.position += self.batch_size
                yield batch
        self.epoch, self.position = self.epoch + 1, 0

    def close(self) -> None:
        """Stop the worker processes now (persistent workers otherwise live until
        garbage collection, holding their open shards)."""
        iterator = getattr(self.loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        self.loader._iterator = None
        reader = getattr(self.dataset, "reader", None)
        if reader is not None:
            reader.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.sampler.seed,
                "world_size": self.sampler.world_size}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.sampler.seed:
            raise ValueError(f"data.seed is {self.sampler.seed} but the checkpoint was made with "
                             f"{state['seed']}; resume with the same seed")
        self.epoch = int(state["epoch"])
        # Another world size deals the shards differently: the saved position means
        # nothing then, so the interrupted epoch starts over.
        same_world = state["world_size"] == self.sampler.world_size
        self.position = int(state["position"]) if same_world else 0


def _worker_errors_as_raised(loader):
    """Iterate ``loader``; an error a DataLoader worker raised arrives as torch re-raises
    it (same type, the message replaced by "Caught ValueError in DataLoader worker process
    0. Original Traceback ...", ~25 lines). Errors that are users' (a damaged shard, a
    storage outage: those with an exit code of their own) are raised again with their
    original one-line message; others (bugs) keep the worker's traceback."""
    iterator = iter(loader)
    while True:
        try:
            packed = next(iterator)
        except StopIteration:
            return
        except Exception as exc:
            text = str(exc)
            if "\nOriginal Traceback" not in text or exit_code(exc) is None:
                raise
            # The traceback's last line is "module.Type: message".
            last = text.rstrip().splitlines()[-1]
            name = type(exc).__qualname__
            original = last.split(f"{name}: ", 1)[1] if f"{name}: " in last else last
            raise type(exc)(original) from None
        yield packed


def build_train_loader(cfg, rank: int = 0, world_size: int = 1, device: str = "cpu",
                       gt_only: bool = False) -> TrainLoader:
    """The training loader described by a :class:`jobs.config.DataConfig` (``gt_only``:
    GT crops only, for a step that makes the LR itself)."""
    augment = Augment(cfg.hflip_prob, cfg.vflip_prob, cfg.transpose_prob, dict(cfg.degradation_probs))
    cache = ShardCache(cfg.cache_dir, int(cfg.cache_max_gb * 1024**3))
    if cfg.train_shards:
        dataset = SubImageDataset(cfg.train_shards, cfg.gt_size, cfg.scale, augment, cache, gt_only)
    elif cfg.train_hr:
        dataset = PairedImageDataset(cfg.train_hr, cfg.train_lr, cfg.gt_size, cfg.scale, augment, cache)
    else:
        raise ValueError("no training data: set data.train_shards (from `sr prepare`) or data.train_hr + data.train_lr")
    return TrainLoader(dataset, cfg.batch_size, rank, world_size, cfg.seed, cfg.shuffle_window_shards,
                       cfg.num_workers, cfg.prefetch_factor, pin_memory=str(device).startswith("cuda"),
                       device=device, samples_per_transfer=cfg.samples_per_transfer)


def build_val_dataset(cfg) -> ValidationDataset | None:
    """The validation set of a :class:`jobs.config.DataConfig` (None when it has none)."""
    if not cfg.val_folder:
        return None
    return ValidationDataset(cfg.val_folder, cfg.scale, cfg.val_center_crop)


# --------------------------------------------------------------------------- meter

class DataWaitMeter:
    """Fraction of step time the train loop spends waiting for its next batch.

    Wrap the loader: ``for batch in meter.wrap(loader): ...``. Time inside ``next()``
    is waiting; the rest of each iteration is the step. ``fraction()`` covers the
    iterations since the last ``reset()``. ``clock`` returns seconds.
    """

    def __init__(self, clock=time.perf_counter):
        self.clock = clock
        self.reset()

    def reset(self) -> None:
        self.wait_seconds = 0.0
        self.total_seconds = 0.0
        self.steps = 0

    def wrap(self, iterable):
        iterator = iter(iterable)
        last = None  # when the previous batch was handed to the loop
        while True:
            t0 = self.clock()
            try:
                item = next(iterator)
            except StopIteration:
                if last is not None:  # the last step's own time
                    self.total_seconds += t0 - last
                return
            t1 = self.clock()
            self.wait_seconds += t1 - t0
            self.total_seconds += t1 - (t0 if last is None else last)
            self.steps += 1
            last = t1
            yield item

    def fraction(self) -> float:
        return self.wait_seconds / self.total_seconds if self.total_seconds > 0 else 0.0
