"""Helpers shared by the tests."""

from __future__ import annotations

import time
from collections.abc import Callable

#: Upper bound for anything a test waits for: it turns a hang into a failure.
TIMEOUT = 30.0


def wait_until(predicate: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    """Wait until *predicate()* is true; fail if it is not within *timeout* seconds.

    For states that no Event signals (a thread blocked inside submit, a queue
    that filled up): a bounded wait for a condition, not a sleep-based guess.
    """
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.001)
