"""submit_with(delay=, retry=, replace=) and asubmit: keyed scheduling that holds the key.

What each test shows: order per key is kept, no worker waits while a key is
held (a one-worker pool runs other keys meanwhile), and each edge case
behaves as documented. Synchronised with events and futures; a delay is only
checked as a lower bound (a task must not start early).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import wait
from typing import Any

import pytest
from _util import TIMEOUT, wait_until

from keyedpool import KeyedPoolExecutor, PoolFull, RetryPolicy

#: A delay or backoff that never passes within a test: tests that use it
#: cancel the task or shut the pool down with cancel_futures=True.
FOREVER = 3600.0


class Flaky:
    """A call that fails its first *failures* calls, then returns how many calls it took."""

    def __init__(self, failures: int, exc: type[BaseException] = ValueError) -> None:
        self.failures = failures
        self.exc = exc
        self.calls = 0
        self.lock = threading.Lock()

    def __call__(self, log: list[Any] | None = None, tag: Any = None) -> int:
        with self.lock:
            self.calls += 1
            calls = self.calls
        if calls <= self.failures:
            raise self.exc(f"attempt {calls}")
        if log is not None:
            log.append(tag)
        return calls


# -- delay ----------------------------------------------------------------------


def test_a_delayed_task_starts_no_earlier_than_its_delay() -> None:
    with KeyedPoolExecutor(2) as pool:
        submitted = time.monotonic()
        started = pool.submit_with("k", time.monotonic, delay=0.05).result(TIMEOUT)
    assert started - submitted >= 0.05


def test_later_tasks_of_a_delayed_key_wait_behind_it_while_other_keys_run() -> None:
    # One worker: if it waited out the delay, the other key could not finish first.
    log: list[str] = []
    with KeyedPoolExecutor(1) as pool:
        go = threading.Event()
        first = pool.submit_with("k", log.append, ("k1",), delay=FOREVER)
        second = pool.submit("k", log.append, "k2")
        other = pool.submit("other", log.append, "other")
        other.result(TIMEOUT)
        assert log == ["other"]  # the held key's tasks wait; the worker does not
        assert not second.done()
        stats = pool.stats()
        assert (stats.parked, stats.held_keys, stats.held_tasks) == (1, 1, 1)
        assert stats.pending == 2
        # Cancelling the parked task lets its key go on at once.
        assert first.cancel()
        second.result(TIMEOUT)
        go.set()
    assert log == ["other", "k2"]
    assert first.cancelled()
    stats = pool.stats()
    assert (stats.parked, stats.held_keys, stats.pending, stats.cancelled) == (0, 0, 0, 1)


def test_delayed_tasks_keep_submit_order_within_a_key() -> None:
    # The second task's delay ends first, but it must wait for the first.
    log: list[int] = []
    with KeyedPoolExecutor(4) as pool:
        pool.submit_with("k", log.append, (1,), delay=0.05)
        pool.submit_with("k", log.append, (2,), delay=0.0)
        pool.submit("k", log.append, 3)
    assert log == [1, 2, 3]


def test_an_unkeyed_delayed_task_holds_nothing() -> None:
    with KeyedPoolExecutor(1) as pool:
        parked = pool.submit_with(None, int, ("1",), delay=FOREVER)
        assert pool.submit(None, int, "2").result(TIMEOUT) == 2
        assert pool.stats().held_keys == 0
        assert parked.cancel()


def test_cancel_futures_cancels_parked_and_held_tasks_at_once() -> None:
    pool = KeyedPoolExecutor(2)
    parked = pool.submit_with("k", int, ("1",), delay=FOREVER)
    behind = pool.submit("k", int, "2")
    done = pool.submit("other", int, "3")
    assert done.result(TIMEOUT) == 3
    pool.shutdown(wait=True, cancel_futures=True)  # must not wait an hour
    assert parked.cancelled() and behind.cancelled()
    stats = pool.stats()
    assert (stats.pending, stats.cancelled, stats.completed, stats.parked) == (0, 2, 1, 0)


def test_shutdown_waits_for_a_delayed_task_and_runs_it() -> None:
    pool = KeyedPoolExecutor(2)
    future = pool.submit_with("k", int, ("7",), delay=0.05)
    pool.shutdown(wait=True)
    assert future.result(0) == 7


def test_at_interpreter_exit_parked_tasks_are_cancelled_and_logged() -> None:
    # A task delayed for an hour must not keep the process alive; the exit says so.
    code = (
        "import logging, sys\n"
        "logging.basicConfig(stream=sys.stderr)\n"
        "from keyedpool import KeyedPoolExecutor\n"
        "pool = KeyedPoolExecutor(2)\n"
        "pool.submit_with('k', print, ('never',), delay=3600)\n"
        "pool.submit('k', print, 'after the parked one')\n"
        "pool.submit('other', print, 'ran')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT
    )
    assert done.returncode == 0, done.stderr
    assert "never" not in done.stdout
    # Tasks behind the cancelled one still run: only waiting for time is dropped.
    assert "after the parked one" in done.stdout and "ran" in done.stdout
    assert "1 task(s) waiting for a delay or a retry were cancelled" in done.stderr


@pytest.mark.parametrize("delay", [-1, -0.001, math.nan, math.inf])
def test_a_bad_delay_is_a_clear_error(delay: float) -> None:
    with KeyedPoolExecutor(1) as pool:
        with pytest.raises(ValueError, match="delay must be a finite number"):
            pool.submit_with("k", int, delay=delay)
        with pytest.raises(TypeError, match="delay must be a number"):
            pool.submit_with("k", int, delay="5")  # type: ignore[arg-type]
        assert pool.stats().submitted == 0


# -- retry ----------------------------------------------------------------------


def test_a_retried_task_resolves_with_its_first_success() -> None:
    flaky = Flaky(failures=2)
    with KeyedPoolExecutor(2) as pool:
        future = pool.submit_with("k", flaky, retry=RetryPolicy(attempts=3, backoff=0.001))
        assert future.result(TIMEOUT) == 3
    stats = pool.stats()
    assert (stats.retries, stats.completed, stats.failed, stats.pending) == (2, 1, 0, 0)


def test_a_task_that_keeps_failing_resolves_with_its_last_failure() -> None:
    flaky = Flaky(failures=10)
    with KeyedPoolExecutor(2) as pool:
        future = pool.submit_with("k", flaky, retry=RetryPolicy(attempts=3, backoff=0))
        with pytest.raises(ValueError, match="attempt 3"):
            future.result(TIMEOUT)
    assert flaky.calls == 3
    stats = pool.stats()
    assert (stats.retries, stats.failed, stats.pending) == (2, 1, 0)


def test_only_retry_on_exceptions_are_retried() -> None:
    flaky = Flaky(failures=5, exc=KeyError)
    with KeyedPoolExecutor(2) as pool:
        policy = RetryPolicy(attempts=5, backoff=0, retry_on=(ValueError, OSError))
        with pytest.raises(KeyError):
            pool.submit_with("k", flaky, retry=policy).result(TIMEOUT)
    assert flaky.calls == 1


def test_a_key_waits_for_its_retrying_task_and_no_worker_sleeps_meanwhile() -> None:
    # One worker, a backoff of an hour: other keys run; the key's next task waits.
    log: list[str] = []
    flaky = Flaky(failures=1)
    with KeyedPoolExecutor(1) as pool:
        retrying = pool.submit_with(
            "k", flaky, (log, "k1"), retry=RetryPolicy(attempts=2, backoff=FOREVER)
        )
        after = pool.submit("k", log.append, "k2")
        wait_until(lambda: flaky.calls == 1)
        pool.submit("other", log.append, "other").result(TIMEOUT)
        assert log == ["other"]
        wait_until(lambda: pool.stats().parked == 1)
        assert not retrying.done() and not retrying.running()
        stats = pool.stats()
        assert (stats.retries, stats.held_keys, stats.held_tasks) == (1, 1, 1)
        # Cancelling it while it waits for its retry: the key goes on.
        assert retrying.cancel()
        after.result(TIMEOUT)
    assert log == ["other", "k2"]
    assert flaky.calls == 1
    stats = pool.stats()
    assert (stats.pending, stats.cancelled, stats.completed) == (0, 1, 2)


def test_tasks_behind_a_retrying_task_run_after_its_success_in_order() -> None:
    log: list[Any] = []
    flaky = Flaky(failures=2)
    with KeyedPoolExecutor(4) as pool:
        pool.submit_with("k", flaky, (log, "first"), retry=RetryPolicy(attempts=3, backoff=0.01))
        for i in range(5):
            pool.submit("k", log.append, i)
    assert log == ["first", 0, 1, 2, 3, 4]


def test_unkeyed_tasks_can_be_retried() -> None:
    flaky = Flaky(failures=1)
    with KeyedPoolExecutor(2) as pool:
        future = pool.submit_with(None, flaky, retry=RetryPolicy(attempts=2, backoff=0))
        assert future.result(TIMEOUT) == 2


def test_cancel_futures_does_not_retry_a_running_attempt() -> None:
    started = threading.Event()
    release = threading.Event()
    calls: list[int] = []

    def fail_once_released() -> None:
        calls.append(1)
        started.set()
        release.wait(TIMEOUT)
        raise ValueError("failed")

    pool = KeyedPoolExecutor(2)
    future = pool.submit_with(
        "k", fail_once_released, retry=RetryPolicy(attempts=5, backoff=0)
    )
    behind = pool.submit("k", int, "1")
    assert started.wait(TIMEOUT)
    closer = threading.Thread(target=pool.shutdown, kwargs={"cancel_futures": True})
    closer.start()
    wait_until(lambda: behind.cancelled())
    release.set()
    closer.join(TIMEOUT)
    assert not closer.is_alive()
    assert calls == [1]
    assert future.done() and behind.cancelled()
    assert future.cancelled() or isinstance(future.exception(0), ValueError)
    assert pool.stats().pending == 0


def test_shutdown_without_wait_returns_while_a_task_with_retries_runs() -> None:
    # shutdown(wait=False, cancel_futures=True) must return at once, as the
    # standard library's does, even while a task with retries runs: the pool
    # holds its key until it is resolved, which must not hold up the caller.
    started, release, returned = threading.Event(), threading.Event(), threading.Event()

    def slow() -> int:
        started.set()
        release.wait(TIMEOUT)
        return 1

    pool = KeyedPoolExecutor(2)
    running = pool.submit_with("k", slow, retry=RetryPolicy(attempts=3, backoff=0))
    behind = pool.submit_with("k", int, ("2",), retry=RetryPolicy(attempts=3))
    try:
        assert started.wait(TIMEOUT)

        def close() -> None:
            pool.shutdown(wait=False, cancel_futures=True)
            returned.set()

        threading.Thread(target=close).start()
        assert returned.wait(TIMEOUT), "shutdown(wait=False) waited for the running task"
        assert behind.cancelled() and not running.done()
    finally:
        release.set()
    assert running.result(TIMEOUT) == 1
    pool.shutdown(wait=True)
    assert pool.stats().pending == 0


def test_a_bad_retry_policy_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="attempts must be >= 1"):
        RetryPolicy(attempts=0)
    with pytest.raises(ValueError, match="jitter must be between 0 and 1"):
        RetryPolicy(jitter=2)
    with pytest.raises(TypeError, match="retry_on must be an exception class"):
        RetryPolicy(retry_on=(int,))  # type: ignore[arg-type]
    assert RetryPolicy(retry_on=KeyError).retry_on == (KeyError,)  # type: ignore[arg-type]
    with KeyedPoolExecutor(1) as pool:
        with pytest.raises(TypeError, match="retry must be a keyedpool.RetryPolicy"):
            pool.submit_with("k", int, retry=3)  # type: ignore[arg-type]


def test_jitter_shortens_the_backoff_by_at_most_its_share() -> None:
    policy = RetryPolicy(backoff=1.0, multiplier=2.0, max_backoff=3.0, jitter=0.5)
    assert [policy.delay(n) for n in (1, 2, 3, 4)] == [1.0, 2.0, 3.0, 3.0]
    waits = [policy.wait(2) for _ in range(200)]
    assert all(1.0 <= w <= 2.0 for w in waits)
    assert len(set(waits)) > 1
    assert RetryPolicy(backoff=1.0).wait(1) == 1.0  # no jitter by default


# -- replace --------------------------------------------------------------------


def test_replace_runs_a_burst_of_updates_once_with_the_newest_arguments() -> None:
    log: list[int] = []
    release = threading.Event()
    with KeyedPoolExecutor(1) as pool:
        started = threading.Event()

        def busy() -> None:
            started.set()
            release.wait(TIMEOUT)

        running = pool.submit("k", busy)
        assert started.wait(TIMEOUT)
        updates = [pool.submit_with("k", log.append, (i,), replace=True) for i in range(10)]
        release.set()
        wait(updates, timeout=TIMEOUT)
    assert log == [9]
    assert [u.cancelled() for u in updates] == [True] * 9 + [False]
    assert running.result(0) is None  # the running task was not interrupted
    assert pool._pool.latest == {}  # nothing kept once they ended


def test_replace_never_drops_tasks_submitted_without_it() -> None:
    log: list[str] = []
    release = threading.Event()
    with KeyedPoolExecutor(1) as pool:
        pool.submit("k", release.wait, TIMEOUT)
        pool.submit_with("k", log.append, ("r1",), replace=True)
        pool.submit("k", log.append, "plain")
        pool.submit_with("k", log.append, ("r2",), replace=True)
        release.set()
    assert log == ["plain", "r2"]


def test_replace_does_not_interrupt_a_running_task() -> None:
    started = threading.Event()
    release = threading.Event()
    with KeyedPoolExecutor(2) as pool:

        def first() -> str:
            started.set()
            release.wait(TIMEOUT)
            return "first"

        running = pool.submit_with("k", first, replace=True)
        assert started.wait(TIMEOUT)
        newer = pool.submit_with("k", str, ("second",), replace=True)
        assert not running.cancelled()
        release.set()
        assert (running.result(TIMEOUT), newer.result(TIMEOUT)) == ("first", "second")


def test_delay_with_replace_debounces_a_key() -> None:
    log: list[int] = []
    with KeyedPoolExecutor(2) as pool:
        futures = [
            pool.submit_with("k", log.append, (i,), delay=0.05, replace=True) for i in range(5)
        ]
    assert log == [4]
    assert sum(f.cancelled() for f in futures) == 4
    assert pool.stats().cancelled == 4


def test_replace_needs_a_key() -> None:
    with KeyedPoolExecutor(1) as pool:
        with pytest.raises(ValueError, match="replace=True needs a key"):
            pool.submit_with(None, int, replace=True)
        with pytest.raises(TypeError, match="replace must be True or False"):
            pool.submit_with("k", int, replace="yes")  # type: ignore[arg-type]


# -- asubmit --------------------------------------------------------------------


def test_asubmit_returns_the_result_and_raises_the_exception() -> None:
    async def main(pool: KeyedPoolExecutor) -> tuple[int, BaseException | None]:
        value = await pool.asubmit("k", int, "5")
        try:
            await pool.asubmit("k", int, "x")
        except ValueError as exc:
            return value, exc
        return value, None

    with KeyedPoolExecutor(2) as pool:
        value, exc = asyncio.run(main(pool))
    assert value == 5 and isinstance(exc, ValueError)


def test_asubmit_awaits_room_without_blocking_the_event_loop() -> None:
    release = threading.Event()
    started = threading.Event()

    def hold() -> None:
        started.set()
        release.wait(TIMEOUT)

    async def main(pool: KeyedPoolExecutor) -> list[str]:
        order: list[str] = []
        pool.submit("a", hold)
        assert started.wait(TIMEOUT)
        pool.submit("a", int, "1")  # the pool is full now (max_pending=2)
        waiting = asyncio.ensure_future(pool.asubmit("b", order.append, "submitted"))
        # The loop runs other coroutines while asubmit waits for room.
        await asyncio.sleep(0)
        while len(pool._pool.room_waiters) == 0:
            await asyncio.sleep(0.001)
        order.append("loop ran")
        release.set()
        await asyncio.wait_for(waiting, TIMEOUT)
        return order

    with KeyedPoolExecutor(1, max_pending=2) as pool:
        order = asyncio.run(main(pool))
    assert order == ["loop ran", "submitted"]


def test_asubmit_honours_on_full_raise() -> None:
    release = threading.Event()

    async def main(pool: KeyedPoolExecutor) -> None:
        await pool.asubmit("k", int, "1")

    with KeyedPoolExecutor(1, max_pending=1, on_full="raise") as pool:
        pool.submit("a", release.wait, TIMEOUT)
        with pytest.raises(PoolFull):
            asyncio.run(main(pool))
        release.set()


def test_cancelling_asubmit_cancels_a_task_that_has_not_started() -> None:
    release = threading.Event()
    ran: list[str] = []

    async def main(pool: KeyedPoolExecutor) -> None:
        waiting = asyncio.ensure_future(pool.asubmit("k", ran.append, "queued"))
        while pool.stats().pending < 2:
            await asyncio.sleep(0.001)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting

    with KeyedPoolExecutor(1) as pool:
        blocker = pool.submit("k", release.wait, TIMEOUT)
        asyncio.run(main(pool))
        release.set()
        blocker.result(TIMEOUT)
    assert ran == []
    assert pool.stats().cancelled == 1


def test_cancelling_asubmit_while_it_waits_for_room_passes_the_room_on() -> None:
    # A coroutine cancelled while waiting for room must not swallow the
    # wake-up meant for it: a blocking submit behind it still gets in.
    release = threading.Event()

    async def main(pool: KeyedPoolExecutor) -> None:
        waiting = asyncio.ensure_future(pool.asubmit("b", int, "1"))
        while len(pool._pool.room_waiters) < 1:
            await asyncio.sleep(0.001)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting

    with KeyedPoolExecutor(1, max_pending=1) as pool:
        pool.submit("a", release.wait, TIMEOUT)
        asyncio.run(main(pool))
        assert len(pool._pool.room_waiters) == 0
        blocked = threading.Thread(target=pool.submit, args=("c", int, "2"))
        blocked.start()
        wait_until(lambda: len(pool._pool.room_waiters) == 1)
        release.set()
        blocked.join(TIMEOUT)
        assert not blocked.is_alive()
    assert pool.stats().submitted == 2


# -- everything at once, under hostile thread switching ---------------------------


#: Rounds of the tests below per routing mode (more with KEYEDPOOL_STRESS_ROUNDS).
ROUNDS = max(2, int(os.environ.get("KEYEDPOOL_STRESS_ROUNDS", "60")) // 20)


def stress(test: Callable[..., None]) -> Callable[..., None]:
    """Run *test* ROUNDS times per routing mode, with threads switching as often as possible."""
    test = pytest.mark.parametrize("routing", ["affinity", "hash"])(test)
    test = pytest.mark.parametrize("round_", range(ROUNDS))(test)
    return pytest.mark.usefixtures("fast_switching")(test)


class PerKey:
    """A task body for stress tests: records, per key, which task ran and any overlap."""

    def __init__(self, keys: list[str]) -> None:
        self.lock = threading.Lock()
        # Owner of these three: lock.
        self.ran: dict[str, list[tuple[int, int]]] = {k: [] for k in keys}
        self.active = dict.fromkeys(keys, 0)
        self.overlaps: list[str] = []

    def call(self, key: str, who: int, seq: int, fail: int, calls: list[int]) -> None:
        """Task *seq* of submitter *who*: fails its first *fail* calls (counted in *calls*)."""
        with self.lock:
            self.active[key] += 1
            if self.active[key] > 1:
                self.overlaps.append(key)
        try:
            calls[0] += 1
            if calls[0] <= fail:
                raise ValueError("retry me")
            with self.lock:
                self.ran[key].append((who, seq))
        finally:
            with self.lock:
                self.active[key] -= 1

    def check(self, submitters: int) -> None:
        """No two tasks of a key overlapped; each submitter's tasks of a key ran in its order."""
        assert not self.overlaps
        for key, ran in self.ran.items():
            for who in range(submitters):
                mine = [seq for w, seq in ran if w == who]
                assert mine == sorted(mine), (key, who)


