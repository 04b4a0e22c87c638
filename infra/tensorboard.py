"""``sr tensorboard``: TensorBoard on a training run, a runs prefix or a batch output.

TensorBoard reads ``gs://`` through fsspec (gcsfs), so a bucket is watched in place.
Training runs keep their events under ``RUN/tb``; a batch output keeps its events under
``OUTPUT/_sr_batch/<run id>/``, next to millions of images that TensorBoard should not
crawl, so a batch output prefix is narrowed to its ``_sr_batch`` folder.
"""

from __future__ import annotations

import os

from sr_core import storage

BATCH_FOLDER = "_sr_batch"
"""Where ``sr batch`` writes its metrics, failures, summary and events below OUTPUT."""


def resolve_logdir(target: str) -> str:
    """The folder TensorBoard should watch for ``target``."""
    fs, path = storage.get_fs(target)
    if not fs.exists(path):
        raise FileNotFoundError(f"{target}: no such run directory or prefix")
    if not fs.isdir(path):
        raise ValueError(f"{target} is a file; give a run directory, a runs prefix or a batch output prefix")
    batch = storage.join(target, BATCH_FOLDER)
    if storage.exists(batch):
        return batch
    return target


def check_port(port: int) -> None:
    """A ValueError naming ``--port`` unless it is a TCP port (0: a free one)."""
    if not 0 <= port <= 65535:
        raise ValueError(f"--port {port} is not a TCP port; give one from 1 to 65535, or 0 for a free one")


def start(logdir: str, host: str = "127.0.0.1", port: int = 6006, reload_interval: float = 30.0):
    """Start TensorBoard serving ``logdir`` in background threads; return ``(program,
    url)``. A port that is out of range, in use or not ours to bind is a ValueError
    naming it, before anything is served."""
    from tensorboard import program

    check_port(port)
    if port and _in_use(host, port):
        # Checked before TensorBoard starts its data server (which prints a notice first).
        raise _port_in_use(host, port)
    if storage.is_gcs(logdir) and os.environ.get("STORAGE_EMULATOR_HOST"):
        import fsspec.config

        # TensorBoard opens gs:// through fsspec with default options; against an
        # emulator use no credentials, as sr_core.storage does.
        fsspec.config.conf.setdefault("gs", {})["token"] = "anon"
    tb = program.TensorBoard()
    tb.configure(argv=[
        "tensorboard", "--logdir", logdir, "--host", host, "--port", str(port),
        "--reload_interval", str(reload_interval),
        # Each run's event files are synced from the training VMs as new files: read all.
        "--reload_multifile", "true",
    ] + ([] if storage.is_local(logdir) else [
        # TensorBoard's fast loader (its Rust data server) has its own GCS client that
        # knows neither fsspec's credentials nor an emulator; the Python loader reads
        # through fsspec/gcsfs like the rest of the project.
        "--load_fast", "false",
    ]))
    try:
        url = tb.launch()
    except program.TensorBoardPortInUseError:  # taken since the check above
        raise _port_in_use(host, port) from None
    except program.TensorBoardServerException as exc:  # e.g. a host that is not this machine's, a privileged port
        raise ValueError(f"cannot serve on {host}:{port} ({exc.msg}); check --host and --port") from None
    return tb, url


def serve(target: str, host: str = "127.0.0.1", port: int = 6006, reload_interval: float = 30.0) -> tuple[str, str]:
    """``sr tensorboard TARGET``: TensorBoard on the folder :func:`resolve_logdir` picks, in
    background threads; returns ``(logdir, url)``."""
    check_port(port)  # before the run directory is listed (a bucket listing takes seconds)
    logdir = resolve_logdir(target)
    _, url = start(logdir, host=host, port=port, reload_interval=reload_interval)
    return logdir, url


def _in_use(host: str, port: int) -> bool:
    """Whether something accepts connections on host:port (TensorBoard's own test)."""
    import socket

    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def _port_in_use(host: str, port: int) -> ValueError:
    return ValueError(f"port {port} on {host} is in use (another TensorBoard, or another server); choose "
                      "another --port, or --port 0 for a free one")
