"""``RetryPolicy``: how often a failed task runs again, and how long its key waits in between."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

__all__ = ["RetryPolicy"]


@dataclass(frozen=True)
class RetryPolicy:
    """How often a failed task is run again, and how long to wait in between.

    The call is made at most ``attempts`` times (the first call included).
    Before retry number ``n`` (1, 2, ...) the task waits
    ``min(backoff * multiplier ** (n - 1), max_backoff)`` seconds, less a random
    share of up to ``jitter`` of that (``jitter=1.0`` draws the wait uniformly
    between 0 and the full backoff, so that many keys failing together do not
    retry together). Only exceptions that are instances of ``retry_on`` are
    retried; any other exception, or the last attempt's, resolves the future.

    With :meth:`KeyedPoolExecutor.submit_with`, a task waiting to retry holds
    its key: later tasks of the key wait behind it, but no worker waits.

    >>> RetryPolicy(attempts=3, backoff=0.1).delay(2)
    0.2
    """

    attempts: int = 3
    backoff: float = 0.1
    multiplier: float = 2.0
    max_backoff: float = 10.0
    jitter: float = 0.0
    retry_on: tuple[type[BaseException], ...] = (Exception,)

    def __post_init__(self) -> None:
        if isinstance(self.attempts, bool) or not isinstance(self.attempts, int):
            raise TypeError(f"attempts must be an int, not {type(self.attempts).__name__}")
        if self.attempts < 1:
            raise ValueError("attempts must be >= 1 (1 means: no retries)")
        for name in ("backoff", "multiplier", "max_backoff", "jitter"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a number, not {type(value).__name__}")
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, not {value!r}")
        if self.multiplier < 1:
            raise ValueError("multiplier must be >= 1")
        if self.jitter > 1:
            raise ValueError(
                f"jitter must be between 0 and 1 (the share of the backoff that is "
                f"random), not {self.jitter!r}"
            )
        retry_on: object = self.retry_on
        if isinstance(retry_on, type):
            retry_on = (retry_on,)
            object.__setattr__(self, "retry_on", retry_on)
        if not isinstance(retry_on, tuple) or not all(
            isinstance(t, type) and issubclass(t, BaseException) for t in retry_on
        ):
            raise TypeError(
                "retry_on must be an exception class or a tuple of them, "
                f"not {self.retry_on!r}"
            )

    def delay(self, retry: int) -> float:
        """Seconds to wait before retry number *retry* (1 for the first retry), before jitter."""
        try:
            grown = self.backoff * self.multiplier ** max(retry - 1, 0)
        except OverflowError:
            grown = math.inf
        return float(min(grown, self.max_backoff))

    def wait(self, retry: int) -> float:
        """Seconds to wait before retry number *retry*: :meth:`delay`, less its random share."""
        full = self.delay(retry)
        if self.jitter:
            full -= full * self.jitter * random.random()
        return full

    def retries(self, exc: BaseException) -> bool:
        """Whether *exc* is one this policy retries (an instance of ``retry_on``)."""
        return isinstance(exc, self.retry_on)