@stress
def test_order_per_key_holds_with_delays_retries_and_replacements(
    routing: str, round_: int
) -> None:
    """Several submitters mix plain, delayed, retried and replacing tasks on few keys.

    For each key: the tasks that ran (the successful attempt of each) ran in
    submit order; no task of a key started while another of its tasks was
    running or waiting for a retry; nothing was lost; the counts add up.
    """
    keys = [f"k{i}" for i in range(6)]
    record = PerKey(keys)
    lock, call, ran = record.lock, record.call, record.ran
    policy = RetryPolicy(attempts=3, backoff=0.0005)

    futures: dict[str, list[tuple[int, int, Any, bool]]] = {k: [] for k in keys}
    failures: dict[tuple[int, int], int] = {}
    barrier = threading.Barrier(4)

    def submitter(who: int, pool: KeyedPoolExecutor) -> None:
        barrier.wait(TIMEOUT)
        for seq in range(150):
            key = keys[(seq * 7 + who) % len(keys)]
            kind = (seq + who) % 5
            calls = [0]
            replace = kind == 4
            if kind == 0:
                f = pool.submit(key, call, key, who, seq, 0, calls)
            elif kind == 1:
                f = pool.submit_with(key, call, (key, who, seq, 0, calls), delay=0.0005)
            elif kind in (2, 3):
                failures[who, seq] = kind - 1
                f = pool.submit_with(key, call, (key, who, seq, kind - 1, calls), retry=policy)
            else:
                f = pool.submit_with(key, call, (key, who, seq, 0, calls), replace=True)
            with lock:
                futures[key].append((who, seq, f, replace))

    with KeyedPoolExecutor(4, routing=routing) as pool:  # type: ignore[arg-type]
        threads = [threading.Thread(target=submitter, args=(w, pool)) for w in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT)
    record.check(submitters=4)
    for key in keys:
        for who, seq, f, replace in futures[key]:
            assert f.done()
            if not replace:
                assert f.result(0) is None  # never dropped, never failed
            elif f.cancelled():
                assert (who, seq) not in ran[key]
    stats = pool.stats()
    total = sum(len(v) for v in futures.values())
    assert stats.submitted == total == stats.completed + stats.cancelled
    assert (stats.pending, stats.failed, stats.parked, stats.held_keys) == (0, 0, 0, 0)
    # Kind 2 fails once and kind 3 twice before they succeed.
    assert stats.retries == sum(failures.values())


