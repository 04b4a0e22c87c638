"""SIGTERM asks the training job to checkpoint and exit 0.

SIGTERM is what a spot VM being reclaimed (GCP gives it 30 s), ``sky jobs cancel``,
``timeout``, ``kill`` and systemd send. The job's handler only records the request;
the train loop answers it at the end of the step in progress (every rank stops at the
same step, see ``jobs.train.stop_reason``): it writes a checkpoint and exits 0.

The handler is installed before the set-up (which can take minutes on a VM: models,
data index, checkpoint download), so a SIGTERM during start-up is answered the same way,
after the first step. Only the moments before Python has imported the job (the
interpreter's start and ``import torch``) end the process with the signal's default.

DataLoader workers ignore SIGTERM (:func:`ignore_sigterm` is their ``worker_init_fn``):
a signal to the whole process group (``timeout``, ``kill -- -PGID``, systemd, a VM
shutdown) would otherwise kill them first — PyTorch's workers die on a SIGTERM that
does not come from their parent — and the job would stop with them, without a
checkpoint. The main process shuts its workers down when it stops.

This module imports nothing heavy: ``sr train`` installs the handler before it imports
torch.
"""

from __future__ import annotations

import signal

_requested = False


def _handle(signum, frame) -> None:
    global _requested
    _requested = True


def requested() -> bool:
    """Whether a SIGTERM arrived since :func:`install`."""
    return _requested


def install():
    """Make SIGTERM a request to checkpoint and stop; returns the handler it replaces
    (for :func:`restore`). Installing again keeps a request that already arrived."""
    global _requested
    previous = signal.getsignal(signal.SIGTERM)
    if previous is None:  # installed outside Python: SIG_DFL is the closest we can restore
        previous = signal.SIG_DFL
    if previous is not _handle:
        _requested = False
        signal.signal(signal.SIGTERM, _handle)
    # A parent may start us with SIGTERM blocked (the signal mask is inherited): unblock
    # it, so that a preemption is never missed. One that is pending is delivered now.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGTERM])
    return previous


def restore(previous) -> None:
    """Put back the handler :func:`install` replaced (a library caller's process goes on)."""
    if previous is not _handle:
        signal.signal(signal.SIGTERM, previous)


def ignore_sigterm(worker_id: int) -> None:
    """A DataLoader ``worker_init_fn``: the worker leaves SIGTERM to the main process."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
