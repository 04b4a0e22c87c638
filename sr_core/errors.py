"""The exit-code policy every command shares (``sr ...`` and ``python -m jobs.train``,
which is what training VMs run), and the small helpers that turn exceptions into the
one-line reports the commands print.

Exit codes: 0 done; 1 some inputs failed (each reported, the rest done); 2 a usage or
input error (one line naming the input and the fix); 75 storage unreachable or down
past the retry budget (sysexits' EX_TEMPFAIL: rerun the same command to resume); 130
interrupted (Ctrl-C; and SIGTERM for the commands that run under ``sigterm_interrupts``).
"""

from __future__ import annotations

import contextlib
import errno
import signal
import sys
import threading
from typing import Callable, Iterator

EXIT_OK = 0
EXIT_SOME_FAILED = 1
EXIT_USAGE = 2
EXIT_TEMPFAIL = 75
EXIT_INTERRUPTED = 130

# Writes that fail with these fail for every later write too: a full, over-quota,
# too-large or read-only destination. Commands stop at the first one instead of
# computing everything that is left.
UNWRITABLE_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS})


class StorageError(ConnectionError):
    """Object storage could not be reached or kept failing after bounded retries. The
    message names the object and what was tried; ``sr`` prints it as one line. Work
    already published stays: rerunning the same command resumes."""


def is_unwritable(exc: BaseException) -> bool:
    """An OSError that every later write to the same place would hit too."""
    return isinstance(exc, OSError) and exc.errno in UNWRITABLE_ERRNOS


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived (``kill``, ``timeout``, systemd, a VM shutting down): handled like
    Ctrl-C, so the command says so on one line and exits 130 (interrupted)."""

    def __init__(self):
        super().__init__("interrupted by SIGTERM")


_terminated = False


def raise_terminated(signum, frame) -> None:
    global _terminated
    _terminated = True
    raise Terminated()


def raise_if_terminated() -> None:
    """Raise :class:`Terminated` if SIGTERM arrived but its exception was lost: raised
    where Python only prints exceptions (a fork handler, a finalizer), it is swallowed.
    Long-running commands call this at points where stopping is safe."""
    if _terminated:
        raise Terminated()


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` in the main thread (the
    previous handler is put back after it). Outside the main thread it does nothing:
    Python delivers signals to the main thread only."""
    global _terminated
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _terminated = False
    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def exit_code(exc: BaseException) -> int | None:
    """The exit code for an exception that ends a command with a one-line message, or
    None for one that is a bug (its traceback is shown)."""
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(exc, ConnectionError):  # StorageError included
        return EXIT_TEMPFAIL
    if isinstance(exc, (ValueError, FileNotFoundError, FileExistsError, PermissionError,
                        IsADirectoryError, NotADirectoryError)):
        return EXIT_USAGE
    if is_unwritable(exc):
        return EXIT_USAGE
    return None


def message(exc: BaseException) -> str:
    """One line for the user: OSErrors without their errno prefix, no traceback."""
    if isinstance(exc, KeyboardInterrupt):
        return str(exc) or "interrupted"
    if isinstance(exc, OSError) and exc.errno is not None and exc.strerror:
        # "[Errno 28] No space left on device: 'x'" -> "x: No space left on device"
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{exc.strerror}"
    return str(exc) or type(exc).__name__


def run_command(prog: str, func: Callable[[], int | None]) -> int:
    """Run one command under the policy: its return value is the exit code; the
    exceptions above become one line on stderr (``PROG: error: ...``) and their code."""
    try:
        return int(func() or 0)
    except BaseException as exc:  # noqa: BLE001 - re-raised below unless the policy maps it
        code = exit_code(exc)
        if code is None:
            raise
        print(f"{prog}: {'error: ' if code != EXIT_INTERRUPTED else ''}{message(exc)}", file=sys.stderr)
        return code


def short_reason(exc: object, limit: int | None = 200) -> str:
    """The text of an exception (or of any message object) on one line, whitespace runs
    and newlines folded to one space, cut to ``limit`` characters (None: not cut): what
    a report line or a log line quotes of an error it does not own."""
    text = " ".join(str(exc).split())
    return text if limit is None else text[:limit]


def strip_url(exc: BaseException, url: str) -> str:
    """The reason an input failed, for a report line that names the input already: our
    errors start with ``URL: ``, which is dropped; exceptions other than ValueError and
    FileNotFoundError keep their type name (they are less expected)."""
    text = str(exc)
    if url and text.startswith(url + ": "):
        text = text[len(url) + 2:]
    if isinstance(exc, (ValueError, FileNotFoundError)):
        return text
    return f"{type(exc).__name__}: {text}"


MAX_SHOWN = 200
"""Characters of an input's value echoed in an error line."""


def shown(value) -> str:
    """``value`` for an error line: its ``repr`` (control characters escaped), at most
    ``MAX_SHOWN`` characters, with the full length said when cut. Integers past 256 bits
    are described, not printed (Python refuses to print those of more than 4300 digits)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 256:
        return f"an integer of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= MAX_SHOWN else f"{text[:MAX_SHOWN]}... ({len(text)} characters)"