@stress
def test_shutdown_without_wait_cancelling_mid_stream_resolves_every_task(
    routing: str, round_: int
) -> None:
    """Submitters keep submitting tasks with retries while another thread shuts down.

    shutdown(wait=False, cancel_futures=True) returns while tasks still run;
    then every future resolves (ran, or cancelled: none is lost or left
    pending), no task of a key overlapped another, and each submitter's tasks
    of a key that ran, ran in its submit order. A task whose attempt was
    running when the shutdown began, and failed, is not retried: it ends
    with that attempt's error (at most one such task per worker).
    """
    keys = [f"k{i}" for i in range(5)]
    record = PerKey(keys)
    lock = record.lock
    futures: list[Any] = []
    policy = RetryPolicy(attempts=3, backoff=0.0002)
    go = threading.Barrier(5)

    pool = KeyedPoolExecutor(3, routing=routing)

    def submitter(who: int) -> None:
        go.wait(TIMEOUT)
        for seq in range(300):
            key = keys[(seq + who) % len(keys)]
            try:
                fail = 1 if seq % 3 == 0 else 0  # every third task fails once
                future = pool.submit_with(key, record.call, (key, who, seq, fail, [0]),
                                          retry=policy)
            except RuntimeError:
                return  # shut down
            with lock:
                futures.append(future)

    threads = [threading.Thread(target=submitter, args=(who,)) for who in range(4)]
    for thread in threads:
        thread.start()
    go.wait(TIMEOUT)
    wait_until(lambda: len(futures) >= 100)
    pool.shutdown(wait=False, cancel_futures=True)
    for thread in threads:
        thread.join(TIMEOUT)
    done, not_done = wait(futures, timeout=TIMEOUT)
    assert not not_done
    pool.shutdown(wait=True)
    record.check(submitters=4)
    failed = [f for f in futures if not f.cancelled() and f.exception(0) is not None]
    assert len(failed) <= 3, [f.exception(0) for f in failed]
    assert all(str(f.exception(0)) == "retry me" for f in failed)
    assert all(f.cancelled() or f in failed or f.result(0) is None for f in futures)
    stats = pool.stats()
    assert stats.pending == 0
    assert stats.submitted == len(futures) == stats.completed + stats.cancelled + stats.failed
    assert stats.failed == len(failed)


