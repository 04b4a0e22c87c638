"""The Ray that ``sr batch`` starts on this machine when no cluster is named, and what it
leaves behind when its driver is killed.

A local Ray is started by the driver (``ray.init``) under a folder of its own,
``$RAY_TMPDIR/sr-batch-ray-UID`` (``/tmp/...`` by default), not Ray's shared
``/tmp/ray``: each run is a session folder there, ``session_<date>_<time>_<driver pid>``.
When the driver is killed with SIGKILL, Ray's GCS server and raylet die with it, but its
dashboard agent and runtime-env agent (and a worker stuck in a read) keep running for a
minute or more: they notice that the raylet is gone, then wait on the dead GCS. The next
``sr batch`` stops them: the processes holding files in (or naming) a session folder
whose driver is gone and whose raylet is not running (Linux: found through /proc;
elsewhere nothing is done). A driver that shuts its Ray down stops what is left of it too (a shutdown while
Ray is starting leaves the agents running) and marks its session folder as stopped, so
later runs look only at the sessions of killed drivers.

Two lines Ray prints on every run are silenced at their source:

- the token-authentication notice: a new local Ray enables token authentication when
  ``RAY_AUTH_MODE`` is unset and logs a warning saying so (and one when it is off) through
  the logger of Ray's ``authentication_token_setup`` module, which is set to ERROR here
  (authentication stays as Ray decides; ``RAY_AUTH_MODE`` works as documented by Ray);
- the core worker's "constructor arguments in the object store and max_restarts > 0"
  note about Ray Data's actors, logged once per driver process: Ray Data passes every
  actor its transformer by reference and keeps that reference alive (as the driver keeps
  the model's), so a restarted actor finds its arguments; the note is a warning about a
  case that does not arise here. It is consumed by creating one throw-away actor of the
  same kind while the driver's stderr points at /dev/null (the note is written
  synchronously when an actor is created).
"""

from __future__ import annotations

import logging
import os
import re
import signal
import sys
import time

from sr_core import storage

SESSION_NAME = re.compile(r"^session_\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2}_\d+_(\d+)$")
STOPPED_MARK = "sr-batch-stopped"
"""A file left in a session folder once nothing of that Ray runs any more."""
# Seconds leftover processes get to exit on SIGTERM before SIGKILL: the agents are
# usually waiting on the dead GCS and do not answer promptly.
STOP_GRACE_SECONDS = 5.0


def temp_dir() -> str:
    """Where ``sr batch`` keeps the session folders of the Rays it starts on this machine.
    Short on purpose: Ray puts Unix sockets in it, whose paths are limited to ~107 bytes."""
    base = os.environ.get("RAY_TMPDIR") or "/tmp"
    return os.path.join(base, f"sr-batch-ray-{os.getuid()}")


TOKEN_NOTICE_LOGGER = "ray._private.authentication.authentication_token_setup"

# Ray starts its workers at nice 15, as if they were background work. On a machine
# shared with anything else (a CI runner, a VM's other jobs) the actors that do the
# upscaling then get a sliver of the CPU: under two busy processes on 2 cores a batch
# test ran ~30x slower. A local Ray's workers are the job the user asked for.
SYSTEM_CONFIG = {"worker_niceness": 0}


def start_options() -> dict:
    """Keyword arguments for ``ray.init`` that starts a local Ray; quiets Ray's
    token-authentication notice (see the module's docstring)."""
    logging.getLogger(TOKEN_NOTICE_LOGGER).setLevel(logging.ERROR)
    return {"_temp_dir": temp_dir(), "_system_config": SYSTEM_CONFIG}


def _session_dirs(root: str) -> list[tuple[str, int]]:
    """(session folder, driver pid) of the sessions below root."""
    try:
        names = os.listdir(root)
    except OSError:
        return []
    return [(os.path.join(root, name), int(m[1])) for name in names if (m := SESSION_NAME.match(name))]


