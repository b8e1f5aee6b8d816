"""Each test here reproduces a way the pool once lost work, hung or crashed.

Hostile keys, futures waited on from several threads, shutdown racing the
threads it joins, forks, signals, threads that cannot start, a task that waits
for itself. Each test failed on the version before the fix it checks.
"""

from __future__ import annotations

import asyncio
import contextvars
import gc
import json
import logging
import os
import signal
import sys
import threading
import time
import weakref
from concurrent.futures import Future, as_completed, wait
from typing import Any

import mmh3
import pytest
from _util import TIMEOUT

import keyedpool._process
from keyedpool import (
    BrokenKeyedPool,
    DeadlockError,
    KeyedPoolExecutor,
    PoolFull,
    key_bytes,
)
from keyedpool.contrib.consumer import shard_of  # (no broker client needed)

# -- 1. keys ---------------------------------------------------------------------


def test_a_key_with_a_lone_surrogate_routes_and_shards() -> None:
    key = json.loads('"user-\\ud800"')  # what a web request can send
    assert key_bytes(key) == key.encode("utf-8", "surrogatepass")
    with KeyedPoolExecutor(4, routing="hash") as pool:
        assert pool.submit(key, str.upper, "ok").result(TIMEOUT) == "OK"
        assert pool.worker_index(key) == mmh3.hash(key_bytes(key), 0, False) % 4
    assert shard_of(key, 8) == (mmh3.hash(key_bytes(key), 0, False) * 8) >> 32
    # Routing and sharding hash the same bytes for every kind of key.
    for other in ("order-1", "é", b"\xff", 42):
        assert shard_of(other, 8) == (mmh3.hash(key_bytes(other), 0, False) * 8) >> 32
    assert key_bytes(42) == key_bytes("42") == b"42"


# -- 2. wait() / as_completed() from several threads --------------------------------


def test_no_two_futures_share_a_lock() -> None:
    # concurrent.futures.wait() locks its futures' conditions in id() order,
    # which is a deadlock-free order only if no two futures share a lock.
    with KeyedPoolExecutor(2) as pool:
        futures = [pool.submit(None, int, i) for i in range(200)]
        assert len({id(f._condition) for f in futures}) == len(futures)
        wait(futures, timeout=TIMEOUT)


def test_two_threads_waiting_on_the_same_futures_never_deadlock(fast_switching: None) -> None:
    with KeyedPoolExecutor(4) as pool:
        for _ in range(100):
            futures = [pool.submit(f"k{i % 7}", time.sleep, 0) for i in range(40)]
            ends: list[Future[Any]] = []
            errors: list[BaseException] = []

            def waiter(order: list[Future[Any]]) -> None:
                try:
                    wait(order, timeout=TIMEOUT)
                    list(as_completed(order, timeout=TIMEOUT))
                except BaseException as exc:  # a timeout here means a deadlock
                    errors.append(exc)

            threads = [
                threading.Thread(target=waiter, args=(futures,)),
                threading.Thread(target=waiter, args=(futures[::-1],)),
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join(TIMEOUT)
                assert not t.is_alive(), "wait() deadlocked"
            assert not errors, errors
            ends.extend(futures)
            assert all(f.done() for f in ends)


# -- 3. shutdown(wait=True) ------------------------------------------------------------


def _pool_threads(prefix: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(prefix) and t.is_alive()]


def test_leaving_with_waits_for_every_task_and_thread(fast_switching: None) -> None:
    for cycle in range(150):
        prefix = f"burst{cycle}"
        with KeyedPoolExecutor(8, thread_name_prefix=prefix) as pool:
            futures = [pool.submit(None if i % 3 else f"k{i}", int, i) for i in range(30)]
        assert all(f.done() for f in futures), f"cycle {cycle}: futures not done"
        assert not _pool_threads(prefix + "_"), f"cycle {cycle}: a thread outlived shutdown"


# -- 4. fork --------------------------------------------------------------------------


def _run_in_child(child: Any) -> int:
    """Fork; run *child()* in the child (its return value is the exit code)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 99
        try:
            code = child()
        finally:
            os._exit(code)
    deadline = time.monotonic() + TIMEOUT
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return -1  # the child hung
        time.sleep(0.01)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_fork_while_the_first_submit_starts_the_dispatcher(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pool = KeyedPoolExecutor(2, thread_name_prefix="forkstart")
    real_start = threading.Thread.start
    codes: list[int] = []
    parent = os.getpid()

    def start_after_forking(thread: threading.Thread) -> None:
        # Another thread forks at this very moment: the child gets the pool
        # half-way through starting its dispatcher.
        if thread.name == "forkstart_dispatcher" and not codes and os.getpid() == parent:
            codes.append(_run_in_child(lambda: 0 if pool.submit("k", int, 7).result(5) == 7 else 1))
        real_start(thread)

    monkeypatch.setattr(threading.Thread, "start", start_after_forking)
    assert pool.submit("k", int, 1).result(TIMEOUT) == 1
    pool.shutdown()
    assert codes == [0], "the child's pool hung or failed"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_shutdown_in_a_forked_child_joins_every_thread() -> None:
    with KeyedPoolExecutor(4, thread_name_prefix="forkjoin") as pool:
        assert pool.submit("a", int, 1).result(TIMEOUT) == 1

        def child() -> int:
            for _ in range(20):
                futures = [pool.submit(None if i % 2 else i, int, i) for i in range(20)]
                wait(futures, timeout=5)
            pool.shutdown(wait=True)
            alive = _pool_threads("forkjoin_")
            return 0 if not alive and all(f.done() for f in futures) else 1

        assert _run_in_child(child) == 0


def test_a_pool_is_ready_for_a_fork_before_its_first_submit() -> None:
    pool = KeyedPoolExecutor(2)
    assert pool._pool in keyedpool._process._pools
    pool.shutdown()


# -- 5. threads that cannot start, and KeyboardInterrupt --------------------------------


def _refuse_threads(monkeypatch: pytest.MonkeyPatch, refuse: Any) -> None:
    """Make Thread.start() fail like a container at its pid limit, for threads *refuse* names."""
    real_start = threading.Thread.start

    def start(thread: threading.Thread) -> None:
        if refuse(thread.name):
            raise RuntimeError("can't start new thread")
        real_start(thread)

    monkeypatch.setattr(threading.Thread, "start", start)


def test_a_worker_that_cannot_start_does_not_stop_the_pool(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _refuse_threads(monkeypatch, lambda name: name == "refused_1")
    with KeyedPoolExecutor(2, thread_name_prefix="refused", routing="hash") as pool:
        keys = [f"k{i}" for i in range(40)]
        assert {pool.worker_index(k) for k in keys} == {0, 1}
        with caplog.at_level(logging.ERROR, logger="keyedpool"):
            futures = {k: [pool.submit(k, int, i) for i in range(5)] for k in keys}
            futures[None] = [pool.submit(None, int, i) for i in range(5)]  # type: ignore[index]
            for fs in futures.values():
                assert [f.result(TIMEOUT) for f in fs] == list(range(5))
    assert "could not start worker thread refused_1" in caplog.text


def test_when_no_worker_can_start_tasks_fail_instead_of_hanging(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _refuse_threads(monkeypatch, lambda name: name.startswith("nothread_") and "disp" not in name)
    with KeyedPoolExecutor(2, thread_name_prefix="nothread") as pool:
        keyed = pool.submit("k", int, 1)
        with pytest.raises(RuntimeError, match="no worker thread could be started"):
            keyed.result(TIMEOUT)
        with pytest.raises(RuntimeError, match="can't start a worker thread"):
            pool.submit(None, int, 1)
        monkeypatch.undo()  # the system has threads again
        assert pool.submit(None, int, 2).result(TIMEOUT) == 2
        assert pool.submit("k", int, 3).result(TIMEOUT) == 3


@pytest.mark.parametrize("which", ["dispatcher", "worker"])
def test_keyboard_interrupt_while_submit_starts_a_thread(
    monkeypatch: pytest.MonkeyPatch, which: str
) -> None:
    real_start = threading.Thread.start
    interrupted: list[str] = []

    def is_target(name: str) -> bool:
        if which == "dispatcher":
            return name == "kbd_dispatcher"
        return name.startswith("kbd_") and name != "kbd_dispatcher"

    def start(thread: threading.Thread) -> None:
        real_start(thread)  # the thread runs, but start() is interrupted
        in_submit = threading.current_thread() is threading.main_thread()
        if in_submit and is_target(thread.name) and not interrupted:
            interrupted.append(thread.name)
            raise KeyboardInterrupt

    release = threading.Event()
    busy_started = threading.Event()
    monkeypatch.setattr(threading.Thread, "start", start)
    with KeyedPoolExecutor(2, thread_name_prefix="kbd") as pool:
        accepted = 0
        if which == "worker":
            # Keep the one started worker busy, so the unkeyed submit starts one.
            pool.submit("busy", lambda: busy_started.set() or release.wait(TIMEOUT))
            accepted = 1
            assert busy_started.wait(TIMEOUT)
        with pytest.raises(KeyboardInterrupt):
            pool.submit(None, int, 1)
        assert interrupted
        assert pool.stats().submitted == accepted  # the interrupted submit accepted nothing
        futures = [pool.submit(None, int, i) for i in range(10)]
        assert [f.result(TIMEOUT) for f in futures] == list(range(10))
        release.set()
    stats = pool.stats()
    assert stats.pending == 0 and stats.submitted == accepted + 10


@pytest.mark.skipif(
    sys.version_info >= (3, 13),
    reason="from CPython 3.13 a signal handler's exception can be raised between a "
    "lock's __enter__ and the with block, so `with lock:` itself can leak the lock; "
    "no Python code can close that window (the tests above cover submit's own windows)",
)
@pytest.mark.filterwarnings(
    # An interrupt that lands in a garbage-collector callback (hypothesis installs
    # one) is printed and dropped by Python: that submit is simply not interrupted.
    "ignore::pytest.PytestUnraisableExceptionWarning"
)
def test_keyboard_interrupts_anywhere_in_submit_lose_nothing() -> None:
    # Interrupt a submit loop at random points, as Ctrl-C would, on a pool that
    # is often full (so many interrupts land while submit waits for room, or
    # takes the pool's lock back after waiting). Whatever a submit accepted
    # must run; whatever it did not must not be counted; the pool's lock must
    # never be left held or released twice (this once raised "release unlocked
    # lock"), and no wake-up may be lost: another thread's submits, which wait
    # for room too, must all get in.
    armed = [False]

    def interrupt(signum: int, frame: object) -> None:
        if armed[0]:
            armed[0] = False  # at most one interrupt per submit
            raise KeyboardInterrupt

    futures: list[Future[Any]] = []
    others: list[Future[Any]] = []
    interrupts = 0
    old = signal.signal(signal.SIGVTALRM, interrupt)
    pool = KeyedPoolExecutor(4, max_pending=20)
    stop = threading.Event()

    def other_submitter() -> None:
        while not stop.is_set():
            others.append(pool.submit("other", int, 1))

    other = threading.Thread(target=other_submitter)
    other.start()
    try:
        signal.setitimer(signal.ITIMER_VIRTUAL, 0.0002, 0.0002)
        # Until enough interrupts landed (each lands wherever the submit is),
        # with an upper bound so that a timer that never fires fails the test.
        i = 0
        while interrupts < 200 and i < 300_000:
            i += 1
            try:
                armed[0] = True
                futures.append(pool.submit(None if i % 3 == 0 else f"k{i % 5}", int, i))
                armed[0] = False
            except KeyboardInterrupt:
                interrupts += 1
    finally:
        armed[0] = False
        signal.setitimer(signal.ITIMER_VIRTUAL, 0)
        signal.signal(signal.SIGVTALRM, old)
        stop.set()
        other.join(TIMEOUT)
        pool.shutdown(wait=True)
    assert not other.is_alive(), "a submit waiting for room was never woken"
    stats = pool.stats()
    assert interrupts == 200
    assert all(f.done() for f in futures + others)
    assert stats.pending == 0
    assert stats.submitted == stats.completed + stats.failed + stats.cancelled
    assert stats.submitted >= len(futures) + len(others)


# -- 6. unkeyed work never waits while a worker is free ---------------------------------


def test_unkeyed_task_runs_while_the_other_worker_is_busy(fast_switching: None) -> None:
    for _ in range(100):
        release = threading.Event()
        with KeyedPoolExecutor(3, routing="hash") as pool:
            busy_key = "busy"
            other = next(
                k
                for k in (f"k{i}" for i in range(100))
                if pool.worker_index(k) != pool.worker_index(busy_key)
            )
            busy = pool.submit(busy_key, release.wait, TIMEOUT)
            try:
                # Runs on a free (or new) worker, never behind the busy one.
                assert pool.submit(None, int, 4).result(TIMEOUT) == 4
                # A keyed task that waits for an unkeyed one: the third worker runs it.
                waits = pool.submit(other, lambda: pool.submit(None, int, 5).result(TIMEOUT))
                assert waits.result(TIMEOUT) == 5
            finally:
                release.set()
            assert busy.result(TIMEOUT) is True


def test_unkeyed_task_whose_new_worker_got_keyed_work_runs_on_another(
    fast_switching: None,
) -> None:
    # A worker started for an unkeyed task can get keyed work first (here, the
    # key routes to the very worker that submit starts first); then another
    # worker must start and take the unkeyed task, not wait behind the key.
    for _ in range(50):
        release = threading.Event()
        with KeyedPoolExecutor(2, routing="hash") as pool:
            key = next(k for k in (f"k{i}" for i in range(100)) if pool.worker_index(k) == 0)
            busy = pool.submit(key, release.wait, TIMEOUT)
            behind = [pool.submit(key, int, n) for n in range(5)]
            try:
                assert pool.submit(None, int, 4).result(TIMEOUT) == 4
                assert not busy.done()
            finally:
                release.set()
            assert [f.result(TIMEOUT) for f in behind] == list(range(5))


def test_a_worker_whose_result_was_seen_is_reused_by_the_next_submit(
    fast_switching: None,
) -> None:
    # ThreadPoolExecutor's promise (and CPython's test_idle_thread_reuse): a
    # caller that waits for each result before the next submit needs one thread.
    # The worker must be free before the caller can see the result, not after.
    for _ in range(50):
        with KeyedPoolExecutor(8) as pool:
            for n in range(20):
                assert pool.submit(None, int, n).result(TIMEOUT) == n
            assert len(pool._pool.threads) == 1  # worker threads started


def test_a_done_callback_waiting_for_a_new_unkeyed_task_does_not_hang() -> None:
    # A worker becomes free before its future resolves, but not when a
    # done-callback will run on it: the callback may block, as this one does.
    for _ in range(20):
        with KeyedPoolExecutor(2) as pool:
            go, called = threading.Event(), threading.Event()
            got: list[int] = []

            def callback(_: object) -> None:
                got.append(pool.submit(None, int, 7).result(TIMEOUT))
                called.set()

            task = pool.submit(None, go.wait, TIMEOUT)
            task.add_done_callback(callback)
            go.set()
            assert task.result(TIMEOUT) is True
            assert called.wait(TIMEOUT)  # (before the pool shuts down)
        assert got == [7]


# -- 9. contextvars do not leak through thread starts -----------------------------------

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


def test_a_worker_does_not_inherit_the_context_of_the_submit_that_started_it() -> None:
    with KeyedPoolExecutor(1, copy_context=False) as pool:
        token = request_id.set("request-1")
        try:
            pool.submit("k", int, 0).result(TIMEOUT)  # starts the worker thread
        finally:
            request_id.reset(token)
        seen: list[str] = []

        def from_another_thread() -> None:
            seen.append(pool.submit("k", request_id.get).result(TIMEOUT))

        t = threading.Thread(target=from_another_thread)
        t.start()
        t.join(TIMEOUT)
        assert seen == ["-"]


# -- 10. memory -----------------------------------------------------------------------


class _Big:
    pass


def test_an_idle_pool_holds_no_finished_future() -> None:
    freed = threading.Event()
    with KeyedPoolExecutor(2) as pool:
        for key in ("k", None):
            freed.clear()

            def make() -> _Big:
                big = _Big()
                weakref.finalize(big, freed.set)
                return big

            future = pool.submit(key, make)
            result = future.result(TIMEOUT)
            del future, result
            gc.collect()
            assert freed.wait(TIMEOUT), f"key={key!r}: the idle pool still holds the result"


def test_cancel_futures_while_a_worker_is_part_way_through_a_batch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A worker clears the slot of each task it finished in the batch it runs,
    # so that the task can be freed; shutdown(cancel_futures=True) once tried
    # to cancel those empty slots and raised AttributeError.
    from keyedpool._pool import Pool

    take_inbox = Pool.take_inbox
    gate = threading.Event()
    calls: list[int] = []

    def gated(self: Pool, *args: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:
            gate.wait(TIMEOUT)  # so the next three tasks go in one batch
        return take_inbox(self, *args)

    monkeypatch.setattr(Pool, "take_inbox", gated)
    first, second, running = threading.Event(), threading.Event(), threading.Event()
    pool = KeyedPoolExecutor(1)
    try:
        pool.submit("k", first.wait, TIMEOUT)
        done = pool.submit("k", int, 1)
        blocked = pool.submit("k", lambda: (running.set(), second.wait(TIMEOUT))[1])
        later = pool.submit("k", int, 3)
        gate.set()
        first.set()
        assert running.wait(TIMEOUT)
        pool.shutdown(wait=False, cancel_futures=True)
        assert done.result(TIMEOUT) == 1 and later.cancelled() and not blocked.cancelled()
    finally:
        gate.set()
        first.set()
        second.set()
        pool.shutdown(wait=True)
    assert blocked.result(TIMEOUT) is True


# -- 11. a done-callback that raises SystemExit ------------------------------------------


def test_systemexit_from_a_callback_of_a_task_failed_by_a_broken_pool() -> None:
    started = threading.Event()

    def init() -> None:
        if threading.current_thread().name.endswith("_0"):
            started.wait(TIMEOUT)
            raise ValueError("bad initializer")

    def exit_now(f: Future[Any]) -> None:
        raise SystemExit

    pool = KeyedPoolExecutor(1, initializer=init, thread_name_prefix="broken")
    try:
        futures = [pool.submit("k", int, i) for i in range(5)]
        futures[0].add_done_callback(exit_now)
        started.set()
        for f in futures:
            with pytest.raises(BrokenKeyedPool):
                f.result(TIMEOUT)
    finally:
        pool.shutdown()


# -- 12. waits that can never end raise instead --------------------------------------------


def test_a_task_waiting_for_a_later_task_of_its_key_raises() -> None:
    with KeyedPoolExecutor(4) as pool:
        later: list[Future[Any]] = []

        def first() -> Any:
            later.append(pool.submit("k", int, 2))
            return later[0].result(TIMEOUT)

        outer = pool.submit("k", first)
        with pytest.raises(DeadlockError, match="add_done_callback") as info:
            outer.result(TIMEOUT)
        assert "same key" in str(info.value)
        assert later[0].result(TIMEOUT) == 2  # the later task still runs, afterwards


def test_a_task_waiting_for_a_key_that_shares_its_worker_raises() -> None:
    with KeyedPoolExecutor(4, routing="hash") as pool:  # keys share a worker only by hash
        mine = "k0"
        neighbour = next(
            k
            for k in (f"k{i}" for i in range(1, 1000))
            if pool.worker_index(k) == pool.worker_index(mine)
        )
        elsewhere = next(
            k
            for k in (f"k{i}" for i in range(1, 1000))
            if pool.worker_index(k) != pool.worker_index(mine)
        )
        assert (
            pool.submit(mine, lambda: pool.submit(elsewhere, int, 3).result(TIMEOUT)).result(
                TIMEOUT
            )
            == 3
        )  # another worker: an ordinary wait
        outer = pool.submit(mine, lambda: pool.submit(neighbour, int, 4).result(TIMEOUT))
        with pytest.raises(DeadlockError, match="shares that worker"):
            outer.result(TIMEOUT)


def test_a_task_waiting_for_an_unkeyed_task_on_a_one_worker_pool_raises() -> None:
    with KeyedPoolExecutor(1) as pool:
        outer = pool.submit("k", lambda: pool.submit(None, int, 1).exception(TIMEOUT))
        with pytest.raises(DeadlockError, match="max_workers is 1"):
            outer.result(TIMEOUT)


def test_a_task_submitting_into_its_own_full_pool_raises_instead_of_freezing_it() -> None:
    release = threading.Event()
    with KeyedPoolExecutor(2, max_pending=2) as pool:
        blocked = pool.submit("a", release.wait, TIMEOUT)

        def producer() -> Any:
            return pool.submit("c", int, 1)  # the pool is full: 2 pending

        outer = pool.submit("b", producer)
        with pytest.raises(PoolFull, match="from a task running on the same pool") as info:
            outer.result(TIMEOUT)
        # It was a blocking submit: no advice to let it wait for room.
        assert "on_full='block'" not in str(info.value)
        release.set()
        assert blocked.result(TIMEOUT) is True


# -- 13. Future internals ---------------------------------------------------------------------


def test_a_task_has_every_attribute_future_init_makes() -> None:
    # Task does not call Future.__init__ (see keyedpool/_task.py); this fails the
    # day CPython's Future grows an attribute that Task does not provide.
    with KeyedPoolExecutor(1) as pool:
        task = pool.submit("k", int, 1)
        task.result(TIMEOUT)
        for name in vars(Future()):
            assert hasattr(task, name), name
        cond = task._condition
        for method in ("acquire", "release", "__enter__", "__exit__", "wait", "notify_all"):
            assert callable(getattr(cond, method)), method


def test_a_task_is_one_object_for_the_garbage_collector() -> None:
    # A caller may hold many thousands of futures, and the garbage collector
    # walks every object they keep each time it runs: one more object per task
    # cost about a quarter of the no-op throughput. So a finished task keeps
    # nothing of its own (no __dict__, no separate condition object).
    with KeyedPoolExecutor(1) as pool:
        done = pool.submit("k", int, 1)
        assert done.result(TIMEOUT) == 1
        own = [o for o in gc.get_referents(done) if gc.is_tracked(o) and o is not type(done)]
        # Only the pool it belongs to, shared by all its tasks: no __dict__, no list.
        assert own == [pool._pool], own
        assert done._condition is done  # its own lock, shared with no other future
        done.custom = "x"  # type: ignore[attr-defined]  # a Future takes attributes
        assert done.custom == "x"  # type: ignore[attr-defined]


def test_appending_to_done_callbacks_directly_is_not_lost() -> None:
    release = threading.Event()
    called: list[Future[Any]] = []
    with KeyedPoolExecutor(1) as pool:
        task = pool.submit("k", release.wait, TIMEOUT)
        task._done_callbacks.append(called.append)
        release.set()
        task.result(TIMEOUT)
    assert called == [task]


def test_asyncio_delivering_an_exception_counts_as_retrieving_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main(pool: KeyedPoolExecutor) -> BaseException | None:
        try:
            await asyncio.wrap_future(pool.submit("k", int, "x"))
        except ValueError as exc:
            return exc
        return None

    with caplog.at_level(logging.ERROR, logger="keyedpool"):
        with KeyedPoolExecutor(1) as pool:
            assert isinstance(asyncio.run(main(pool)), ValueError)
        gc.collect()
    assert "never retrieved" not in caplog.text
