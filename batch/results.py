"""The result files of one ``sr batch`` run, under OUTPUT/_sr_batch/<run-id>/:

- ``metrics.parquet/``: one row per image processed in this run (``METRIC_COLUMNS``),
  as a folder of Parquet parts (``part-000000.parquet``, ...) that readers take as one
  table (pandas, pyarrow.dataset, DuckDB's ``metrics.parquet/*.parquet``);
- ``failures.parquet/``: one row per input that failed (input, output, stage, error),
  parts as well;
- ``summary.json``: counts, wall time, throughput, mean and percentiles of every metric,
  the model file and its SHA-256, the settings; written last, so a run directory
  without it is a run that did not finish;
- TensorBoard events (throughput while running, metric histograms at the end).

The driver keeps counters and the rows since the last checkpoint, never all rows:
every ``checkpoint_seconds`` (or ``MAX_PART_ROWS`` rows) the new rows are written as a
new part, whole (``storage.write_bytes``: never a partial object), and no part is ever
rewritten. A killed run keeps every part it finished; the rows of outputs it wrote after
its last part are made by the next run (``recorded_inputs`` finds them missing; their
rows say ``recovered``). The summary is computed at the end from the parts, one column
at a time. TensorBoard's writer appends to its file, which object stores cannot do (a
writer pointed at gs:// loses data): for a remote OUTPUT it writes to a local folder
whose files are uploaded whole with each checkpoint (``sr_core.storage.UploadedFolder``).
"""

from __future__ import annotations

import json
import math
import posixpath
import time

import numpy as np

from sr_core import storage

RESULTS_FOLDER = "_sr_batch"

# (name, type, meaning): the per-image table. Quality is measured on Y (BT.601, as in
# SR papers); a gray image is its own Y.
METRIC_COLUMNS = [
    ("input", "string", "input URL"),
    ("output", "string", "output URL"),
    ("in_width", "int64", "input width (pixels)"),
    ("in_height", "int64", "input height"),
    ("channels", "int64", "channels (1 gray, 2 gray+alpha, 3 RGB, 4 RGBA)"),
    ("bits", "int64", "bits per channel (8 or 16)"),
    ("out_width", "int64", "output width"),
    ("out_height", "int64", "output height"),
    ("in_bytes", "int64", "input file size"),
    ("out_bytes", "int64", "output file size"),
    ("read_s", "float64", "seconds reading the input"),
    ("decode_s", "float64", "seconds decoding it"),
    ("model_s", "float64", "seconds in the Upscaler"),
    ("encode_s", "float64", "seconds encoding the output"),
    ("write_s", "float64", "seconds writing it"),
    ("metrics_s", "float64", "seconds computing the quality metrics"),
    ("lr_psnr", "float64", "LR consistency: PSNR (dB, Y) of the input vs the MATLAB-bicubic downscale of the output"),
    ("lr_ssim", "float64", "LR consistency: SSIM (Y) of the same pair (NaN below 11x11 pixels)"),
    ("reference", "string", "the HR image compared with (--reference), or ''"),
    ("ref_psnr", "float64", "PSNR (dB, Y, border = scale cropped) of the output vs the reference"),
    ("ref_ssim", "float64", "SSIM of the same pair"),
    ("ref_mse", "float64", "MSE (Y, 0..255 or 0..65535) of the same pair"),
    ("reference_error", "string", "why the reference metrics are missing, or ''"),
    ("worker", "string", "host:pid of the actor that upscaled the image"),
    ("finished_at", "float64", "UNIX time the output was written"),
    ("recovered", "bool", "measured by a later run from the written output (its run was killed before "
                          "recording the row): timings, worker and finished_at are empty"),
]
FAILURE_COLUMNS = [
    ("input", "string", "input URL"),
    ("output", "string", "the output it would have had, or ''"),
    ("stage", "string", "plan, read, decode, upscale, encode or write"),
    ("error", "string", "what went wrong"),
]
# Metrics summarized with mean and percentiles in summary.json and TensorBoard.
SUMMARY_COLUMNS = ["lr_psnr", "lr_ssim", "ref_psnr", "ref_ssim", "ref_mse", "read_s", "decode_s", "model_s",
                   "encode_s", "write_s", "metrics_s", "in_bytes", "out_bytes"]
