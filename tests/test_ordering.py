"""Per-key order: if submit(k, a) returns before submit(k, b) is called, a ends before b starts."""

from __future__ import annotations

import random
import threading
from collections import defaultdict
from concurrent.futures import wait

import pytest
from _util import TIMEOUT
from hypothesis import given, settings
from hypothesis import strategies as st

from keyedpool import KeyedPoolExecutor

#: Order per key must hold with either routing.
ROUTINGS = pytest.mark.parametrize("routing", ["hash", "affinity"])


class Recorder:
    """Records, per key, the order tasks started in, and whether two ever overlapped."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.started: dict[object, list[int]] = defaultdict(list)
        self.active: dict[object, int] = defaultdict(int)
        self.overlaps = 0

    def task(self, key: object, seq: int, fail: bool = False) -> int:
        with self.lock:
            # Unkeyed tasks (key None) may run at the same time: no overlap.
            self.active[key] += 1
            if self.active[key] > 1 and key is not None:
                self.overlaps += 1
            self.started[key].append(seq)
        # Give other threads a chance to run in the middle of this task.
        for _ in range(random.randrange(3)):
            threading.Event().wait(0)
        with self.lock:
            self.active[key] -= 1
        if fail:
            raise ValueError(f"task {seq} of {key!r} fails on purpose")
        return seq


@ROUTINGS
def test_one_key_runs_in_submit_order_and_never_overlaps(routing: str) -> None:
    rec = Recorder()
    with KeyedPoolExecutor(8, routing=routing) as pool:  # type: ignore[arg-type]
        futures = [pool.submit("order-123", rec.task, "order-123", i) for i in range(2000)]
        wait(futures, timeout=TIMEOUT)
    assert rec.started["order-123"] == list(range(2000))
    assert rec.overlaps == 0
    assert [f.result() for f in futures] == list(range(2000))


@ROUTINGS
def test_many_submitting_threads_many_keys_with_random_failures(routing: str) -> None:
    rec = Recorder()
    threads_count, per_thread = 8, 600
    # max_pending is small: submitters block now and then.
    pool = KeyedPoolExecutor(16, max_pending=500, routing=routing)  # type: ignore[arg-type]
    futures: list = []
    futures_lock = threading.Lock()
    barrier = threading.Barrier(threads_count)

    def submitter(t: int) -> None:
        rnd = random.Random(t)
        mine = []
        barrier.wait()
        for i in range(per_thread):
            # Each thread owns its keys (order is per submitting sequence), of
            # mixed types, and some tasks fail.
            key = [f"t{t}-k{i % 7}", b"t%d-b%d" % (t, i % 5), t * 1000 + i % 3][i % 3]
            mine.append(pool.submit(key, rec.task, key, i, rnd.random() < 0.2))
        with futures_lock:
            futures.extend(mine)

    threads = [threading.Thread(target=submitter, args=(t,)) for t in range(threads_count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    done, not_done = wait(futures, timeout=TIMEOUT)
    pool.shutdown()
    assert not not_done
    assert len(futures) == threads_count * per_thread
    assert rec.overlaps == 0
    for key, seqs in rec.started.items():
        assert seqs == sorted(seqs), f"key {key!r} ran out of order"
    failed = sum(1 for f in futures if f.exception() is not None)
    assert 0 < failed < len(futures)
    stats = pool.stats()
    assert stats.failed == failed
    assert stats.completed + stats.failed == len(futures)


@ROUTINGS
def test_unkeyed_tasks_interleaved_with_keyed_keep_keyed_order(routing: str) -> None:
    rec = Recorder()
    with KeyedPoolExecutor(4, routing=routing) as pool:  # type: ignore[arg-type]
        futures = []
        for i in range(3000):
            futures.append(pool.submit(f"k{i % 10}", rec.task, f"k{i % 10}", i))
            futures.append(pool.submit(None, rec.task, ("none", i), i))
        wait(futures, timeout=TIMEOUT)
    for k in range(10):
        seqs = rec.started[f"k{k}"]
        assert seqs == sorted(seqs) and len(seqs) == 300
    assert rec.overlaps == 0


@settings(max_examples=40, deadline=None)
@given(
    ops=st.lists(
        st.tuples(
            st.one_of(
                st.none(),
                st.sampled_from(["a", "b", "", "c"]),
                st.integers(0, 3),
                st.sampled_from([b"x", b"y"]),
            ),
            st.booleans(),
        ),
        max_size=60,
    ),
    workers=st.integers(1, 5),
)
@ROUTINGS
def test_order_property(ops: list[tuple[object, bool]], workers: int, routing: str) -> None:
    rec = Recorder()
    with KeyedPoolExecutor(workers, routing=routing) as pool:  # type: ignore[arg-type]
        futures = [pool.submit(key, rec.task, key, i, fail) for i, (key, fail) in enumerate(ops)]
        wait(futures, timeout=TIMEOUT)
    for i, (_key, fail) in enumerate(ops):
        if fail:
            assert isinstance(futures[i].exception(), ValueError)
        else:
            assert futures[i].result() == i
    expected: dict[object, list[int]] = defaultdict(list)
    for i, (key, _) in enumerate(ops):
        if key is not None:
            expected[key].append(i)
    for key, seqs in expected.items():
        assert rec.started[key] == seqs
    assert rec.overlaps == 0
