"""The driver of ``sr batch``: check the model, list the work, start (or join) Ray, run
the pipeline with a progress bar, write the results. Everything that can be refused
is refused before Ray starts (exit code 2, one line)."""

from __future__ import annotations

import hashlib
import logging
import os
import posixpath
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field

from sr_core import codecs, errors, storage
from sr_core.lease import Lease
from sr_core.outputs import OutputSettings

from batch import inputs, pipeline, planfeed
from batch.results import RunResults

# Failures printed at the end (all of them are in failures.parquet).
MAX_PRINTED_FAILURES = 20


@dataclass
class BatchConfig:
    """One ``sr batch`` run (the command-line options, checked)."""

    input: str
    """Folder/prefix or manifest."""
    output: str
    """Output folder/prefix."""
    model: str
    """Generator file URL."""
    output_settings: OutputSettings
    """Naming, format, quality, outscale, max pixels and Upscaler settings (shared with ``sr upscale``)."""
    include: tuple[str, ...] = ()
    """Only inputs whose relative path matches one of these globs."""
    exclude: tuple[str, ...] = ()
    """Leave out inputs whose relative path matches one of these globs."""
    overwrite: bool = False
    """Redo outputs that exist."""
    limit: int | None = None
    """At most this many images in this run."""
    reference: str | None = None
    """HR images with the inputs' relative paths, for reference metrics."""
    address: str | None = None
    """Ray address (None: $RAY_ADDRESS, else a local Ray)."""
    num_cpus: int | None = None
    """CPUs of a local Ray (None: all)."""
    actors: tuple[int, int] | None = None
    """(min, max) actors (None: 1 and the GPU count)."""
    num_gpus_per_actor: float | None = None
    """GPUs per actor (None: 1 if the cluster has GPUs, else 0)."""
    cpus_per_actor: float = 1.0
    """CPUs reserved per actor."""
    encode_threads: int = 2
    """Encoding threads per actor."""
    batch_size: int = 4
    """Images per actor call."""
    run_id: str | None = None
    """Results folder name (None: UTC time + random)."""
    progress: bool = True
    """Show a progress bar."""
    encode_in_actor: bool = True
    """False: encode in separate CPU tasks (only for the measurement in bench/)."""
    command: dict = field(default_factory=dict)
    """The command-line arguments, recorded in summary.json."""


def connect_ray(address: str | None, num_cpus: int | None) -> tuple[bool, float]:
    """Join the cluster at ``address`` (or $RAY_ADDRESS), or start a local Ray; a Ray
    already initialized in this process is used as it is. Returns (started here, seconds).

    A local Ray lives in ``batch.localray.temp_dir()``."""
    _import_ray_without_its_signal_dump()
    import ray

    from batch import localray

    if ray.is_initialized():
        return False, 0.0
    address = address or os.environ.get("RAY_ADDRESS") or None
    # Workers on other hosts do not inherit this process's environment; only what points
    # them at an emulator is sent (a job submitted with its own runtime_env keeps it).
    env = {k: os.environ[k] for k in pipeline.FORWARDED_ENV if k in os.environ}
    if "STORAGE_EMULATOR_HOST" not in env or "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ:
        # Nothing to point at, or a job submitted with `ray job submit`: its runtime_env
        # already reaches every worker (Ray refuses the same variable set twice).
        env = {}
    options = {"include_dashboard": False, "logging_level": logging.WARNING, "log_to_driver": False}
    if env:
        options["runtime_env"] = {"env_vars": env}
    if not address:
        options.update(localray.start_options(), num_cpus=num_cpus)
    started = time.perf_counter()
    try:
        _RayKeeper(address, options).start()
    except (ConnectionError, RuntimeError, TimeoutError) as exc:
        where = address or "a local Ray"
        raise ValueError(f"cannot start or reach Ray at {where}: {exc}") from None
    localray.consume_actor_restart_note()
    return True, time.perf_counter() - started


