"""``sr upscale``: upscale files, folders (recursive), globs and fsspec URLs with one model.

Outputs are named by ``sr_core.outputs`` (as ``sr batch`` names them). Existing outputs
are skipped unless --overwrite, so a rerun finishes only what is missing. A bad input
is reported with its reason and the run goes on; the exit code is 1 when anything
failed.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings

from sr_cli.options import add_output_options, output_settings


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "upscale",
        help="upscale image files, folders, globs or fsspec URLs with a model",
        description=(
            "Upscale images with a generator file (ours or a foreign ESRGAN/Real-ESRGAN .pth). "
            "INPUT may be a file, a folder (searched recursively; the relative structure is kept "
            "under OUT), a glob (quote it) or an fsspec URL (gs://, s3://, memory://). Existing "
            "outputs are skipped unless --overwrite. Bad inputs are reported and skipped; the "
            "exit code is 1 if any input failed."
        ),
    )
    p.add_argument("inputs", metavar="INPUT", nargs="+", help="image file, folder, glob or URL")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output folder (path or fsspec URL)")
    p.add_argument("-m", "--model", required=True, help="generator file (.safetensors or .pth; path or URL)")
    p.add_argument("--device", default="auto", help="auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:1, mps")
    add_output_options(p)
    p.add_argument("--overwrite", action="store_true", help="replace outputs that exist")
    p.add_argument("--memory-limit", type=float, default=None, metavar="GIB",
                   help="refuse, before decoding, an image whose input and assembled output would need more "
                        "host memory than this (default: the memory available when the run starts)")
    p.set_defaults(func=run_upscale, interrupt_on_sigterm=True)


def run_upscale(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from sr_core import codecs, storage
    from sr_core.errors import is_unwritable, strip_url
    from sr_core.memory import available_memory, read_within_memory
    from sr_core.outputs import BackgroundWork, Task, plan_outputs

    settings = output_settings(args)
    if args.memory_limit is not None and not (math.isfinite(args.memory_limit) and args.memory_limit > 0):
        raise ValueError(f"--memory-limit must be a positive number of GiB, got {args.memory_limit}")
    options, max_pixels = settings.encode, settings.max_pixels
    out_fs, out_path = storage.get_fs(args.output)
    if out_fs.isfile(out_path):
        raise ValueError(f"{args.output} is a file; OUT must be a folder (new or existing) to hold the outputs")
    plan = plan_outputs(args.inputs, args.output, settings.suffix, options.extension)
    failures = list(plan.failures)
    # Temporaries of earlier runs that were killed between writing and renaming; a
    # live run's own are kept (their writer's process still exists).
    storage.remove_stale_temporaries(args.output)
    todo, skipped = [], 0
    for task in plan.tasks:
        if not args.overwrite and storage.exists(task.output):
            skipped += 1
        else:
            todo.append(task)

    written, interrupted, stopped, ran_on = 0, False, None, ""
    notes: list[tuple[str, str]] = []  # (input, decoder warning) of images that were processed
    if todo:
        # A read-only, foreign or full OUT is refused before any image is computed.
        storage.check_writable(args.output)
        up = settings.load_upscaler(args.model, device=args.device)
        ran_on = f" on {up.device.type} in {up.precision}"
        memory_limit = (args.memory_limit * 2**30 if args.memory_limit is not None else available_memory())
        out_pixels = 0
        start = time.perf_counter()
        bar = tqdm(total=len(todo), unit="img", desc="upscale", file=sys.stderr, dynamic_ncols=True)

        def save(task: Task, image) -> int:
            storage.write_bytes(task.output, codecs.encode_image(image, options))
            return image.shape[0] * image.shape[1]

        # Encoding (PNG above all) is as slow as a small model: it runs in the
        # background while the next image is upscaled. At most two results wait, so
        # memory stays at a few outputs.
        writer = BackgroundWork(threads=2)
        try:
            def collect(finished) -> None:
                nonlocal written, out_pixels, stopped
                for task, future in finished:
                    try:
                        out_pixels += future.result()
                        written += 1
                    except Exception as exc:  # a failed write is reported, the run goes on
                        failures.append((task.input, f"writing {task.output}: {strip_url(exc, task.output)}"))
                        # ... unless no other write could succeed: storage down past the
                        # retries, or a full / read-only / over-quota OUT
                        if isinstance(exc, storage.StorageError) or is_unwritable(exc):
                            stopped = stopped or f"writing {task.output}: {strip_url(exc, task.output)}"
                    bar.update(1)
                    elapsed = max(time.perf_counter() - start, 1e-9)
                    bar.set_postfix_str(f"{out_pixels / elapsed / 1e6:.2f} Mpx/s out")

            try:
                for task in todo:
                    if stopped:
                        break
                    try:
                        # Decoder warnings (a corrupt EXIF block...) become one report
                        # line naming the file instead of Python's two anonymous lines.
                        with warnings.catch_warnings(record=True) as caught:
                            warnings.simplefilter("always")
                            image = read_within_memory(task.input, max_pixels, memory_limit, up.scale,
                                                       settings.outscale)
                        notes.extend((task.input, str(w.message).strip()) for w in caught)
                        result = up(image, outscale=settings.outscale)
                    except storage.StorageError as exc:  # storage down past the retries: stop
                        stopped = str(exc)
                        break
                    except Exception as exc:  # a bad input is reported, the run goes on
                        failures.append((task.input, strip_url(exc, task.input)))
                        bar.update(1)
                        continue
                    collect(writer.submit(task, save, task, result))
                    del image, result
            except KeyboardInterrupt:
                # Ctrl-C: the outputs already handed to the writers are finished (each
                # is written atomically), then the summary says what is left.
                interrupted = True
            collect(writer.drain())
        finally:
            writer.close()
        bar.close()

    hidden = f", {len(plan.hidden)} hidden file(s) not read" if plan.hidden else ""
    hidden += f", {len(plan.special)} non-regular file(s) not read" if plan.special else ""
    print(f"sr upscale: written {written}, skipped {skipped} (output exists), failed {len(failures)}{hidden}"
          f"{ran_on}")
    show = storage.printable
    for url, message in notes:
        print(f"  WARNING {show(url)}: {show(message)}", file=sys.stderr)
    for url in plan.hidden:
        print(f"  SKIPPED {show(url)}: hidden file (its name starts with '.'); name it as an INPUT to upscale it",
              file=sys.stderr)
    for url, reason in plan.special:
        print(f"  SKIPPED {show(url)}: {reason}", file=sys.stderr)
    for url, reason in failures:
        print(f"  FAILED {show(url)}: {show(reason)}", file=sys.stderr)
    if stopped:
        print(f"sr upscale: stopped ({stopped}); {len(todo) - bar.n} image(s) not done; run the same command "
              "again to finish them (outputs that exist are skipped)", file=sys.stderr)
        return 1
    if interrupted:
        left = len(todo) - bar.n
        print(f"sr upscale: interrupted with {left} image(s) not done; run the same command again to finish "
              "them (outputs that exist are skipped)", file=sys.stderr)
        return 130
    return 1 if failures else 0


