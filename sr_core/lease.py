"""A lease on a folder (any fsspec URL: local, ``gs://``, ...): one job at a time writes
there. Two training jobs in one run directory would overwrite each other's config and
checkpoints; two batch runs into one OUTPUT would both record an image.

The lease is a small JSON file, ``FOLDER/.sr-lease.json``, naming its holder (host,
pid, command, a random token) with a heartbeat time that a background thread renews
every ``heartbeat_seconds``. Another job refuses to start while the lease is held
(:class:`LeaseHeld`, a ``ValueError``: exit 2 with one line naming the holder) and takes
it over only when it is stale: the heartbeat is older than the holder's own
``stale_seconds``, or the holder ran on this host and its process is gone (a killed job
is replaced at once, without waiting). The holder deletes it at exit.

Usage (a context manager, or ``acquire()`` / ``release()``)::

    with Lease(output, "sr batch"):
        ...  # the work

How long a job waits for a holder on another host is ours to decide, never the lease
file's: at most ``MAX_WAIT_SECONDS`` (our own heartbeat period plus our stale limit), however far in
the future its heartbeat or however large its ``stale_seconds``. A holder that has not
beaten by then is refused on one line naming it and saying how to take over (delete the
lease file once that job is known to be gone). A signal ends the wait at once: Ctrl-C
as ``KeyboardInterrupt``, and whatever ``interrupted`` reports (``sr train``'s SIGTERM
flag) as :class:`sr_core.errors.Terminated`.

A launcher that starts the processes doing the work hands its lease to the one that
writes (``hand_over()`` in the launcher, ``adopt=TOKEN`` in that process): the lease then
lives exactly as long as the writer does, even when the launcher is killed first.

Takeover and renewal use ``sr_core.storage.swap_if_unchanged`` (an ``flock`` locally,
generation preconditions on GCS), so of several jobs starting at once exactly one gets
the lease. Heartbeats compare wall clocks of different hosts: keep ``stale_seconds``
well above the clock skew between them (NTP keeps cloud VMs within milliseconds).
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import threading
import time
import uuid

from sr_core import storage
from sr_core.errors import short_reason

LEASE_NAME = ".sr-lease.json"  # hidden: listings of the folder's files skip it
DEFAULT_HEARTBEAT_SECONDS = 30.0
DEFAULT_STALE_SECONDS = 120.0
# The longest wait for a holder on another host to beat or go stale: a live holder with
# our defaults beats within DEFAULT_HEARTBEAT_SECONDS, a vanished one goes stale after
# DEFAULT_STALE_SECONDS; a lease that claims more (a heartbeat in the future, a stale
# limit of days) is refused after this instead of being waited for.
MAX_WAIT_SECONDS = DEFAULT_HEARTBEAT_SECONDS + DEFAULT_STALE_SECONDS
# How often a wait looks at ``interrupted`` (a signal handler's flag).
_SIGNAL_POLL_SECONDS = 0.1

logger = logging.getLogger("sr_core.lease")


class LeaseHeld(ValueError):
    """The folder's lease is held by a live job; ``holder`` is its record."""

    def __init__(self, message: str, holder: dict):
        super().__init__(message)
        self.holder = holder


def describe(holder: dict) -> str:
    """``sr train on host vm-3, pid 1234``."""
    return f"{holder.get('command') or 'a job'} on host {holder.get('host')}, pid {holder.get('pid')}"


def is_stale(holder: dict, now: float | None = None) -> bool:
    """Whether a lease record may be taken over: its heartbeat is older than the holder
    said it would let it get, or its process on this host is gone."""
    now = time.time() if now is None else now
    try:
        heartbeat = float(holder["heartbeat"])
        if not math.isfinite(heartbeat):
            return True  # damaged: names no time at which its holder was alive
        if now - heartbeat > float(holder.get("stale_seconds", DEFAULT_STALE_SECONDS)):
            return True
        return holder.get("host") == socket.gethostname() and not storage._pid_alive(int(holder["pid"]))
    except (KeyError, TypeError, ValueError):
        return True  # a record that names no holder protects nothing


