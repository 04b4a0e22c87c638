"""What ``sr batch`` works on: the images below a folder or prefix, or named by a
manifest, each with its output URL, minus those whose output exists (resume) — made as
a stream (``Planner.steps``), a few hundred inputs at a time, so that a bucket of
millions of images is planned in bounded memory and work starts on the first ones
while the listing goes on.

Outputs are named exactly as ``sr upscale`` names them (``sr_core.outputs``):
OUTPUT/<path below the input root, suffix, new extension>, refused when the key would
escape OUTPUT, collide with another output or replace an input. A manifest is a text
file (one URL per line, ``#`` comments), or a CSV or Parquet file with a ``path``
column; relative entries are taken relative to the manifest's folder, and the relative
path of an entry is its path below the deepest folder common to all entries (so a
manifest is read twice: once for that folder, once for the tasks; text line by line,
CSV row by row, Parquet by row group).

What is held in memory: one folder's names at a time (two inputs can only have one
output when they are in one folder with one stem), and a page of a manifest. What must
be remembered for every input goes to disk (``batch.diskset``): the inputs an earlier
run recorded (orphans), the outputs a manifest's entries have taken. Resume checks the
outputs of each step where they are made: a local OUTPUT with one ``stat`` per output,
an object store with a listing of the range of names the step's outputs span in their
folder (on Cloud Storage; the folder elsewhere), so a rerun's first task comes after
one input page, not after a listing of all of OUTPUT.
"""

from __future__ import annotations

import csv
import io
import os
import posixpath
import stat
from dataclasses import dataclass, field
from typing import Iterator

from sr_core import codecs, datasets, storage
from sr_core.outputs import Task

from batch import listing, results
from batch.diskset import DiskSet

MANIFEST_EXTENSIONS = (".txt", ".csv", ".parquet")
HIDDEN_REASON = "hidden file (its name starts with '.'); not read (list it in a manifest to upscale it)"
NOT_UTF8_REASON = ("its name is not valid UTF-8 (shown with \\x escapes); the results tables cannot hold it: "
                   "rename the file (e.g. with convmv) to upscale it")
MANIFEST_CHUNK = 1000
"""Manifest entries planned together."""
_INPUT_EXTENSIONS = frozenset(codecs.INPUT_EXTENSIONS)


@dataclass
class BatchTask(Task):
    """One image to upscale, with its reference image."""

    reference: str = ""
    """The matching HR image below --reference, or '' (none asked for, or none found)."""
    reference_error: str = ""
    """Why there is no HR image for it when --reference was given, or ''."""

    def row(self) -> dict:
        return {"input": self.input, "output": self.output, "reference": self.reference,
                "reference_error": self.reference_error}


@dataclass
class PlanStep:
    """What planning some inputs gave (one folder, or a page of a manifest)."""

    todo: list[BatchTask] = field(default_factory=list)
    """Images to upscale in this run."""
    orphans: list[BatchTask] = field(default_factory=list)
    """Skipped images (output exists) without a row in any earlier run's metrics table:
    a run killed between writing the output and recording its row. This run measures
    them from the output instead of upscaling them again."""
    failures: list[tuple[str, str]] = field(default_factory=list)
    """(input, reason) of inputs refused before any work: unsafe, colliding or non-UTF-8 names."""
    not_read: list[tuple[str, str]] = field(default_factory=list)
    """(input, reason) of files with image names the listing left out without opening
    them: hidden files, and named pipes, sockets and devices (reading a FIFO blocks
    forever). Reported, not failures."""
    num_listed: int = 0
    """Images listed or named (before --include/--exclude)."""
    num_found: int = 0
    """Images selected by --include/--exclude (tasks, skipped, left and failures)."""
    num_skipped: int = 0
    """Images whose output exists (done by an earlier run)."""
    num_left: int = 0
    """Images left for a later run by --limit."""


@dataclass
class BatchPlan(PlanStep):
    """The whole plan of a run, gathered (for small inputs and tests; ``sr batch``
    itself streams the steps)."""

    def add(self, step: PlanStep) -> None:
        for name in ("todo", "orphans", "failures", "not_read"):
            getattr(self, name).extend(getattr(step, name))
        for name in ("num_listed", "num_found", "num_skipped", "num_left"):
            setattr(self, name, getattr(self, name) + getattr(step, name))


