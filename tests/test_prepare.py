"""`sr prepare`: sub-image shards + index, local and gs:// (a real GCS API server),
bad images reported, resume after SIGKILL equal to a clean run."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from events import HANG_TIMEOUT, wait_for
from jobs.prepare import PrepareSettings, prepare, read_index, tile_starts

REPO = Path(__file__).resolve().parents[1]
PHOTOS = ["astronaut.png", "chelsea.png", "coffee.png", "camera.png"]


def cut_photos(folder: Path, count: int, side: int) -> dict[str, np.ndarray]:
    """``count`` square crops of the real photos in assets/images, saved as PNG."""
    folder.mkdir(parents=True, exist_ok=True)
    photos = [np.asarray(Image.open(REPO / "assets/images" / n).convert("RGB")) for n in PHOTOS]
    out = {}
    for i in range(count):
        p = photos[i % len(photos)]
        y, x = (i * 37) % (p.shape[0] - side), (i * 53) % (p.shape[1] - side)
        crop = np.ascontiguousarray(p[y:y + side, x:x + side])
        Image.fromarray(crop).save(folder / f"img{i:03d}.png")
        out[f"img{i:03d}.png"] = crop
    return out


def run_sr(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sr_cli", *args], capture_output=True, text=True,
                          timeout=HANG_TIMEOUT, **kwargs)


def shard_bytes(dst: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((dst / "shards").glob("*.tar"))}


def test_tile_starts_follow_size_step_and_min_size():
    assert tile_starts(480, 480, 240, 0) == [0]
    assert tile_starts(1000, 480, 240, 0) == [0, 240, 480, 520]  # edge tile flush with the border
    assert tile_starts(1000, 480, 240, 41) == [0, 240, 480]  # the 40-px leftover strip is dropped
    assert tile_starts(1000, 480, 240, 40) == [0, 240, 480, 520]
    assert tile_starts(300, 480, 240, 0) == [0]  # a small image is one smaller sub-image
    assert tile_starts(300, 480, 240, 301) == []


def test_prepare_local_subimages_are_exact_and_bad_images_are_listed(tmp_path):
    images = cut_photos(tmp_path / "src", 5, 150)
    (tmp_path / "src" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (tmp_path / "src" / "notes.txt").write_text("not an image")
    (tmp_path / "src" / "sub").mkdir()
    (tmp_path / "src" / "sub" / "skip-me.png").write_bytes((tmp_path / "src" / "img000.png").read_bytes())
    settings = PrepareSettings(size=64, step=32, min_size=10, images_per_shard=2, max_shard_mb=0.05,
                               exclude=("sub/*",))
    index = prepare(str(tmp_path / "src"), str(tmp_path / "dst"), settings, num_workers=1, progress=False)

    assert index["sources"] == ["broken.png"] + sorted(images)  # .txt and the excluded glob left out
    assert [b["source"] for b in index["bad"]] == ["broken.png"]
    assert index["bad"][0]["reason"] == "truncated or corrupt PNG file (19 bytes)"
    # 150 px, size 64, step 32: starts 0, 32, 64 and a 22-px leftover >= min_size -> edge tile at 86
    per_image = len(tile_starts(150, 64, 32, 10)) ** 2
    assert per_image == 16
    assert index["num_subimages"] == per_image * len(images)

    seen = set()
    for shard in index["shards"]:
        data = (tmp_path / "dst" / shard["name"]).read_bytes()
        assert len(data) == shard["bytes"] <= 0.05 * 1024 * 1024
        assert hashlib.sha256(data).hexdigest() == shard["sha256"]
        for name, offset, size, h, w in shard["members"]:
            tile = np.asarray(Image.open(io.BytesIO(data[offset:offset + size])))
            source, k = name.rsplit("_s", 1)
            k = int(k[:-4]) - 1
            starts = tile_starts(150, 64, 32, 10)
            y, x = starts[k // len(starts)], starts[k % len(starts)]
            np.testing.assert_array_equal(tile, images[source][y:y + 64, x:x + 64])
            assert (h, w) == tile.shape[:2]
            seen.add(name)
    assert len(seen) == index["num_subimages"]
    assert len(index["shards"]) > 3  # the 0.05 MB bound split units into parts
    assert read_index(str(tmp_path / "dst"))["num_subimages"] == index["num_subimages"]


def test_prepare_refuses_other_settings_and_unfinished_dst_is_not_an_index(tmp_path):
    cut_photos(tmp_path / "src", 2, 100)
    dst = tmp_path / "dst"
    prepare(str(tmp_path / "src"), str(dst), PrepareSettings(size=64, step=32), progress=False)
    again = run_sr("prepare", str(tmp_path / "src"), str(dst), "--size", "64", "--step", "32", "-q")
    assert again.returncode == 0 and "nothing to do" in again.stderr
    other = run_sr("prepare", str(tmp_path / "src"), str(dst), "--size", "48", "--step", "32", "-q")
    assert other.returncode == 2 and "other images or settings" in other.stderr
    empty = run_sr("prepare", str(tmp_path / "nothing-here"), str(tmp_path / "dst2"))
    assert empty.returncode == 2 and "nothing-here" in empty.stderr

    (dst / "index.json").unlink()  # as if the run had died before the end
    with pytest.raises(FileNotFoundError, match="did not finish"):
        read_index(str(dst))


def test_prepare_resumes_after_sigkill_and_equals_a_clean_run(tmp_path):
    cut_photos(tmp_path / "src", 32, 280)
    args = [str(tmp_path / "src"), "--size", "64", "--step", "32", "--images-per-shard", "2",
            "--png-level", "9", "-j", "2", "-q"]
    clean = run_sr("prepare", args[0], str(tmp_path / "clean"), *args[1:])
    assert clean.returncode == 0, clean.stderr
    clean_index = json.loads((tmp_path / "clean" / "index.json").read_bytes())
    num_units = 16

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "sr_cli", "prepare", args[0], str(killed), *args[1:]],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    wait_for(lambda: len(list((killed / "units").glob("*.json"))) >= 3, "3 finished units (if prepare finished "
             "before: make the test data bigger)", proc)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole process group: main process and pool workers
    proc.wait()
    done_at_kill = {p.name: p.stat().st_mtime_ns for p in (killed / "units").glob("*.json")}
    assert 3 <= len(done_at_kill) < num_units
    assert not (killed / "index.json").exists()

    resumed = run_sr("prepare", args[0], str(killed), *args[1:])
    assert resumed.returncode == 0, resumed.stderr
    index = json.loads((killed / "index.json").read_bytes())
    # finished units were not redone
    assert {n: (killed / "units" / n).stat().st_mtime_ns for n in done_at_kill} == done_at_kill
    assert index["shards"] == clean_index["shards"]  # names, sizes, checksums, members, offsets
    assert shard_bytes(killed) == shard_bytes(tmp_path / "clean")
    names = [m[0] for s in index["shards"] for m in s["members"]]
    assert len(names) == len(set(names)) == 32 * len(tile_starts(280, 64, 32, 0)) ** 2
    assert not [p for p in killed.rglob("*") if p.name.startswith(".tmp-")]


def test_prepare_gs_to_gs_matches_local(gcs_emulator, tmp_path):
    images = cut_photos(tmp_path / "src", 6, 120)
    bucket = gcs_emulator.make_bucket("prep")
    fs = gcs_emulator.fs()
    for name in images:
        fs.put_file(str(tmp_path / "src" / name), f"{bucket[5:]}/photos/{name}")
    fs.pipe_file(f"{bucket[5:]}/photos/truncated.png", (tmp_path / "src" / "img000.png").read_bytes()[:300])

    result = run_sr("prepare", f"{bucket}/photos", f"{bucket}/sub", "--size", "64", "--step", "32",
                    "--images-per-shard", "2", "-j", "2", "-q")
    assert result.returncode == 1, result.stderr  # a bad image: the set is complete without it, exit 1 says so
    assert "bad image truncated.png" in result.stderr
    index = read_index(f"{bucket}/sub")
    assert [b["source"] for b in index["bad"]] == ["truncated.png"]
    assert "truncated" in index["bad"][0]["reason"]
    assert index["num_sources"] == 7 and index["num_subimages"] == 6 * 9

    (tmp_path / "src" / "truncated.png").write_bytes(fs.cat_file(f"{bucket[5:]}/photos/truncated.png"))
    local = prepare(str(tmp_path / "src"), str(tmp_path / "dst"),
                    PrepareSettings(size=64, step=32, images_per_shard=2), progress=False)
    assert index["shards"] == local["shards"]  # same bytes whatever the storage
    for shard in index["shards"]:
        data = fs.cat_file(f"{bucket[5:]}/sub/{shard['name']}")
        assert hashlib.sha256(data).hexdigest() == shard["sha256"]
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            assert [m.name for m in tar.getmembers()] == [m[0] for m in shard["members"]]


def test_same_stem_images_and_odd_names_get_their_own_members(tmp_path):
    rng = np.random.default_rng(2)
    src = tmp_path / "src"
    (src / "sub dir é").mkdir(parents=True)
    shapes = {"a.png": (80, 80), "a.bmp": (70, 96), "sub dir é/ph oto ü.png": (64, 64)}
    for rel, (h, w) in shapes.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(src / rel)
    index = prepare(str(src), str(tmp_path / "dst"), PrepareSettings(size=64, step=32, format="raw"),
                    progress=False)
    members = [m for s in index["shards"] for m in s["members"]]
    names = [m[0] for m in members]
    assert len(names) == len(set(names)) == index["num_subimages"] == 2 * 2 + 2 * 2 + 1
    for name, _, size, h, w in members:
        assert size == h * w * 3  # each member's recorded shape is its own
    assert {n.rsplit("_s", 1)[0] for n in names} == set(shapes)


def test_dst_that_is_a_file_or_holds_foreign_json_is_refused_clearly(tmp_path):
    cut_photos(tmp_path / "src", 1, 70)
    settings = PrepareSettings(size=64, step=32)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"file.*is a file.*choose a folder"):
        prepare(str(tmp_path / "src"), str(tmp_path / "file"), settings, progress=False)
    for i, text in enumerate(["[1, 2]", "not json", '{"images": 3}']):
        dst = tmp_path / f"foreign{i}"
        dst.mkdir()
        (dst / "index.json").write_text(text)
        with pytest.raises(ValueError, match=rf"foreign{i}/index.json: not an sr prepare index.*another DST"):
            prepare(str(tmp_path / "src"), str(dst), settings, progress=False)
        with pytest.raises(ValueError, match=rf"foreign{i}/index.json: not an sr prepare index"):
            read_index(str(dst))
        assert (dst / "index.json").read_text() == text  # nothing of theirs overwritten
    (tmp_path / "foreign3").mkdir()
    (tmp_path / "foreign3" / "plan.json").write_text("garbage")
    with pytest.raises(ValueError, match=r"foreign3/plan.json: not an sr prepare plan.*another DST"):
        prepare(str(tmp_path / "src"), str(tmp_path / "foreign3"), settings, progress=False)


def test_object_names_that_would_escape_dst_are_listed_as_bad_and_the_rest_prepared():
    import uuid

    import fsspec

    # object stores allow any name, '..' segments included (a local folder cannot hold them)
    fs, root = fsspec.filesystem("memory"), f"/prep-{uuid.uuid4().hex[:8]}"
    png = io.BytesIO()
    Image.fromarray(np.zeros((70, 70, 3), np.uint8)).save(png, format="PNG")
    fs.pipe_file(f"{root}/src/ok.png", png.getvalue())
    fs.pipe_file(f"{root}/src/x/../evil.png", png.getvalue())
    try:
        index = prepare(f"memory://{root}/src", f"memory://{root}/dst", PrepareSettings(size=64, step=32),
                        progress=False)
        assert index["sources"] == ["ok.png"] and index["num_subimages"] == 4
        assert [b["source"] for b in index["bad"]] == ["x/../evil.png"]
        assert "--exclude" in index["bad"][0]["reason"]
        assert not any(".." in m[0] for s in index["shards"] for m in s["members"])
    finally:
        fs.rm(root, recursive=True)


def test_a_full_dst_disk_is_a_clear_error_and_a_rerun_finishes(tmp_path):
    import resource

    cut_photos(tmp_path / "src", 2, 150)
    settings = PrepareSettings(size=64, step=32, images_per_shard=1)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, hard))  # writes beyond 20 kB fail, like ENOSPC
    try:
        with pytest.raises(ValueError, match=r"dst: cannot write .*free space.*re-run"):
            prepare(str(tmp_path / "src"), str(tmp_path / "dst"), settings, progress=False)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    index = prepare(str(tmp_path / "src"), str(tmp_path / "dst"), settings, progress=False)
    assert index["num_subimages"] == 2 * 16
    assert not [p for p in (tmp_path / "dst").rglob("*") if p.name.startswith(".tmp-")]
