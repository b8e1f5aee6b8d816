"""The consumers' ack batches (keyedpool.contrib.consumer._acks.Acks), on their own."""

from __future__ import annotations

import threading

import pytest

from keyedpool.contrib.consumer._acks import Acks

pytestmark = pytest.mark.timeout(120)

WAIT = 60.0


def test_a_shard_is_busy_from_receive_until_its_ack_is_written() -> None:
    woken: list[int] = []
    acks: Acks[str] = Acks(2, lambda: woken.append(1))
    acks.received(0)
    acks.received(1)
    acks.received(1)
    acks.forget(1)  # refused: never acked here
    assert acks.busy(0) and acks.busy(1)
    acks.add("m0", False, 0)
    acks.add("m1", True, 1)
    assert woken == [1]  # only the first of a batch wakes the sender
    batch = acks.take()
    assert batch == [("m0", False, 0), ("m1", True, 1)] and acks.take() == []
    assert acks.busy(0) and acks.busy(1)  # taken, not written yet
    acks.failed(batch)
    acks.add("later", False, 0)
    acks.received(0)
    again = acks.take()
    assert again == [*batch, ("later", False, 0)]  # a failed batch goes first
    acks.sent(again[:2])
    assert acks.busy(0) and not acks.busy(1)
    acks.sent(again[2:])
    assert not acks.busy(0)


def test_many_workers_adding_while_one_thread_sends_lose_and_double_nothing(
    fast_switching: None,
) -> None:
    workers, per_worker, shards = 6, 2000, 4
    acks: Acks[int] = Acks(shards, lambda: None)
    written: list[int] = []
    start = threading.Barrier(workers + 1)
    added = threading.Event()
    finished = 0
    lock = threading.Lock()

    def worker(w: int) -> None:
        nonlocal finished
        start.wait(WAIT)
        for i in range(per_worker):
            message = w * per_worker + i
            acks.received(message % shards)
            acks.add(message, False, message % shards)
        with lock:
            finished += 1
            if finished == workers:
                added.set()

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(workers)]
    for thread in threads:
        thread.start()
    start.wait(WAIT)
    failing = 0
    while True:
        done = added.is_set()  # read before the last take: nothing is added after
        batch = acks.take()
        if batch and failing % 7 == 3:
            acks.failed(batch)  # as a broker that refuses a batch now and then
        else:
            written.extend(message for message, _, _ in batch)
            acks.sent(batch)
        failing += 1
        if done and not batch:
            break
    for thread in threads:
        thread.join(WAIT)
    assert sorted(written) == list(range(workers * per_worker))
    assert not any(acks.busy(s) for s in range(shards))
