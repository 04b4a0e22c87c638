"""The training data pipeline: crops from shards (local and a real GCS API server),
distributed order (disjoint, complete, deterministic), mid-epoch resume, the shared
local cache, paired folders, validation sets, typed config and the data-wait meter."""

from __future__ import annotations

import gc
import os

import numpy as np
import pytest
import torch
from PIL import Image

from jobs.config import Config, DataConfig, field_docs, load_config
from jobs.data import (Augment, DataWaitMeter, PairedImageDataset, ShardCache, ShardSampler,
                       SubImageDataset, TrainLoader, ValidationDataset, build_train_loader)
from jobs.prepare import PrepareSettings, prepare
from sr_core.resize import imresize
from test_prepare import cut_photos

NO_AUGMENT = Augment(0.0, 0.0, 0.0, {})


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    return folder, cut_photos(folder, 7, 100)


@pytest.fixture(scope="module")
def local_shards(photos, tmp_path_factory):
    """7 images of 100 px -> 3x3 sub-images of 64 px each, one image per shard."""
    dst = tmp_path_factory.mktemp("shards")
    prepare(str(photos[0]), str(dst), PrepareSettings(size=64, step=32, images_per_shard=1), progress=False)
    return str(dst)


def epoch_batches(loader: TrainLoader, limit: int | None = None) -> list[dict]:
    out = []
    for batch in loader:
        out.append({k: v.clone() for k, v in batch.items()})
        if limit is not None and len(out) == limit:
            break
    return out


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for key in ("index", "lr", "gt"):
            assert torch.equal(x[key], y[key]), key


def test_crop_is_from_the_subimage_and_lr_is_matlab_bicubic(local_shards, photos):
    ds = SubImageDataset(local_shards, gt_size=32, scale=2, augment=NO_AUGMENT)
    assert len(ds) == 7 * 9 and ds.num_too_small == 0
    for key in [(0, (1, 2)), (40, (3, 4)), (62, (5, 6))]:
        item = ds[key]
        gt, lr = item["gt"].permute(1, 2, 0).numpy(), item["lr"].permute(1, 2, 0).numpy()
        assert gt.dtype == lr.dtype == np.uint8
        assert gt.shape == (32, 32, 3) and lr.shape == (16, 16, 3)
        np.testing.assert_array_equal(lr, imresize(gt, scale=1 / 2))
        sub = ds.read_subimage(key[0])
        windows = np.lib.stride_tricks.sliding_window_view(sub, (32, 32, 3))[:, :, 0]
        assert (windows == gt).all(axis=(2, 3, 4)).any(), "crop not found in its sub-image"
        # and the sub-image is the source image's pixels
        source = photos[1][ds.names[key[0]].rsplit("_s", 1)[0]]
        tiles = np.lib.stride_tricks.sliding_window_view(source, (64, 64, 3))[:, :, 0]
        assert (tiles == sub).all(axis=(2, 3, 4)).any()


def test_raw_shards_give_the_same_crops_as_png_shards(local_shards, photos, tmp_path):
    index = prepare(str(photos[0]), str(tmp_path / "raw"),
                    PrepareSettings(size=64, step=32, images_per_shard=1, format="raw"), progress=False)
    assert all(m[0].endswith(".rgb") and m[2] == 64 * 64 * 3 for s in index["shards"] for m in s["members"])
    png = SubImageDataset(local_shards, 32, 2, Augment(0.5, 0.5, 0.5, {}))
    raw = SubImageDataset(str(tmp_path / "raw"), 32, 2, Augment(0.5, 0.5, 0.5, {}))
    assert raw.raw and not png.raw
    assert_same_batches(epoch_batches(TrainLoader(png, 4, 0, 2, seed=5)),
                        epoch_batches(TrainLoader(raw, 4, 0, 2, seed=5)))


def test_degradations_change_the_lr_only(local_shards):
    clean = SubImageDataset(local_shards, 32, 2, Augment(0.5, 0.5, 0.5, {}))
    noisy = SubImageDataset(local_shards, 32, 2, Augment(0.5, 0.5, 0.5, {"gaussian_noise": 1.0, "jpeg": 1.0}))
    for key in [(3, (1,)), (30, (2,))]:
        a, b = clean[key], noisy[key]
        assert torch.equal(a["gt"], b["gt"])
        assert (a["lr"].float() - b["lr"].float()).abs().mean() > 1


