"""Waiting for events in tests: a file appearing, a process starting, a row being
checkpointed. Nothing here waits for a time: the predicate is polled until it holds, and
the only bound is a generous one that turns a hang into a failure (a slow, busy machine
takes longer; it never makes a wait fail)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time

import pytest

HANG_TIMEOUT = 600.0
"""Seconds after which a wait is a hang. Nothing the suite waits for takes a tenth of it."""


def wait_for(predicate, what: str, proc: subprocess.Popen | None = None, timeout: float = HANG_TIMEOUT,
             interval: float = 0.02) -> None:
    """Return once ``predicate()`` is true, polling it every ``interval`` seconds. Fails
    if ``proc`` ends first (the event can then never come), naming ``what`` and the end
    of its stderr, or after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            err = proc.stderr.read() if proc.stderr else ""
            err = err.decode(errors="replace") if isinstance(err, bytes) else (err or "")
            pytest.fail(f"the process ended (exit {proc.returncode}) before {what}: {err[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} after {timeout:.0f} s: a hang")
        time.sleep(interval)  # the polling interval, not a wait for something to happen


def wait_listening(port: int, what: str, proc: subprocess.Popen, log_path=None) -> None:
    """Return once a server the test started (``proc``) accepts connections on
    127.0.0.1:``port``. Fails, with the end of its log, if it exits first (servers log to
    a file: an unread pipe would fill up and stop them); killed if the wait fails."""
    def listening() -> bool:
        if proc.poll() is not None:
            log = open(log_path, errors="replace").read()[-3000:] if log_path else ""
            pytest.fail(f"{what} exited {proc.returncode} before listening on 127.0.0.1:{port}: {log}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            return False

    try:
        wait_for(listening, f"{what} listening on 127.0.0.1:{port}")
    except BaseException:
        proc.kill()
        raise


@contextlib.contextmanager
def server_in_env(proc: subprocess.Popen, **env: str):
    """``env`` set while a server the test started (``proc``) serves; afterwards the
    environment as it was, and the server stopped (killed if it does not stop in 10 s)."""
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def upscale_actors_below(pid: int | None = None) -> list:
    """Processes below ``pid`` (default: this one) that run an ``sr batch`` Upscaler actor
    (Ray titles them ``ray::MapWorker(MapBatches(UpscaleActor))``). A Ray started by this
    process has its workers below it; another Ray on the machine does not count."""
    import os

    import psutil

    found = []
    for child in psutil.Process(pid or os.getpid()).children(recursive=True):
        try:
            if "UpscaleActor" in " ".join(child.cmdline()) and child.status() != psutil.STATUS_ZOMBIE:
                found.append(child)
        except psutil.Error:
            continue
    return found


def run_in_session(cmd: list[str], timeout: float = HANG_TIMEOUT, **popen) -> subprocess.CompletedProcess:
    """Run ``cmd`` to its end in a session of its own, capturing its output as text. On
    timeout (a hang) the whole session is killed, the processes it started (a local
    Ray) included, and the test fails with the end of its stderr."""
    import os
    import signal

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            **popen)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} hung (killed after {timeout:.0f} s): {err[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
