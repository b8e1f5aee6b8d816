"""The broker-independent consumer logic (keyedpool.contrib.consumer), without a broker.

These tests drive ``KeyedHandling`` directly: the broker adapters' tests cover
the same properties against real servers.
"""

from __future__ import annotations

import threading
from collections import defaultdict

import pytest
from _util import wait_until

from keyedpool import KeyedPoolExecutor
from keyedpool._routing import worker_index
from keyedpool.contrib.consumer import (
    DeadLetter,
    KeyedHandling,
    RetryPolicy,
    shard_of,
)
from keyedpool.contrib.consumer._engine import read_key

pytestmark = pytest.mark.timeout(60)


class _Recorder:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.handled: dict[str, list[int]] = defaultdict(list)
        self.acked: list[tuple[str, int]] = []
        self.dead: list[tuple[tuple[str, int], BaseException]] = []
        self.calls: dict[tuple[str, int], int] = defaultdict(int)

    def ack(self, msg: tuple[str, int], dead: bool = False) -> None:
        with self.lock:
            self.acked.append(msg)

    def dead_letter(self, msg: tuple[str, int], exc: BaseException) -> None:
        with self.lock:
            self.dead.append((msg, exc))


def test_order_kept_when_a_message_fails_twice_then_succeeds() -> None:
    rec = _Recorder()

    def handler(msg: tuple[str, int]) -> None:
        with rec.lock:
            rec.calls[msg] += 1
            if msg == ("k", 3) and rec.calls[msg] <= 2:
                raise RuntimeError("flaky")
            rec.handled[msg[0]].append(msg[1])

    with KeyedPoolExecutor(4) as pool:
        handling = KeyedHandling(
            handler, pool=pool, ack=rec.ack, dead_letter=rec.dead_letter,
            retry=RetryPolicy(attempts=3, backoff=0.01),
        )
        for i in range(10):
            handling.dispatch("k", ("k", i))
            handling.dispatch("other", ("other", i))
        assert handling.drain(30)
        handling.close()
    assert rec.handled["k"] == list(range(10))
    assert rec.handled["other"] == list(range(10))
    assert rec.calls[("k", 3)] == 3
    stats = handling.stats()
    assert stats.retries == 2
    assert stats.handled == 20 and stats.in_flight == 0 and stats.parked == 0
    assert len(rec.acked) == 20 and not rec.dead


def test_poison_message_is_dead_lettered_and_its_key_moves_on() -> None:
    rec = _Recorder()

    def handler(msg: tuple[str, int]) -> None:
        if msg == ("k", 1):
            raise ValueError("poison")
        if msg == ("k", 2):
            raise DeadLetter("unknown type")
        with rec.lock:
            rec.handled[msg[0]].append(msg[1])

    with KeyedPoolExecutor(2) as pool:
        handling = KeyedHandling(
            handler, pool=pool, ack=rec.ack, dead_letter=rec.dead_letter,
            retry=RetryPolicy(attempts=2, backoff=0),
        )
        for i in range(5):
            handling.dispatch("k", ("k", i))
        assert handling.drain(30)
        handling.close()
    assert rec.handled["k"] == [0, 3, 4]
    assert [m for m, _ in rec.dead] == [("k", 1), ("k", 2)]
    assert isinstance(rec.dead[0][1], ValueError)
    assert handling.stats().dead_lettered == 2
    assert handling.stats().retries == 1  # DeadLetter skips the retries
    assert len(rec.acked) == 5


def test_a_key_waiting_for_a_retry_does_not_hold_its_worker() -> None:
    # One worker: every key shares it. While "stuck" waits for its retry, "free" runs.
    rec = _Recorder()
    free_done = threading.Event()

    def handler(msg: tuple[str, int]) -> None:
        with rec.lock:
            rec.calls[msg] += 1
            first = rec.calls[msg] == 1
        if msg == ("stuck", 0) and first:
            raise RuntimeError("retry me once free has run")
        if msg[0] == "free":
            with rec.lock:
                rec.handled["free"].append(msg[1])
            if msg[1] == 4:
                free_done.set()
        else:
            with rec.lock:
                rec.handled["stuck"].append(msg[1])

    with KeyedPoolExecutor(1) as pool:
        handling = KeyedHandling(
            handler, pool=pool, ack=rec.ack, dead_letter=rec.dead_letter,
            # A backoff far longer than the test: the retry can only come after
            # "free" is done if the worker was not blocked by the backoff.
            retry=RetryPolicy(attempts=2, backoff=3600, max_backoff=3600),
        )
        handling.dispatch("stuck", ("stuck", 0))
        handling.dispatch("stuck", ("stuck", 1))
        for i in range(5):
            handling.dispatch("free", ("free", i))
        assert free_done.wait(30)
        assert rec.handled["free"] == [0, 1, 2, 3, 4]
        assert rec.handled["stuck"] == []
        assert handling.stats().parked == 1
        assert handling.in_flight == 2
        handling.close()  # leaves the two "stuck" messages unacked
    assert len(rec.acked) == 5


def test_backpressure_bounds_in_flight_messages() -> None:
    rec = _Recorder()
    gate = threading.Event()
    with KeyedPoolExecutor(2) as pool:
        handling = KeyedHandling(
            lambda msg: gate.wait(30), pool=pool, ack=rec.ack,
            dead_letter=rec.dead_letter, max_in_flight=3,
        )
        for i in range(3):
            assert handling.wait_for_room(0) > 0
            handling.dispatch(f"k{i}", (f"k{i}", i))
        assert handling.room() == 0
        assert handling.wait_for_room(0.01) == 0
        gate.set()
        assert handling.wait_for_room(30) >= 1
        assert handling.drain(30)
        handling.close()
    assert len(rec.acked) == 3


def test_bad_arguments_are_rejected() -> None:
    with KeyedPoolExecutor(1) as pool:
        with pytest.raises(TypeError):
            KeyedHandling("nope", pool=pool, ack=lambda m, d: None, dead_letter=print)  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            KeyedHandling(
                print, pool=pool, ack=lambda m, d: None, dead_letter=print, max_in_flight=0
            )
    with pytest.raises(ValueError):
        RetryPolicy(attempts=0)
    with pytest.raises(TypeError):
        RetryPolicy(backoff="1")  # type: ignore[arg-type]


def test_a_bad_key_is_refused_before_anything_is_dispatched() -> None:
    rec = _Recorder()
    with KeyedPoolExecutor(1) as pool:
        handling = KeyedHandling(
            lambda msg: None, pool=pool, ack=rec.ack, dead_letter=rec.dead_letter
        )
        with pytest.raises(TypeError):
            handling.dispatch(1.5, ("k", 0))  # type: ignore[arg-type]
        assert handling.in_flight == 0
        handling.dispatch("k", ("k", 1))
        assert handling.drain(30)
        handling.close()
    assert rec.acked == [("k", 1)]


def test_shard_of_is_mmh3_high_bits_and_independent_of_the_worker() -> None:
    import mmh3

    # The documented rule, so publishers in other languages can compute it.
    for key in ("order-123", "", "é"):
        assert shard_of(key, 8) == (mmh3.hash(key.encode(), 0, False) * 8) >> 32
    assert shard_of(42, 8) == shard_of("42", 8) == shard_of(b"42", 8)
    # The keys of one process (half the shards) still spread over the whole pool,
    # which they would not if shards and workers both used hash % n.
    keys = [f"key-{i}" for i in range(2000)]
    mine = [k for k in keys if shard_of(k, 8) % 2 == 0]
    assert {worker_index(k, 32) for k in mine} == set(range(32))
    with pytest.raises(ValueError):
        shard_of(None, 8)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        shard_of("k", 0)


def test_many_keys_with_random_failures_keep_order_and_settle_each_message_once() -> None:
    import random

    rng = random.Random(1234)
    # Which attempts fail is fixed up front: (key, seq) -> failures before success
    # (3 failures with 3 attempts means dead-lettered).
    plan = {(f"k{k}", s): rng.choice([0, 0, 0, 0, 1, 2, 3]) for k in range(50) for s in range(40)}
    rec = _Recorder()

    def handler(msg: tuple[str, int]) -> None:
        with rec.lock:
            rec.calls[msg] += 1
            call = rec.calls[msg]
        if call <= plan[msg]:
            raise RuntimeError(f"planned failure {call}")
        with rec.lock:
            rec.handled[msg[0]].append(msg[1])

    with KeyedPoolExecutor(8) as pool:
        handling = KeyedHandling(
            handler, pool=pool, ack=rec.ack, dead_letter=rec.dead_letter,
            retry=RetryPolicy(attempts=3, backoff=0.0005), max_in_flight=300,
        )
        for s in range(40):
            for k in range(50):
                assert handling.wait_for_room(30) > 0
                handling.dispatch(f"k{k}", (f"k{k}", s))
        assert handling.drain(60)
        handling.close()
    dead = {m for m, _ in rec.dead}
    assert dead == {m for m, n in plan.items() if n >= 3}
    for k in range(50):
        key = f"k{k}"
        assert rec.handled[key] == [s for s in range(40) if plan[(key, s)] < 3]
    assert sorted(rec.acked) == sorted(plan)  # every message acked exactly once
    stats = handling.stats()
    assert stats.retries == sum(min(n, 2) for n in plan.values())
    assert stats.in_flight == 0 and stats.parked == 0
    assert not handling._per_key and not handling._items  # nothing left behind once settled


def test_dispatch_dead_writes_the_dead_letter_without_calling_the_handler() -> None:
    rec = _Recorder()
    error = LookupError("no key")

    def handler(msg: tuple[str, int]) -> None:
        with rec.lock:
            rec.handled[msg[0]].append(msg[1])

    with KeyedPoolExecutor(2) as pool:
        handling = KeyedHandling(handler, pool=pool, ack=rec.ack, dead_letter=rec.dead_letter)
        handling.dispatch_dead(("?", 0), error, redelivered=True)
        handling.dispatch("k", ("k", 1))
        assert handling.drain(30)
        handling.close()
    assert rec.dead == [(("?", 0), error)]
    assert rec.handled == {"k": [1]}
    assert sorted(rec.acked) == [("?", 0), ("k", 1)]
    stats = handling.stats()
    assert (stats.received, stats.dead_lettered, stats.handled, stats.redelivered) == (2, 1, 1, 1)


def test_read_key_checks_what_the_key_function_returns() -> None:
    def named(message: dict[str, object], name: str) -> object:
        return message.get(name)

    assert read_key(lambda m: m["id"], {"id": "k"}, named, {}) == "k"
    assert read_key("id", {}, named, {"id": 7}) == 7
    assert read_key("id", {}, named, {}) is None
    with pytest.raises(TypeError, match="float"):
        read_key(lambda m: 1.5, {}, named, {})
    with pytest.raises(TypeError, match="bool"):
        read_key("id", {}, named, {"id": True})

    def missing(message: dict[str, object]) -> object:
        raise KeyError("id")

    with pytest.raises(KeyError):
        read_key(missing, {}, named, {})


def test_a_retry_is_not_lost_when_a_shared_pool_is_full() -> None:
    # The pool is shared with other work and refuses submits when full
    # (on_full="raise"). A message that failed must still be retried (by the
    # pool itself, holding its key), and the key's next message must follow.
    from keyedpool import PoolFull

    rec = _Recorder()
    failed = threading.Event()
    second_done = threading.Event()
    gate = threading.Event()

    def handler(msg: tuple[str, int]) -> None:
        with rec.lock:
            rec.calls[msg] += 1
            first = rec.calls[msg] == 1
        if msg == ("k", 0) and first:
            failed.set()
            raise RuntimeError("fails once")
        with rec.lock:
            rec.handled["k"].append(msg[1])
        if msg == ("k", 1):
            second_done.set()

    with KeyedPoolExecutor(2, max_pending=6, on_full="raise") as pool:
        handling = KeyedHandling(
            handler, pool=pool, ack=rec.ack, dead_letter=rec.dead_letter,
            retry=RetryPolicy(attempts=3, backoff=0.05),
        )
        handling.dispatch("k", ("k", 0))
        handling.dispatch("k", ("k", 1))
        assert failed.wait(30)
        # The second message waits behind the failed one, and no worker runs.
        wait_until(
            lambda: handling.stats().parked == 1
            and not any(w.running for w in pool.stats().workers)
        )
        # Other work fills the pool: one task holds a worker, the rest queue behind it.
        others = []
        while True:
            try:
                others.append(pool.submit("other", gate.wait, 30))
            except PoolFull:
                break
        try:
            # The retry runs on the free worker while the pool stays full.
            assert second_done.wait(30), "the failed message was never retried"
        finally:
            gate.set()
        assert handling.drain(30)
        handling.close()
    assert rec.handled["k"] == [0, 1]
    assert sorted(rec.acked) == [("k", 0), ("k", 1)]
    assert handling.stats().retries == 1


def test_a_full_shared_pool_makes_dispatch_wait_not_drop_the_key() -> None:
    # With on_full="raise", a full shared pool used to refuse the message, and
    # every later message of its key then waited for good. Now dispatch waits
    # for room (a consumer cannot drop a message), and the key goes on.
    rec = _Recorder()
    gate = threading.Event()

    def handler(msg: tuple[str, int]) -> None:
        with rec.lock:
            rec.handled[msg[0]].append(msg[1])

    with KeyedPoolExecutor(1, max_pending=2, on_full="raise") as pool:
        handling = KeyedHandling(
            handler, pool=pool, ack=rec.ack, dead_letter=rec.dead_letter, max_in_flight=10
        )
        pool.submit("other", gate.wait, 30)
        pool.submit("other", int, "1")  # the pool is full now
        errors: list[BaseException] = []

        def dispatch_first() -> None:
            try:
                handling.dispatch("k", ("k", 0))
            except BaseException as exc:  # noqa: BLE001 - recorded for the assertion
                errors.append(exc)

        sender = threading.Thread(target=dispatch_first)
        sender.start()
        wait_until(lambda: len(pool._pool.room_waiters) == 1 or bool(errors))
        gate.set()
        sender.join(30)
        assert not sender.is_alive() and errors == []
        handling.dispatch("k", ("k", 1))
        assert handling.drain(30), "the key's later message never ran"
        handling.close()
    assert rec.handled["k"] == [0, 1]


def test_dispatch_without_waiting_returns_false_on_a_full_pool_and_changes_nothing() -> None:
    rec = _Recorder()
    gate = threading.Event()
    with KeyedPoolExecutor(1, max_pending=1) as pool:
        handling = KeyedHandling(
            lambda msg: None, pool=pool, ack=rec.ack, dead_letter=rec.dead_letter
        )
        pool.submit("other", gate.wait, 30)  # full
        assert handling.dispatch("k", ("k", 0), redelivered=True, wait=False) is False
        stats = handling.stats()
        assert (stats.received, stats.redelivered, stats.in_flight) == (0, 0, 0)
        gate.set()
        assert handling.dispatch("k", ("k", 0), wait=True) is True
        assert handling.drain(30)
        handling.close()
    assert rec.acked == [("k", 0)]
