"""Listing a prefix of Cloud Storage in parallel ranges, and resume against a remote
OUTPUT that lists only the ranges of names a step's outputs span.

The tests' emulator (gcp-storage-emulator 2026.7) answers ``objects.list`` with
everything in one response: it ignores ``startOffset``, ``endOffset``, ``maxResults``
and ``pageToken``. These tests run it with that handler completed as the JSON API
documents it (``tests/gcs_ranges.py``): a real server, paged and ranged, reached over
HTTP, directly and through the fault proxy."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batch import inputs, listing
from events import HANG_TIMEOUT, server_in_env, wait_listening
from faultproxy import FaultProxy, FaultRates
from ports import free_port

HERE = Path(__file__).resolve().parent
PAGE = 40  # names per page in these tests: many pages from a few hundred objects


def start_ranged_emulator(log_path) -> tuple[subprocess.Popen, str]:
    """The ranged emulator as its own process; (process, its URL) once it listens."""
    port = free_port()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, str(HERE / "gcs_ranges.py"), str(port)],
                                stdout=subprocess.DEVNULL, stderr=log)
    wait_listening(port, "the ranged emulator", proc, log_path)
    return proc, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def ranged(tmp_path_factory):
    """STORAGE_EMULATOR_HOST pointed at a ranged emulator for this module's tests."""
    proc, url = start_ranged_emulator(tmp_path_factory.mktemp("ranged") / "emulator.log")
    with server_in_env(proc, STORAGE_EMULATOR_HOST=url):
        yield url


@pytest.fixture
def small_pages(monkeypatch):
    monkeypatch.setattr(listing, "PAGE_SIZE", PAGE)


@pytest.fixture
def requests(monkeypatch):
    """Every listing request made: (prefix, startOffset, endOffset)."""
    made = []
    real = listing._gcs_page

    def recording(fs, bucket, prefix, span, token):
        made.append((prefix, span.start, span.end))
        return real(fs, bucket, prefix, span, token)

    monkeypatch.setattr(listing, "_gcs_page", recording)
    return made


def new_bucket(name: str) -> str:
    import uuid

    import gcsfs

    bucket = f"{name}-{uuid.uuid4().hex[:8]}"
    gcsfs.GCSFileSystem(token="anon").mkdir(bucket)
    return bucket


def upload(bucket: str, keys) -> None:
    """Tiny objects, one simple upload each over one connection (gcsfs's ``pipe`` takes
    ~0.4 s per object against the emulator here)."""
    import http.client
    from urllib.parse import quote, urlsplit

    host = urlsplit(os.environ["STORAGE_EMULATOR_HOST"])
    conn = http.client.HTTPConnection(host.hostname, host.port, timeout=HANG_TIMEOUT)
    try:
        for key in dict.fromkeys(keys):
            conn.request("POST", f"/upload/storage/v1/b/{bucket}/o?uploadType=media&name={quote(key, safe='')}",
                         body=b"x", headers={"Content-Type": "application/octet-stream"})
            answer = conn.getresponse()
            answer.read()
            assert answer.status == 200, (key, answer.status)
    finally:
        conn.close()


def flat_names() -> list[str]:
    """Numbered names, hashed-looking names, and stems with two extensions (a.jpg and
    a.png must land in one chunk wherever pages end)."""
    names = [f"img_{i:05d}.jpg" for i in range(0, 900, 3)]
    names += [f"{(i * 2654435761) % 16**6:06x}.png" for i in range(150)]
    names += [f"pair{i:03d}.{ext}" for i in range(40) for ext in ("jpg", "png")]
    return sorted(set(names))


def listed(url: str, whole_folders: bool = False) -> tuple[list[tuple[str, str]], list[listing.Chunk]]:
    chunks = list(listing.walk(url, whole_folders=whole_folders))
    return [(c.folder, n) for c in chunks for n in c.names], chunks


def test_the_ranged_emulator_pages_and_ranges_as_the_api_documents(ranged, small_pages):
    """The emulator the other tests trust: offsets filter names before the delimiter
    groups them, items and prefixes share the pages."""
    bucket = new_bucket("ranges")
    keys = ["in/a.png", "in/b.png", "in/c/x.png", "in/c/y.png", "in/d.png", "in/e/z.png", "in/f.png"]
    upload(bucket, keys)
    from sr_core import storage

    fs, _ = storage.get_fs(f"gs://{bucket}")
    page = listing._gcs_page(fs, bucket, "in/", listing._Span("", start="in/b", end="in/e"), None)
    assert [i["name"] for i in page["items"]] == ["in/b.png", "in/d.png"]
    assert page["prefixes"] == ["in/c/"]
    page = listing._gcs_page(fs, bucket, "in/", listing._Span("", start="in/c/y"), None)
    assert page["prefixes"] == ["in/c/", "in/e/"]  # c/ still holds an object in range
    listing.PAGE_SIZE = 2
    seen, token = [], None
    while True:
        page = listing._gcs_page(fs, bucket, "in/", listing._Span(""), token)
        seen.append(sorted([i["name"] for i in page.get("items", [])] + page.get("prefixes", [])))
        token = page.get("nextPageToken")
        if not token:
            break
    assert seen == [["in/a.png", "in/b.png"], ["in/c/", "in/d.png"], ["in/e/", "in/f.png"]]


def test_split_points_cut_the_rest_in_growing_ranges_never_inside_a_stem():
    page = [f"in/img_{i:06d}.jpg" for i in range(1000)]
    points = listing.split_points(page, len("in/"), None)
    assert {"in/img_001", "in/img_009", "in/img_01", "in/img_09", "in/img_1", "in/img_9"} <= set(points)
    assert len(points) < 60  # the extension's letters cost a few empty ranges, not one per character
    assert all(p > page[-1] for p in points) and points == sorted(points)
    assert not any("." in p[3:] or "/" in p[3:] for p in points)
    # Within a range's end, and at most MAX_SPLITS of them.
    assert all(p < "in/img_05" for p in listing.split_points(page, 3, "in/img_05"))
    hashed = sorted(f"in/{(i * 2654435761) % 16**8:08x}" for i in range(5000))[:1000]
    assert len(listing.split_points(hashed, 3, None, most=10)) == 10
    # A page whose last entry is a stem cut by the page's end: no point falls between
    # a.jpg and a.png, whatever the characters.
    stems = ["in/a.jpg", "in/a.png", "in/a.tif"]
    for p in listing.split_points(stems[:2], 3, None):
        assert not (stems[0] < p <= stems[2])


def test_a_flat_prefix_is_listed_in_parallel_ranges_each_name_once(ranged, small_pages, requests):
    bucket = new_bucket("flat")
    names = flat_names()
    subs = [f"sub{i}/n{j}.png" for i in range(3) for j in range(5)]
    upload(bucket, [f"in/{n}" for n in names] + [f"in/{s}" for s in subs] + ["other/skip.png"])
    got, chunks = listed(f"gs://{bucket}/in")
    assert Counter(got) == Counter([("", n) for n in names] + [tuple(s.split("/")) for s in subs])
    ranged_requests = [r for r in requests if r[1] is not None]
    assert len({(r[1], r[2]) for r in ranged_requests}) > 4, "the flat prefix was not cut into ranges"
    assert not any(r[0].startswith("other") for r in requests)
    # Names of one stem share a chunk, though pages and ranges end everywhere.
    where = {(c.folder, n): i for i, c in enumerate(chunks) for n in c.names}
    for i in range(40):
        assert where[("", f"pair{i:03d}.jpg")] == where[("", f"pair{i:03d}.png")]
    # Serial (what the checks that need a folder whole get): the same names, in name
    # order, with no range requests.
    before = len(requests)
    got_serial, serial_chunks = listed(f"gs://{bucket}/in", whole_folders=True)
    assert sorted(got_serial) == sorted(got)
    assert [n for c in serial_chunks if c.folder == "" for n in c.names] == names
    assert all(r[1] is None for r in requests[before:])


def test_ranges_hold_through_dropped_connections_and_server_errors(ranged, small_pages, monkeypatch):
    bucket = new_bucket("faulty")
    names = flat_names()
    upload(bucket, [f"in/{n}" for n in names])
    rates = FaultRates(drop_before=0.05, drop_after=0.05, status_429=0.05, status_500=0.05, status_503=0.05,
                       delay=0.05, delay_seconds=0.05)
    with FaultProxy(ranged, rates, seed=11) as proxy:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
        monkeypatch.setenv("SR_STORAGE_ATTEMPTS", "12")
        monkeypatch.setenv("SR_STORAGE_BACKOFF", "0.01")
        got, _ = listed(f"gs://{bucket}/in")
        assert sum(proxy.counts.values()) > 0
        assert Counter(got) == Counter(("", n) for n in names)


def write_metrics(output_key: str, bucket: str, run: str, recorded: list[str]) -> None:
    import gcsfs

    table = pa.table({"input": recorded})
    fs = gcsfs.GCSFileSystem(token="anon")
    with fs.open(f"{bucket}/{output_key}/_sr_batch/{run}/metrics.parquet/part-000000.parquet", "wb") as f:
        pq.write_table(table, f)


def test_resume_against_a_remote_output_lists_only_the_ranges_its_outputs_span(ranged, small_pages, requests):
    """A rerun over gs:// plans only what is missing, finds the orphans of a killed run
    (outputs without a metrics row), and never lists OUTPUT whole: a folder of OUTPUT
    no input maps to is never listed. Outputs do not sort like inputs here: a.jpg <
    a0.jpg but a_sr.png > a0_sr.png."""
    bucket = new_bucket("resume")
    stems = sorted({"a", "a0", "a_b", "a-", "b"} | {f"p{i:03d}" for i in range(300)})
    upload(bucket, [f"in/{s}.jpg" for s in stems] + ["in/deep/x.jpg", "in/deep/x0.jpg"])
    done = [s for i, s in enumerate(stems) if i % 3 != 0] + ["a", "a0", "a_b"]
    upload(bucket, [f"out/{s}_sr.png" for s in done] + ["out/deep/x0_sr.png"])
    upload(bucket, [f"out/unrelated/{i:04d}.png" for i in range(200)])
    recorded = [f"gs://{bucket}/in/{s}.jpg" for s in done[: len(done) // 2]]
    write_metrics("out", bucket, "run-1", recorded)
    plan = inputs.plan_batch(f"gs://{bucket}/in", f"gs://{bucket}/out", "_sr", ".png", run_id="run-2")
    expect_todo = {f"gs://{bucket}/in/{s}.jpg" for s in stems if s not in done} | {f"gs://{bucket}/in/deep/x.jpg"}
    assert {t.input for t in plan.todo} == expect_todo
    assert plan.num_skipped == len(set(done)) + 1
    orphans = {f"gs://{bucket}/in/{s}.jpg" for s in done} - set(recorded) | {f"gs://{bucket}/in/deep/x0.jpg"}
    assert {t.input for t in plan.orphans} == orphans
    out_requests = [r for r in requests if r[0].startswith("out/")]
    assert out_requests and all(r[1] is not None for r in out_requests), "OUTPUT was listed whole"
    assert not any(r[0].startswith("out/unrelated") for r in requests)
    # A rerun after everything is done: nothing to do, nothing orphaned twice.
    upload(bucket, [f"out/{s}_sr.png" for s in stems if s not in done] + ["out/deep/x_sr.png"])
    write_metrics("out", bucket, "run-2", sorted(orphans | expect_todo))
    import gcsfs

    gcsfs.GCSFileSystem.clear_instance_cache()  # a rerun is a new process: no cached listing of _sr_batch/
    plan = inputs.plan_batch(f"gs://{bucket}/in", f"gs://{bucket}/out", "_sr", ".png", run_id="run-3")
    assert plan.todo == [] and plan.orphans == [] and plan.num_skipped == len(stems) + 2