def is_manifest(url: str) -> bool:
    if posixpath.splitext(url.lower())[1] not in MANIFEST_EXTENSIONS:
        return False
    fs, path = storage.get_fs(url)
    return fs.isfile(path)


def manifest_entries(url: str) -> Iterator[str]:
    """The URLs a manifest names, in order, relative entries made absolute; read as a
    stream (text and CSV line by line, Parquet by row group)."""
    fs, path = storage.get_fs(url)
    ext = posixpath.splitext(url.lower())[1]
    with fs.open(path, "rb") as raw:
        if ext == ".parquet":
            import pyarrow.parquet as pq

            file = pq.ParquetFile(raw)
            if "path" not in file.schema_arrow.names:
                raise ValueError(f"{url}: a Parquet manifest needs a 'path' column; it has {file.schema_arrow.names}")
            for batch in file.iter_batches(columns=["path"], batch_size=MANIFEST_CHUNK):
                for entry in batch.column(0).to_pylist():
                    if entry:
                        yield datasets.resolve_entry(url, str(entry))
            return
        text = io.TextIOWrapper(raw, encoding="utf-8-sig", newline="" if ext == ".csv" else None)
        try:
            if ext == ".csv":
                reader = csv.DictReader(text)
                if "path" not in (reader.fieldnames or []):
                    raise ValueError(f"{url}: a CSV manifest needs a 'path' column; its header is {reader.fieldnames}")
                for row in reader:
                    if entry := (row["path"] or "").strip():
                        yield datasets.resolve_entry(url, entry)
                return
            for line in text:
                entry = line.strip()
                if entry and not entry.startswith("#"):
                    yield datasets.resolve_entry(url, entry)
        except UnicodeDecodeError:
            raise ValueError(f"{url}: a manifest must be UTF-8 text") from None


def read_manifest(url: str) -> list[str]:
    """The URLs a manifest names, in order (the whole list: for small manifests)."""
    return list(manifest_entries(url))


def _key(url: str) -> str:
    """The path that identifies ``url`` within its store (absolute for local files),
    what ``storage.get_fs(url)[1]`` gives, without building a filesystem per URL."""
    if storage.is_local(url):
        return os.path.abspath(storage.local_path(url))
    return url.split("://", 1)[1].rstrip("/")


def common_root(url_list, what: str) -> str:
    """The deepest folder holding every URL (same scheme required); ``url_list`` may be
    any iterable (it is read once)."""
    prefix, root, absolute = None, None, None
    for url in url_list:
        p = storage.protocol_prefix(url)
        if prefix is not None and p != prefix:
            raise ValueError(f"{what}: entries mix storage schemes ({', '.join(sorted(x or 'local' for x in {p, prefix}))}); "
                             "split it into one manifest per scheme")
        prefix = p
        path = _key(url)
        folder = posixpath.dirname(path) or "."
        if absolute is not None and path.startswith("/") != absolute:
            raise ValueError(f"{what}: entries mix absolute and relative paths; use one kind")
        absolute = path.startswith("/")
        root = folder if root is None else _common_folder(root, folder)
    if prefix is None:
        raise ValueError(f"{what}: the manifest names no images")
    if not root:
        raise ValueError(f"{what}: the entries share no common folder (e.g. several buckets); "
                         "split it into one manifest per bucket")
    return (prefix or "") + root


def _common_folder(a: str, b: str) -> str:
    if b == a or b.startswith(a + "/") or (a == "/" and b.startswith("/")):
        return a
    return posixpath.commonpath([a, b])


def _is_below(path: str, folder: str) -> bool:
    return path.startswith(folder.rstrip("/") + "/")


