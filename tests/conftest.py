"""Shared fixtures: every test gets a check that the pools it made left no thread behind."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator

import pytest
from _util import TIMEOUT


@pytest.fixture(autouse=True)
def no_thread_left_behind() -> Iterator[None]:
    before = set(threading.enumerate())
    yield
    # Pools made by the test must be shut down by it; give joins a moment.
    deadline = time.monotonic() + TIMEOUT
    while True:
        extra = [
            t
            for t in threading.enumerate()
            if t not in before
            and t.is_alive()
            # every pool has a dispatcher, whatever its prefix
            and ("keyedpool" in t.name.lower() or t.name.endswith("_dispatcher"))
        ]
        if not extra or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    assert not extra, f"threads left running: {[t.name for t in extra]}"


@pytest.fixture
def fast_switching() -> Iterator[None]:
    """Switch threads as often as the interpreter can: races show up in seconds."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(old)
