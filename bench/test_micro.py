"""Micro-costs, side by side with the standard library: ``pytest bench/ --benchmark-only``.

Groups (compare within a group; the table pytest-benchmark prints is per group):

* ``submit``: one ``submit`` while every worker is busy, so the call's own cost
  (and the dispatcher it feeds) is what is timed, not the tasks;
* ``route``: which worker a key goes to;
* ``hop``: handing items from one thread to another (the per-worker queue's
  building block), and one task's submit-to-result round trip on an idle pool;
* ``completion``: reading results and waiting on finished futures;
* ``batch``: submit 100 no-op tasks and wait for them all, end to end. With one
  key, every task after the first finds its worker busy and goes through the
  dispatcher thread, so ``one-key-via-dispatcher`` is the dispatcher hop at work.

Speed is measured here and in ``python -m bench.compare`` only, never asserted:
the asserts below check that each benchmark did the work it claims to time.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

import mmh3
import pytest

from keyedpool import KeyedPoolExecutor

WORKERS = 32
#: Upper bound on waits that should end on their own.
LIMIT = 60.0


def noop() -> None:
    pass


class Blocker:
    """Occupy every worker of a pool with a task that waits for ``release()``."""

    def __init__(self) -> None:
        self.started = threading.Semaphore(0)
        self.gate = threading.Event()

    def hold(self) -> None:
        self.started.release()
        self.gate.wait(LIMIT)

    def occupy(self, submit: Callable[[Callable[[], None]], Future[Any]]) -> None:
        for _ in range(WORKERS):
            submit(self.hold)
        for _ in range(WORKERS):
            assert self.started.acquire(timeout=LIMIT), "a worker never started"

    def release(self) -> None:
        self.gate.set()


@pytest.fixture
def keyed_pool() -> Iterator[KeyedPoolExecutor]:
    pool = KeyedPoolExecutor(WORKERS, max_pending=10_000_000)
    yield pool
    pool.shutdown(wait=True)


@pytest.fixture
def stdlib_pool() -> Iterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(WORKERS)
    yield pool
    pool.shutdown(wait=True)


# -- submit ------------------------------------------------------------------------


SUBMIT_ROUNDS = 20
SUBMIT_ITERATIONS = 1000


def _submits(benchmark: Any) -> int:
    # With --benchmark-disable, pedantic() calls the target once.
    return 1 if benchmark.disabled else SUBMIT_ROUNDS * SUBMIT_ITERATIONS


@pytest.mark.benchmark(group="submit")
@pytest.mark.parametrize("key", ["order-123", None], ids=["keyed", "unkeyed"])
def test_submit_keyedpool(benchmark: Any, keyed_pool: KeyedPoolExecutor, key: str | None) -> None:
    blocker = Blocker()
    blocker.occupy(lambda fn: keyed_pool.submit(None, fn))
    futures: list[Future[Any]] = []
    append = futures.append
    submit = keyed_pool.submit
    try:
        benchmark.pedantic(
            lambda: append(submit(key, noop)),
            rounds=SUBMIT_ROUNDS,
            iterations=SUBMIT_ITERATIONS,
        )
        assert not any(f.done() for f in futures), "a task ran while every worker was busy"
    finally:
        blocker.release()
    assert len(futures) >= _submits(benchmark)
    assert len(wait(futures, LIMIT).done) == len(futures)


@pytest.mark.benchmark(group="submit")
def test_submit_threadpool(benchmark: Any, stdlib_pool: ThreadPoolExecutor) -> None:
    blocker = Blocker()
    blocker.occupy(stdlib_pool.submit)
    futures: list[Future[Any]] = []
    append = futures.append
    submit = stdlib_pool.submit
    try:
        benchmark.pedantic(
            lambda: append(submit(noop)), rounds=SUBMIT_ROUNDS, iterations=SUBMIT_ITERATIONS
        )
        assert not any(f.done() for f in futures), "a task ran while every worker was busy"
    finally:
        blocker.release()
    assert len(futures) >= _submits(benchmark)
    assert len(wait(futures, LIMIT).done) == len(futures)


# -- route -------------------------------------------------------------------------


@pytest.mark.benchmark(group="route")
def test_route_worker_index(benchmark: Any, keyed_pool: KeyedPoolExecutor) -> None:
    index = benchmark(keyed_pool.worker_index, "order-123")
    assert 0 <= index < WORKERS


@pytest.mark.benchmark(group="route")
def test_route_mmh3_direct(benchmark: Any, keyed_pool: KeyedPoolExecutor) -> None:
    # keyedpool's documented rule, without the checks worker_index() makes.
    index = benchmark(lambda: mmh3.hash("order-123", 0, False) % WORKERS)
    assert index == keyed_pool.worker_index("order-123")


@pytest.mark.benchmark(group="route")
def test_route_builtin_hash(benchmark: Any) -> None:
    # For scale only: hash() of a str differs per process, so it cannot route.
    index = benchmark(lambda: hash("order-123") % WORKERS)
    assert 0 <= index < WORKERS


# -- hop ---------------------------------------------------------------------------


HOP_ITEMS = 10_000


def _stream(make: Callable[[], Any]) -> int:
    # Put HOP_ITEMS items on a queue while another thread takes them off.
    q = make()
    got = [0]

    def consume() -> None:
        get = q.get
        n = 0
        while get() is not None:
            n += 1
        got[0] = n

    consumer = threading.Thread(target=consume)
    consumer.start()
    put = q.put
    for i in range(HOP_ITEMS):
        put(i)
    put(None)
    consumer.join(LIMIT)
    return got[0]


@pytest.mark.benchmark(group="hop")
@pytest.mark.parametrize("make", [queue.SimpleQueue, queue.Queue], ids=["SimpleQueue", "Queue"])
def test_hop_stream_10k(benchmark: Any, make: Callable[[], Any]) -> None:
    got = benchmark.pedantic(_stream, args=(make,), rounds=10, warmup_rounds=1)
    assert got == HOP_ITEMS


@pytest.mark.benchmark(group="hop")
@pytest.mark.parametrize("key", ["order-123", None], ids=["keyed", "unkeyed"])
def test_hop_roundtrip_keyedpool(
    benchmark: Any, keyed_pool: KeyedPoolExecutor, key: str | None
) -> None:
    result = benchmark(lambda: keyed_pool.submit(key, int, "7").result(LIMIT))
    assert result == 7


@pytest.mark.benchmark(group="hop")
def test_hop_roundtrip_threadpool(benchmark: Any, stdlib_pool: ThreadPoolExecutor) -> None:
    result = benchmark(lambda: stdlib_pool.submit(int, "7").result(LIMIT))
    assert result == 7


# -- completion -----------------------------------------------------------------------


DONE = 1000


def _results(futures: list[Future[Any]]) -> int:
    return sum(f.result() for f in futures)


def _wait(futures: list[Future[Any]]) -> int:
    return len(wait(futures, LIMIT).done)


def _finished(submit: Callable[[int], Future[Any]]) -> list[Future[Any]]:
    futures = [submit(i) for i in range(DONE)]
    assert len(wait(futures, LIMIT).done) == DONE
    return futures


@pytest.mark.benchmark(group="completion")
@pytest.mark.parametrize("how", [_results, _wait], ids=["result", "wait"])
def test_completion_keyedpool(
    benchmark: Any, keyed_pool: KeyedPoolExecutor, how: Callable[[list[Future[Any]]], int]
) -> None:
    futures = _finished(lambda i: keyed_pool.submit(i, int, i))
    got = benchmark(how, futures)
    assert got == (sum(range(DONE)) if how is _results else DONE)


@pytest.mark.benchmark(group="completion")
@pytest.mark.parametrize("how", [_results, _wait], ids=["result", "wait"])
def test_completion_threadpool(
    benchmark: Any, stdlib_pool: ThreadPoolExecutor, how: Callable[[list[Future[Any]]], int]
) -> None:
    futures = _finished(lambda i: stdlib_pool.submit(int, i))
    got = benchmark(how, futures)
    assert got == (sum(range(DONE)) if how is _results else DONE)


# -- batch ---------------------------------------------------------------------------


BATCH = 100


def _batch(submit: Callable[[int], Future[Any]]) -> int:
    futures = [submit(i) for i in range(BATCH)]
    return sum(f.result(LIMIT) for f in futures)


@pytest.mark.benchmark(group="batch")
@pytest.mark.parametrize(
    "keys",
    [lambda i: f"order-{i % 10}", lambda i: "order-1", lambda i: None],
    ids=["10-keys", "one-key-via-dispatcher", "unkeyed"],
)
def test_batch_keyedpool(
    benchmark: Any, keyed_pool: KeyedPoolExecutor, keys: Callable[[int], str | None]
) -> None:
    got = benchmark(_batch, lambda i: keyed_pool.submit(keys(i), int, i))
    assert got == sum(range(BATCH))


@pytest.mark.benchmark(group="batch")
def test_batch_threadpool(benchmark: Any, stdlib_pool: ThreadPoolExecutor) -> None:
    got = benchmark(_batch, lambda i: stdlib_pool.submit(int, i))
    assert got == sum(range(BATCH))


# -- stats -----------------------------------------------------------------------------


@pytest.mark.benchmark(group="stats")
def test_stats_with_a_full_pool(benchmark: Any) -> None:
    """``stats()`` on a pool of 32 workers holding its default 3,200 pending tasks."""
    gate = threading.Event()
    pool = KeyedPoolExecutor(32)
    try:
        futures = [pool.submit(f"order-{i % 500}", gate.wait, LIMIT) for i in range(3200)]
        snapshot = benchmark(pool.stats)
        assert snapshot.pending == 3200 and snapshot.top_keys
    finally:
        gate.set()
        pool.shutdown()
    assert all(f.result(LIMIT) for f in futures)