class Planner:
    """The plan of one run as a stream of ``PlanStep``s. Made (``__init__``) in the
    caller's thread: what makes the run impossible (INPUT missing or not a folder, a
    manifest without its column or mixing schemes) is raised there, before any work.
    ``run_id``'s own table (a reused --run-id) is about to be replaced, so its rows do
    not count as recorded: the run records them again."""

    def __init__(self, input_url: str, output: str, suffix: str, extension: str, include: tuple[str, ...] = (),
                 exclude: tuple[str, ...] = (), overwrite: bool = False, limit: int | None = None,
                 reference: str | None = None, run_id: str = ""):
        self.input, self.output, self.suffix, self.extension = input_url, output, suffix, extension
        self.include, self.exclude, self.overwrite, self.limit = tuple(include), tuple(exclude), overwrite, limit
        self.run_id = run_id
        self.references = _ReferenceIndex(reference) if reference else None
        self.num_todo = 0
        self._sets: list[DiskSet] = []
        self._recorded: DiskSet | None = None
        self._out_local = storage.is_local(output)
        self._out_key = _key(output)
        if kind := storage.special_kind(input_url):
            raise ValueError(f"{input_url}: {kind}, not a folder, prefix or manifest")
        self.manifest = is_manifest(input_url)
        if self.manifest:
            self.root = common_root(manifest_entries(input_url), input_url)
        else:
            fs, path = storage.get_fs(input_url)
            if not fs.exists(path):
                raise FileNotFoundError(f"{input_url}: no such file or folder")
            self.root = input_url

    # ------------------------------------------------------------ the stream

    def steps(self) -> Iterator[PlanStep]:
        """The plan, a folder (or a page of a manifest) at a time."""
        try:
            yield from (self._manifest_steps() if self.manifest else self._folder_steps())
        finally:
            for s in self._sets:
                s.close()
            self._sets.clear()

    def _new_set(self) -> DiskSet:
        s = DiskSet()
        self._sets.append(s)
        return s

    def _folder_steps(self) -> Iterator[PlanStep]:
        fs, root_path = storage.get_fs(self.input)
        if fs.isfile(root_path):  # INPUT names one image file: its folder is the root
            root_key = posixpath.dirname(_key(self.input))
        else:
            root_key = _key(self.input)
        same_store = storage.protocol_prefix(self.input) == storage.protocol_prefix(self.output)
        out_key = self._out_key
        # OUTPUT inside INPUT: not listed (a rerun must not upscale its own outputs).
        skip = self.output if same_store and _is_below(out_key, root_key) else None
        # OUTPUT = INPUT (or INPUT inside OUTPUT): an output can be named like another
        # input of its folder; the checks then need each folder whole.
        overlap = same_store and (out_key == root_key or _is_below(root_key, out_key))
        prefix = storage.protocol_prefix(self.input)
        root_url = root_key if storage.is_local(self.input) else prefix + root_key
        for chunk in listing.walk(self.input, skip=skip, whole_folders=overlap):
            yield self._folder_step(chunk, root_url, overlap)

    def _folder_step(self, chunk: listing.Chunk, root_url: str, overlap: bool) -> PlanStep:
        step = PlanStep()
        local = storage.is_local(root_url)
        base = os.path.join(root_url, chunk.folder) if local else posixpath.join(root_url, chunk.folder)
        join = os.path.join if local else posixpath.join
        for name, kind in chunk.special:
            rel = f"{chunk.folder}/{name}" if chunk.folder else name
            if self._is_image(name) and self._selected(rel):
                step.not_read.append((join(base, name), f"{kind}, not a regular file; not read"))
        linked = set(chunk.linked)
        candidates = []  # (rel, input URL)
        for name in chunk.names:
            if not self._is_image(name):
                continue
            rel = f"{chunk.folder}/{name}" if chunk.folder else name
            url = join(base, name)
            if name.startswith("."):
                if not name.startswith(storage.TMP_PREFIX) and self._selected(rel):
                    step.not_read.append((url, HIDDEN_REASON))
                continue
            step.num_listed += 1
            if not self._admitted(step, rel, url):
                continue
            if name in linked and (target := storage.link_out_of(root_url, url)):
                step.failures.append((url, f"a symbolic link to {target}, outside the folder {root_url}; not "
                                           "followed (name the file as an INPUT, or copy it into the folder)"))
                continue
            candidates.append((rel, url))
        self._assign(candidates, step, listed=True, overlap=overlap)
        return step

    def _manifest_steps(self) -> Iterator[PlanStep]:
        root_key = _key(self.root)
        # Entries inside OUTPUT could be replaced by another entry's output: remember
        # them (usually none) so that every output is checked against every input.
        inputs_in_output = self._new_set()
        for part in _chunks(manifest_entries(self.input), MANIFEST_CHUNK):
            inputs_in_output.add_many(k for k in map(_key, part) if _is_below(k, self._out_key))
        taken = self._new_set()
        for part in _chunks(manifest_entries(self.input), MANIFEST_CHUNK):
            step = PlanStep()
            candidates = []
            for url in part:
                step.num_listed += 1
                key = _key(url)
                rel = key[len(root_key) + 1:] if _is_below(key, root_key) else key
                if self._admitted(step, rel, url):
                    candidates.append((rel, url))
            self._assign(candidates, step, listed=False, overlap=False, taken=taken,
                         inputs_in_output=inputs_in_output)
            yield step

    def _admitted(self, step: PlanStep, rel: str, url: str) -> bool:
        """Whether a listed input goes on to naming: selected by --include/--exclude
        (counted as found) and with a UTF-8 name (else a failure row, never a crash in
        the results tables)."""
        if not self._selected(rel):
            return False
        step.num_found += 1
        if not storage.is_utf8(url):
            step.failures.append((storage.printable(url), NOT_UTF8_REASON))
            return False
        return True

    # ------------------------------------------------------------ naming and checks

    def _assign(self, candidates: list[tuple[str, str]], step: PlanStep, listed: bool, overlap: bool,
                taken: DiskSet | None = None, inputs_in_output: DiskSet | None = None) -> None:
        """Output names for some inputs of one folder (or manifest page), with the checks
        of ``sr_core.outputs.assign_outputs``: escape, collision, replacing an input."""
        named = []  # (rel, input URL, output URL, output key)
        for rel, url in candidates:
            try:
                out = self._output_of(rel)
            except ValueError as exc:
                step.failures.append((url, str(exc)))
                continue
            named.append((rel, url, out, _key(out)))
        if overlap and self.suffix:
            # OUTPUT = a listed folder: a file there that is the output of another input
            # is that input's output from an earlier run, not a new input.
            output_of = {okey: url for _, url, _, okey in named}
            named = [n for n in named if output_of.get(_key(n[1]), n[1]) == n[1]]
        input_keys = {_key(url) for _, url, _, _ in named} if (overlap or not listed) else set()
        replaced = inputs_in_output.lookup([n[3] for n in named]) if inputs_in_output is not None else {}
        before = taken.lookup([n[2] for n in named]) if taken is not None else {}
        here: dict[str, str] = {}
        accepted = []
        for rel, url, out, okey in named:
            if okey in input_keys or okey in replaced:
                step.failures.append((url, f"the output {out} would replace an input; choose another OUT or --suffix"))
                continue
            owner = here.get(out) or before.get(out)
            if owner is not None:
                if owner != url:
                    step.failures.append((url, f"the output {out} is also the output of {owner}"))
                continue
            here[out] = url
            accepted.append((BatchTask(url, out), rel))
        if taken is not None:
            taken.add_pairs(here.items())
        self._resume(accepted, step)

    def _output_of(self, rel: str) -> str:
        stem = posixpath.splitext(storage.safe_key(rel))[0]
        return storage.join(self.output, storage.safe_key(stem + self.suffix + self.extension))

    def _resume(self, accepted: list[tuple[BatchTask, str]], step: PlanStep) -> None:
        done = self._done_outputs([t for t, _ in accepted])
        skipped = [t for t, _ in accepted if t.output in done]
        recorded = self._recorded_of([t.input for t in skipped]) if skipped else set()
        for task, rel in accepted:
            self._add_reference(task, rel)
            if task.output in done:
                step.num_skipped += 1
                if task.input not in recorded:
                    step.orphans.append(task)
            elif self.limit is not None and self.num_todo >= self.limit:
                step.num_left += 1
            else:
                step.todo.append(task)
                self.num_todo += 1

    def _done_outputs(self, tasks: list[BatchTask]) -> set[str]:
        """Of ``tasks``' outputs, those that exist: locally one ``stat`` each; on an
        object store, per output folder, the listing of the range from the first to the
        last of their names only (outputs do not sort like their inputs, so the range is
        taken over the outputs' own names), never the whole of OUTPUT."""
        if self.overwrite or not tasks:
            return set()
        done = set()
        if self._out_local:
            for task in tasks:
                try:
                    if stat.S_ISREG(os.stat(task.output).st_mode):
                        done.add(task.output)
                except (OSError, ValueError):
                    pass
            return done
        by_folder: dict[str, list[str]] = {}
        for task in tasks:
            folder, name = task.output.rsplit("/", 1)
            by_folder.setdefault(folder, []).append(name)
        for folder, names in by_folder.items():
            found = listing.names_between(folder, min(names), max(names))
            done.update(f"{folder}/{name}" for name in names if name in found)
        return done

    def _recorded_of(self, inputs: list[str]) -> set[str]:
        """Of ``inputs``, those with a row in an earlier run's metrics table; the tables'
        ``input`` columns are read once, at the first skipped input, into a set on disk."""
        if self._recorded is None:
            self._recorded = self._new_set()
            results.recorded_inputs(results.earlier_tables(self.output, self.run_id), into=self._recorded)
        return set(self._recorded.lookup(inputs))

    def _add_reference(self, task: BatchTask, rel: str) -> None:
        if self.references is None:
            return
        rel = posixpath.splitext(rel)[0]
        found = self.references.find(rel)
        if found:
            task.reference = found
        else:
            task.reference_error = f"no HR image for it below {self.references.url} (looked for {rel}.*)"

    def _is_image(self, name: str) -> bool:
        return os.path.splitext(name)[1].lower() in _INPUT_EXTENSIONS

    def _selected(self, rel: str) -> bool:
        return (not self.include and not self.exclude) or storage.selected(rel, self.include, self.exclude)