def test_augmentation_is_paired_and_follows_probabilities():
    rng = np.random.default_rng(0)
    hr = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    lr = hr[::2, ::2].copy()
    always = Augment(1.0, 1.0, 1.0)
    out_hr, out_lr = always.geometric(rng, hr, lr)
    np.testing.assert_array_equal(out_hr, hr[::-1, ::-1].transpose(1, 0, 2))
    np.testing.assert_array_equal(out_lr, lr[::-1, ::-1].transpose(1, 0, 2))
    sometimes = Augment(0.3, 0.0, 0.0)
    flips = sum(not np.array_equal(sometimes.geometric(rng, hr)[0], hr) for _ in range(2000))
    assert 500 < flips < 700


def test_two_ranks_are_disjoint_complete_balanced_and_deterministic(local_shards):
    ds = SubImageDataset(local_shards, gt_size=32, scale=2)
    streams = {}
    for epoch in (0, 1):
        per_rank = [ShardSampler(ds.groups, r, 2, seed=7, window_shards=2).epoch_indices(epoch) for r in (0, 1)]
        assert len(per_rank[0]) == len(per_rank[1])  # same number of steps on every rank
        shards = [{ds.samples[i][0] for i in ids} for ids in per_rank]
        assert not shards[0] & shards[1]  # each rank reads its own shards
        assert set(per_rank[0]) | set(per_rank[1]) == set(range(len(ds)))  # and together all samples
        streams[epoch] = per_rank
    assert streams[0] != streams[1]  # a new order each epoch
    again = ShardSampler(ds.groups, 1, 2, seed=7, window_shards=2)
    again.set_epoch(1)
    assert [i for i, _ in again] == streams[1][1]
    other_seed = ShardSampler(ds.groups, 1, 2, seed=8, window_shards=2).epoch_indices(1)
    assert other_seed != streams[1][1]
    with pytest.raises(ValueError, match="smaller --images-per-shard"):
        ShardSampler(ds.groups, 0, 8).epoch_indices(0)

    # the crops themselves are deterministic, whatever the number of workers
    a = epoch_batches(TrainLoader(ds, 4, rank=1, world_size=2, seed=7, num_workers=0))
    with TrainLoader(ds, 4, rank=1, world_size=2, seed=7, num_workers=2) as loader:
        b = epoch_batches(loader)
    assert_same_batches(a, b)
    assert len(a) == len(streams[0][1]) // 4


def test_mid_epoch_resume_gives_the_rest_of_the_same_stream(local_shards):
    ds = SubImageDataset(local_shards, gt_size=32, scale=2)
    # one batch per worker hand-over here, groups of 11 batches below: same stream
    full = TrainLoader(ds, 3, rank=0, world_size=2, seed=3, num_workers=0, samples_per_transfer=1)
    epoch0 = epoch_batches(full)
    epoch1 = epoch_batches(full)
    assert full.state_dict()["epoch"] == 2

    first = TrainLoader(ds, 3, rank=0, world_size=2, seed=3, num_workers=2)
    epoch_batches(first)  # epoch 0
    head = epoch_batches(first, limit=4)  # 4 batches into epoch 1, workers prefetching ahead
    state = first.state_dict()
    assert state == {"epoch": 1, "position": 12, "seed": 3, "world_size": 2}

    resumed = TrainLoader(ds, 3, rank=0, world_size=2, seed=3, num_workers=2)
    resumed.load_state_dict(state)
    tail = epoch_batches(resumed)
    first.close()
    resumed.close()
    assert_same_batches(head + tail, epoch1)
    assert not all(torch.equal(x["index"], y["index"]) for x, y in zip(epoch0, epoch1))
    with pytest.raises(ValueError, match="same seed"):
        TrainLoader(ds, 3, seed=4).load_state_dict(state)


