"""The commands a step starts: each in a process group of its own, logged to a file, and
stopped together with the step at its time limit."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from infra.gpucheck.context import REPO


def sr_command() -> list[str]:
    """The installed ``sr`` entry point beside this interpreter."""
    sr = Path(sys.executable).with_name("sr")
    if not sr.exists():
        raise ValueError(f"{sr} does not exist: install the project (./dev setup) first")
    return [str(sr)]


_CHILDREN: list[subprocess.Popen] = []
"""The commands this step process started, each in a process group of its own."""


def start_child(command: list[str], out, env: dict) -> subprocess.Popen:
    """Start a command of a step (output to the open file ``out``), in its own process
    group so that it, and the processes it starts, can be stopped together."""
    out.write("$ " + " ".join(command) + "\n")
    out.flush()
    proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
    _CHILDREN.append(proc)
    return proc


class StepStopped(BaseException):
    """Raised in a step process at its time limit (a BaseException: the steps' own
    ``except Exception`` around one configuration must not swallow it)."""


def stop_step(signum, frame) -> None:
    """SIGTERM to a step process (its limit passed): stop its commands, then fail the step."""
    for proc in _CHILDREN:
        if proc.poll() is None:
            kill_group(proc)
    raise StepStopped("stopped at the step's time limit; the commands it started were stopped")


def run_logged(command: list[str], log: Path, env: dict, timeout: float) -> tuple[int, float, str]:
    """Run ``command`` with its output in ``log``; (exit code, seconds, output)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = start_child(command, out, env)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            code = -9
    return code, time.perf_counter() - start, log.read_text(errors="replace")


def kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(no output)"
