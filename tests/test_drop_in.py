"""keyedpool.ThreadPoolExecutor behaves like concurrent.futures.ThreadPoolExecutor.

(CPython's own tests for it run in test_stdlib_suite.py; these are ours, one per
documented behaviour, plus the keyed extras and the per-key Executor views.)
"""

from __future__ import annotations

import asyncio
import os
import threading
import weakref
from concurrent.futures import BrokenExecutor, CancelledError, Executor, TimeoutError, wait
from concurrent.futures.thread import BrokenThreadPool

import pytest
from _util import TIMEOUT
from test_lifecycle import pool_threads, run_script

import keyedpool
from keyedpool import KeyedPoolExecutor, ThreadPoolExecutor


def test_it_is_an_executor_with_the_standard_constructor() -> None:
    def init(tag: str) -> None:
        threading.current_thread().tag = tag  # type: ignore[attr-defined]

    ex = ThreadPoolExecutor(3, "io", init, ("ready",))
    try:
        assert isinstance(ex, Executor)
        assert ex.submit(lambda: threading.current_thread().tag).result(TIMEOUT) == "ready"
        assert ex.submit(lambda: threading.current_thread().name).result(TIMEOUT).startswith("io_")
        assert ex.pool.max_workers == 3
    finally:
        ex.shutdown()


def test_default_max_workers_is_the_standard_one() -> None:
    cpus = getattr(os, "process_cpu_count", os.cpu_count)() or 1
    with ThreadPoolExecutor() as ex:
        assert ex.pool.max_workers == min(32, cpus + 4)
        assert ex._max_workers == ex.pool.max_workers


@pytest.mark.parametrize("bad", [0, -1])
def test_max_workers_must_be_positive(bad: int) -> None:
    with pytest.raises(ValueError, match="max_workers must be greater than 0"):
        ThreadPoolExecutor(bad)


def test_initializer_must_be_callable() -> None:
    with pytest.raises(TypeError, match="initializer must be a callable"):
        ThreadPoolExecutor(1, initializer=42)  # type: ignore[arg-type]


def test_submit_takes_fn_positionally_only() -> None:
    with ThreadPoolExecutor(2) as ex:
        assert ex.submit(pow, 2, exp=5).result(TIMEOUT) == 32
        with pytest.raises(TypeError):
            ex.submit(fn=pow)  # type: ignore[call-arg]


def test_map_with_timeout_and_chunksize() -> None:
    release = threading.Event()
    with ThreadPoolExecutor(2) as ex:
        assert list(ex.map(pow, [2, 3], [3, 2], chunksize=5)) == [8, 9]
        results = ex.map(release.wait, [TIMEOUT], timeout=0.01)
        with pytest.raises(TimeoutError):
            next(results)
        release.set()


def test_queue_is_unbounded_like_the_standard_pool() -> None:
    release = threading.Event()
    with ThreadPoolExecutor(1) as ex:
        ex.submit(release.wait, TIMEOUT)
        # Far past KeyedPoolExecutor's default max_pending (workers x 100).
        futures = [ex.submit(int, i) for i in range(5000)]
        assert not any(f.done() for f in futures)
        release.set()
        assert [f.result(TIMEOUT) for f in futures] == list(range(5000))


def test_shutdown_semantics() -> None:
    release = threading.Event()
    started = threading.Event()
    ex = ThreadPoolExecutor(1, thread_name_prefix="dropin")

    def first() -> None:
        started.set()
        release.wait(TIMEOUT)

    running = ex.submit(first)
    assert started.wait(TIMEOUT)
    queued = [ex.submit(int, i) for i in range(10)]
    ex.shutdown(wait=False, cancel_futures=True)
    assert all(f.cancelled() for f in queued)
    with pytest.raises(RuntimeError, match="cannot schedule new futures after shutdown"):
        ex.submit(int)
    release.set()
    ex.shutdown(wait=True)
    assert running.done() and not running.cancelled()
    assert pool_threads("dropin_") == []
    with pytest.raises(CancelledError):
        queued[0].result()


def test_failing_initializer_gives_broken_thread_pool() -> None:
    def boom() -> None:
        raise RuntimeError("init failed")

    ex = ThreadPoolExecutor(2, initializer=boom)
    try:
        f = ex.submit(int, 1)
        assert isinstance(f.exception(TIMEOUT), BrokenThreadPool)
        with pytest.raises(BrokenExecutor):
            ex.submit(int, 2)
        assert ex._broken
    finally:
        ex.shutdown()


def test_queued_work_finishes_at_interpreter_exit_and_late_submit_raises() -> None:
    proc = run_script("""
        import atexit, os, threading
        from keyedpool import ThreadPoolExecutor
        ex = ThreadPoolExecutor(2)
        gate = threading.Event()
        ex.submit(gate.wait)
        for i in range(20):
            # one write per line: two workers print at once
            ex.submit(os.write, 1, b"item %d\\n" % i)
        gate.set()
        @atexit.register
        def late():
            try:
                ex.submit(print, "too late")
            except RuntimeError as exc:
                print("refused:", exc, flush=True)
    """)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert sorted(ln for ln in lines if ln.startswith("item")) == sorted(
        f"item {i}" for i in range(20)
    )
    assert "refused: cannot schedule new futures after interpreter shutdown" in lines
    assert "too late" not in proc.stdout


def test_workers_drop_finished_calls() -> None:
    class Payload:
        def run(self) -> int:
            return 7

    with ThreadPoolExecutor(1) as ex:
        payload = Payload()
        gone = threading.Event()
        ref = weakref.ref(payload, lambda _: gone.set())
        future = ex.submit(payload.run)
        del payload
        assert future.result(TIMEOUT) == 7
        assert gone.wait(TIMEOUT) and ref() is None


def test_unretrieved_exceptions_are_not_logged_by_default(caplog: pytest.LogCaptureFixture) -> None:
    # As the standard pool; KeyedPoolExecutor logs them (log_unretrieved=True).
    with ThreadPoolExecutor(1) as ex:
        f = ex.submit(int, "x")
        wait([f], timeout=TIMEOUT)
    del f
    assert "never retrieved" not in caplog.text


def test_keyed_tasks_on_the_same_threads() -> None:
    seen: list[int] = []
    with ThreadPoolExecutor(4) as ex:
        futures = [ex.submit_keyed("acct-1", seen.append, i) for i in range(500)]
        futures.append(ex.submit(int, 3))
        wait(futures, timeout=TIMEOUT)
        assert ex.pool.stats().completed == 501
    assert seen == list(range(500))


def test_per_key_view_runs_its_tasks_in_order_and_stops_alone() -> None:
    seen: list[int] = []
    with KeyedPoolExecutor(4) as pool:
        serial = pool.executor("user-42")
        assert isinstance(serial, Executor) and isinstance(serial, keyedpool.KeyExecutor)
        assert serial.key == "user-42" and serial.pool is pool
        futures = [serial.submit(seen.append, i) for i in range(300)]
        serial.shutdown(wait=True)  # waits for the view's own tasks
        assert all(f.done() for f in futures)
        assert seen == list(range(300))
        with pytest.raises(RuntimeError, match="after shutdown"):
            serial.submit(int)
        # The shared pool keeps running, and other views too.
        assert pool.executor().submit(int, "5").result(TIMEOUT) == 5
        assert list(pool.executor("other").map(abs, [-1, -2])) == [1, 2]


def test_view_shutdown_can_cancel_its_own_queued_tasks_only() -> None:
    release = threading.Event()
    started = threading.Event()

    def block() -> bool:
        started.set()
        return release.wait(TIMEOUT)

    with KeyedPoolExecutor(2) as pool:
        view = pool.executor("k")
        blocker = view.submit(block)
        assert started.wait(TIMEOUT)
        queued = [view.submit(int, i) for i in range(5)]
        others = [pool.submit("k", int, 9)]
        view.shutdown(wait=False, cancel_futures=True)
        assert all(f.cancelled() for f in queued)
        release.set()
        assert blocker.result(TIMEOUT) is True
        assert others[0].result(TIMEOUT) == 9


def test_view_rejects_a_bad_key() -> None:
    with KeyedPoolExecutor(1) as pool, pytest.raises(TypeError):
        pool.executor(1.5)  # type: ignore[arg-type]


def test_asyncio_run_in_executor_keeps_order_per_key_view() -> None:
    started: list[int] = []
    active = [0]
    overlaps = [0]
    lock = threading.Lock()

    def record(n: int) -> int:
        with lock:
            active[0] += 1
            overlaps[0] += active[0] > 1
            started.append(n)
        threading.Event().wait(0)
        with lock:
            active[0] -= 1
        return n

    async def main(serial: Executor) -> list[int]:
        loop = asyncio.get_running_loop()
        submitted: list[int] = []
        gate = asyncio.Event()

        async def one(n: int) -> int:
            await gate.wait()
            submitted.append(n)  # run_in_executor submits synchronously, right here
            return await loop.run_in_executor(serial, record, n)

        tasks = [asyncio.ensure_future(one(n)) for n in range(1000)]
        await asyncio.sleep(0)
        gate.set()
        results = await asyncio.gather(*tasks)
        assert started == submitted
        return results

    with KeyedPoolExecutor(8) as pool:
        results = asyncio.run(main(pool.executor("user-42")))
    assert sorted(results) == list(range(1000))
    assert len(started) == 1000 and overlaps[0] == 0


def test_asyncio_default_executor_through_loop_shutdown() -> None:
    ex = ThreadPoolExecutor(4, thread_name_prefix="aio")

    async def main() -> list[str]:
        loop = asyncio.get_running_loop()
        loop.set_default_executor(ex)
        names = await asyncio.gather(
            *(
                loop.run_in_executor(None, lambda: threading.current_thread().name)
                for _ in range(50)
            )
        )
        return list(names)

    names = asyncio.run(main())  # closes the loop: shutdown_default_executor()
    assert all(n.startswith("aio_") for n in names)
    with pytest.raises(RuntimeError):
        ex.submit(int)
    assert pool_threads("aio_") == []


def test_context_is_not_copied_unless_asked_like_the_standard_pool() -> None:
    import contextvars

    var: contextvars.ContextVar[str] = contextvars.ContextVar("dropin_var", default="unset")
    token = var.set("submitter")
    try:
        with ThreadPoolExecutor(1) as plain, ThreadPoolExecutor(1, copy_context=True) as copying:
            assert plain.submit(var.get).result(TIMEOUT) == "unset"
            assert copying.submit(var.get).result(TIMEOUT) == "submitter"
    finally:
        var.reset(token)
