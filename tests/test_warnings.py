"""slow_task_warning: a slow task, and a key whose backlog keeps growing, get logged."""

from __future__ import annotations

import logging
import threading
import weakref

import pytest
from _util import TIMEOUT, wait_until

from keyedpool import KeyedPoolExecutor, ThreadPoolExecutor


def slow_records(caplog: pytest.LogCaptureFixture, key: str) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "keyedpool"
        and "has been running" in r.getMessage()
        and repr(key) in r.getMessage()
    ]


def test_a_slow_task_is_logged_once_with_its_key_function_and_stack(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="keyedpool")
    release = threading.Event()

    def export_report() -> None:  # a name to find in the warning
        release.wait(TIMEOUT)

    with KeyedPoolExecutor(2, slow_task_warning=0.2) as pool:
        first = pool.submit("report-7", export_report)
        try:
            wait_until(lambda: bool(slow_records(caplog, "report-7")))
            # A second slow task, started after the first was reported: once it
            # is reported too, the first has been looked at again meanwhile.
            second = pool.submit("report-8", export_report)
            wait_until(lambda: bool(slow_records(caplog, "report-8")))
        finally:
            release.set()
        assert first.result(TIMEOUT) is None and second.result(TIMEOUT) is None
    [record] = slow_records(caplog, "report-7")
    message = record.getMessage()
    assert record.levelno == logging.WARNING
    assert "function export_report" in message
    assert "slow_task_warning=0.2 s" in message
    assert "worker " in message
    # The stack starts at the task's own function (the pool's frames left out).
    stack = message.split("It is at:\n", 1)[1]
    assert "in export_report" in stack.splitlines()[0]
    # ...down to where it blocks. (Not its source line: a free-threaded build
    # can report another thread's running frame at its first line.)
    assert "threading.py" in stack and "in wait" in stack
    assert "_worker.py" not in stack and "_task.py" not in stack


def test_a_key_whose_backlog_keeps_growing_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="keyedpool")
    release = threading.Event()

    def growing() -> bool:
        return any(
            "'hot'" in r.getMessage() and "backlog grew" in r.getMessage()
            for r in caplog.records
        )

    with KeyedPoolExecutor(2, max_pending=100_000, slow_task_warning=0.2) as pool:
        futures = [pool.submit("hot", release.wait, TIMEOUT)]
        other = pool.submit("calm", int, 1)
        try:
            # Keep adding to the key until the pool reports it (an upper bound
            # on how many, so that a pool that never reports fails the test).
            while not growing():
                assert len(futures) < 90_000, "a growing key was never reported"
                futures += [pool.submit("hot", int, i) for i in range(20)]
                wait_until(lambda: pool.stats().in_transit == 0)
        finally:
            release.set()
        assert other.result(TIMEOUT) == 1
        assert [f.result(TIMEOUT) for f in futures[1:]] == [i % 20 for i in range(len(futures) - 1)]
    [record] = [r for r in caplog.records if "backlog grew" in r.getMessage()]
    assert "split the key" in record.getMessage()
    assert "'calm'" not in "".join(r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("value", [0, -1, float("nan"), float("inf")])
def test_slow_task_warning_must_be_a_positive_number_of_seconds(value: float) -> None:
    with pytest.raises(ValueError, match="slow_task_warning must be a finite number"):
        KeyedPoolExecutor(1, slow_task_warning=value)


@pytest.mark.parametrize("value", ["60", True])
def test_slow_task_warning_must_be_a_number(value: object) -> None:
    with pytest.raises(TypeError, match="slow_task_warning must be a number"):
        KeyedPoolExecutor(1, slow_task_warning=value)  # type: ignore[arg-type]


def test_the_drop_in_thread_pool_warns_about_nothing_and_the_default_is_a_minute() -> None:
    # As concurrent.futures.ThreadPoolExecutor, which has no such warning.
    with ThreadPoolExecutor(1) as stdlib_like, KeyedPoolExecutor(1) as pool:
        assert stdlib_like.pool._pool.slow_task_warning is None
        assert pool._pool.slow_task_warning == 60.0
    with KeyedPoolExecutor(1, slow_task_warning=None) as off:
        assert off._pool.slow_task_warning is None


def test_watching_a_task_does_not_keep_it_or_its_result_alive(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="keyedpool")
    release = threading.Event()

    class Result:
        pass

    made: list[weakref.ref[Result]] = []

    def slow() -> Result:
        release.wait(TIMEOUT)
        result = Result()
        made.append(weakref.ref(result))
        return result

    with KeyedPoolExecutor(1, slow_task_warning=0.2) as pool:
        future = pool.submit("k", slow)
        try:
            wait_until(lambda: bool(slow_records(caplog, "k")))  # the watch has seen it
        finally:
            release.set()
        assert isinstance(future.result(TIMEOUT), Result)
        task = weakref.ref(future)
        del future
        # Once the worker has moved on (a later task of its key ran), nothing of
        # the pool holds the task or its result, the warnings' watch included.
        assert pool.submit("k", int, 1).result(TIMEOUT) == 1
        assert task() is None and made[0]() is None
