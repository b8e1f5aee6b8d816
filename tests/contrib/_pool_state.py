"""A pool in a known state, for the metrics exporters' tests."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import wait
from typing import TypeVar

import pytest
from _util import TIMEOUT, wait_until

from keyedpool import KeyedPoolExecutor, PoolFull, RetryPolicy

T = TypeVar("T")


def read_in_known_state(pool: KeyedPoolExecutor, read: Callable[[], T]) -> T:
    """Call *read* while *pool* (2 workers, ``max_pending=4``) is in a known state.

    Then: 5 tasks completed, 2 failed, 0 cancelled; 11 submitted, 1 rejected;
    4 pending, all of key "slow" on one worker (1 running, 3 queued); 1 key bound.
    """
    release = threading.Event()
    started = threading.Event()

    def hold() -> None:
        started.set()
        release.wait(TIMEOUT)

    done = [pool.submit(f"k{i}", int, "1") for i in range(5)]
    failed = [pool.submit("bad", int, "x") for _ in range(2)]
    wait(done + failed, timeout=TIMEOUT)
    held = pool.submit("slow", hold)
    assert started.wait(TIMEOUT)
    queued = [pool.submit("slow", int, "2") for _ in range(3)]  # behind it: 4 pending
    with pytest.raises(PoolFull):
        pool.submit_with("late", int, ("3",), on_full="raise")
    # submit() returns before the dispatcher has put the task on a worker's queue:
    # the per-worker backlog counts only tasks already placed.
    wait_until(lambda: pool.stats().in_transit == 0)
    try:
        return read()
    finally:
        release.set()
        wait([held, *queued], timeout=TIMEOUT)


def read_while_holding(pool: KeyedPoolExecutor, read: Callable[[], T]) -> T:
    """Put *pool* where it holds keys (see ``submit_with``), then return ``read()``.

    Then: 1 retry done, 2 tasks parked (one waiting for its retry, one for
    its delay), 2 keys held, 1 task waiting behind them. The caller shuts the
    pool down with ``cancel_futures=True``.
    """
    calls: list[int] = []

    def fail_once() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("first attempt fails")

    pool.submit_with("retried", fail_once, retry=RetryPolicy(attempts=2, backoff=3600))
    pool.submit_with("delayed", int, ("1",), delay=3600)
    pool.submit("delayed", int, "2")
    wait_until(lambda: pool.stats().parked == 2)
    return read()