@pytest.mark.parametrize("retry", [None, RetryPolicy(attempts=2, backoff=0)])
def test_a_failed_task_is_freed_and_logged_once_without_the_garbage_collector(
    caplog: pytest.LogCaptureFixture, retry: RetryPolicy | None
) -> None:
    # Dropping the future of a failed task frees it at once (no reference
    # cycle through the traceback), and only the last failure is logged.
    flaky = Flaky(failures=10)
    gc.disable()
    try:
        with caplog.at_level(logging.ERROR, logger="keyedpool"):
            with KeyedPoolExecutor(1) as pool:
                future = pool.submit_with("k", flaky, retry=retry)
                wait([future], timeout=TIMEOUT)
            del future
            logged = [r for r in caplog.records if "never retrieved" in r.getMessage()]
    finally:
        gc.enable()
    assert len(logged) == 1
    assert flaky.calls == (1 if retry is None else 2)


def test_cancelled_parked_tasks_are_not_kept_until_their_time() -> None:
    # A burst of long-delayed updates, each replacing the one before: the
    # cancelled ones must not stay in memory for the length of their delay.
    import weakref

    with KeyedPoolExecutor(2) as pool:
        # Due first, so the cancelled ones are not simply at the head of the line.
        pool.submit_with("first", int, ("0",), delay=FOREVER / 2)
        refs = []
        for i in range(300):
            future = pool.submit_with("k", int, (str(i),), delay=FOREVER, replace=True)
            refs.append(weakref.ref(future))
            # Parked before the next one replaces it (not cancelled on its way in).
            wait_until(lambda i=i: pool.stats().cancelled == i and pool.stats().parked == 2)
        del future
        wait_until(lambda: pool.stats().cancelled == 299)
        wait_until(lambda: sum(ref() is not None for ref in refs) < 100)
        assert pool.stats().parked == 2
        pool.shutdown(cancel_futures=True)
