"""The retry budget of object-store requests: how many tries, how long between them."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries with exponential backoff for object-store requests."""

    attempts: int = 6
    """Tries per request, the first included (env ``SR_STORAGE_ATTEMPTS``)."""

    initial_backoff: float = 1.0
    """Seconds before the first retry; doubled each time, with up to 50% jitter (env
    ``SR_STORAGE_BACKOFF``)."""

    max_backoff: float = 16.0
    """Longest single wait in seconds."""

    @classmethod
    def from_env(cls) -> "RetryPolicy":
        try:
            policy = cls(attempts=int(os.environ.get("SR_STORAGE_ATTEMPTS", cls.attempts)),
                         initial_backoff=float(os.environ.get("SR_STORAGE_BACKOFF", cls.initial_backoff)))
        except ValueError:
            raise ValueError("SR_STORAGE_ATTEMPTS must be an integer and SR_STORAGE_BACKOFF a number of "
                             "seconds") from None
        if policy.attempts < 1 or policy.initial_backoff < 0:
            raise ValueError("SR_STORAGE_ATTEMPTS must be >= 1 and SR_STORAGE_BACKOFF >= 0")
        return policy

    def delay(self, retry: int) -> float:
        base = min(self.initial_backoff * 2 ** (retry - 1), self.max_backoff)
        return base * (1 + 0.5 * random.random())
