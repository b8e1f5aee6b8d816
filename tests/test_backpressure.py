"""max_pending bounds accepted-but-unfinished tasks; submit blocks, times out or raises."""

from __future__ import annotations

import threading
from concurrent.futures import Future, wait

import pytest
from _util import TIMEOUT, wait_until

from keyedpool import KeyedPoolExecutor, PoolFull


def fill(pool: KeyedPoolExecutor, release: threading.Event, count: int) -> list[Future[bool]]:
    return [pool.submit(f"k{i}", release.wait, TIMEOUT) for i in range(count)]


def test_default_capacity_is_workers_times_100() -> None:
    pool = KeyedPoolExecutor(3)
    assert pool.max_pending == 300
    pool.shutdown()


def test_raise_at_once_when_full_and_nothing_is_lost() -> None:
    release = threading.Event()
    pool = KeyedPoolExecutor(2, max_pending=5, on_full="raise")
    try:
        accepted = fill(pool, release, 5)
        with pytest.raises(PoolFull) as info:
            pool.submit("late", int, 1)
        message = str(info.value)
        assert "max_pending is 5" in message and "raise max_pending" in message
        assert "on_full='block'" in message  # this caller did not wait: it may
        stats = pool.stats()
        assert (stats.submitted, stats.rejected, stats.pending) == (5, 1, 5)
    finally:
        release.set()
        pool.shutdown()
    assert all(f.result() for f in accepted)
    assert pool.stats().pending == 0


def test_block_with_timeout_raises_pool_full() -> None:
    release = threading.Event()
    pool = KeyedPoolExecutor(2, max_pending=3, full_timeout=0.05)
    try:
        fill(pool, release, 3)
        with pytest.raises(PoolFull, match="waited 0.05 s") as info:
            pool.submit("late", int, 1)
        # It did wait: the advice is to wait longer, not to start waiting.
        assert "larger full_timeout" in str(info.value)
        assert "on_full='block'" not in str(info.value)
    finally:
        release.set()
        pool.shutdown()


def test_block_waits_for_room_then_accepts() -> None:
    release = threading.Event()
    pool = KeyedPoolExecutor(2, max_pending=4)
    try:
        first = fill(pool, release, 4)
        result: list[Future[int]] = []
        submitter = threading.Thread(target=lambda: result.append(pool.submit("late", int, 7)))
        submitter.start()
        # The submitter is inside submit, waiting for room.
        wait_until(lambda: len(pool._pool.room_waiters) == 1)
        assert not result and pool.stats().submitted == 4
        release.set()
        submitter.join(TIMEOUT)
        assert result[0].result(TIMEOUT) == 7
        assert all(f.result() for f in first)
    finally:
        release.set()
        pool.shutdown()


def test_per_call_backpressure_overrides_the_pool() -> None:
    release = threading.Event()
    pool = KeyedPoolExecutor(2, max_pending=2)  # blocks by default
    try:
        fill(pool, release, 2)
        with pytest.raises(PoolFull):
            pool.submit_with("late", int, (1,), on_full="raise")
        with pytest.raises(PoolFull):
            pool.submit_with("late", int, (1,), full_timeout=0.01)
    finally:
        release.set()
        pool.shutdown()


def test_pending_never_exceeds_max_pending_under_load() -> None:
    limit = 50
    seen = []
    lock = threading.Lock()
    pool = KeyedPoolExecutor(4, max_pending=limit)

    def task() -> None:
        with lock:
            seen.append(pool.stats(top_keys=0).pending)

    threads = [
        threading.Thread(target=lambda t=t: [pool.submit(f"{t}-{i % 9}", task) for i in range(500)])
        for t in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    pool.shutdown()
    assert len(seen) == 2000
    assert max(seen) <= limit


def test_shutdown_wakes_a_blocked_submitter_with_runtime_error() -> None:
    release = threading.Event()
    pool = KeyedPoolExecutor(1, max_pending=1)
    fill(pool, release, 1)
    errors: list[BaseException] = []

    def late() -> None:
        try:
            pool.submit("late", int, 1)
        except BaseException as exc:
            errors.append(exc)

    submitter = threading.Thread(target=late)
    submitter.start()
    wait_until(lambda: len(pool._pool.room_waiters) == 1)
    pool.shutdown(wait=False)
    submitter.join(TIMEOUT)
    assert isinstance(errors[0], RuntimeError)
    release.set()
    pool.shutdown()


def test_blocked_submits_all_get_in_eventually() -> None:
    pool = KeyedPoolExecutor(2, max_pending=3)
    futures = [pool.submit(i % 5, int, i) for i in range(300)]
    wait(futures, timeout=TIMEOUT)
    pool.shutdown()
    assert [f.result() for f in futures] == list(range(300))
