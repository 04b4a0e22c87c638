"""Progress bars on stderr that suit a terminal and a log file alike.

On a terminal a bar is redrawn at tqdm's usual rate. Where stderr is a file or a pipe (a
cloud VM's job log, SkyPilot's and Ray's log streams, CI) every redraw is kept as text:
tqdm's 0.1 s would write up to 864,000 redraws a day into the log of a long training run,
so there the bar is redrawn at most every ``LOG_INTERVAL_S`` seconds (and at its start
and end)."""

from __future__ import annotations

import sys

from tqdm import tqdm

LOG_INTERVAL_S = 30.0
"""Seconds between redraws when stderr is not a terminal (2,880 a day at most)."""


def bar(total: int | None, desc: str, unit: str, *, initial: int = 0, shown: bool = True, file=None) -> tqdm:
    """A tqdm bar on ``file`` (default: stderr), hidden unless ``shown``; ``total`` None
    for a count without an end."""
    file = file if file is not None else sys.stderr
    terminal = bool(getattr(file, "isatty", lambda: False)())
    # maxinterval too: tqdm's monitor thread redraws a bar not redrawn for that long (10 s).
    interval = {"mininterval": 0.1} if terminal else {"mininterval": LOG_INTERVAL_S, "maxinterval": LOG_INTERVAL_S}
    return tqdm(total=total, initial=initial, unit=unit, desc=desc, file=file, disable=not shown,
                dynamic_ncols=terminal, **interval)
