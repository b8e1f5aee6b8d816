"""Futures are standard concurrent.futures futures: wait, as_completed, callbacks, asyncio."""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import threading
from concurrent.futures import (
    FIRST_COMPLETED,
    CancelledError,
    Future,
    TimeoutError,
    as_completed,
    wait,
)

import pytest
from _util import TIMEOUT, wait_until

from keyedpool import KeyedPoolExecutor


def test_futures_are_stdlib_futures_and_work_with_wait_and_as_completed() -> None:
    with KeyedPoolExecutor(4) as pool:
        futures = [pool.submit(i % 4, int, i) for i in range(200)]
        assert all(isinstance(f, Future) for f in futures)
        assert sorted(f.result() for f in as_completed(futures, timeout=TIMEOUT)) == list(
            range(200)
        )
        done, not_done = wait(futures, timeout=TIMEOUT)
        assert len(done) == 200 and not not_done


def test_wait_first_completed_and_timeouts() -> None:
    release = threading.Event()
    with KeyedPoolExecutor(2) as pool:
        slow = pool.submit("slow", release.wait, TIMEOUT)
        fast = pool.submit("fast", int, 1)
        done, not_done = wait([slow, fast], timeout=TIMEOUT, return_when=FIRST_COMPLETED)
        assert fast in done and slow in not_done
        with pytest.raises(TimeoutError):
            slow.result(timeout=0.01)
        with pytest.raises(TimeoutError):
            slow.exception(timeout=0)
        assert slow.running() and not slow.done()
        release.set()
        assert slow.result(TIMEOUT) is True


def test_many_threads_waiting_on_many_futures_at_once() -> None:
    # Each waiter must be woken by its own future's result, not by another's.
    gates = [threading.Event() for _ in range(40)]
    with KeyedPoolExecutor(40) as pool:
        futures = [pool.submit(f"k{i}", gates[i].wait, TIMEOUT) for i in range(40)]
        results: list[object] = [None] * 40

        def waiter(i: int) -> None:
            results[i] = futures[i].result(TIMEOUT)

        threads = [threading.Thread(target=waiter, args=(i,)) for i in range(40)]
        for t in threads:
            t.start()
        for i in range(40):
            gates[i].set()
        for t in threads:
            t.join(TIMEOUT)
    assert results == [True] * 40


def test_done_callbacks_run_once_in_order_and_after_done() -> None:
    calls: list[tuple[str, object]] = []
    release = threading.Event()
    with KeyedPoolExecutor(1) as pool:
        f = pool.submit("k", release.wait, TIMEOUT)
        f.add_done_callback(lambda fut: calls.append(("first", fut.result())))
        f.add_done_callback(lambda fut: calls.append(("second", fut.done())))
        release.set()
        f.result(TIMEOUT)
    f.add_done_callback(lambda fut: calls.append(("late", fut.done())))
    assert calls == [("first", True), ("second", True), ("late", True)]


def test_cancelled_future_is_reported_to_waiters() -> None:
    # As in the standard library, wait()/as_completed() report a cancelled
    # task once its worker reaches it (and skips it).
    release = threading.Event()
    with KeyedPoolExecutor(1) as pool:
        pool.submit("k", release.wait, TIMEOUT)
        victim = pool.submit("k", int, 1)
        after = pool.submit("k", int, 2)
        assert victim.cancel() and victim.cancelled()
        with pytest.raises(CancelledError):
            victim.result()
        release.set()
        assert next(as_completed([victim], timeout=TIMEOUT)) is victim
        assert after.result(TIMEOUT) == 2


def test_asyncio_can_await_the_futures() -> None:
    async def main() -> list[int]:
        with KeyedPoolExecutor(4) as pool:
            return await asyncio.gather(
                *(asyncio.wrap_future(pool.submit(i % 3, int, i)) for i in range(50))
            )

    assert asyncio.run(main()) == list(range(50))


def test_repr_shows_state() -> None:
    with KeyedPoolExecutor(1) as pool:
        f = pool.submit("k", int, 1)
        f.result(TIMEOUT)
        assert "finished returned int" in repr(f)
        assert "KeyedPoolExecutor running" in repr(pool)