def test_gcs_shards_two_ranks_with_workers_share_the_cache(gcs_emulator, photos, local_shards, tmp_path):
    bucket = gcs_emulator.make_bucket("data")
    index = prepare(str(photos[0]), f"{bucket}/sub", PrepareSettings(size=64, step=32, images_per_shard=1),
                    progress=False)
    cfg = DataConfig(train_shards=f"{bucket}/sub", gt_size=32, scale=2, batch_size=4, num_workers=2,
                     seed=11, cache_dir=str(tmp_path / "cache"), cache_max_gb=1.0)
    loaders = [build_train_loader(cfg, rank=r, world_size=2) for r in (0, 1)]
    first = [epoch_batches(loader) for loader in loaders]
    seen = [torch.cat([b["index"] for b in batches]).tolist() for batches in first]
    ds = loaders[0].dataset
    shards = [{ds.samples[i][0] for i in ids} for ids in seen]
    assert not shards[0] & shards[1]
    # drop_last may leave out up to batch_size-1 samples per rank; nothing else is missing
    assert len(set(seen[0]) | set(seen[1])) >= len(ds) - 2 * 3
    cache = ShardCache(str(tmp_path / "cache"))
    assert len(cache.entries()) == index["num_shards"]  # each shard downloaded once, by one worker
    assert cache.total_bytes() == index["total_bytes"]

    # same crops as from the local copy of the same shards (identical bytes)
    local = SubImageDataset(local_shards, 32, 2, Augment(0.5, 0.5, 0.5, {}))
    assert_same_batches(first[1], epoch_batches(TrainLoader(local, 4, 1, 2, seed=11)))

    # later epochs read the local copies: they work with the bucket emptied
    gcs_emulator.fs().rm(f"{bucket[5:]}/sub/shards", recursive=True)
    second = epoch_batches(loaders[0])
    for loader in loaders:
        loader.close()
    assert len(second) == len(first[0])
    reference = TrainLoader(local, 4, 0, 2, seed=11)
    reference.load_state_dict({"epoch": 1, "position": 0, "seed": 11, "world_size": 2})
    assert_same_batches(second, epoch_batches(reference))


def test_cache_checks_checksums_and_evicts_least_recently_used(gcs_emulator, tmp_path):
    bucket = gcs_emulator.make_bucket("cache")
    fs = gcs_emulator.fs()
    blobs = {f"f{i}.bin": bytes([i]) * 1000 for i in range(4)}
    for name, data in blobs.items():
        fs.pipe_file(f"{bucket[5:]}/{name}", data)
    import hashlib

    cache = ShardCache(str(tmp_path / "c"), max_bytes=2500)
    for i, (name, data) in enumerate(blobs.items()):
        path = cache.local_path(f"{bucket}/{name}", len(data), hashlib.sha256(data).hexdigest())
        assert open(path, "rb").read() == data
        os.utime(path, (1000 + i, 1000 + i))  # used in this order, whatever the clock's resolution
    assert cache.total_bytes() <= 2500
    assert sorted(p.rsplit("-", 1)[1] for p in cache.entries()) == ["f2.bin", "f3.bin"]
    with pytest.raises(ValueError, match="checksum"):
        cache.local_path(f"{bucket}/f0.bin", 1000, "0" * 64)
    assert not [p for p in (tmp_path / "c").iterdir() if ".part-" in p.name]


class _EvictedBetweenLookupAndOpen(ShardCache):
    """What another process's eviction does to this one: the entry disappears right
    after local_path() returned it, before the reader opens it."""

    evictions_left = 1

    def local_path(self, url, size=None, sha256=None):
        path = super().local_path(url, size, sha256)
        if self.evictions_left:
            self.evictions_left -= 1
            os.remove(path)
        return path


def test_reader_fetches_again_when_its_entry_is_evicted_before_open(gcs_emulator, tmp_path):
    import hashlib

    from jobs.data import _FileReader

    bucket = gcs_emulator.make_bucket("evict")
    data = bytes(range(256)) * 8
    gcs_emulator.fs().pipe_file(f"{bucket[5:]}/shard.tar", data)
    cache = _EvictedBetweenLookupAndOpen(str(tmp_path / "c"))
    reader = _FileReader(cache)
    sha = hashlib.sha256(data).hexdigest()
    assert reader.read(f"{bucket}/shard.tar", 10, 20, size=len(data), sha256=sha) == data[10:30]
    assert cache.downloads == 2
    reader.close()

    always = _EvictedBetweenLookupAndOpen(str(tmp_path / "d"))
    always.evictions_left = 10
    with pytest.raises(ValueError, match="raise data.cache_max_gb"):
        _FileReader(always).read(f"{bucket}/shard.tar", size=len(data), sha256=sha)


def _fetch_all(folder: str, urls: list[str], start) -> int:
    start.wait()  # both processes start together
    cache = ShardCache(folder)
    for url in urls:
        cache.local_path(url)
    return cache.downloads