def _chunks(items, size: int) -> Iterator[list]:
    part = []
    for item in items:
        part.append(item)
        if len(part) == size:
            yield part
            part = []
    if part:
        yield part


class _ReferenceIndex:
    """HR images below --reference by relative path without extension (``x.jpg`` finds
    its HR ``x.png``; of two HR images with one stem, the first in name order), one
    folder listed at a time and the last folders kept. A name there that would escape
    the folder is left out (its image gets 'no HR image'), not a refusal of the run."""

    MAX_FOLDERS = 64

    def __init__(self, url: str):
        self.url = url
        self.folders: dict[str, dict[str, str]] = {}

    def find(self, rel_stem: str) -> str | None:
        folder, _, stem = rel_stem.rpartition("/")
        if folder not in self.folders:
            if len(self.folders) >= self.MAX_FOLDERS:
                self.folders.pop(next(iter(self.folders)))
            self.folders[folder] = self._list(folder)
        return self.folders[folder].get(stem)

    def _list(self, folder: str) -> dict[str, str]:
        index: dict[str, str] = {}
        url = storage.join(self.url, folder) if folder else self.url
        try:
            storage.safe_key(folder) if folder else None
            fs, path = storage.get_fs(url)
            names = sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))
        except (FileNotFoundError, NotADirectoryError, ValueError):
            return index
        for name in names:
            if name.startswith(".") or os.path.splitext(name)[1].lower() not in _INPUT_EXTENSIONS:
                continue
            if name in ("", ".", "..") or "/" in name or "\\" in name or not storage.is_utf8(name):
                continue
            full = storage.join(url, name)
            if storage.is_local(full) and not os.path.isfile(full):
                continue
            index.setdefault(os.path.splitext(name)[0], full)
        return index


def plan_batch(input_url: str, output: str, suffix: str, extension: str, include: tuple[str, ...] = (),
               exclude: tuple[str, ...] = (), overwrite: bool = False, limit: int | None = None,
               reference: str | None = None, run_id: str = "") -> BatchPlan:
    """The whole plan of a run at once (``Planner``'s steps gathered); ValueError /
    FileNotFoundError for an INPUT that cannot be read."""
    planner = Planner(input_url, output, suffix, extension, include, exclude, overwrite, limit, reference, run_id)
    plan = BatchPlan()
    for step in planner.steps():
        plan.add(step)
    if planner.manifest and plan.num_listed == 0:
        raise ValueError(f"{input_url}: the manifest names no images")
    plan.not_read.sort()
    return plan
