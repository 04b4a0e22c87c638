"""What ``sr batch`` works on: the images below a folder or prefix, or named by a
manifest, each with its output URL, minus those whose output exists (resume).

Outputs are named exactly as ``sr upscale`` names them (``assign_outputs`` from
``sr_core.outputs``): OUTPUT/<path below the input root, suffix, new extension>,
refused when the key would escape OUTPUT, collide with another output or replace an
input. A manifest is a text file (one URL per line, ``#`` comments), or a CSV or
Parquet file with a ``path`` column; relative entries are taken relative to the
manifest's folder, and the relative path of an entry is its path below the deepest
folder common to all entries.
"""

from __future__ import annotations

import csv
import io
import posixpath
from dataclasses import dataclass, field

from sr_core import codecs, datasets, storage
from sr_core.outputs import Task, assign_outputs

from batch import results

MANIFEST_EXTENSIONS = (".txt", ".csv", ".parquet")
HIDDEN_REASON = "hidden file (its name starts with '.'); not read (list it in a manifest to upscale it)"


@dataclass
class BatchTask(Task):
    """One image to upscale, with its reference image."""

    reference: str = ""
    """The matching HR image below --reference, or '' (none asked for, or none found)."""
    reference_error: str = ""
    """Why there is no HR image for it when --reference was given, or ''."""


@dataclass
class BatchPlan:
    """The work of one run."""

    todo: list[BatchTask] = field(default_factory=list)
    """Images to upscale in this run (after resume and --limit)."""
    num_listed: int = 0
    """Images listed or named by the manifest (before --include/--exclude)."""
    num_found: int = 0
    """Images found (after --include/--exclude)."""
    num_skipped: int = 0
    """Images whose output exists (done by an earlier run)."""
    num_left: int = 0
    """Images left for a later run by --limit."""
    failures: list[tuple[str, str]] = field(default_factory=list)
    """(input, reason) of inputs refused before any work: unsafe or colliding names."""
    not_read: list[tuple[str, str]] = field(default_factory=list)
    """(input, reason) of files with image names the listing left out without opening
    them: hidden files, and named pipes, sockets and devices (reading a FIFO blocks
    forever). Reported, not failures."""
    orphans: list[BatchTask] = field(default_factory=list)
    """Skipped images (output exists) that have no row in any earlier run's metrics
    table: a run killed between writing the output and checkpointing its row. This run
    measures them from the output instead of upscaling them again."""


def is_manifest(url: str) -> bool:
    if posixpath.splitext(url.lower())[1] not in MANIFEST_EXTENSIONS:
        return False
    fs, path = storage.get_fs(url)
    return fs.isfile(path)


def read_manifest(url: str) -> list[str]:
    """The URLs a manifest names, in order, relative entries made absolute."""
    data = storage.read_bytes(url)
    ext = posixpath.splitext(url.lower())[1]
    if ext == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(io.BytesIO(data))
        if "path" not in table.column_names:
            raise ValueError(f"{url}: a Parquet manifest needs a 'path' column; it has {table.column_names}")
        entries = [str(p) for p in table.column("path").to_pylist() if p]
    elif ext == ".csv":
        reader = csv.DictReader(io.StringIO(data.decode("utf-8-sig")))
        if "path" not in (reader.fieldnames or []):
            raise ValueError(f"{url}: a CSV manifest needs a 'path' column; its header is {reader.fieldnames}")
        entries = [row["path"].strip() for row in reader if (row["path"] or "").strip()]
    else:
        return [full for _, full in datasets.read_list(url)]
    return [datasets.resolve_entry(url, entry) for entry in entries]


def common_root(url_list: list[str], what: str) -> str:
    """The deepest folder holding every URL (same scheme required)."""
    prefixes = {storage.protocol_prefix(u) for u in url_list}
    if len(prefixes) != 1:
        raise ValueError(f"{what}: entries mix storage schemes ({', '.join(sorted(p or 'local' for p in prefixes))}); "
                         "split it into one manifest per scheme")
    prefix = prefixes.pop()
    paths = [storage.get_fs(u)[1] for u in url_list]
    if len({p.startswith("/") for p in paths}) != 1:
        raise ValueError(f"{what}: entries mix absolute and relative paths; use one kind")
    root = posixpath.commonpath([posixpath.dirname(p) or "." for p in paths])
    if not root:
        raise ValueError(f"{what}: the entries share no common folder (e.g. several buckets); "
                         "split it into one manifest per bucket")
    return prefix + root


