"""The Ray Data pipeline of ``sr batch``:

    tasks (input, output, reference)  -- listed on the driver, resume applied
      -> read + decode                 CPU tasks
      -> upscale + encode + write      an actor pool, one Upscaler per actor
                                       (GPU actors on clusters, CPU locally)
      -> small result rows             back to the driver (metrics and failures)

Decoded inputs travel through Ray's object store (an input is 1/16 of its x4
output); outputs never do: the actor that made an output encodes and writes it and
returns a row of numbers. Why the encoding lives in the actor and not in a CPU stage
of its own is measured in bench/bench_batch.py (docs/PERFORMANCE.md): a separate
stage moves every output (~106 MB for a 2K frame at x4, 16x its input) through the
object store, where at GPU rates it spills to disk or crosses the network, and
locally it was no faster (the actor already overlaps encoding with the next image in
background threads). So the actor holds threads for
encoding (Pillow's zlib and libjpeg encoders release the GIL), and the CPUs they need
are reserved with it (``cpus_per_actor``; docs/BATCH.md sizes them per GPU).

The stage functions are plain functions and classes of numpy batches, so they also
run without Ray.
"""

from __future__ import annotations

import math
import os
import socket
import time
from dataclasses import dataclass

import numpy as np

from sr_core import codecs, storage
from sr_core.errors import strip_url
from sr_core.outputs import BackgroundWork, OutputSettings

# Environment that workers on other processes and hosts need to reach the same
# storage as the driver (never credentials: workers use their own).
FORWARDED_ENV = ("STORAGE_EMULATOR_HOST", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT",
                 "SR_STORAGE_ATTEMPTS", "SR_STORAGE_BACKOFF", "SR_GCS_ANON")


@dataclass(frozen=True)
class StageSettings:
    """What every stage needs to know (sent to the workers, so it stays small)."""

    output: OutputSettings
    """Format, quality, outscale, max pixels and Upscaler settings (shared with ``sr upscale``)."""
    scale: int
    """The model's scale (the border cropped by the reference metrics: round(outscale))."""


def _empty_row(task: dict) -> dict:
    row = {"input": task["input"], "output": task["output"], "reference": task.get("reference", ""),
           "status": "ok", "stage": "", "error": "", "reference_error": task.get("reference_error", ""),
           "worker": ""}
    for name in ("in_width", "in_height", "channels", "bits", "out_width", "out_height", "in_bytes", "out_bytes"):
        row[name] = 0
    for name in ("read_s", "decode_s", "model_s", "encode_s", "write_s", "metrics_s", "lr_psnr", "lr_ssim",
                 "ref_psnr", "ref_ssim", "ref_mse", "finished_at"):
        row[name] = float("nan")
    row["recovered"] = False
    return row


def _fail(row: dict, stage: str, exc: BaseException, url: str) -> dict:
    row.update(status="failed", stage=stage, error=strip_url(exc, url))  # the row names the input already
    return row


class Frame:
    """An image travelling between stages. Ray Data turns a column of same-shaped
    arrays into a tensor column and a column of mixed shapes into pickled objects, and
    then cannot put blocks of both kinds together; wrapped, every column of images is
    pickled objects."""

    __slots__ = ("array",)

    def __init__(self, array: np.ndarray | None):
        self.array = array


def _rows_to_batch(rows: list[dict], frames: dict[str, list] | None = None) -> dict[str, np.ndarray]:
    """Rows as a numpy batch; ``frames`` columns hold images (or None), wrapped."""
    batch = {}
    for name in rows[0] if rows else ():
        values = [r[name] for r in rows]
        batch[name] = np.array(values, dtype=object if isinstance(values[0], str) else None)
    for name, values in (frames or {}).items():
        column = np.empty(len(values), dtype=object)
        column[:] = [Frame(v) for v in values]
        batch[name] = column
    return batch


def _batch_rows(batch: dict[str, np.ndarray], skip: tuple[str, ...] = ()) -> list[dict]:
    names = [n for n in batch if n not in skip]
    count = len(batch[names[0]])
    return [{n: (batch[n][i].item() if hasattr(batch[n][i], "item") else batch[n][i]) for n in names}
            for i in range(count)]


# ---------------------------------------------------------------- stage 1: read + decode


