"""`sr batch` at bucket scale: how the driver's planning, its time to the first output
and its own memory behave from 1,000 to 1,000,000 inputs, and what a rerun over a
finished run costs.

    PYTHONPATH=$PWD .venv/bin/python bench/bench_batch_scale.py [--quick]
        [--sizes 1000,10000,100000,1000000] [--rerun 100000] [--gcs 100000] [--limit 20]

Rows (each measured in a driver process of its own, so that its peak RSS is its own:
``VmHWM`` of /proc/self/status, read by that process when the run is over; Ray's
processes are not counted):

- ``local N``: ``run_batch`` over N inputs in folders of 1,000 (written with ``os.open``
  in a loop): the folder listed first holds copies of one 8x8 PNG (83 bytes), the
  others empty files (nothing is opened to be listed), the tiny x2 RRDBNet, ``--limit`` images upscaled (default 20) on a local Ray
  started by the run, 2 CPUs. The listing goes on to the end (the rest count as
  ``left_for_later``), so the run lists all N while the first images are upscaled.
- ``rerun N``: the same command over N inputs whose run is finished (every output
  exists and an earlier run's metrics table has a row for every input): the rerun lists,
  finds every output, reads the earlier table's ``input`` column, starts no Ray and
  does no model work, and writes one summary. The finished run is made by writing what
  one leaves (the outputs, and a metrics table of one row per input) rather than by
  upscaling N images (100,000 would take ~22 minutes here). Compared with ``list N``:
  the bare listing of the same folder (``batch.listing.walk``, names counted).
- ``gcs N``: the plan alone (``batch.inputs.Planner.steps``, no Ray) over N objects in
  one prefix of a GCS emulator (gcp-storage-emulator, the server the tests start, on
  loopback), OUTPUT a prefix of the same bucket; the number of list requests is
  counted, so the time per request at the parallelism used is printed. The emulator
  answers one request at a time and ignores ``maxResults`` (a prefix comes back in one
  response, held whole by the driver: its peak RSS here is not Cloud Storage's), so
  neither figure is Cloud Storage's.

Columns: planning rate = inputs / listing seconds (the plan thread's own time, from the
first listing to end.json); first task = when the first plan shard is written or Ray is
up, whichever is later (the dataset's reader reads shard 0 as soon as both are there);
first output = the earliest ``finished_at`` of the metrics table; all times from the
call of ``run_batch`` (imports done; Ray's start included).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

FOLDER_FILES = 1000
"""Inputs per folder of the synthetic corpora."""
MIB = 2**20


def tiny_png() -> bytes:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def make_corpus(root: str, count: int, data: bytes, name: str = "img{:07d}.png", real: int | None = None) -> float:
    """``count`` files in folders of ``FOLDER_FILES``: the first ``real`` (default: all)
    hold ``data``, the others are empty (listing never opens a file; empty files also
    delete fast on a disk mounted with ``discard``). Returns the seconds."""
    started = time.perf_counter()
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    real = count if real is None else real
    for first in range(0, count, FOLDER_FILES):
        folder = os.path.join(root, f"d{first // FOLDER_FILES:05d}")
        os.makedirs(folder, exist_ok=True)
        for i in range(first, min(count, first + FOLDER_FILES)):
            fd = os.open(os.path.join(folder, name.format(i)), flags, 0o644)
            if i < real:
                os.write(fd, data)
            os.close(fd)
    return time.perf_counter() - started


def vmhwm_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


# ---------------------------------------------------------------- child processes


def child_run(args: dict) -> dict:
    """One ``run_batch`` in this process, timed from the call."""
    from batch import planfeed, run
    from batch.results import read_table
    from sr_core.outputs import OutputSettings

    marks: dict[str, float] = {}
    start_feed, connect = planfeed.PlanFeed.start, run.connect_ray

    def timed_start(feed):
        marks["listing_start"] = time.time()
        return start_feed(feed)

    def timed_connect(*a, **k):
        out = connect(*a, **k)
        marks["ray_ready"] = time.time()
        return out

    planfeed.PlanFeed.start, run.connect_ray = timed_start, timed_connect
    config = run.BatchConfig(input=args["input"], output=args["output"], model=args["model"],
                             output_settings=OutputSettings(tile=0), limit=args.get("limit"), num_cpus=2,
                             batch_size=4, encode_threads=1, run_id=args["run_id"], progress=False)
    t0 = time.time()
    summary = run.run_batch(config)
    total = time.time() - t0
    plan = summary["plan"]
    out = {"total_s": total, "listing_s": plan["listing_seconds"], "listed": summary["listed"],
           "done": summary["done"], "skipped": summary["skipped"], "recovered": summary["recovered"],
           "failed": summary["failed"], "ray_started": summary["ray"]["started_here"],
           "ray_start_s": summary["ray"]["startup_seconds"], "vmhwm_mib": vmhwm_mib()}
    if plan["first_shard_seconds"] is not None:
        shard_at = marks["listing_start"] + plan["first_shard_seconds"]
        out["first_task_s"] = max(shard_at, marks.get("ray_ready", shard_at)) - t0
    if summary["done"]:
        finished = read_table(summary["files"]["metrics"], columns=["finished_at"]).column(0).to_numpy()
        out["first_output_s"] = float(finished.min()) - t0
    return out


def child_list(args: dict) -> dict:
    """The bare listing of INPUT: names counted, nothing planned."""
    from batch import listing

    started = time.perf_counter()
    count = sum(len(chunk.names) for chunk in listing.walk(args["input"]))
    return {"listing_s": time.perf_counter() - started, "listed": count, "vmhwm_mib": vmhwm_mib()}


def child_plan(args: dict) -> dict:
    """The plan alone (no Ray), with the object store's list requests counted."""
    import gcsfs

    from batch import inputs

    calls = [0]
    list_objects = gcsfs.GCSFileSystem._call_list_objects

    async def counted(self, *a, **k):
        calls[0] += 1
        return await list_objects(self, *a, **k)

    gcsfs.GCSFileSystem._call_list_objects = counted
    started = time.perf_counter()
    planner = inputs.Planner(args["input"], args["output"], "_sr", ".png", run_id="plan")
    todo = listed = 0
    for step in planner.steps():
        todo += len(step.todo)
        listed += step.num_listed
    return {"listing_s": time.perf_counter() - started, "listed": listed, "todo": todo,
            "list_requests": calls[0], "vmhwm_mib": vmhwm_mib()}