def test_cache_is_shared_by_processes_each_file_fetched_once(gcs_emulator, tmp_path):
    import multiprocessing

    bucket = gcs_emulator.make_bucket("race")
    fs = gcs_emulator.fs()
    urls = []
    for i in range(3):
        fs.pipe_file(f"{bucket[5:]}/s{i}.tar", bytes([i]) * 3_000_000)
        urls.append(f"{bucket}/s{i}.tar")
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager, context.Pool(2) as pool:
        start = manager.Barrier(2)
        counts = pool.starmap(_fetch_all, [(str(tmp_path), urls, start), (str(tmp_path), urls[::-1], start)])
    assert sum(counts) == 3  # a file wanted by both was downloaded by one and awaited by the other
    cache = ShardCache(str(tmp_path))
    assert [open(cache.local_path(u), "rb").read() == bytes([i]) * 3_000_000 for i, u in enumerate(urls)] == [True] * 3
    assert cache.downloads == 0


def test_paired_folders_give_aligned_crops(tmp_path, photos):
    hr_dir, lr_dir = tmp_path / "HR", tmp_path / "LR" / "X2"
    hr_dir.mkdir()
    lr_dir.mkdir(parents=True)
    for name, img in list(photos[1].items())[:3]:
        Image.fromarray(img).save(hr_dir / name)
        # a 2x2 box average: flips and transposes of the HR crop commute with it exactly
        box = img.reshape(50, 2, 50, 2, 3).astype(np.float64).mean(axis=(1, 3)).round().astype(np.uint8)
        Image.fromarray(box).save(lr_dir / name.replace(".png", "x2.png"))
    ds = PairedImageDataset(str(hr_dir), str(lr_dir), gt_size=32, scale=2, augment=Augment(0.5, 0.5, 0.5))
    assert len(ds) == 3
    for i in range(12):
        item = ds[(i % 3, (i,))]
        gt = item["gt"].permute(1, 2, 0).numpy().astype(np.float64)
        lr = item["lr"].permute(1, 2, 0).numpy().astype(np.float64)
        assert gt.shape == (32, 32, 3) and lr.shape == (16, 16, 3)
        np.testing.assert_array_equal(gt.reshape(16, 2, 16, 2, 3).mean(axis=(1, 3)).round(), lr)
    (hr_dir / "extra.png").write_bytes((hr_dir / "img000.png").read_bytes())
    with pytest.raises(ValueError, match="no LR image"):
        PairedImageDataset(str(hr_dir), str(lr_dir), 32, 2)


def test_validation_whole_images_and_centre_crops(tmp_path):
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (50, 37, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8)).save(tmp_path / "b.png")
    whole = ValidationDataset(str(tmp_path), scale=4)
    item = whole[0]
    assert item["name"] == "a.png" and item["gt"].shape == (3, 48, 36) and item["lr"].shape == (3, 12, 9)
    gt = (item["gt"].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    np.testing.assert_array_equal((item["lr"].permute(1, 2, 0).numpy() * 255).round(), imresize(gt, scale=1 / 4))
    assert whole[1]["gt"].shape == (3, 40, 40)  # grayscale made RGB
    crops = ValidationDataset(str(tmp_path), scale=4, center_crop=32)
    assert crops[0]["gt"].shape == (3, 32, 32) and crops[1]["lr"].shape == (3, 8, 8)


def test_config_yaml_overrides_and_errors_name_the_field(tmp_path):
    (tmp_path / "c.yaml").write_text("data:\n  gt_size: 96\n  scale: 2\n  degradation_probs: {jpeg: 0.5}\n")
    cfg = load_config(str(tmp_path / "c.yaml"), ["data.batch_size=3", "data.hflip_prob=1"], preset="tiny")
    assert isinstance(cfg, Config)
    assert (cfg.data.gt_size, cfg.data.scale, cfg.data.batch_size) == (96, 2, 3)
    assert cfg.data.hflip_prob == 1.0 and cfg.data.degradation_probs == {"jpeg": 0.5}
    assert cfg.data.num_workers == 2  # from the tiny preset
    with pytest.raises(ValueError, match="data.gt_sise"):
        load_config(None, ["data.gt_sise=64"])
    with pytest.raises(ValueError, match="data.gt_size"):
        load_config(None, ["data.gt_size=big"])
    with pytest.raises(ValueError, match="data.batch_size"):
        load_config(None, ["data.batch_size=2.5"])
    with pytest.raises(ValueError, match="data.degradation_probs"):
        load_config(None, ["data.degradation_probs={jepg: 0.5}"])
    with pytest.raises(ValueError, match="multiple of data.scale"):
        load_config(None, ["data.gt_size=30", "data.scale=4"])
    docs = field_docs(DataConfig)
    assert set(docs) == {f for f in DataConfig.__dataclass_fields__} and all(docs.values())


class _Clock:
    """Seconds that pass only when the test says so: the meter's arithmetic is checked
    exactly, whatever the machine's load (its real-time figures are bench/bench_data.py's)."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_data_wait_meter_measures_the_waiting_share():
    clock = _Clock()

    def slow_source(n, delay):
        for i in range(n):
            clock.now += delay  # the loader takes this long to hand over an item
            yield i

    waiting = DataWaitMeter(clock)
    for _ in waiting.wrap(slow_source(5, 0.04)):
        clock.now += 0.01  # the step itself
    assert waiting.fraction() == pytest.approx(0.8) and waiting.steps == 5
    fed = DataWaitMeter(clock)
    for _ in fed.wrap(slow_source(5, 0.0)):
        clock.now += 0.04
    assert fed.fraction() == 0.0
    fed.reset()
    assert fed.fraction() == 0.0 and fed.steps == 0


def test_cache_folder_unusable_or_full_is_a_clear_error_and_leaves_nothing(gcs_emulator, tmp_path):
    import resource
    import signal

    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ValueError, match=r"a-file/cache.*data.cache_dir"):
        ShardCache(str(tmp_path / "a-file" / "cache"))

    bucket = gcs_emulator.make_bucket("full")
    data = bytes(range(256)) * 4000
    gcs_emulator.fs().pipe_file(f"{bucket[5:]}/big.tar", data)
    cache = ShardCache(str(tmp_path / "cache"))
    # a disk that fills up during the download: writes beyond 100 kB fail (EFBIG, like ENOSPC)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, hard))
    try:
        with pytest.raises(ValueError, match=r"cache.*big.tar.*data.cache_dir"):
            cache.local_path(f"{bucket}/big.tar", len(data))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == []
    assert open(cache.local_path(f"{bucket}/big.tar", len(data)), "rb").read() == data


def test_cache_heals_truncated_corrupt_and_half_downloaded_entries(gcs_emulator, photos, tmp_path):
    import hashlib

    bucket = gcs_emulator.make_bucket("heal")
    index = prepare(str(photos[0]), f"{bucket}/sub", PrepareSettings(size=64, step=32, images_per_shard=7),
                    progress=False)
    (shard,) = index["shards"]
    url = f"{bucket}/sub/{shard['name']}"
    cache = ShardCache(str(tmp_path / "cache"))
    # a download killed half-way left its part file behind: the next download removes it
    path = cache.local_path(url, shard["bytes"], shard["sha256"])
    os_remove_and_leave_part = path + ".part-999999"
    (tmp_path / "cache" / os.path.basename(path)).rename(os_remove_and_leave_part)
    cache.local_path(url, shard["bytes"], shard["sha256"])
    assert not [p for p in (tmp_path / "cache").iterdir() if ".part-" in p.name]

    # a copy cut short (a crash before the data reached the disk) is fetched again
    with open(path, "r+b") as f:
        f.truncate(1000)
    assert cache.local_path(url, shard["bytes"], shard["sha256"]) == path
    assert hashlib.sha256(open(path, "rb").read()).hexdigest() == shard["sha256"]

    # bytes damaged in the cached copy: detected by the checksum, fetched again, same crop
    expected = SubImageDataset(f"{bucket}/sub", 32, 2, NO_AUGMENT, cache)[(5, (1,))]
    name, offset, size = shard["members"][5][:3]
    with open(path, "r+b") as f:
        f.seek(offset + size // 2)
        f.write(b"\0" * 64)
    again = SubImageDataset(f"{bucket}/sub", 32, 2, NO_AUGMENT, ShardCache(str(tmp_path / "cache")))
    assert torch.equal(again[(5, (1,))]["gt"], expected["gt"])
    assert hashlib.sha256(open(path, "rb").read()).hexdigest() == shard["sha256"]


def test_odd_sizes_seeds_and_rank_counts_are_clear_errors(tmp_path, local_shards):
    Image.fromarray(np.zeros((3, 5, 3), dtype=np.uint8)).save(tmp_path / "tiny.png")
    with pytest.raises(ValueError, match=r"tiny.png: 5x3 is smaller than the scale 4"):
        ValidationDataset(str(tmp_path), scale=4)[0]
    with pytest.raises(ValueError, match="data.seed"):
        load_config(None, ["data.seed=-1"])
    # three shards, one of them without a crop of gt_size: two ranks at most
    with pytest.raises(ValueError, match=r"2 shards with samples cannot be split over 3 ranks.*--images-per-shard"):
        len(ShardSampler([[0, 1], [2], []], 0, 3))


def test_close_releases_the_open_shards(local_shards):
    def open_fds():
        return len(os.listdir("/proc/self/fd"))

    # Readers of earlier tests close their descriptors when collected: collect them now,
    # not in the middle of the count.
    gc.collect()
    ds = SubImageDataset(local_shards, gt_size=32, scale=2)
    before = open_fds()
    with TrainLoader(ds, 4, num_workers=0) as loader:
        epoch_batches(loader)
        assert open_fds() >= before + 7  # one descriptor per shard read
    assert open_fds() == before


# ---------------------------------------------------------------- issue 17


def _shard_copy(local_shards, tmp_path) -> str:
    import shutil

    shutil.copytree(local_shards, tmp_path / "shards")
    return str(tmp_path / "shards")


def test_local_shards_are_verified_against_the_index_once_per_process(local_shards, tmp_path):
    """Issue 17 #11: a local shard whose bytes changed after `sr prepare` (its tar padding:
    every member still decodes) or that was cut short is refused on first open, naming
    it; intact shards read on. Each shard is checked once per process."""
    shards = _shard_copy(local_shards, tmp_path)
    ds = SubImageDataset(shards, gt_size=32, scale=2, augment=NO_AUGMENT)
    first, last = ds.shards[0][0], ds.shards[-1][0]
    with open(first, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        f.write(b"\x01")
    with open(last, "r+b") as f:
        f.truncate(os.path.getsize(last) - 1024)
    by_shard = {s: [i for i, sample in enumerate(ds.samples) if sample[0] == s] for s in range(len(ds.shards))}
    with pytest.raises(ValueError, match=rf"^{first}: .*index.json.*sr prepare") as info:
        ds[by_shard[0][0]]
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match=rf"^{last}: .*bytes.*index.json.*sr prepare"):
        ds[by_shard[len(ds.shards) - 1][0]]
    for s in range(1, len(ds.shards) - 1):  # the others are intact
        for i in by_shard[s]:
            ds[i]
    assert ds.reader.verified == {url for url, _, _ in ds.shards[1:-1]}


def test_a_member_a_worker_cannot_decode_reaches_the_loop_as_one_line(local_shards, tmp_path):
    """Issue 17 #1 at the loader: the worker's ValueError arrives as the same one-line
    ValueError (naming shard, member and `sr prepare`), not torch's re-raise carrying the
    worker's traceback."""
    import hashlib
    import json

    shards = _shard_copy(local_shards, tmp_path)
    index_path = os.path.join(shards, "index.json")
    index = json.load(open(index_path))
    for shard in index["shards"]:  # every member damaged; checksums made to match
        path = os.path.join(shards, shard["name"])
        blob = bytearray(open(path, "rb").read())
        for _name, offset, size, _h, _w in shard["members"]:
            blob[offset + 40: offset + size] = bytes(size - 40)
        open(path, "wb").write(bytes(blob))
        shard["bytes"], shard["sha256"] = len(blob), hashlib.sha256(blob).hexdigest()
    json.dump(index, open(index_path, "w"))
    ds = SubImageDataset(shards, gt_size=32, scale=2, augment=NO_AUGMENT)
    with TrainLoader(ds, 4, num_workers=1) as loader:
        with pytest.raises(ValueError) as info:
            epoch_batches(loader, 1)
    text = str(info.value)
    assert "\n" not in text and "Traceback" not in text and "DataLoader worker" not in text, text
    assert text.startswith(f"{shards}/shards/") and ": member " in text and "sr prepare" in text, text


@pytest.mark.parametrize("what", ["members", "shards"])
def test_an_index_listing_a_member_or_shard_twice_is_refused(local_shards, tmp_path, what):
    """Issue 17, minor: an index listing each member 30 times was accepted (30x the
    samples, all the same); duplicates are refused naming one and the fix."""
    import json

    shards = _shard_copy(local_shards, tmp_path)
    index_path = os.path.join(shards, "index.json")
    index = json.load(open(index_path))
    if what == "members":
        for shard in index["shards"]:
            shard["members"] = shard["members"] * 30
        name = index["shards"][0]["members"][0][0]
    else:
        index["shards"] = index["shards"] + index["shards"][:1]
        name = index["shards"][0]["name"]
    json.dump(index, open(index_path, "w"))
    with pytest.raises(ValueError, match=rf"{index_path}: .*{name}.*listed \d+ times.*sr prepare"):
        SubImageDataset(shards, gt_size=32, scale=2)