def decode_batch(batch: dict[str, np.ndarray], settings: StageSettings) -> dict[str, np.ndarray]:
    """Read and decode each task; failures become rows with status 'failed'. Images of
    different sizes and dtypes go in an object column (Ray pickles it).

    Reads go through ``sr_core.storage`` (fsspec, gcsfs for gs://) rather than Ray Data's
    ``read_binary_files``: each task needs its (input, output, reference) row anyway,
    and Ray's readers given a bare gs:// path use pyarrow's own GCS client, which hangs
    against an emulator and ignores gcsfs's settings."""
    rows, images = [], []
    for task in _batch_rows(batch):
        row = _empty_row(task)
        image = None
        started = time.perf_counter()
        try:
            data = storage.read_bytes(task["input"])
        except Exception as exc:  # one unreadable input is a failure row, the run goes on
            rows.append(_fail(row, "read", exc, task["input"]))
            images.append(None)
            continue
        read_done = time.perf_counter()
        try:
            image = codecs.decode_image(data, name=task["input"], max_pixels=settings.output.max_pixels)
        except Exception as exc:
            _fail(row, "decode", exc, task["input"])
        row.update(read_s=read_done - started, decode_s=time.perf_counter() - read_done, in_bytes=len(data))
        rows.append(row)
        images.append(image)
    return _rows_to_batch(rows, {"image": images})


# ---------------------------------------------------------------- stage 2: the actors


def _quality(image: np.ndarray, result: np.ndarray, reference_url: str, settings: StageSettings, row: dict) -> None:
    """LR consistency, and reference metrics when there is a reference."""
    from sr_core import metrics
    from sr_core.resize import imresize

    lr = codecs.to_rgb8(image, keep_gray=True)
    down = codecs.to_rgb8(imresize(result, size=image.shape[:2]), keep_gray=True)
    colour = lr.ndim == 3
    row["lr_psnr"] = metrics.psnr(down, lr, y_channel=colour)
    if min(lr.shape[:2]) >= metrics.SSIM_WINDOW:
        row["lr_ssim"] = metrics.ssim(down, lr, y_channel=colour)
    if not reference_url:
        return
    try:
        hr = codecs.to_rgb8(codecs.read_image(reference_url), keep_gray=True)
        out = codecs.to_rgb8(result, keep_gray=True)
        border = max(1, round(settings.output.outscale or settings.scale))
        # An HR image whose sides are not multiples of the scale is cropped to them (as
        # SR evaluation does): its LR is floor(size / scale), its SR that times scale.
        hr_h, hr_w = hr.shape[:2]
        out_h, out_w = out.shape[:2]
        if hr.ndim != out.ndim or not (0 <= hr_h - out_h < border and 0 <= hr_w - out_w < border):
            raise ValueError(f"the reference is {hr_w}x{hr_h}{'' if hr.ndim == 2 else ' colour'}, "
                             f"the output {out_w}x{out_h}{'' if out.ndim == 2 else ' colour'}")
        hr = hr[:out_h, :out_w]
        row["ref_psnr"] = metrics.psnr(out, hr, crop_border=border, y_channel=colour)
        row["ref_ssim"] = metrics.ssim(out, hr, crop_border=border, y_channel=colour)
        row["ref_mse"] = metrics.mse(out, hr, crop_border=border, y_channel=colour)
    except Exception as exc:  # the output is written either way; the row says why there is no score
        row["reference_error"] = _fail({}, "reference", exc, reference_url)["error"]


def finish_image(row: dict, image: np.ndarray, result: np.ndarray, settings: StageSettings,
                 device: str = "cpu") -> dict:
    """Quality metrics, encode and write one upscaled image; returns its result row.
    ``device``: the actor's (``cuda``: JPEG is encoded on the GPU where it can be)."""
    row.update(out_height=result.shape[0], out_width=result.shape[1])
    started = time.perf_counter()
    try:
        _quality(image, result, row["reference"], settings, row)
    except Exception as exc:  # metrics never cost an output
        row["reference_error"] = f"metrics failed: {type(exc).__name__}: {exc}"
    encode_start = time.perf_counter()
    row["metrics_s"] = encode_start - started
    try:
        data = codecs.encode_image(result, settings.output.encode, device=device)
    except Exception as exc:
        return _fail(row, "encode", exc, row["input"])
    write_start = time.perf_counter()
    try:
        storage.write_bytes(row["output"], data)
    except Exception as exc:
        return _fail(row, "write", exc, row["output"])
    row.update(encode_s=write_start - encode_start, write_s=time.perf_counter() - write_start, out_bytes=len(data),
               finished_at=time.time())
    return row