def _holders(folders: list[str]) -> dict[str, list[tuple[int, str]]]:
    """For each folder, the (pid, command) of this user's processes with a file open below
    it or its path on their command line, from /proc (a process's open files are listed
    only to its owner). Ray passes every process it starts the session folder as an
    argument, and a process renames itself (``ray::DashboardAgent``) only after opening its
    log files there: one of the two is always visible."""
    found: dict[str, list[tuple[int, str]]] = {f: [] for f in folders}
    prefixes = [(f, f.rstrip("/") + "/") for f in folders]
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            fds = os.listdir(f"/proc/{entry}/fd")
            targets = set()
            for fd in fds:
                try:
                    targets.add(os.readlink(f"/proc/{entry}/fd/{fd}"))
                except OSError:
                    continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                command = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # gone, or not ours
            continue
        for folder, prefix in prefixes:
            if any(t.startswith(prefix) for t in targets) or folder in command:
                found[folder].append((int(entry), command))
    return found


def stop_leftovers(root: str | None = None) -> list[int]:
    """Stop what the local Rays of killed drivers left running below ``root`` (default:
    ``temp_dir()``); returns the pids stopped. Sessions of live drivers, sessions whose
    raylet still runs (a cluster someone else started there) and sessions their driver
    shut down cleanly are left alone."""
    root = root or temp_dir()
    return _stop([folder for folder, pid in _session_dirs(root)
                  if not os.path.exists(os.path.join(folder, STOPPED_MARK)) and not storage._pid_alive(pid)],
                 spare_running=True)


def stop_own(root: str | None = None) -> list[int]:
    """After ``ray.shutdown()``: stop whatever of the local Rays this process started is
    still running. A shutdown while Ray was starting (Ctrl-C, SIGTERM) kills the raylet
    before it could stop its agents, which then linger like a killed run's."""
    root = root or temp_dir()
    return _stop([folder for folder, pid in _session_dirs(root)
                  if pid == os.getpid() and not os.path.exists(os.path.join(folder, STOPPED_MARK))],
                 spare_running=False)


def _stop(folders: list[str], spare_running: bool) -> list[int]:
    """Stop every process with a file open in one of ``folders`` or naming it (Linux
    only), and mark the folders stopped. With ``spare_running`` a folder whose raylet
    runs is left alone."""
    if not folders or not sys.platform.startswith("linux"):
        return []
    stopped: list[int] = []
    spared = set()
    # Again until nothing is found: a raylet being stopped may still start an agent.
    for _round in range(5):
        holders = {f: p for f, p in _holders([f for f in folders if f not in spared]).items() if p}
        if not holders:
            break
        for folder, processes in holders.items():
            if spare_running and any(os.path.basename(command.split(" ", 1)[0]) == "raylet"
                                     for _, command in processes):
                spared.add(folder)  # a running Ray: not a leftover
                continue
            stopped += _terminate([pid for pid, _ in processes])
    for folder in folders:
        if folder not in spared:
            mark_stopped(folder)
    return stopped


def _terminate(pids: list[int]) -> list[int]:
    """SIGTERM, then SIGKILL for those still there after STOP_GRACE_SECONDS."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:
            pass
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    while any(storage._pid_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in pids:
        if storage._pid_alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    return pids


def mark_stopped(session_dir: str) -> None:
    """Record that a session's processes are gone (its driver shut Ray down, or a later
    run stopped what was left), so later runs do not look at it again."""
    try:
        with open(os.path.join(session_dir, STOPPED_MARK), "w"):
            pass
    except OSError:
        pass


def consume_actor_restart_note() -> None:
    """Let Ray log its once-per-process note about actors whose constructor arguments are
    in the object store (see the module's docstring) where nobody sees it: one throw-away
    actor with such an argument is created with the driver's stderr (fd 2) on /dev/null
    for that one call, and killed at once."""
    import ray

    @ray.remote(num_cpus=0, max_restarts=1)
    class _Quiet:
        def __init__(self, _arg):
            pass

    argument = ray.put(b"")
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
            try:
                actor = _Quiet.remote(argument)
            finally:
                os.dup2(saved, 2)
    finally:
        os.close(saved)
    ray.kill(actor, no_restart=True)