class Lease:
    """The lease on ``folder`` for ``command`` (a name shown to whoever is refused)."""

    def __init__(self, folder: str, command: str, *, heartbeat_seconds: float = DEFAULT_HEARTBEAT_SECONDS,
                 stale_seconds: float = DEFAULT_STALE_SECONDS, wait_for_stale: bool = False,
                 max_wait_seconds: float = MAX_WAIT_SECONDS, interrupted=None, adopt: str = ""):
        if not 0 < heartbeat_seconds < stale_seconds:
            raise ValueError(f"a lease's heartbeat ({heartbeat_seconds} s) must be positive and shorter than "
                             f"the time after which it is stale ({stale_seconds} s)")
        self.folder, self.command = folder, command
        self.url = storage.join(folder, LEASE_NAME)
        self.heartbeat_seconds, self.stale_seconds = float(heartbeat_seconds), float(stale_seconds)
        # A holder on another host that looks alive may be a VM that just vanished (its
        # replacement starting within stale_seconds): with this, wait until it either
        # beats (alive: refused) or goes stale (taken over), at most max_wait_seconds;
        # ``interrupted()`` true (a signal arrived) ends the wait with Terminated.
        self.wait_for_stale = wait_for_stale
        self.max_wait_seconds = float(max_wait_seconds)
        self.interrupted = interrupted
        self.waiting = threading.Event()  # set while waiting for such a holder
        self.token = uuid.uuid4().hex
        # The token of a launcher's lease this process takes over (see hand_over()).
        self.adopt = adopt
        self.handing_over = False
        self.lost = False  # another job took it over (we looked stale to it)
        self.took_over_from = ""  # the stale holder this lease replaced, described
        self.beat_event = threading.Event()  # set after every heartbeat attempt
        self._written: bytes | None = None
        self._started = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- reading

    @staticmethod
    def _read(url: str) -> bytes | None:
        try:
            fs, path = storage.get_fs(url)
            if not storage.is_local(url):
                fs.invalidate_cache(path)  # a listing's cached entry could be an older object
            return storage.read_bytes(url)
        except FileNotFoundError:
            return None

    @staticmethod
    def _parse(data: bytes) -> dict:
        try:
            holder = json.loads(data)
        except ValueError:
            holder = None
        return holder if isinstance(holder, dict) else {}

    @classmethod
    def holder(cls, folder: str) -> dict | None:
        """The record of the lease on ``folder`` ({} if unreadable), None when there is none."""
        data = cls._read(storage.join(folder, LEASE_NAME))
        return None if data is None else cls._parse(data)

    # ---------------------------------------------------------------- taking and giving back

    def _record(self) -> bytes:
        return json.dumps({
            "host": socket.gethostname(), "pid": os.getpid(), "command": self.command, "token": self.token,
            "started": self._started, "heartbeat": time.time(), "heartbeat_seconds": self.heartbeat_seconds,
            "stale_seconds": self.stale_seconds, **({"adopted_from": self.adopt} if self.adopt else {}),
        }).encode()

    def _refusal(self, holder: dict) -> LeaseHeld:
        age = time.time() - float(holder.get("heartbeat", 0))
        stale = float(holder.get("stale_seconds", DEFAULT_STALE_SECONDS))
        return LeaseHeld(f"{self.folder} is in use by {describe(holder)} (heartbeat {age:.0f} s ago); wait for "
                         f"it to finish or stop it, or use another folder (a lease whose heartbeat stops goes "
                         f"stale after {stale:.0f} s and is then taken over; lease file {self.url})", holder)

    def acquire(self) -> "Lease":
        """Take the lease, or raise :class:`LeaseHeld` naming the live holder. Starts the
        heartbeat thread."""
        if self._written is not None:
            return self
        self._started = time.time()
        if self.adopt:
            self._adopt()
            return self._start_beating()
        for _attempt in range(5):
            current = self._read(self.url)
            record = self._record()
            if current is None:
                if storage.create_bytes(self.url, record):
                    break
                continue  # another job created it first: look at who
            holder = self._parse(current)
            if not is_stale(holder):
                if not self.wait_for_stale or holder.get("host") == socket.gethostname():
                    raise self._refusal(holder)  # on this host, its process is known to live
                self._wait_for(current, holder)
                continue
            if storage.swap_if_unchanged(self.url, current, record):
                self.took_over_from = describe(holder)
                logger.warning("lease: %s: took over the stale lease of %s", self.folder, self.took_over_from)
                break
        else:  # changed under us every time: others are taking it right now
            raise self._refusal(self.holder(self.folder) or {})
        self._written = record
        return self._start_beating()

    def _start_beating(self) -> "Lease":
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name=f"lease {self.url}", daemon=True)
        self._thread.start()
        return self

    def _adopt(self) -> None:
        """Take over the launcher's lease whose token is ``self.adopt``, or refuse."""
        current = self._read(self.url)
        holder = self._parse(current) if current is not None else {}
        if holder.get("token") == self.adopt:
            record = self._record()
            if storage.swap_if_unchanged(self.url, current, record):
                self._written = record
                return
        raise LeaseHeld(f"{self.folder}: the lease of the launcher that started this process is gone "
                        f"({describe(holder) + ' holds it now' if holder else 'no lease file'}); start the run "
                        "again", holder)

    def hand_over(self) -> None:
        """The launcher's side: a process it starts will adopt this lease (given
        ``self.token``); from then on this one stops beating quietly and does not delete
        it at release."""
        self.handing_over = True

    def _wait_for(self, current: bytes, holder: dict) -> None:
        """Return when the lease changed hands or went stale; raise if its holder beats,
        or has done neither within our own bound (``max_wait_seconds``)."""
        start = time.time()
        try:  # the file's own figures, capped by ours: a damaged or hostile file decides nothing
            by_file = float(holder["heartbeat"]) + float(holder.get("stale_seconds", DEFAULT_STALE_SECONDS)) + 1
            interval = min(max(float(holder.get("heartbeat_seconds", DEFAULT_HEARTBEAT_SECONDS)) / 4, 0.05), 5.0)
        except (KeyError, TypeError, ValueError):
            by_file, interval = start, 1.0
        if not math.isfinite(interval):
            interval = 1.0
        if not math.isfinite(by_file):
            by_file = start + self.max_wait_seconds
        deadline = start + min(max(0.0, by_file - start), self.max_wait_seconds)
        logger.warning("lease: %s is held by %s (heartbeat %s); waiting up to %.0f s for it to beat "
                       "again (a live job: refused) or go stale (taken over)", self.folder, describe(holder),
                       self._heartbeat_age(holder), deadline - start)
        self.waiting.set()
        try:
            next_read = start + interval
            while True:
                self._raise_if_interrupted()
                now_time = time.time()
                if now_time >= deadline:
                    break
                if now_time < next_read:  # short sleeps: a signal's flag is seen at once
                    time.sleep(min(_SIGNAL_POLL_SECONDS, next_read - now_time, deadline - now_time))
                    continue
                next_read = now_time + interval
                now = self._read(self.url)
                if now == current:
                    continue
                if now is not None and self._parse(now).get("token") == holder.get("token"):
                    raise self._refusal(self._parse(now))  # it beat: a live job
                return  # released or taken by another: look again
            if self._read(self.url) == current and not is_stale(holder):
                raise self._not_stale_in_time(holder, deadline - start)
        finally:
            self.waiting.clear()

    def _raise_if_interrupted(self) -> None:
        if self.interrupted is not None and self.interrupted():
            from sr_core.errors import Terminated

            raise Terminated()

    def _not_stale_in_time(self, holder: dict, waited: float) -> LeaseHeld:
        """The holder neither beat nor went stale within our bound: its file claims more
        time than we give it (a heartbeat in the future, a stale limit of days)."""
        return LeaseHeld(f"{self.folder} is held by {describe(holder)}, whose lease neither beat nor went stale "
                         f"within {waited:g} s (its file claims a heartbeat "
                         f"{self._heartbeat_age(holder)} and a stale limit of {holder.get('stale_seconds')!r} s); "
                         f"if that job is gone, delete {self.url} and rerun; if it runs, stop it or use another "
                         "folder", holder)

    @staticmethod
    def _heartbeat_age(holder: dict) -> str:
        try:
            age = time.time() - float(holder["heartbeat"])
        except (KeyError, TypeError, ValueError):
            return "that is unreadable"
        return f"{age:.0f} s ago" if age >= 0 else f"{-age:.0f} s in the future"

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_seconds):
            try:
                record = self._record()
                if storage.swap_if_unchanged(self.url, self._written, record):
                    self._written = record
                else:
                    self.lost = True
                    if self.handing_over:
                        return  # adopted by the process it was handed to: theirs now
                    logger.warning("lease: %s: another job took over this job's lease (%s); it is no longer "
                                   "protected from that job", self.folder, self.url)
                    return
            except Exception as exc:  # noqa: BLE001 - storage down: the next beat tries again
                logger.warning("lease: %s: heartbeat failed (%s); trying again in %.0f s",
                               self.url, short_reason(exc, 200), self.heartbeat_seconds)
            finally:
                self.beat_event.set()

    def thread_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def release(self) -> None:
        """Stop the heartbeat and delete the lease, unless another job holds it now."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._written is None:
            return
        written, self._written = self._written, None
        if self.lost:
            return
        try:
            storage.swap_if_unchanged(self.url, written, None)
        except Exception as exc:  # noqa: BLE001 - a lease left behind goes stale; the work is done
            logger.warning("lease: %s: could not delete it (%s); it goes stale in %.0f s",
                           self.url, short_reason(exc, 200), self.stale_seconds)

    def __enter__(self) -> "Lease":
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()