def recover_row(task: dict, settings: StageSettings) -> dict:
    """The result row of an output an earlier run wrote but never recorded (it was
    killed first): the same measurements as ``finish_image``, of the input and the
    output as written, without running the model. Timings, worker and finished_at stay
    empty (NaN, ''): nothing was timed. A lossless output (PNG) decodes to exactly the
    array the earlier run measured, so the metrics are the ones it would have recorded;
    a JPEG or WebP output is measured as written, within its compression error of them.
    Failures become rows with status 'failed' and stage 'recover'."""
    row = _empty_row(task)
    row["recovered"] = True
    try:
        data = storage.read_bytes(task["input"])
        image = codecs.decode_image(data, name=task["input"], max_pixels=settings.output.max_pixels)
        out_data = storage.read_bytes(task["output"])
        # The output of an image within max_pixels has up to outscale^2 times as many.
        factor = math.ceil(settings.output.outscale or settings.scale) ** 2
        result = codecs.decode_image(out_data, name=task["output"], max_pixels=settings.output.max_pixels * factor)
    except Exception as exc:
        return _fail(row, "recover", exc, task["input"])
    row.update(in_height=image.shape[0], in_width=image.shape[1], channels=1 if image.ndim == 2 else image.shape[2],
               bits=8 * image.dtype.itemsize, in_bytes=len(data), out_bytes=len(out_data),
               out_height=result.shape[0], out_width=result.shape[1])
    try:
        _quality(image, result, row["reference"], settings, row)
    except Exception as exc:  # as in finish_image: the row is kept, saying why a score is missing
        row["reference_error"] = f"metrics failed: {type(exc).__name__}: {exc}"
    return row


MODEL_FOLDER = "memory://sr-batch-model"


def load_upscaler(model_bytes: bytes, name: str, device: str, settings: StageSettings):
    """An Upscaler for model file bytes. The bytes come from the driver (through the
    object store), so every actor runs exactly the file the driver checked and hashed,
    and a model given as a local path works on a cluster too."""
    url = f"{MODEL_FOLDER}/{os.getpid()}/{os.path.basename(name) or 'model'}"
    storage.write_bytes(url, model_bytes)
    try:
        return settings.output.load_upscaler(url, device=device)
    except ValueError as exc:  # name the user's file, not the in-memory copy
        raise ValueError(str(exc).replace(url, name)) from None
    finally:
        fs, path = storage.get_fs(url)
        fs.rm(path)


class UpscaleActor:
    """One Upscaler per actor, loaded once. Each image goes through the model on the
    calling thread, then to a small thread pool that measures, encodes and writes it
    while the next image is upscaled."""

    def __init__(self, model: list, model_name: str, settings: StageSettings, device: str, threads: int,
                 encode_threads: int, encode_here: bool = True):
        import ray
        import torch

        if device == "cpu":
            torch.set_num_threads(max(1, threads))
        model_bytes = ray.get(model[0]) if not isinstance(model[0], bytes) else model[0]
        self.upscaler = load_upscaler(model_bytes, model_name, device, settings)
        self.settings = settings
        self.encode_here = encode_here
        self.encode_threads = max(1, encode_threads)
        # Outputs waiting for an encoder are bounded (one per thread, plus one), so an
        # actor holds a few outputs in memory whatever the batch size.
        self.writer = BackgroundWork(self.encode_threads, max_pending=self.encode_threads + 1)
        self.worker = f"{socket.gethostname()}:{os.getpid()}"

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = _batch_rows(batch, skip=("image",))
        results = [None] * len(rows)
        finished = []
        for i, (row, frame) in enumerate(zip(rows, batch["image"])):
            image = frame.array
            row["worker"] = self.worker
            if row["status"] != "ok":
                results[i] = row
                continue
            row.update(in_height=image.shape[0], in_width=image.shape[1],
                       channels=1 if image.ndim == 2 else image.shape[2], bits=8 * image.dtype.itemsize)
            started = time.perf_counter()
            try:
                result = self.upscaler(image, outscale=self.settings.output.outscale)
            except Exception as exc:  # e.g. out of memory on one huge image: that image fails
                results[i] = _fail(row, "upscale", exc, row["input"])
                continue
            row["model_s"] = time.perf_counter() - started
            if self.encode_here:
                finished += self.writer.submit(i, finish_image, row, image, result, self.settings,
                                               self.upscaler.device.type)
            else:
                results[i] = (row, image, result)
        for i, future in finished + self.writer.drain():
            results[i] = future.result()
        if not self.encode_here:
            done = [r if isinstance(r, tuple) else (r, None, None) for r in results]
            return _rows_to_batch([r for r, _, _ in done], {"image": [im for _, im, _ in done],
                                                            "result": [out for _, _, out in done]})
        return _rows_to_batch(results)


def encode_batch(batch: dict[str, np.ndarray], settings: StageSettings) -> dict[str, np.ndarray]:
    """The alternative measured in bench/bench_batch.py: encoding and writing in CPU
    tasks of their own, the outputs arriving through the object store."""
    rows = _batch_rows(batch, skip=("image", "result"))
    out = []
    for row, image, result in zip(rows, batch["image"], batch["result"]):
        if row["status"] == "ok" and result.array is not None:
            row = finish_image(row, image.array, result.array, settings)
        out.append(row)
    return _rows_to_batch(out)


# ---------------------------------------------------------------- the dataset


@dataclass
class PoolSettings:
    """How the actor pool is shaped."""

    min_actors: int = 1
    """Actors started at once (the pool never shrinks below)."""
    max_actors: int = 1
    """Actors the pool may grow to when work waits (autoscaling)."""
    num_gpus: float = 0.0
    """GPUs per actor (0: the Upscaler runs on CPU)."""
    cpus_per_actor: float = 1.0
    """CPUs reserved per actor: torch threads on CPU actors; encode threads beside the GPU."""
    encode_threads: int = 2
    """Threads per actor that measure, encode and write outputs."""
    batch_size: int = 4
    """Images per call of an actor (and per decode task)."""
    decode_cpus: float = 1.0
    """CPUs per read + decode task."""
    encode_in_actor: bool = True
    """False moves encoding to CPU tasks of its own (for the measurement; see above)."""


def build_dataset(tasks, model_ref, model_name: str, settings: StageSettings, pool: PoolSettings):
    """The lazy Ray dataset of result rows for ``tasks``: a list of dicts (input, output,
    reference, reference_error), or a Ray dataset of such rows (the plan as a stream,
    ``batch.planfeed.plan_dataset``, whose blocks are already small)."""
    import ray

    if isinstance(tasks, list):
        # Small blocks, so reading and decoding start on many tasks at once and decoded
        # images stream to the actors instead of piling up in a few large blocks.
        num_blocks = max(1, min(len(tasks) // max(pool.batch_size, 1), 10_000))
        ds = ray.data.from_items(tasks, override_num_blocks=num_blocks)
    else:
        ds = tasks
    # Ray Data fuses a task stage into the next actor stage when both have the same
    # remote arguments (CPU actors): decoding would then run inside the actors,
    # serially with the model. Stating Ray's default for tasks, max_calls=0 (a worker
    # runs any number of tasks), makes the arguments differ, so decoding stays on CPU
    # tasks beside the model, as it does on GPU clusters.
    ds = ds.map_batches(decode_batch, fn_kwargs={"settings": settings}, batch_size=pool.batch_size,
                        num_cpus=pool.decode_cpus, max_calls=0)
    device = "cuda" if pool.num_gpus > 0 else "cpu"
    ds = ds.map_batches(
        UpscaleActor,
        fn_constructor_kwargs={"model": [model_ref], "model_name": model_name, "settings": settings,
                               "device": device, "threads": int(max(1, pool.cpus_per_actor)),
                               "encode_threads": pool.encode_threads, "encode_here": pool.encode_in_actor},
        compute=ray.data.ActorPoolStrategy(min_size=pool.min_actors, max_size=pool.max_actors),
        batch_size=pool.batch_size,  # Ray Data requires it with num_gpus
        num_gpus=pool.num_gpus or None,
        num_cpus=pool.cpus_per_actor,
    )
    if not pool.encode_in_actor:
        ds = ds.map_batches(encode_batch, fn_kwargs={"settings": settings}, batch_size=pool.batch_size,
                            num_cpus=pool.decode_cpus)
    return ds