PERCENTILES = (50, 90, 99)


def _schema(columns):
    import pyarrow as pa

    return pa.schema([(name, pa.bool_() if kind == "bool" else getattr(pa, kind)()) for name, kind, _ in columns])


def _table_bytes(rows: dict[str, list], columns) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({name: rows[name] for name, _, _ in columns}, schema=_schema(columns))
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def describe(values) -> dict:
    """Count, mean, min, max and percentiles of the finite values (None when empty)."""
    array = np.asarray(values, dtype=np.float64)
    array = array[np.isfinite(array)]
    if array.size == 0:
        return {"count": 0}
    out = {"count": int(array.size), "mean": float(array.mean()), "min": float(array.min()),
           "max": float(array.max())}
    for p in PERCENTILES:
        out[f"p{p}"] = float(np.percentile(array, p))
    return out


MAX_PART_ROWS = 50_000
"""Rows after which a part is written even before ``checkpoint_seconds``."""
MAX_KEPT = 20
"""Failures and unscored images kept in memory for the report (all are in the tables)."""


def table_url(run_url: str, name: str) -> str:
    """The folder of parts of table ``name`` ('metrics' or 'failures') of a run."""
    return storage.join(run_url, f"{name}.parquet")


def read_table(url: str, columns: list[str] | None = None):
    """A run's table (the folder of parts, or an older run's single file) as one
    pyarrow Table, only ``columns`` when given."""
    return table_dataset(url).to_table(columns=columns)


def table_dataset(url: str):
    """A run's table as a pyarrow dataset over its non-empty files. Object stores can
    hold zero-byte "folder" markers inside the folder of parts (gcsfs writes them), which
    pyarrow would otherwise take for a damaged Parquet file."""
    import pyarrow.dataset as pads

    fs, path = storage.get_fs(url)
    if fs.isfile(path):
        return pads.dataset(path, filesystem=fs, format="parquet")
    parts = sorted(info["name"] for info in fs.ls(path, detail=True)
                   if info.get("type") == "file" and info.get("size", 0) > 0
                   and info["name"].endswith(".parquet"))
    if not parts:
        raise FileNotFoundError(url)
    return pads.dataset(parts, filesystem=fs, format="parquet")


def _clean_strings(rows: dict[str, list], columns) -> dict[str, list]:
    """Strings Parquet can hold (UTF-8): an undecodable byte of a file name (Python's
    surrogate escape) is written as a ``\\x`` escape."""
    out = dict(rows)
    for name, kind, _ in columns:
        if kind == "string":
            out[name] = [v if storage.is_utf8(v) else storage.printable(v) for v in rows[name]]
    return out



class RunResults:
    """Counts result rows on the driver and writes them as parts of the run directory."""

    def __init__(self, output: str, run_id: str, checkpoint_seconds: float = 15.0):
        self.url = storage.join(output, RESULTS_FOLDER, run_id)
        self.rows: dict[str, list] = {name: [] for name, _, _ in METRIC_COLUMNS}
        """Metric rows since the last part."""
        self.failures: dict[str, list] = {name: [] for name, _, _ in FAILURE_COLUMNS}
        """Failure rows since the last part."""
        self.checkpoint_seconds = checkpoint_seconds
        self.start = time.perf_counter()
        self.out_pixels = 0
        self.first_result_seconds: float | None = None
        """Seconds from the start to the first result: actor start-up (model load) + one batch."""
        self.first_result_rows = 0
        self.num_rows = 0
        """Metric rows of this run (upscaled and recovered)."""
        self.num_recovered = 0
        """Rows of outputs an earlier, killed run wrote (measured, not upscaled, here)."""
        self.num_failed = 0
        self.num_reference_errors = 0
        self.first_failures: list[tuple[str, str, str]] = []
        """(input, stage, error) of the first ``MAX_KEPT`` failures."""
        self.first_unscored: list[tuple[str, str, str]] = []
        """(input, reference, reference_error) of the first ``MAX_KEPT`` rows without a reference score."""
        self._parts = {"metrics": 0, "failures": 0}
        self._remove_tables()  # a reused --run-id: its tables are replaced
        self._last_checkpoint = time.perf_counter()
        self._last_scalars = 0.0
        self._tb = storage.UploadedFolder(self.url, prefix="sr-batch-tb-")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(self._tb.path)

    @property
    def num_done(self) -> int:
        """Images upscaled in this run (recovered rows are not)."""
        return self.num_rows - self.num_recovered

    def elapsed(self) -> float:
        return max(time.perf_counter() - self.start, 1e-9)

    def _remove_tables(self) -> None:
        for name in self._parts:
            fs, path = storage.get_fs(table_url(self.url, name))
            if fs.exists(path):
                fs.rm(path, recursive=True)

    def add_failure(self, input_url: str, output: str, stage: str, error: str) -> None:
        for name, value in (("input", input_url), ("output", output), ("stage", stage), ("error", error)):
            self.failures[name].append(value)
        self.num_failed += 1
        if len(self.first_failures) < MAX_KEPT:
            self.first_failures.append((input_url, stage, error))

    def _add_row(self, row: dict) -> None:
        for name, kind, _ in METRIC_COLUMNS:
            value = row[name]
            self.rows[name].append(str(value) if kind == "string" else int(value) if kind == "int64" else
                                   bool(value) if kind == "bool" else float(value))
        self.num_rows += 1
        if row["reference_error"]:
            self.num_reference_errors += 1
            if len(self.first_unscored) < MAX_KEPT:
                self.first_unscored.append((str(row["input"]), str(row["reference"]), str(row["reference_error"])))

    def add_recovered(self, row: dict) -> None:
        """The row of an output an earlier run wrote but did not record (``recovered``
        True); it counts in the table and the metrics, not in this run's throughput."""
        assert row["recovered"]
        self._add_row(row)
        self.num_recovered += 1

    def add_batch(self, batch: dict) -> None:
        """One batch of result rows from the pipeline (``status`` 'ok' or a failure)."""
        if self.first_result_seconds is None:
            self.first_result_seconds = self.elapsed()
            self.first_result_rows = len(batch["status"])
        for i, status in enumerate(batch["status"]):
            if status != "ok":
                self.add_failure(str(batch["input"][i]), str(batch["output"][i]), str(batch["stage"][i]),
                                 str(batch["error"][i]))
                continue
            self._add_row({name: batch[name][i] for name, _, _ in METRIC_COLUMNS})
            self.out_pixels += int(batch["out_width"][i]) * int(batch["out_height"][i])
        now = time.perf_counter()
        if now - self._last_scalars >= 5.0:
            self._last_scalars = now
            self.log_progress()
        if now - self._last_checkpoint >= self.checkpoint_seconds or len(self.rows["input"]) >= MAX_PART_ROWS:
            self.checkpoint()

    def rates(self) -> tuple[float, float]:
        """Images per second and output megapixels per second so far."""
        elapsed = self.elapsed()
        return self.num_done / elapsed, self.out_pixels / elapsed / 1e6

    def log_progress(self) -> None:
        images_per_s, mpx_per_s = self.rates()
        step = self.num_done + self.num_failed
        self.writer.add_scalar("throughput/images_per_s", images_per_s, step)
        self.writer.add_scalar("throughput/output_mpx_per_s", mpx_per_s, step)
        self.writer.add_scalar("progress/done", self.num_done, step)
        self.writer.add_scalar("progress/failed", self.num_failed, step)

    def _write_part(self, name: str, rows: dict[str, list], columns, force: bool = False) -> None:
        if not rows[columns[0][0]] and not (force and self._parts[name] == 0):
            return
        url = storage.join(table_url(self.url, name), f"part-{self._parts[name]:06d}.parquet")
        try:
            data = _table_bytes(rows, columns)
        except (UnicodeEncodeError, ValueError):
            data = _table_bytes(_clean_strings(rows, columns), columns)
        storage.write_bytes(url, data)
        self._parts[name] += 1
        for values in rows.values():
            values.clear()

    def checkpoint(self, final: bool = False) -> None:
        """Write the rows since the last checkpoint as new parts, and the events so far.
        ``final``: a table without any part gets an empty one (readers find its columns)."""
        self._write_part("metrics", self.rows, METRIC_COLUMNS, force=final)
        self._write_part("failures", self.failures, FAILURE_COLUMNS, force=final)
        self.writer.flush()
        self._tb.upload()
        self._last_checkpoint = time.perf_counter()

    def column(self, table: str, name: str) -> np.ndarray:
        """One column of this run's table (all parts), read once the parts are written."""
        values = read_table(table_url(self.url, table), columns=[name]).column(name)
        return values.to_numpy(zero_copy_only=False)

    def finish(self, summary: dict) -> dict:
        """Last parts, metric histograms, then summary.json (last), computed from the
        parts a column at a time. Returns the summary."""
        self.checkpoint(final=True)
        images_per_s, mpx_per_s = self.rates()
        finished_at = self.column("metrics", "finished_at")
        stages, counts = np.unique(self.column("failures", "stage").astype(str), return_counts=True)
        summary.update({
            "done": self.num_done,
            "recovered": self.num_recovered,
            "failed": self.num_failed,
            "wall_seconds": self.elapsed(),
            "images_per_second": images_per_s,
            "output_mpx_per_second": mpx_per_s,
            "output_pixels": self.out_pixels,
            "first_result_seconds": self.first_result_seconds,
            "first_result_images": self.first_result_rows,
            # The rate once the actors are up (start-up excluded), from when the outputs
            # were written: what a long run approaches.
            "steady_images_per_second": _steady_rate(finished_at[np.isfinite(finished_at)]),
            "failures_by_stage": {str(k): int(v) for k, v in zip(stages, counts)},
            "metrics": {},
            "files": {"metrics": table_url(self.url, "metrics"), "failures": table_url(self.url, "failures"),
                      "summary": storage.join(self.url, "summary.json")},
        })
        del finished_at
        self.log_progress()
        step = self.num_done + self.num_failed
        for name in SUMMARY_COLUMNS:
            values = self.column("metrics", name).astype(np.float64)
            summary["metrics"][name] = describe(values)
            values = values[np.isfinite(values)]
            if values.size:
                self.writer.add_histogram(f"metrics/{name}", values, step)
                self.writer.add_scalar(f"mean/{name}", float(values.mean()), step)
        self.writer.flush()
        self._tb.upload()
        self.writer.close()
        self._tb.close()
        storage.write_bytes(summary["files"]["summary"], (json.dumps(_finite(summary), indent=2) + "\n").encode())
        return summary