def in_child(mode: str, args: dict, env: dict | None = None) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", mode, json.dumps(args)], capture_output=True,
                          text=True, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} child failed (exit {proc.returncode}): {proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- the rows


def local_rows(work: str, sizes: list[int], model: str, limit: int, data: bytes) -> list[dict]:
    rows = []
    for count in sizes:
        src, dst = os.path.join(work, f"in{count}"), os.path.join(work, f"out{count}")
        # The folder listed first (d00000) holds the images the run upscales.
        made = make_corpus(src, count, data, real=FOLDER_FILES)
        print(f"  local {count}: {count} files written in {made:.1f} s", file=sys.stderr)
        row = in_child("run", {"input": src, "output": dst, "model": model, "limit": limit, "run_id": "scale"})
        assert row["listed"] == count and row["done"] == min(limit, count), row
        rows.append({"row": f"local {count:,}", "inputs": count, **row})
        print(f"  {rows[-1]}", file=sys.stderr)
        shutil.rmtree(src)
        shutil.rmtree(dst)
    return rows


def finished_run(src: str, dst: str, count: int, data: bytes, out_data: bytes) -> None:
    """What a finished run over ``src`` leaves in ``dst``: every output, and a metrics
    table (one part) with one row per input. The rerun reads neither the inputs nor the
    outputs (it checks that the outputs exist), so all but the first folder are empty."""
    from batch import pipeline, results
    from sr_core import storage

    make_corpus(src, count, data, real=FOLDER_FILES)
    make_corpus(dst, count, out_data, name="img{:07d}_sr.png", real=FOLDER_FILES)
    rows: dict[str, list] = {name: [] for name, _, _ in results.METRIC_COLUMNS}
    for first in range(0, count, FOLDER_FILES):
        folder = f"d{first // FOLDER_FILES:05d}"
        for i in range(first, min(count, first + FOLDER_FILES)):
            row = pipeline._empty_row({"input": os.path.join(src, folder, f"img{i:07d}.png"),
                                       "output": os.path.join(dst, folder, f"img{i:07d}_sr.png")})
            for name, kind, _ in results.METRIC_COLUMNS:
                rows[name].append(row[name])
    url = storage.join(results.table_url(storage.join(dst, results.RESULTS_FOLDER, "finished"), "metrics"),
                       "part-000000.parquet")
    storage.write_bytes(url, results._table_bytes(rows, results.METRIC_COLUMNS))


def rerun_rows(work: str, count: int, model: str, data: bytes) -> list[dict]:
    from sr_core.upscaler import Upscaler
    from sr_core import codecs

    src, dst = os.path.join(work, "rerun-in"), os.path.join(work, "rerun-out")
    image = codecs.decode_image(data, name="tiny.png")
    out_data = codecs.encode_image(Upscaler.from_file(model, tile=0)(image), codecs.EncodeOptions("png"))
    finished_run(src, dst, count, data, out_data)
    listed = in_child("list", {"input": src})
    rerun = in_child("run", {"input": src, "output": dst, "model": model, "run_id": "rerun"})
    summaries = [name for name in os.listdir(os.path.join(dst, "_sr_batch"))
                 if os.path.exists(os.path.join(dst, "_sr_batch", name, "summary.json"))]
    assert rerun["done"] == 0 and rerun["skipped"] == count and rerun["recovered"] == 0, rerun
    assert not rerun["ray_started"] and summaries == ["rerun"], (rerun, summaries)
    shutil.rmtree(src)
    shutil.rmtree(dst)
    print(f"  {listed}\n  {rerun}", file=sys.stderr)
    return [{"row": f"list {count:,}", "inputs": count, **listed},
            {"row": f"rerun {count:,}", "inputs": count, **rerun, "x_listing": rerun["total_s"] / listed["listing_s"]}]


def start_emulator(data_dir: str):
    """The emulator on loopback, storing under ``data_dir`` (its objects survive a restart)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(os.path.join(os.path.dirname(data_dir), "emulator.log"), "ab")
    proc = subprocess.Popen([sys.executable, "-m", "gcp_storage_emulator", f"--data-dir={data_dir}", "start",
                             "--host=127.0.0.1", f"--port={port}", "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=log)
    log.close()
    deadline = time.monotonic() + 120
    while True:  # the server's start: its port accepting connections (or its exit)
        if proc.poll() is not None:
            raise RuntimeError(f"gcp-storage-emulator exited {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return proc, f"http://127.0.0.1:{port}"
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("gcp-storage-emulator did not start within 120 s")
            time.sleep(0.1)


def stop(proc) -> None:
    proc.kill()
    proc.wait()


def fill_emulator(data_dir: str, bucket: str, prefix: str, count: int, data: bytes) -> None:
    """``count`` objects ``prefix/img*.png`` in the emulator's data folder. The emulator
    rewrites its whole metadata file at every upload (100,000 uploads would take hours),
    so one object is uploaded through the API, the server stopped, and its metadata and
    file copied for the others before it starts again."""
    import gcsfs

    proc, host = start_emulator(data_dir)
    try:
        os.environ["STORAGE_EMULATOR_HOST"] = host
        fs = gcsfs.GCSFileSystem(token="anon", skip_instance_cache=True)
        fs.mkdir(bucket)
        fs.pipe(f"{bucket}/{prefix}/model.png", data)
    finally:
        stop(proc)
    root = os.path.join(data_dir, ".cloudstorage")
    meta_path = os.path.join(root, ".meta")
    with open(meta_path) as f:
        meta = json.load(f)
    model = meta["objects"][bucket].pop(f"{prefix}/model.png")
    os.remove(os.path.join(root, bucket, prefix, "model.png"))
    objects = meta["objects"][bucket]
    folder = os.path.join(root, bucket, prefix)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    for i in range(count):
        name = f"{prefix}/img{i:07d}.png"
        obj = dict(model, name=name, id=f"{bucket}/{name}/{model.get('generation', '1')}")
        if "selfLink" in obj:
            obj["selfLink"] = obj["selfLink"].replace(f"{prefix}%2Fmodel.png", name.replace("/", "%2F"))
        objects[name] = obj
        # Empty on disk (the plan reads none of them): a disk mounted with discard
        # deletes empty files fast. The metadata says 83 bytes, as listed.
        os.close(os.open(os.path.join(folder, f"img{i:07d}.png"), flags, 0o644))
    with open(meta_path, "w") as f:
        json.dump(meta, f)


def gcs_rows(work: str, count: int, data: bytes) -> list[dict]:
    data_dir = os.path.join(work, "gcs")
    started = time.perf_counter()
    fill_emulator(data_dir, "scale", "in", count, data)
    print(f"  gcs {count}: {count} objects stored in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    proc, host = start_emulator(data_dir)
    try:
        row = in_child("plan", {"input": "gs://scale/in", "output": "gs://scale/out"},
                       env={"STORAGE_EMULATOR_HOST": host})
    finally:
        stop(proc)
    assert row["listed"] == count == row["todo"], row
    row["s_per_request"] = row["listing_s"] / max(1, row["list_requests"])
    from batch import listing

    row["list_threads"] = getattr(listing, "NUM_LIST_THREADS", 1)
    return [{"row": f"gcs {count:,} (plan)", "inputs": count, **row}]


def fmt(value, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def print_table(rows: list[dict]) -> None:
    print("| row | inputs | planning rate (inputs/s) | listing s | first task s | first output s | "
          "driver peak RSS MiB | total s | notes |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        notes = []
        if "x_listing" in r:
            notes.append(f"{r['x_listing']:.2f}x the listing; done {r['done']}, skipped {r['skipped']}, no Ray")
        if "list_requests" in r:
            notes.append(f"{r['list_requests']} list requests, {1000 * r['s_per_request']:.0f} ms each "
                         f"({r['list_threads']} listing threads)")
        if r["row"].startswith("local"):
            notes.append(f"{r['done']} upscaled; Ray start {r['ray_start_s']:.1f} s")
        print(f"| {r['row']} | {r['inputs']:,} | {r['inputs'] / r['listing_s']:,.0f} | {r['listing_s']:.1f} | "
              f"{fmt(r.get('first_task_s'), '.1f')} | {fmt(r.get('first_output_s'), '.1f')} | "
              f"{r['vmhwm_mib']:.0f} | {fmt(r.get('total_s'), '.1f')} | {'; '.join(notes)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,10000,100000,1000000", help="local inputs per row (comma list)")
    parser.add_argument("--rerun", type=int, default=100_000, help="inputs of the rerun row (0: none)")
    parser.add_argument("--gcs", type=int, default=100_000, help="objects of the emulator row (0: none)")
    parser.add_argument("--limit", type=int, default=20, help="images upscaled per local row")
    parser.add_argument("--quick", action="store_true", help="1,000 and 10,000 local, 2,000 rerun and gcs")
    parser.add_argument("--workdir", default=None, help="where the corpora go (default: a temporary folder)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, payload = args.child
        result = {"run": child_run, "list": child_list, "plan": child_plan}[mode](json.loads(payload))
        print(json.dumps(result))
        return
    if args.quick:
        args.sizes, args.rerun, args.gcs = "1000,10000", 2000, 2000
    sizes = [int(s) for s in args.sizes.split(",") if s]

    import torch

    from sr_core import build_generator, save_generator

    work = tempfile.mkdtemp(prefix="sr-bench-scale-", dir=args.workdir)
    try:
        torch.manual_seed(0)
        model = os.path.join(work, "tiny_x2.safetensors")
        save_generator(build_generator("rrdbnet", "tiny", scale=2), model)
        data = tiny_png()
        rows = local_rows(work, sizes, model, args.limit, data)
        if args.rerun:
            rows += rerun_rows(work, args.rerun, model, data)
        if args.gcs:
            rows += gcs_rows(work, args.gcs, data)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n`sr batch` at scale on {os.cpu_count()} CPUs; tiny x2 RRDBNet, 8x8 PNG inputs, "
          f"--limit {args.limit} on the local rows\n")
    print_table(rows)
    local = {r["inputs"]: r for r in rows if r["row"].startswith("local")}
    if len(local) >= 2:
        small, large = local[min(local)], local[max(local)]
        print(f"\n{max(local):,} vs {min(local):,} inputs: first output "
              f"{large['first_output_s'] - small['first_output_s']:+.1f} s, driver peak RSS "
              f"{large['vmhwm_mib'] - small['vmhwm_mib']:+.0f} MiB")


if __name__ == "__main__":
    main()
