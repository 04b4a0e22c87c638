"""The plan reaching Ray Data as a stream: the driver writes the tasks as Parquet shards
under the run's folder while it lists (``PlanFeed``, a thread), and the dataset reads
them as they appear (``plan_dataset``: read tasks that wait for their shards).

Why shards in storage rather than a list handed to ``ray.data.from_items``: the driver
never holds the plan (a shard of at most ``MAX_SHARD_TASKS`` tasks at a time), work
can start on the first shard while the listing goes on (the first shard is small, a
shard is also written after ``FLUSH_SECONDS``, and ``plan_dataset`` says how the read
hands each early shard on at once), and the plan is a file any node can
read, so it needs no channel back to the driver. Why not a Ray Data datasource that
lists lazily: the plan's checks (collisions, resume, orphans, references) and its
counts belong to the driver, which reports them; listing inside a read task would
send all of that back through another channel.

Layout under OUTPUT/_sr_batch/<run-id>/plan/: ``shard-000000.parquet``, ... (columns
input, output, reference, reference_error), ``orphans-000000.parquet``, ... (outputs of
a killed run without their rows, measured by the driver after the pipeline), and
``end.json`` once the listing is over (how many shards there are). The folder is
removed when the run finishes; a killed run leaves it (it is not read again).
"""

from __future__ import annotations

import io
import json
import threading
import time

from sr_core import storage

from batch import inputs

PLAN_FOLDER = "plan"
FIRST_SHARD_TASKS = 16
"""Tasks in the first shard: small, so that work starts at once."""
MAX_SHARD_TASKS = 4096
"""Tasks per shard once the listing is under way (shards double up to it)."""
FLUSH_SECONDS = 1.0
"""A shard is written after this long even if not full (slow listings start work too)."""
POLL_SECONDS = 0.2
"""How often the dataset's reader looks for the next shard while the driver lists."""
SHARD_READ_TASKS = 64
"""Read tasks of the plan's dataset: one per shard for the first 63 shards (16 tasks
doubling to 4096: up to 229,360 tasks), one for all later shards."""
SHARD_READ_CONCURRENCY = 2
"""Read tasks waiting for their shard at a time."""
MAX_NOT_READ = 1000
"""Files not read (hidden, special) kept by name for summary.json; all are counted."""
COLUMNS = ("input", "output", "reference", "reference_error")


def plan_url(run_url: str) -> str:
    return storage.join(run_url, PLAN_FOLDER)


def shard_url(run_url: str, kind: str, index: int) -> str:
    return storage.join(plan_url(run_url), f"{kind}-{index:06d}.parquet")


def _shard_bytes(rows: list[dict]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({name: pa.array([r[name] for r in rows], pa.string()) for name in COLUMNS})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def read_shard(url: str) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(io.BytesIO(storage.read_bytes(url))).to_pylist()


class PlanFeed:
    """Runs a ``Planner`` in a thread: tasks go to shards, the rest is counted (and the
    plan's failures queued for the driver's results)."""

    def __init__(self, planner: inputs.Planner, run_url: str):
        self.planner, self.run_url = planner, run_url
        self.lock = threading.Lock()
        self.first_shard = threading.Event()
        """Set when the first shard is written or the listing is over."""
        self.finished = threading.Event()
        self.stopping = threading.Event()
        self.error: BaseException | None = None
        self.num_listed = self.num_found = self.num_skipped = self.num_left = 0
        self.num_tasks = 0
        """Tasks written to shards so far."""
        self.num_shards = 0
        self.num_orphan_shards = 0
        self.num_orphans = 0
        self.num_hidden = self.num_special = 0
        self.not_read: list[tuple[str, str]] = []
        self.first_shard_seconds: float | None = None
        """Seconds from the start of the listing to the first shard written."""
        self.listing_seconds: float | None = None
        self._failures: list[tuple[str, str]] = []
        self._pending: list[dict] = []
        self._orphans: list[dict] = []
        self._started = 0.0
        self._last_flush = 0.0
        self.thread = threading.Thread(target=self._run, name="sr batch: plan", daemon=True)

    def start(self) -> None:
        self._started = self._last_flush = time.perf_counter()
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join()

    def take_failures(self) -> list[tuple[str, str]]:
        with self.lock:
            out, self._failures = self._failures, []
        return out

    def _run(self) -> None:
        try:
            for step in self.planner.steps():
                self._add(step)
                if self.stopping.is_set():
                    break
            self._flush(force=True)
            self._flush_orphans(force=True)
        except BaseException as exc:  # noqa: BLE001 - handed to the driver's thread
            self.error = exc
        finally:
            self.listing_seconds = time.perf_counter() - self._started
            try:
                storage.write_bytes(storage.join(plan_url(self.run_url), "end.json"),
                                    json.dumps({"shards": self.num_shards, "tasks": self.num_tasks}).encode())
            except BaseException as exc:  # noqa: BLE001
                self.error = self.error or exc
            self.finished.set()
            self.first_shard.set()

    def _add(self, step: inputs.PlanStep) -> None:
        with self.lock:
            self.num_listed += step.num_listed
            self.num_found += step.num_found
            self.num_skipped += step.num_skipped
            self.num_left += step.num_left
            self._failures.extend(step.failures)
            for url, reason in step.not_read:
                if reason == inputs.HIDDEN_REASON:
                    self.num_hidden += 1
                else:
                    self.num_special += 1
                if len(self.not_read) < MAX_NOT_READ:
                    self.not_read.append((url, reason))
        self._pending.extend(t.row() for t in step.todo)
        self._orphans.extend(t.row() for t in step.orphans)
        self.num_orphans += len(step.orphans)
        self._flush()
        self._flush_orphans()

    def _flush(self, force: bool = False) -> None:
        size = FIRST_SHARD_TASKS if self.num_shards == 0 else min(MAX_SHARD_TASKS, FIRST_SHARD_TASKS << self.num_shards)
        due = time.perf_counter() - self._last_flush >= FLUSH_SECONDS
        while self._pending and (len(self._pending) >= size or force or due):
            rows, self._pending = self._pending[:size], self._pending[size:]
            storage.write_bytes(shard_url(self.run_url, "shard", self.num_shards), _shard_bytes(rows))
            with self.lock:
                self.num_shards += 1
                self.num_tasks += len(rows)
            if self.first_shard_seconds is None:
                self.first_shard_seconds = time.perf_counter() - self._started
                self.first_shard.set()
            self._last_flush = time.perf_counter()
            size = min(MAX_SHARD_TASKS, size * 2)
            due = False

    def _flush_orphans(self, force: bool = False) -> None:
        while self._orphans and (len(self._orphans) >= MAX_SHARD_TASKS or force):
            rows, self._orphans = self._orphans[:MAX_SHARD_TASKS], self._orphans[MAX_SHARD_TASKS:]
            storage.write_bytes(shard_url(self.run_url, "orphans", self.num_orphan_shards), _shard_bytes(rows))
            self.num_orphan_shards += 1

    def orphan_shards(self) -> list[str]:
        return [shard_url(self.run_url, "orphans", i) for i in range(self.num_orphan_shards)]

    def remove(self) -> None:
        """The plan folder, once the run is over."""
        fs, path = storage.get_fs(plan_url(self.run_url))
        if fs.exists(path):
            fs.rm(path, recursive=True)


def _read_shards(run_url: str, block_rows: int, first: int, count: int | None):
    """The blocks of shards ``first`` .. ``first + count - 1`` (``count`` None: every
    shard from ``first`` on), in order, as they appear; ends early when ``end.json``
    says the plan has no more shards."""
    import pyarrow as pa

    index = first
    end_url = storage.join(plan_url(run_url), "end.json")
    while count is None or index < first + count:
        url = shard_url(run_url, "shard", index)
        if storage.exists(url):
            table = pa.Table.from_pylist(read_shard(url))
            for start in range(0, table.num_rows, block_rows):
                yield table.slice(start, block_rows)
            index += 1
            continue
        if storage.exists(end_url) and json.loads(storage.read_bytes(end_url))["shards"] <= index:
            return
        time.sleep(POLL_SECONDS)  # the driver is still listing


def plan_dataset(run_url: str, block_rows: int):
    """The Ray dataset of the plan's tasks, read as the driver writes the shards.

    Ray Data hands on what a read task yields only once it holds
    ``target_max_block_size`` bytes (128 MiB, about a million tasks) or the task ends.
    So the first ``SHARD_READ_TASKS - 1`` shards each get a read task of their own, which
    ends, and hands its tasks on, as soon as its shard is read: work starts on the first
    shard (16 tasks) while the listing goes on. The last read task takes every later
    shard; by then the earlier shards hold up to 229,360 tasks of work, and
    its 128 MiB blocks keep coming as the listing goes on. At most
    ``SHARD_READ_CONCURRENCY`` read tasks wait at a time (each polls for its shard), in
    order; one whose shard never comes (a short plan) ends when ``end.json`` is written.
    The block size stays Ray's for every stage: one byte for the whole dataset would make
    every stage's blocks one row (8x8 images went from ~80 to ~6 images/s)."""
    import functools

    import ray.data
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class PlanSource(Datasource):
        def estimate_inmemory_data_size(self):
            return None

        def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None):
            metadata = BlockMetadata(num_rows=None, size_bytes=None, input_files=None, exec_stats=None)
            alone = SHARD_READ_TASKS - 1
            return [ReadTask(functools.partial(_read_shards, run_url, block_rows, i, 1), metadata)
                    for i in range(alone)] + [
                ReadTask(functools.partial(_read_shards, run_url, block_rows, alone, None), metadata)]

    # No CPU of its own: a reader mostly waits for shards, and on a small machine a
    # reserved CPU would leave the decode tasks none. (A different resource request
    # also keeps Ray Data from fusing the decode stage into the read.) The streaming
    # repartition cuts a shard into small blocks, so decoding runs on many tasks at once.
    ds = ray.data.read_datasource(PlanSource(), override_num_blocks=SHARD_READ_TASKS, num_cpus=0,
                                  concurrency=SHARD_READ_CONCURRENCY)
    return ds.repartition(target_num_rows_per_block=block_rows)