def earlier_tables(output: str, except_run: str) -> list[str]:
    """The metrics tables (folders of parts, or an older run's single file) of the runs
    below OUTPUT/_sr_batch/ other than ``except_run``."""
    folder = storage.join(output, RESULTS_FOLDER)
    fs, path = storage.get_fs(folder)
    try:
        entries = fs.ls(path, detail=False)
    except (FileNotFoundError, NotADirectoryError):
        return []
    tables = []
    for entry in sorted(entries):
        run = posixpath.basename(entry.rstrip("/"))
        if run.startswith(".") or run == except_run:
            continue
        url = table_url(storage.join(folder, run), "metrics")
        if storage.exists(url):
            tables.append(url)
    return tables


def recorded_inputs(tables: list[str], into=None) -> set[str]:
    """The inputs that have a row in any of these metrics tables (earlier runs'),
    reading only the ``input`` column, a row group at a time. With ``into`` (a
    ``batch.diskset.DiskSet``) they are added to it (and an empty set is returned)."""
    found: set[str] = set()
    for url in tables:
        try:
            dataset = table_dataset(url)
            for batch in dataset.to_batches(columns=["input"]):
                values = batch.column(0).to_pylist()
                if into is not None:
                    into.add_many(values)
                else:
                    found.update(values)
        except FileNotFoundError:
            continue  # a run directory removed while we listed
        except Exception as exc:  # an unreadable table would make its images' rows again
            raise ValueError(f"{url}: cannot read this earlier run's metrics table ({type(exc).__name__}: "
                             f"{exc}); move its run folder out of {RESULTS_FOLDER}/ and run again") from None
    return found


def _steady_rate(finished_at: np.ndarray) -> float | None:
    """Images per second between the first and the last output written."""
    if len(finished_at) < 2 or finished_at.max() <= finished_at.min():
        return None
    return float((len(finished_at) - 1) / (finished_at.max() - finished_at.min()))


def _finite(obj):
    """JSON has no NaN/Inf: they become null (PSNR of identical images is +inf)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj
