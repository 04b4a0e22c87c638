"""Upscaling files, folders (recursive), globs and fsspec URLs with one model, one image
at a time in this process: the loop of ``sr upscale`` (``sr batch`` runs the same naming
and settings on Ray Data).

Outputs are named by ``sr_core.outputs``. Existing outputs are skipped unless
``overwrite``, so a rerun finishes only what is missing. A bad input is recorded with
its reason and the run goes on; storage down past its retries, or an output folder that
cannot take files, stops the run (what was written stays). Ctrl-C finishes the outputs
already being written and returns what is left.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field

from sr_core import codecs, storage
from sr_core.errors import is_unwritable, strip_url
from sr_core.memory import available_memory, read_within_memory
from sr_core.outputs import BackgroundWork, OutputSettings, Plan, Task, plan_outputs


@dataclass
class FolderReport:
    """What :func:`upscale_folder` did."""

    plan: Plan
    """The inputs found, their outputs, and what was not read (hidden, special files)."""
    todo: int = 0
    """Inputs whose output was to be computed in this run."""
    skipped: int = 0
    """Inputs whose output existed (not recomputed)."""
    written: int = 0
    """Outputs written."""
    done: int = 0
    """Inputs of ``todo`` finished, written or failed."""
    failures: list[tuple[str, str]] = field(default_factory=list)
    """(input, reason) of each input that failed, the plan's own refusals first."""
    notes: list[tuple[str, str]] = field(default_factory=list)
    """(input, decoder warning) of images that were processed."""
    stopped: str | None = None
    """Why the run stopped early (storage down, an unwritable output folder); None if not."""
    interrupted: bool = False
    """Ctrl-C stopped the run."""
    ran_on: str = ""
    """The device and precision the model ran in ("" when nothing ran)."""

    @property
    def left(self) -> int:
        """Inputs of ``todo`` not finished."""
        return self.todo - self.done


def upscale_folder(inputs: list[str], output: str, model: str, settings: OutputSettings, device: str = "auto",
                   overwrite: bool = False, memory_limit_gib: float | None = None,
                   progress: bool = True) -> FolderReport:
    """Upscale everything ``inputs`` name into the folder ``output`` with the generator file
    ``model``. ``memory_limit_gib``: refuse, before decoding, an image whose input and
    assembled output would need more host memory (None: what is available at the start)."""
    if memory_limit_gib is not None and not (math.isfinite(memory_limit_gib) and memory_limit_gib > 0):
        raise ValueError(f"--memory-limit must be a positive number of GiB, got {memory_limit_gib}")
    out_fs, out_path = storage.get_fs(output)
    if out_fs.isfile(out_path):
        raise ValueError(f"{output} is a file; OUT must be a folder (new or existing) to hold the outputs")
    plan = plan_outputs(inputs, output, settings.suffix, settings.encode.extension)
    report = FolderReport(plan=plan, failures=list(plan.failures))
    # Temporaries of earlier runs that were killed between writing and renaming; a
    # live run's own are kept (their writer's process still exists).
    storage.remove_stale_temporaries(output)
    todo = []
    for task in plan.tasks:
        if not overwrite and storage.exists(task.output):
            report.skipped += 1
        else:
            todo.append(task)
    report.todo = len(todo)
    if todo:
        # A read-only, foreign or full OUT is refused before any image is computed.
        storage.check_writable(output)
        up = settings.load_upscaler(model, device=device)
        report.ran_on = f" on {up.device.type} in {up.precision}"
        memory_limit = memory_limit_gib * 2**30 if memory_limit_gib is not None else available_memory()
        _upscale_tasks(todo, up, settings, memory_limit, report, progress)
    return report


def _upscale_tasks(todo: list[Task], up, settings: OutputSettings, memory_limit: float, report: FolderReport,
                   progress: bool) -> None:
    from sr_core.progress import bar as progress_bar

    out_pixels = 0
    start = time.perf_counter()
    bar = progress_bar(len(todo), "upscale", "img", shown=progress)

    def save(task: Task, image) -> int:
        storage.write_bytes(task.output, codecs.encode_image(image, settings.encode))
        return image.shape[0] * image.shape[1]

    def collect(finished) -> None:
        nonlocal out_pixels
        for task, future in finished:
            try:
                out_pixels += future.result()
                report.written += 1
            except Exception as exc:  # a failed write is reported, the run goes on
                report.failures.append((task.input, f"writing {task.output}: {strip_url(exc, task.output)}"))
                # ... unless no other write could succeed: storage down past the
                # retries, or a full / read-only / over-quota OUT
                if isinstance(exc, storage.StorageError) or is_unwritable(exc):
                    report.stopped = report.stopped or f"writing {task.output}: {strip_url(exc, task.output)}"
            report.done += 1
            # refresh=False: the update redraws, as often as the bar's interval allows
            bar.set_postfix_str(f"{out_pixels / max(time.perf_counter() - start, 1e-9) / 1e6:.2f} Mpx/s out",
                                refresh=False)
            bar.update(1)

    # Encoding (PNG above all) is as slow as a small model: it runs in the background
    # while the next image is upscaled. At most two results wait, so memory stays at a
    # few outputs.
    writer = BackgroundWork(threads=2)
    try:
        try:
            for task in todo:
                if report.stopped:
                    break
                try:
                    # Decoder warnings (a corrupt EXIF block...) become one report line
                    # naming the file instead of Python's two anonymous lines.
                    with warnings.catch_warnings(record=True) as caught:
                        warnings.simplefilter("always")
                        image = read_within_memory(task.input, settings.max_pixels, memory_limit, up.scale,
                                                   settings.outscale)
                    report.notes.extend((task.input, str(w.message).strip()) for w in caught)
                    result = up(image, outscale=settings.outscale)
                except storage.StorageError as exc:  # storage down past the retries: stop
                    report.stopped = str(exc)
                    break
                except Exception as exc:  # a bad input is reported, the run goes on
                    report.failures.append((task.input, strip_url(exc, task.input)))
                    report.done += 1
                    bar.update(1)
                    continue
                collect(writer.submit(task, save, task, result))
                del image, result
        except KeyboardInterrupt:
            # Ctrl-C: the outputs already handed to the writers are finished (each is
            # written atomically), then the report says what is left.
            report.interrupted = True
        collect(writer.drain())
    finally:
        writer.close()
        bar.close()
