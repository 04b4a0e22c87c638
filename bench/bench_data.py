"""Training data pipeline throughput: crops/s of one process reading sub-image shards
(local, and from a GCS API server on 127.0.0.1 cold then cached) against a naive
loader that decodes a whole 2K source image per crop; then the share of step time the
tiny preset's training loop waits for data with 2 DataLoader workers; then degraded
pairs/s of Real-ESRGAN's second-order degradation (``sr_core.realdegrade``) on this CPU,
the whole pipeline and each of its steps, beside the bicubic loader.

    .venv/bin/python bench/bench_data.py [--images 6] [--steps 60]
    .venv/bin/python bench/bench_data.py --degraded-only [--batches 4]

Sources are DIV2K-sized (2040x1356) PNGs made by upscaling the photos in
assets/images; shards are made by ``sr prepare`` with the defaults (480/240).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

import torch  # noqa: E402
from PIL import Image  # noqa: E402


from jobs.config import load_config  # noqa: E402
from jobs.data import (Augment, DataWaitMeter, ShardCache, SubImageDataset, TrainLoader,  # noqa: E402
                       _random_crop, _rng_for, _to_tensor)
from sr_core.codecs import decode_rgb8  # noqa: E402
from jobs.prepare import PrepareSettings, prepare  # noqa: E402
from sr_core.resize import imresize  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


class NaiveDataset(torch.utils.data.Dataset):
    """What the shards replace: decode a whole source image for every crop."""

    def __init__(self, files: list[str], gt_size: int, scale: int, crops_per_image: int = 40):
        self.files, self.gt_size, self.scale = files, gt_size, scale
        # as many samples per image as it has sub-images, so epochs are comparable
        self.groups = [list(range(i * crops_per_image, (i + 1) * crops_per_image)) for i in range(len(files))]
        self.crops_per_image = crops_per_image
        self.augment = Augment()

    def __len__(self):
        return len(self.files) * self.crops_per_image

    def __getitem__(self, key):
        index, rng = _rng_for(key)
        with open(self.files[index // self.crops_per_image], "rb") as f:
            hr = decode_rgb8(f.read())
        y, x = _random_crop(rng, hr.shape[0], hr.shape[1], self.gt_size)
        (gt,) = self.augment.geometric(rng, hr[y:y + self.gt_size, x:x + self.gt_size])
        lr = imresize(gt, scale=1 / self.scale)
        return {"lr": _to_tensor(lr), "gt": _to_tensor(gt), "index": index}


def make_sources(folder: Path, count: int) -> list[str]:
    folder.mkdir(parents=True)
    names = ["astronaut.png", "chelsea.png", "coffee.png", "camera.png"]
    files = []
    for i in range(count):
        img = Image.open(REPO / "assets/images" / names[i % len(names)]).convert("RGB")
        img = img.rotate(90 * (i // len(names)), expand=True).resize((2040, 1356), Image.BICUBIC)
        path = folder / f"{i:04d}.png"
        img.save(path)
        files.append(str(path))
    return files


def start_emulator() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "gcp_storage_emulator", "start", "--host=127.0.0.1",
                             f"--port={port}", "--in-memory", "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.1)
    os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{port}"
    return proc, os.environ["STORAGE_EMULATOR_HOST"]


def crops_per_second(dataset, num_crops: int, seed: int = 0) -> float:
    """One process (no DataLoader workers): crops/s of a single worker."""
    loader = TrainLoader(dataset, batch_size=16, rank=0, world_size=1, seed=seed, num_workers=0)
    start, done = time.perf_counter(), 0
    while done < num_crops:
        for batch in loader:
            done += len(batch["gt"])
            if done >= num_crops:
                break
    return done / (time.perf_counter() - start)


def train_wait(dataset, cfg, steps: int, samples_per_transfer: int, warmup: int = 5) -> tuple[float, float]:
    """Train the tiny generator with L1 and return (data-wait fraction, ms per step)."""
    from sr_core.archs import build_generator

    torch.manual_seed(0)
    model = build_generator("rrdbnet", "tiny", scale=cfg.scale)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-4)
    loader = TrainLoader(dataset, cfg.batch_size, 0, 1, cfg.seed, cfg.shuffle_window_shards,
                         num_workers=cfg.num_workers, prefetch_factor=cfg.prefetch_factor,
                         samples_per_transfer=samples_per_transfer)
    meter = DataWaitMeter()
    step = 0
    while step < steps + warmup:
        for batch in meter.wrap(loader):
            loss = torch.nn.functional.l1_loss(model(batch["lr"]), batch["gt"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if step == warmup:  # worker start-up is not the steady state
                meter.reset()
            if step == steps + warmup:
                break
    loader.close()
    return meter.fraction(), 1000 * meter.total_seconds / max(meter.steps, 1)


def _best_ms(fn, repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return 1000 * best


def degraded_pairs(shards: str, batches: int) -> None:
    """Pairs/s of one process: the bicubic loader, the GT-only loader + the second-order
    degradation, and each degradation step alone on one batch (best of ``batches``)."""
    from torch.nn import functional as F

    from sr_core import jpeg_torch
    from sr_core import realdegrade as rd

    print(f"\nDegraded pairs/s, one process, {torch.get_num_threads()} torch thread(s), CPU "
          f"(best of {batches} batches per step row):\n")
    print(f"| {'setting':<26} | {'what':<44} | {'ms/batch':>9} | {'pairs/s':>8} |")
    print(f"|{'-' * 28}|{'-' * 46}|{'-' * 11}|{'-' * 10}|")
    for label, gt_size, scale, batch in (("x4plus: 256 px, x4, b 12", 256, 4, 12),
                                         ("demo size: 64 px, x2, b 16", 64, 2, 16)):
        def row(what, ms):
            print(f"| {label:<26} | {what:<44} | {ms:>9.1f} | {1000 * batch / ms:>8.1f} |")

        bicubic = SubImageDataset(shards, gt_size, scale)
        row("bicubic loader (MATLAB imresize LR)", 1000 * batch / crops_per_second(bicubic, batch * batches))
        gt_only = SubImageDataset(shards, gt_size, scale, gt_only=True)
        row("GT-only loader (the LR made in the step)", 1000 * batch / crops_per_second(gt_only, batch * batches))
        pipeline = rd.RealDegradation(rd.RealDegradationOptions(scale=scale))
        loader = TrainLoader(gt_only, batch_size=batch, rank=0, world_size=1, seed=0, num_workers=0)
        gts = []
        for b in loader:
            gts.append(b["gt"])
            if len(gts) == batches:
                break
        seeds = iter(range(10**6))
        row("second-order pipeline (no loader)",
            min(_best_ms(lambda: pipeline(gt, torch.Generator().manual_seed(next(seeds))), 1) for gt in gts))
        gt, g = gts[0], torch.Generator().manual_seed(0)
        lr_size = gt_size // scale
        kernels = pipeline.kernels(g, batch, pipeline.options.first)[1]
        sigma, gray = torch.full((batch,), 10 / 255), torch.zeros(batch, dtype=torch.bool)
        small = F.interpolate(gt, size=(lr_size, lr_size), mode="area")
        steps = [
            ("  USM sharpening of the GT", lambda: rd.usm_sharpen(gt)),
            ("  drawing the kernels (2 x b + b sinc)", lambda: (pipeline.kernels(g, batch, pipeline.options.first),
                                                                 pipeline.kernels(g, batch, pipeline.options.second),
                                                                 pipeline.final_sinc_kernels(g, batch))),
            ("  blur 21x21, GT size", lambda: rd.filter2d(gt, kernels)),
            ("  resize GT size -> 0.7x (bicubic)", lambda: F.interpolate(gt, scale_factor=0.7, mode="bicubic")),
            ("  Gaussian noise, GT size", lambda: rd.gaussian_noise(gt, sigma, gray, g)),
            ("  Poisson noise, GT size", lambda: rd.poisson_noise(gt, sigma * 10, gray, g)),
            ("  JPEG, GT size", lambda: jpeg_torch.jpeg(gt, 60)),
            ("  blur 21x21, LR size", lambda: rd.filter2d(small, kernels)),
            ("  JPEG, LR size", lambda: jpeg_torch.jpeg(small, 60)),
        ]
        for what, fn in steps:
            row(what, _best_ms(fn, batches))


def crops_table(work: Path, files: list[str], crops: int) -> dict:
    """The crops/s table (local and emulator shards against the naive loader); returns the
    shard caches, which the training table reads through."""
    gt, scale = 128, 4
    rows = []
    naive = NaiveDataset(files, gt, scale)
    rows.append(("naive: whole 2K PNG per crop (local)", crops_per_second(naive, crops // 4)))
    caches = {}
    for fmt in ("png", "raw"):
        local = SubImageDataset(str(work / fmt), gt, scale)
        rows.append((f"{fmt} shards, local", crops_per_second(local, crops)))
        caches[fmt] = ShardCache(str(work / f"cache-{fmt}"))
        remote = SubImageDataset(f"gs://bench/{fmt}", gt, scale, cache=caches[fmt])
        # one epoch touches every shard once: all downloads happen in it
        rows.append((f"{fmt} shards, emulator gs://, cold cache (1 epoch)", crops_per_second(remote, len(remote))))
        rows.append((f"{fmt} shards, emulator gs://, cached", crops_per_second(remote, crops, seed=1)))

    print(f"\nCrops/s of one worker process, gt {gt} px, x{scale} (LR by MATLAB bicubic), flips on:\n")
    print(f"| {'source':<50} | {'crops/s':>8} | {'vs naive':>8} |")
    print(f"|{'-' * 52}|{'-' * 10}|{'-' * 10}|")
    for name, rate in rows:
        print(f"| {name:<50} | {rate:>8.1f} | {rate / rows[0][1]:>7.1f}x |")
    return caches


def training_table(files: list[str], caches: dict, steps: int) -> None:
    """ms per step and the share of it spent waiting for data, training the tiny preset."""
    cfg = load_config(None, [], preset="tiny").data
    print(f"\nTraining the tiny preset (rrdbnet tiny, gt {cfg.gt_size}, x{cfg.scale}, batch {cfg.batch_size}, "
          f"{cfg.num_workers} DataLoader workers, {torch.get_num_threads()} torch threads), "
          f"{steps} steps after 5 warm-up:\n")
    print(f"| {'loader (samples per worker hand-over)':<44} | {'ms/step':>8} | {'data wait':>9} |")
    print(f"|{'-' * 46}|{'-' * 10}|{'-' * 11}|")
    remote = {fmt: SubImageDataset(f"gs://bench/{fmt}", cfg.gt_size, cfg.scale, cache=caches[fmt])
              for fmt in ("raw", "png")}
    group = cfg.samples_per_transfer
    variants = [
        (f"raw shards, gs:// cached, {group}/transfer", remote["raw"], group),
        ("raw shards, gs:// cached, 1 batch/transfer", remote["raw"], 1),
        (f"png shards, gs:// cached, {group}/transfer", remote["png"], group),
        ("png shards, gs:// cached, 1 batch/transfer", remote["png"], 1),
        ("naive: whole 2K PNG per crop", NaiveDataset(files, cfg.gt_size, cfg.scale), group),
    ]
    for name, ds, per_transfer in variants:
        fraction, ms = train_wait(ds, cfg, steps, per_transfer)
        print(f"| {name:<44} | {ms:>8.1f} | {100 * fraction:>8.1f}% |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=6, help="2K source images (default: 6)")
    parser.add_argument("--degraded-only", action="store_true",
                        help="only the degraded-pairs table (local raw shards of --images sources)")
    parser.add_argument("--batches", type=int, default=4, help="batches per degraded-pairs row (default: 4)")
    parser.add_argument("--crops", type=int, default=320, help="crops per throughput measurement (default: 320)")
    parser.add_argument("--steps", type=int, default=200, help="training steps measured (default: 200)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-data-"))
    emulator = None
    try:
        t = time.perf_counter()
        files = make_sources(work / "src", args.images)
        print(f"{args.images} sources of 2040x1356 made in {time.perf_counter() - t:.1f} s")
        for fmt in ("png", "raw"):
            t = time.perf_counter()
            index = prepare(str(work / "src"), str(work / fmt), PrepareSettings(images_per_shard=1, format=fmt),
                            num_workers=2, progress=False)
            print(f"sr prepare --format {fmt}: {index['num_subimages']} sub-images of 480 px in "
                  f"{index['num_shards']} shards ({index['total_bytes'] / 1e6:.0f} MB) in "
                  f"{time.perf_counter() - t:.1f} s")

        degraded_pairs(str(work / "raw"), args.batches)
        if args.degraded_only:
            return
        emulator, url = start_emulator()
        import gcsfs

        fs = gcsfs.GCSFileSystem(token="anon")
        fs.mkdir("bench")
        for fmt in ("png", "raw"):
            fs.put(str(work / fmt) + "/", f"bench/{fmt}/", recursive=True)

        caches = crops_table(work, files, args.crops)
        training_table(files, caches, args.steps)
        print(f"\nmachine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
              f"torch {torch.__version__}")
    finally:
        if emulator is not None:
            emulator.terminate()
            emulator.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