def plan_batch(input_url: str, output: str, suffix: str, extension: str, include: tuple[str, ...] = (),
              exclude: tuple[str, ...] = (), overwrite: bool = False, limit: int | None = None,
              reference: str | None = None, run_id: str = "") -> BatchPlan:
    """Everything a run must do; ValueError / FileNotFoundError for an INPUT that cannot be read.
    ``run_id``'s own table (a reused --run-id) is about to be replaced, so its rows do
    not count as recorded: the run records them again."""
    batch_plan = BatchPlan()
    if kind := storage.special_kind(input_url):
        raise ValueError(f"{input_url}: {kind}, not a folder, prefix or manifest")
    if is_manifest(input_url):
        urls = read_manifest(input_url)
        if not urls:
            raise ValueError(f"{input_url}: the manifest names no images")
        root, listed = common_root(urls, input_url), False
    else:
        hidden: list[str] = []
        special: list[tuple[str, str]] = []
        urls = storage.list_files(input_url, suffixes=codecs.INPUT_EXTENSIONS, hidden=hidden, special=special)
        root, listed = input_url, True
        not_read = [(url, HIDDEN_REASON) for url in hidden] + special
        batch_plan.not_read = sorted((url, reason) for url, reason in not_read
                                     if storage.selected(_relative_or_url(root, url), include, exclude))
    batch_plan.num_listed = len(urls)
    found = [(root, url, listed) for url in urls if storage.selected(_relative_or_url(root, url), include, exclude)]
    plan = assign_outputs(found, output, suffix, extension)
    batch_plan.failures = list(plan.failures)
    batch_plan.num_found = len(plan.tasks) + len(plan.failures)

    # One listing of OUTPUT instead of one existence check per image: on an object store
    # that is one request per 1,000 names instead of one per image.
    done, tables = set(), []
    if not overwrite:
        out_fs, out_path = storage.get_fs(output)
        if out_fs.exists(out_path):
            listed_outputs = storage.list_files(output)
            done = {storage.get_fs(u)[1] for u in listed_outputs}
            tables = [u for u in listed_outputs if _is_metrics_table(output, u, run_id)]
    # Which skipped images have a row already: one column of each earlier run's table.
    recorded = results.recorded_inputs(tables) if done else set()
    references = _reference_index(reference) if reference else {}

    def with_reference(task: Task) -> BatchTask:
        if not reference:
            return BatchTask(task.input, task.output)
        rel = posixpath.splitext(storage.relative_key(root, task.input))[0]
        if rel in references:
            return BatchTask(task.input, task.output, references[rel])
        return BatchTask(task.input, task.output, reference_error=f"no HR image for it below {reference} "
                                                                  f"(looked for {rel}.*)")

    for task in plan.tasks:
        if storage.get_fs(task.output)[1] in done:
            batch_plan.num_skipped += 1
            if task.input not in recorded:
                batch_plan.orphans.append(with_reference(task))
            continue
        if limit is not None and len(batch_plan.todo) >= limit:
            batch_plan.num_left += 1
            continue
        batch_plan.todo.append(with_reference(task))
    return batch_plan


def _relative_or_url(root: str, url: str) -> str:
    """The path --include/--exclude match: below the input root (the URL itself for an
    unsafe name, which assign_outputs reports)."""
    try:
        return storage.relative_key(root, url)
    except ValueError:
        return url


def _is_metrics_table(output: str, url: str, except_run: str) -> bool:
    """OUTPUT/_sr_batch/<run-id>/metrics.parquet of a run other than ``except_run``."""
    try:
        parts = storage.relative_key(output, url).split("/")
    except ValueError:
        return False
    return (len(parts) == 3 and parts[0] == results.RESULTS_FOLDER and parts[1] != except_run
            and parts[2] == "metrics.parquet")


def _reference_index(reference: str) -> dict[str, str]:
    """HR images below ``reference`` by relative path without extension, so that
    ``x.jpg`` finds its HR ``x.png``."""
    index = {}
    for url in storage.list_files(reference, suffixes=codecs.INPUT_EXTENSIONS):
        index.setdefault(posixpath.splitext(storage.relative_key(reference, url))[0], url)
    return index