def _import_ray_without_its_signal_dump() -> None:
    """Import Ray with its C++ failure-signal handler off in this process (Ray reads
    RAY_DISABLE_FAILURE_SIGNAL_HANDLER once, at import). That handler catches SIGTERM in
    the driver, prints a stack dump before our one line and then aborts (exit -6, not
    130). The variable is put back right after the import, so the Ray processes started
    later keep their crash traces."""
    if "ray" in sys.modules:
        return
    name = "RAY_DISABLE_FAILURE_SIGNAL_HANDLER"
    before = os.environ.get(name)
    os.environ[name] = "1"
    try:
        import ray  # noqa: F401
    finally:
        if before is None:
            del os.environ[name]
        else:
            os.environ[name] = before


class _NoSigtermNote(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("SIGTERM handler is not set")


class _RayKeeper:
    """The thread that starts Ray (``ray.init``) and lives until it is shut down.

    Not the main thread, so that Ctrl-C and SIGTERM stay this command's: from the main
    thread, ``ray.init`` replaces SIGTERM's handler by one that exits with status 15 and
    no word, and the exception a signal raises while it forks Ray's processes can be
    swallowed (a fork handler prints it) with the start going on. The main thread waits
    for the start; interrupted, it lets the start finish, stops that Ray and raises the
    interruption. The thread must outlive Ray: Ray's processes are started with Linux's
    parent-death signal, which follows the thread that forked them, not the process.
    (From a thread Ray logs that it sets no SIGTERM handler, which is the point: that
    line is filtered out.)"""

    current: "_RayKeeper | None" = None

    def __init__(self, address: str | None, options: dict):
        self.address, self.options = address, options
        self.started = threading.Event()
        self.released = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="sr batch: Ray", daemon=True)

    def _run(self) -> None:
        import ray

        try:
            ray.init(address=self.address, **self.options)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            self.error = exc
        finally:
            self.started.set()
        self.released.wait()

    def start(self) -> None:
        """Start Ray and wait for it; raise what stopped it (or the interruption)."""
        note = _NoSigtermNote()
        worker_logger = logging.getLogger("ray._private.worker")
        worker_logger.addFilter(note)
        _RayKeeper.current = self
        interruption: BaseException | None = None
        try:
            self.thread.start()
            while not self.started.is_set():
                try:
                    self.started.wait()
                except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: Ray's start cannot be cut short
                    interruption = interruption or exc
        finally:
            worker_logger.removeFilter(note)
        if interruption is not None or self.error is not None:
            shutdown_ray()  # whatever part of Ray started
            raise interruption or self.error

    def release(self) -> None:
        self.released.set()
        self.thread.join()
        _RayKeeper.current = None


def stop_leftovers(config: BatchConfig) -> None:
    """Stop what the local Ray of an earlier, killed run left running (when this run would
    use a local Ray too: on a cluster, Ray cleans up after its drivers)."""
    from batch import localray

    if config.address or os.environ.get("RAY_ADDRESS"):
        return
    stopped = localray.stop_leftovers()
    if stopped:
        print(f"sr batch: stopped {len(stopped)} process(es) that the local Ray of a killed run left running "
              f"(in {localray.temp_dir()})", file=sys.stderr)


def shutdown_ray() -> None:
    """Stop the Ray this process started, and whatever of it outlives ``ray.shutdown``."""
    import ray

    from batch import localray

    ray.shutdown()
    localray.stop_own()
    if _RayKeeper.current is not None:
        _RayKeeper.current.release()


def pool_settings(config: BatchConfig, local: bool) -> pipeline.PoolSettings:
    """The actor pool for this cluster: GPU actors where there are GPUs."""
    import ray

    resources = ray.cluster_resources()
    gpus, cpus = resources.get("GPU", 0.0), resources.get("CPU", 0.0)
    num_gpus = config.num_gpus_per_actor
    if num_gpus is None:
        num_gpus = 1.0 if gpus >= 1 else 0.0
    if local and num_gpus > gpus:
        raise ValueError(f"--num-gpus-per-actor {num_gpus:g} but this machine's Ray has {gpus:g} GPUs; "
                         "use 0 for CPU actors")
    # On a cluster, GPUs that are not there yet may come: an autoscaling cluster adds
    # GPU nodes while actors wait for them.
    if config.actors is not None:
        min_actors, max_actors = config.actors
    elif num_gpus > 0:
        min_actors, max_actors = 1, max(1, int(gpus // num_gpus))
    else:
        min_actors, max_actors = 1, 1
    if local and min_actors * config.cpus_per_actor >= cpus:
        raise ValueError(f"{min_actors} actor(s) x {config.cpus_per_actor:g} CPUs leave none of the {cpus:g} "
                         "CPUs for reading and decoding; lower --cpus-per-actor or --actors")
    return pipeline.PoolSettings(min_actors=min_actors, max_actors=max_actors, num_gpus=num_gpus,
                                 cpus_per_actor=config.cpus_per_actor, encode_threads=config.encode_threads,
                                 batch_size=config.batch_size, encode_in_actor=config.encode_in_actor)


def _read_model(url: str) -> bytes:
    try:
        return storage.read_bytes(url)
    except FileNotFoundError:
        raise FileNotFoundError(f"{url}: no such model file") from None
    except IsADirectoryError:
        raise ValueError(f"{url}: is a folder; --model takes a generator file") from None
    except OSError as exc:
        raise ValueError(f"{url}: cannot read the model file ({type(exc).__name__}: {exc})") from None


def _planner(config: BatchConfig, extension: str, run_id: str) -> inputs.Planner:
    try:
        return inputs.Planner(config.input, config.output, config.output_settings.suffix, extension,
                              include=config.include, exclude=config.exclude, overwrite=config.overwrite,
                              limit=config.limit, reference=config.reference, run_id=run_id)
    except (ValueError, FileNotFoundError):
        raise
    except OSError as exc:  # unreachable or refusing storage: the job cannot run
        raise ValueError(f"cannot list {config.input} or {config.output}: {type(exc).__name__}: {exc}") from None


def _quiet_ray_data() -> None:
    import ray.data

    context = ray.data.DataContext.get_current()
    # One bar of our own (images, rates, failures) instead of Ray's per operator.
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    context.enable_progress_bars = False
    context.print_on_execution_start = False


def run_batch(config: BatchConfig) -> dict:
    """Run one batch job; returns the summary (also in summary.json)."""
    wall_start = time.perf_counter()
    settings = config.output_settings
    _import_ray_without_its_signal_dump()  # before anything below imports Ray
    stop_leftovers(config)
    model_bytes = _read_model(config.model)
    model_sha256 = hashlib.sha256(model_bytes).hexdigest()
    model_name = posixpath.basename(config.model.rstrip("/"))
    # Refuse an unreadable or unrunnable model here, in one line, before any worker starts.
    checked = pipeline.load_upscaler(model_bytes, config.model, "cpu", pipeline.StageSettings(settings, scale=1))
    stage_settings = pipeline.StageSettings(settings, scale=checked.scale)
    model_info = {"url": config.model, "sha256": model_sha256, "bytes": len(model_bytes), "scale": checked.scale,
                  "architecture": getattr(checked.model, "arch_name", type(checked.model).__name__),
                  # What CPU workers run (auto: bf16 on CPUs with bf16 hardware for the
                  # architectures that agree with fp32); GPU workers choose by compute capability.
                  "precision_cpu": checked.precision}
    del checked

    run_id = config.run_id or time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
    storage.safe_key(run_id)
    out_fs, out_path = storage.get_fs(config.output)
    if out_fs.isfile(out_path):
        raise ValueError(f"{config.output} is a file; OUTPUT must be a folder or prefix")
    # One run at a time per OUTPUT: two would plan the same images and both record them.
    # The lease is taken before planning and given back after summary.json is written.
    with Lease(config.output, "sr batch"):
        return _run_leased(config, run_id, model_bytes, model_name, model_info, stage_settings, wall_start)


def _run_leased(config: BatchConfig, run_id: str, model_bytes: bytes, model_name: str, model_info: dict,
                stage_settings: pipeline.StageSettings, wall_start: float) -> dict:
    settings = config.output_settings
    planner = _planner(config, settings.encode.extension, run_id)
    results = RunResults(config.output, run_id)
    feed = planfeed.PlanFeed(planner, results.url)
    progress = _Progress(feed, results, config.progress)
    feed.start()
    try:
        while not feed.first_shard.wait(0.5):  # listing: nothing to hand to Ray yet
            progress.update()
    except KeyboardInterrupt:
        feed.stop()
        progress.close()
        raise
    ray_info: dict = {"started_here": False, "startup_seconds": 0.0}
    interrupted, pipeline_error = False, ""
    if feed.num_tasks:
        interrupted, pipeline_error = _run_pipeline(config, feed, results, progress, model_bytes, model_name,
                                                    stage_settings, ray_info)
    if interrupted:
        feed.stop()
    feed.thread.join()
    progress.close()
    planned_failures = _add_plan_failures(feed, results)
    planned_failures += _recover(feed, stage_settings, results, config.progress and not interrupted)
    plan_error = ""
    if feed.error is not None and not isinstance(feed.error, KeyboardInterrupt):
        plan_error = f"{type(feed.error).__name__}: {str(feed.error).strip().splitlines()[0] if str(feed.error).strip() else ''}"
    summary = results.finish({
        "run_id": run_id,
        "input": config.input,
        "output": config.output,
        "found": feed.num_found,
        "listed": feed.num_listed,
        "skipped": feed.num_skipped,
        "not_read": [{"input": url, "reason": reason} for url, reason in sorted(feed.not_read)],
        "not_read_hidden": feed.num_hidden,
        "not_read_special": feed.num_special,
        "reference_errors": results.num_reference_errors,
        "left_for_later": feed.num_left + feed.num_tasks - results.num_done
                          - (results.num_failed - planned_failures),
        "interrupted": interrupted or isinstance(feed.error, KeyboardInterrupt),
        "pipeline_error": pipeline_error,
        "plan_error": plan_error,
        "plan": {"shards": feed.num_shards, "first_shard_seconds": feed.first_shard_seconds,
                 "listing_seconds": feed.listing_seconds},
        "total_seconds": time.perf_counter() - wall_start,
        "model": model_info,
        "settings": {k: v for k, v in config.command.items() if isinstance(v, (str, int, float, bool, list, tuple,
                                                                               type(None)))},
        "ray": ray_info,
    })
    if not summary["interrupted"]:
        feed.remove()
    _report(summary, results)
    if plan_error:
        raise ValueError(f"listing stopped after {feed.num_listed} input(s) ({plan_error}); what was written is "
                         f"kept (results in {results.url}): run the same command again to finish")
    if pipeline_error:
        raise ValueError(f"the pipeline stopped after {results.num_done} image(s) ({pipeline_error}); what was "
                         f"written is kept (results in {results.url}; the workers' logs are in {_ray_logs(config)}): "
                         "run the same command again to finish")
    return summary


def _run_pipeline(config: BatchConfig, feed: planfeed.PlanFeed, results: RunResults, progress: "_Progress",
                  model_bytes: bytes, model_name: str, stage_settings: pipeline.StageSettings,
                  ray_info: dict) -> tuple[bool, str]:
    """Ray Data over the plan's shards while the listing goes on; returns (interrupted,
    pipeline error). The plan's failures join the results as they come."""
    import ray

    interrupted, pipeline_error = False, ""
    started_here, startup = connect_ray(config.address, config.num_cpus)
    ray_info.update(started_here=started_here, startup_seconds=startup)
    try:
        _quiet_ray_data()
        pool = pool_settings(config, local=started_here and not (config.address or os.environ.get("RAY_ADDRESS")))
        ray_info.update(pool=asdict(pool), cluster=ray.cluster_resources())
        model_ref = ray.put(model_bytes)
        source = planfeed.plan_dataset(results.url, block_rows=4 * pool.batch_size)
        ds = pipeline.build_dataset(source, model_ref, model_name, stage_settings, pool)
        results.start = time.perf_counter()  # throughput counts from here: Ray is up
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                errors.raise_if_terminated()
                _add_plan_failures(feed, results)
                results.add_batch(batch)
                progress.update(len(batch["status"]))
        except KeyboardInterrupt:
            interrupted = True
        except Exception as exc:  # Ray gave up (e.g. actors that keep dying): keep what is done
            pipeline_error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    finally:
        if started_here:
            shutdown_ray()
    return interrupted, pipeline_error


def _add_plan_failures(feed: planfeed.PlanFeed, results: RunResults) -> int:
    failures = feed.take_failures()
    for url, reason in failures:
        results.add_failure(url, "", "plan", reason)
    return len(failures)


class _Progress:
    """One bar: while listing, inputs listed and planned; then images done of those
    planned so far (the total grows until the listing ends), rate and failures."""

    def __init__(self, feed: planfeed.PlanFeed, results: RunResults, enabled: bool):
        from sr_core.progress import bar as progress_bar

        self.feed, self.results = feed, results
        self.bar = progress_bar(0, "sr batch: listing", "img", shown=enabled)

    def update(self, done: int = 0) -> None:
        feed = self.feed
        self.bar.total = feed.num_tasks
        if done:
            self.bar.set_description("sr batch", refresh=False)
        images_per_s, mpx_per_s = self.results.rates()
        listing = "" if feed.finished.is_set() else f"listing: {feed.num_listed} listed, {feed.num_tasks} to do; "
        self.bar.set_postfix_str(f"{listing}{images_per_s:.3g} img/s, {mpx_per_s:.3g} Mpx/s out, "
                                 f"{self.results.num_failed} failed", refresh=False)
        # update(0) too: it redraws (the listing's figures) as often as the bar's interval allows
        self.bar.update(done)

    def close(self) -> None:
        self.bar.close()


def _ray_logs(config: BatchConfig) -> str:
    if config.address or os.environ.get("RAY_ADDRESS"):
        return "Ray's session folder on each node, /tmp/ray/session_latest/logs"
    from batch import localray

    return os.path.join(localray.temp_dir(), "session_latest", "logs")


def _recover(feed: planfeed.PlanFeed, settings: pipeline.StageSettings, results: RunResults,
             progress: bool) -> int:
    """Rows for outputs that an earlier, killed run wrote after its last checkpoint:
    measured here on the driver (no model), a shard of the plan's orphans at a time,
    each checkpointed at once, so a kill of this run does not lose them again. They are
    the few images of a checkpoint interval per kill, so they need no cluster. Returns
    how many could not be measured."""
    from sr_core.progress import bar as progress_bar

    failed = 0
    bar = progress_bar(feed.num_orphans, "sr batch: rows of a killed run", "img",
                       shown=progress and bool(feed.num_orphans))
    for url in feed.orphan_shards():
        for task in planfeed.read_shard(url):
            row = pipeline.recover_row(task, settings)
            if row["status"] == "ok":
                results.add_recovered(row)
            else:
                results.add_failure(row["input"], row["output"], row["stage"], row["error"])
                failed += 1
            bar.update()
        results.checkpoint()
    bar.close()
    return failed


def _report(summary: dict, results: RunResults) -> None:
    recovered = f" ({summary['recovered']} of them measured for a killed run's missing rows)" \
        if summary["recovered"] else ""
    hidden, special = summary["not_read_hidden"], summary["not_read_special"]
    not_read = (f", {hidden} hidden file(s) not read" if hidden else "") + \
        (f", {special} non-regular file(s) not read" if special else "")
    print(f"sr batch: done {summary['done']}, skipped {summary['skipped']} (output exists){recovered}{not_read}, "
          f"failed {summary['failed']} in {summary['wall_seconds']:.1f} s "
          f"({summary['images_per_second']:.3g} img/s, {summary['output_mpx_per_second']:.3g} Mpx/s out"
          f"; Ray start {summary['ray']['startup_seconds']:.1f} s)")
    print(f"  precision on CPU workers: {summary['model']['precision_cpu']}")
    lr = summary["metrics"]["lr_psnr"]
    if lr.get("count"):
        print(f"  LR consistency PSNR-Y: mean {lr['mean']:.2f} dB, p50 {lr['p50']:.2f}, min {lr['min']:.2f}")
    ref = summary["metrics"]["ref_psnr"]
    unscored, num_unscored = results.first_unscored, results.num_reference_errors
    summary_unscored = f"; {num_unscored} image(s) without a reference score (below)" if num_unscored else ""
    if ref.get("count"):
        print(f"  vs reference PSNR-Y: mean {ref['mean']:.2f} dB over {ref['count']} images, "
              f"SSIM {summary['metrics']['ref_ssim'].get('mean', float('nan')):.4f}{summary_unscored}")
    elif num_unscored:
        print(f"  vs reference: no image scored{summary_unscored}")
    print(f"  results: {results.url} (summary.json, metrics.parquet, failures.parquet, TensorBoard events)")
    show = storage.printable
    if summary["found"] == 0:
        filters = " ".join([f"--include {g!r}" for g in summary["settings"].get("include") or ()]
                           + [f"--exclude {g!r}" for g in summary["settings"].get("exclude") or ()])
        if filters and summary["listed"]:
            print(f"sr batch: warning: none of the {summary['listed']} images in {show(summary['input'])} is "
                  f"selected by {filters}; nothing to do (exit code 1)", file=sys.stderr)
        else:
            print(f"sr batch: warning: no images found in {show(summary['input'])} (looked for "
                  f"{', '.join(codecs.INPUT_EXTENSIONS)}); nothing to do (exit code 1)", file=sys.stderr)
    for url, ref, why in unscored[:MAX_PRINTED_FAILURES]:
        against = f" (reference {show(ref)})" if ref else ""
        print(f"  NO REFERENCE SCORE {show(url)}{against}: {show(why)}", file=sys.stderr)
    if num_unscored > MAX_PRINTED_FAILURES:
        print(f"  ... and {num_unscored - MAX_PRINTED_FAILURES} more in metrics.parquet (reference_error)",
              file=sys.stderr)
    for entry in summary["not_read"][:MAX_PRINTED_FAILURES]:
        print(f"  SKIPPED {show(entry['input'])}: {entry['reason']}", file=sys.stderr)
    if hidden + special > MAX_PRINTED_FAILURES:
        print(f"  ... and {hidden + special - MAX_PRINTED_FAILURES} more (summary.json's not_read lists the first "
              f"{planfeed.MAX_NOT_READ})", file=sys.stderr)
    for url, stage, error in results.first_failures[:MAX_PRINTED_FAILURES]:
        print(f"  FAILED {show(url)} ({stage}): {show(error)}", file=sys.stderr)
    if results.num_failed > MAX_PRINTED_FAILURES:
        print(f"  ... and {results.num_failed - MAX_PRINTED_FAILURES} more in failures.parquet", file=sys.stderr)
    if summary["interrupted"]:
        print("sr batch: interrupted; run the same command again to finish (outputs that exist are skipped)",
              file=sys.stderr)