def test_map_keeps_input_order_and_per_key_order() -> None:
    started: list[tuple[str, int]] = []
    lock = threading.Lock()

    def handle(user: str, n: int) -> int:
        with lock:
            started.append((user, n))
        return n * 10

    users = [f"user-{i % 5}" for i in range(100)]
    with KeyedPoolExecutor(4) as pool:
        results = list(pool.map(handle, users, range(100), key=lambda user, n: user))
    assert results == [n * 10 for n in range(100)]
    for u in set(users):
        seq = [n for (who, n) in started if who == u]
        assert seq == sorted(seq)


def test_map_with_buffersize_reads_an_endless_iterable_a_few_items_ahead() -> None:
    # As Executor.map from Python 3.14: at most buffersize items are submitted
    # ahead of the results read, so an endless iterable is fine.
    with KeyedPoolExecutor(2) as pool:
        results = pool.map(int, itertools.count(), key=lambda n: f"k{n % 3}", buffersize=4)
        assert [next(results) for _ in range(10)] == list(range(10))
        assert pool.stats().submitted <= 10 + 4
        results.close()  # what is still queued is cancelled, as without buffersize
        assert list(pool.map(str, range(7), buffersize=2)) == [str(n) for n in range(7)]
        with pytest.raises(ValueError, match="buffersize must be None or > 0"):
            pool.map(str, range(3), buffersize=0)
        with pytest.raises(TypeError, match="buffersize must be an integer or None"):
            pool.map(str, range(3), buffersize=2.0)  # type: ignore[arg-type]


def test_map_timeout_and_exception() -> None:
    release = threading.Event()
    with KeyedPoolExecutor(2) as pool:
        it = pool.map(release.wait, [TIMEOUT], timeout=0.01)
        with pytest.raises(TimeoutError):
            next(it)
        release.set()
        with pytest.raises(ValueError):
            list(pool.map(int, ["1", "x", "3"], key="same"))


def test_context_is_copied_into_the_task() -> None:
    request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
    with KeyedPoolExecutor(2) as pool:
        token = request_id.set("req-7")
        try:
            seen = pool.submit("k", request_id.get).result(TIMEOUT)
            # The task's own changes stay in its copy.
            pool.submit("k", request_id.set, "changed").result(TIMEOUT)
            assert request_id.get() == "req-7"
        finally:
            request_id.reset(token)
    assert seen == "req-7"


def test_context_copy_can_be_turned_off() -> None:
    request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id2", default="-")
    with KeyedPoolExecutor(1, copy_context=False) as pool:
        token = request_id.set("req-8")
        try:
            seen = pool.submit("k", request_id.get).result(TIMEOUT)
        finally:
            request_id.reset(token)
    assert seen == "-"


def test_stats_snapshot_counts() -> None:
    release = threading.Event()
    started = threading.Event()

    def blocker() -> None:
        started.set()
        release.wait(TIMEOUT)

    with KeyedPoolExecutor(2) as pool:
        hot = "hot-key"
        pool.submit(hot, blocker)
        for _ in range(5):
            pool.submit(hot, int, 1)
        failing = pool.submit(None, int, "x")
        assert started.wait(TIMEOUT)
        assert isinstance(failing.exception(TIMEOUT), ValueError)
        # The dispatcher routes tasks a moment after submit returns.
        wait_until(lambda: pool.stats().in_transit == 0)
        stats = pool.stats()
        assert stats.submitted == 7 and stats.max_workers == 2 and stats.max_pending == 200
        assert stats.top_keys[0].key == hot and stats.top_keys[0].backlog == 6
        where = stats.top_keys[0].worker
        assert stats.workers[where].backlog == 6 and stats.workers[where].running
        assert "top keys by backlog: 'hot-key'=6" in stats.table()
        release.set()
    final = pool.stats()
    assert (final.completed, final.failed, final.pending) == (6, 1, 0)
    assert final.top_keys == ()
    assert sum(w.completed for w in final.workers) == 6
