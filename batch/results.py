"""The result files of one ``sr batch`` run, under OUTPUT/_sr_batch/<run-id>/:

- ``metrics.parquet``: one row per image processed in this run (``METRIC_COLUMNS``);
- ``failures.parquet``: one row per input that failed (input, output, stage, error);
- ``summary.json``: counts, wall time, throughput, mean and percentiles of every metric,
  the model file and its SHA-256, the settings; written last, so a run directory
  without it is a run that did not finish;
- TensorBoard events (throughput while running, metric histograms at the end).

Every file is written whole (``storage.write_bytes``: never a partial object), and
the tables are rewritten every ``checkpoint_seconds`` while the run goes on, so a
killed run leaves the rows of what it had finished at its last checkpoint. The rows
of outputs it wrote after that are made by the next run (``recorded_inputs`` finds
them missing; their rows say ``recovered``). TensorBoard's writer appends to its
file, which object stores cannot do (a writer pointed at gs:// loses data): for a
remote OUTPUT it writes to a local folder whose files are uploaded whole with each
checkpoint (``sr_core.storage.UploadedFolder``).
"""

from __future__ import annotations

import io
import json
import math
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


class RunResults:
    """Collects result rows on the driver and writes the run directory."""

    def __init__(self, output: str, run_id: str, checkpoint_seconds: float = 15.0):
        self.url = storage.join(output, RESULTS_FOLDER, run_id)
        self.rows: dict[str, list] = {name: [] for name, _, _ in METRIC_COLUMNS}
        self.failures: dict[str, list] = {name: [] for name, _, _ in FAILURE_COLUMNS}
        self.checkpoint_seconds = checkpoint_seconds
        self.start = time.perf_counter()
        self.out_pixels = 0
        self.first_result_seconds: float | None = None
        """Seconds from the start to the first result: actor start-up (model load) + one batch."""
        self.first_result_rows = 0
        self.num_recovered = 0
        """Rows of outputs an earlier, killed run wrote (measured, not upscaled, here)."""
        self._last_checkpoint = time.perf_counter()
        self._last_scalars = 0.0
        self._tb = storage.UploadedFolder(self.url, prefix="sr-batch-tb-")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(self._tb.path)

    @property
    def num_done(self) -> int:
        """Images upscaled in this run (recovered rows are not)."""
        return len(self.rows["input"]) - self.num_recovered

    @property
    def num_failed(self) -> int:
        return len(self.failures["input"])

    def elapsed(self) -> float:
        return max(time.perf_counter() - self.start, 1e-9)

    def add_failure(self, input_url: str, output: str, stage: str, error: str) -> None:
        for name, value in (("input", input_url), ("output", output), ("stage", stage), ("error", error)):
            self.failures[name].append(value)

    def _add_row(self, row: dict) -> None:
        for name, kind, _ in METRIC_COLUMNS:
            value = row[name]
            self.rows[name].append(str(value) if kind == "string" else int(value) if kind == "int64" else
                                   bool(value) if kind == "bool" else float(value))

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
        if now - self._last_checkpoint >= self.checkpoint_seconds:
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

    def checkpoint(self) -> None:
        """Write the tables and events so far (each file whole)."""
        started = time.perf_counter()
        storage.write_bytes(storage.join(self.url, "metrics.parquet"), _table_bytes(self.rows, METRIC_COLUMNS))
        storage.write_bytes(storage.join(self.url, "failures.parquet"), _table_bytes(self.failures, FAILURE_COLUMNS))
        self.writer.flush()
        self._tb.upload()
        # Rewriting whole tables costs time proportional to the rows: keep it a small
        # share of the run however long it gets.
        self.checkpoint_seconds = max(self.checkpoint_seconds, 20 * (time.perf_counter() - started))
        self._last_checkpoint = time.perf_counter()

    def finish(self, summary: dict) -> dict:
        """Final tables, metric histograms, then summary.json (last). Returns the summary."""
        images_per_s, mpx_per_s = self.rates()
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
            "steady_images_per_second": _steady_rate([t for t in self.rows["finished_at"] if math.isfinite(t)]),
            "failures_by_stage": _count(self.failures["stage"]),
            "metrics": {name: describe(self.rows[name]) for name in SUMMARY_COLUMNS},
            "files": {"metrics": storage.join(self.url, "metrics.parquet"),
                      "failures": storage.join(self.url, "failures.parquet"),
                      "summary": storage.join(self.url, "summary.json")},
        })
        self.log_progress()
        step = self.num_done + self.num_failed
        for name in SUMMARY_COLUMNS:
            values = np.asarray(self.rows[name], dtype=np.float64)
            values = values[np.isfinite(values)]
            if values.size:
                self.writer.add_histogram(f"metrics/{name}", values, step)
                self.writer.add_scalar(f"mean/{name}", float(values.mean()), step)
        self.checkpoint()
        self.writer.close()
        self._tb.close()
        storage.write_bytes(summary["files"]["summary"], (json.dumps(_finite(summary), indent=2) + "\n").encode())
        return summary


def recorded_inputs(tables: list[str]) -> set[str]:
    """The inputs that have a row in any of these metrics tables (earlier runs'): one
    read per table (through ``storage``, with its retries), decoding only the
    ``input`` column."""
    import pyarrow.parquet as pq

    found: set[str] = set()
    for url in tables:
        try:
            column = pq.read_table(io.BytesIO(storage.read_bytes(url)), columns=["input"]).column("input")
        except FileNotFoundError:
            continue  # a run directory removed while we listed
        except Exception as exc:  # an unreadable table would make its images' rows again
            raise ValueError(f"{url}: cannot read this earlier run's metrics table ({type(exc).__name__}: "
                             f"{exc}); move its run folder out of {RESULTS_FOLDER}/ and run again") from None
        found.update(column.to_pylist())
    return found


def _steady_rate(finished_at: list[float]) -> float | None:
    """Images per second between the first and the last output written."""
    if len(finished_at) < 2 or max(finished_at) <= min(finished_at):
        return None
    return (len(finished_at) - 1) / (max(finished_at) - min(finished_at))


def _count(values: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out


def _finite(obj):
    """JSON has no NaN/Inf: they become null (PSNR of identical images is +inf)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj
