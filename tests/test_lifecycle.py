"""Lifecycle as in the standard library: shutdown, with, initializer, names, exit, fork."""

from __future__ import annotations

import gc
import logging
import os
import subprocess
import sys
import textwrap
import threading
from concurrent.futures import BrokenExecutor, CancelledError, wait
from concurrent.futures.thread import BrokenThreadPool

import pytest
from _util import TIMEOUT, wait_until

from keyedpool import BrokenKeyedPool, KeyedPoolExecutor


def pool_threads(prefix: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(prefix)]


def test_shutdown_wait_drains_and_leaves_no_thread() -> None:
    pool = KeyedPoolExecutor(4, thread_name_prefix="drain")
    futures = [pool.submit(i % 3, int, i) for i in range(1000)]
    assert pool_threads("drain_")
    pool.shutdown(wait=True)
    assert all(f.done() for f in futures)
    assert [f.result() for f in futures] == list(range(1000))
    assert pool_threads("drain_") == []


def test_thread_names_show_prefix_and_worker_index() -> None:
    with KeyedPoolExecutor(3, thread_name_prefix="mail", routing="hash") as pool:
        names = {
            pool.submit(k, lambda: threading.current_thread().name).result() for k in range(30)
        }
        key_worker = pool.worker_index(7)
        assert (
            pool.submit(7, lambda: threading.current_thread().name).result() == f"mail_{key_worker}"
        )
        assert {t.name for t in pool_threads("mail_")} == {
            "mail_0",
            "mail_1",
            "mail_2",
            "mail_dispatcher",
        }
    assert names <= {"mail_0", "mail_1", "mail_2"}


def test_default_thread_names_are_unique_per_pool() -> None:
    with KeyedPoolExecutor(1) as a, KeyedPoolExecutor(1) as b:
        na = a.submit(None, lambda: threading.current_thread().name).result()
        nb = b.submit(None, lambda: threading.current_thread().name).result()
    assert na.startswith("KeyedPool-") and nb.startswith("KeyedPool-") and na != nb


def test_submit_after_shutdown_raises_runtime_error() -> None:
    pool = KeyedPoolExecutor(2)
    pool.shutdown()
    with pytest.raises(RuntimeError, match="cannot schedule new futures after shutdown"):
        pool.submit("k", int)
    pool.shutdown()  # again: harmless


def test_context_manager_shuts_down_on_exit() -> None:
    with KeyedPoolExecutor(2) as pool:
        f = pool.submit("k", int, 5)
    assert f.result() == 5
    with pytest.raises(RuntimeError):
        pool.submit("k", int)


def test_cancel_futures_cancels_what_has_not_started() -> None:
    release = threading.Event()
    started = threading.Event()
    pool = KeyedPoolExecutor(1)

    def first() -> str:
        started.set()
        release.wait(TIMEOUT)
        return "ran"

    running = pool.submit("k", first)
    assert started.wait(TIMEOUT)
    queued = [pool.submit(k, int, 1) for k in ("k", None, "other")] * 1
    ran_after = []
    later = pool.submit("k", ran_after.append, 1)
    release_thread = threading.Timer(0, release.set)
    pool.shutdown(wait=False, cancel_futures=True)
    # Cancelled at once, before the running task even finished.
    assert all(f.cancelled() for f in queued + [later])
    release_thread.start()
    pool.shutdown(wait=True)
    release_thread.join()
    assert running.result() == "ran"
    assert ran_after == []
    with pytest.raises(CancelledError):
        later.result()
    assert pool.stats().cancelled == 4


def test_a_cancelled_future_never_runs() -> None:
    release = threading.Event()
    ran = []
    with KeyedPoolExecutor(1) as pool:
        pool.submit("k", release.wait, TIMEOUT)
        victim = pool.submit("k", ran.append, "victim")
        survivor = pool.submit("k", ran.append, "survivor")
        assert victim.cancel()
        release.set()
        survivor.result(TIMEOUT)
    assert ran == ["survivor"]
    assert victim.cancelled()


def test_initializer_runs_once_in_each_worker_thread() -> None:
    seen = []
    lock = threading.Lock()
    local = threading.local()

    def init(tag: str) -> None:
        local.tag = tag
        with lock:
            seen.append(threading.current_thread().name)

    # routing="hash", so that 20 keys, one at a time, start all three threads
    # (with affinity, each would reuse the one idle worker).
    with KeyedPoolExecutor(
        3, initializer=init, initargs=("ready",), thread_name_prefix="ini", routing="hash"
    ) as pool:
        tags = [pool.submit(k, lambda: local.tag).result() for k in range(20)]
    assert sorted(seen) == ["ini_0", "ini_1", "ini_2"]
    assert set(tags) == {"ready"}


def test_failing_initializer_breaks_the_pool(caplog: pytest.LogCaptureFixture) -> None:
    def init() -> None:
        raise OSError("no database")

    pool = KeyedPoolExecutor(2, initializer=init)
    futures = []
    try:
        for k in range(10):
            # Once a worker has failed, submit itself refuses.
            futures.append(pool.submit(k, int, 1))
    except BrokenKeyedPool:
        pass
    assert futures, "the first submit starts the threads, so it is accepted"
    for f in futures:
        exc = f.exception(TIMEOUT)
        assert isinstance(exc, BrokenKeyedPool)
        assert isinstance(exc, BrokenThreadPool) and isinstance(exc, BrokenExecutor)
    with pytest.raises(BrokenKeyedPool, match="initializer failed"):
        pool.submit("k", int)
    pool.shutdown()
    assert "Exception in initializer" in caplog.text
    assert "no database" in caplog.text


def test_exception_goes_into_the_future_and_the_worker_lives_on() -> None:
    with KeyedPoolExecutor(1) as pool:
        bad = pool.submit("k", int, "not a number")
        good = pool.submit("k", int, "12")
        with pytest.raises(ValueError):
            bad.result(TIMEOUT)
        assert good.result(TIMEOUT) == 12
        # Even BaseException subclasses land in the future.
        exit_future = pool.submit("k", sys.exit, 3)
        assert isinstance(exit_future.exception(TIMEOUT), SystemExit)
        assert pool.submit("k", int, "5").result(TIMEOUT) == 5


def test_unretrieved_exception_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    def send_newsletter() -> None:
        raise ConnectionError("smtp down")

    with KeyedPoolExecutor(1) as pool:
        f = pool.submit("user-9", send_newsletter)
        wait([f], timeout=TIMEOUT)
    with caplog.at_level(logging.ERROR, logger="keyedpool"):
        del f
        gc.collect()
    assert "was never retrieved" in caplog.text
    assert "send_newsletter" in caplog.text and "user-9" in caplog.text
    assert "smtp down" in caplog.text


def test_retrieved_exception_is_not_logged(caplog: pytest.LogCaptureFixture) -> None:
    with KeyedPoolExecutor(1) as pool:
        f = pool.submit("k", int, "x")
        assert isinstance(f.exception(TIMEOUT), ValueError)
        g = pool.submit("k", int, "y")
        with pytest.raises(ValueError):
            g.result(TIMEOUT)
        quiet = KeyedPoolExecutor(1, log_unretrieved=False)
        h = quiet.submit("k", int, "z")
        wait([h], timeout=TIMEOUT)
        quiet.shutdown()
    with caplog.at_level(logging.ERROR, logger="keyedpool"):
        del f, g, h
        gc.collect()
    assert "never retrieved" not in caplog.text


def test_worker_drops_the_call_once_it_ran() -> None:
    import weakref

    class Payload:
        def handle(self) -> int:
            return 1

    with KeyedPoolExecutor(1) as pool:
        payload = Payload()
        collected = threading.Event()
        ref = weakref.ref(payload, lambda _: collected.set())
        future = pool.submit("k", payload.handle)
        del payload
        assert future.result(TIMEOUT) == 1
        assert collected.wait(TIMEOUT), "the finished task still holds its function"
        assert ref() is None


def test_dropped_pool_stops_its_threads() -> None:
    pool = KeyedPoolExecutor(2, thread_name_prefix="dropped")
    f = pool.submit("k", int, 3)
    assert f.result(TIMEOUT) == 3
    del pool
    gc.collect()
    wait_until(lambda: not pool_threads("dropped_"))


def run_script(code: str) -> subprocess.CompletedProcess[str]:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=env,
    )


def test_queued_work_finishes_at_interpreter_exit() -> None:
    proc = run_script("""
        import threading
        from keyedpool import KeyedPoolExecutor
        gate = threading.Event()
        pool = KeyedPoolExecutor(2)
        pool.submit("k", gate.wait)
        for i in range(100):
            pool.submit("k", print, i, flush=True)
        gate.set()
        # no shutdown(): the interpreter exits with work still queued
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [str(i) for i in range(100)]
    assert proc.stderr == ""


def test_submit_during_interpreter_exit_raises() -> None:
    proc = run_script("""
        import atexit
        from keyedpool import KeyedPoolExecutor
        pool = KeyedPoolExecutor(1)
        pool.submit(None, int).result()
        @atexit.register
        def late():
            try:
                pool.submit(None, int)
            except RuntimeError as exc:
                print("refused:", exc)
    """)
    assert "refused: cannot schedule new futures after interpreter shutdown" in proc.stdout


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
# Forking a process with threads is exactly the case under test (gunicorn --preload).
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_pool_created_before_fork_works_in_the_child_and_nothing_runs_twice() -> None:
    # The parent has one task running (blocked) and more queued behind it
    # when it forks. The child must not run the parent's tasks, and its own
    # tasks must run on fresh threads.
    release = threading.Event()
    started = threading.Event()
    read_fd, write_fd = os.pipe()
    pool = KeyedPoolExecutor(2)

    def blocked() -> None:
        started.set()
        release.wait(TIMEOUT)

    def record(tag: str) -> str:
        os.write(write_fd, f"{os.getpid()}:{tag}\n".encode())
        return tag

    pool.submit("k", blocked)
    assert started.wait(TIMEOUT)
    queued = [pool.submit("k", record, f"parent-{i}") for i in range(5)]
    pid = os.fork()
    if pid == 0:  # the child
        code = 1
        try:
            os.close(read_fd)
            results = [pool.submit(k, record, f"child-{k}").result(TIMEOUT) for k in range(4)]
            pool.shutdown()
            code = 0 if results == [f"child-{k}" for k in range(4)] else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    release.set()
    assert [f.result(TIMEOUT) for f in queued] == [f"parent-{i}" for i in range(5)]
    pool.shutdown()
    os.close(write_fd)
    with os.fdopen(read_fd) as pipe:
        lines = pipe.read().split()
    parent_lines = [ln for ln in lines if ln.startswith(f"{os.getpid()}:")]
    child_lines = [ln for ln in lines if ln.startswith(f"{pid}:")]
    assert sorted(tag.split(":")[1] for tag in child_lines) == [f"child-{k}" for k in range(4)]
    assert [tag.split(":")[1] for tag in parent_lines] == [f"parent-{i}" for i in range(5)]


def test_worker_survives_a_done_callback_raising_base_exception(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def raise_exit(_: object) -> None:
        raise SystemExit("from a callback")

    release = threading.Event()
    with KeyedPoolExecutor(1) as pool:
        first = pool.submit("k", release.wait, TIMEOUT)
        first.add_done_callback(raise_exit)
        after = pool.submit("k", int, 5)
        release.set()
        assert after.result(TIMEOUT) == 5  # the same worker ran it
    assert first.result() is True
    assert "exception calling callback" in caplog.text
