"""The consumer engine (keyedpool.contrib.consumer.Consumer) with an in-memory "broker".

The adapter below is what a broker adapter writes: fetch, ack, dead-letter,
find a message's key. Everything else (options, lifecycle, keys, dead-letter
destinations and hooks, the stop sequence, errors) is the engine's, tested
here without any server.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from typing import Any

import pytest

from keyedpool import RetryPolicy
from keyedpool.contrib.consumer import Consumer, DeadLetter

pytestmark = pytest.mark.timeout(60)

WAIT = 30.0
Message = dict[str, Any]


class MemoryConsumer(Consumer[Message]):
    """Consumes a list of dicts; acks and dead letters are recorded."""

    def __init__(self, messages: list[Message], handler: Any, **options: Any) -> None:
        self.fail_open: BaseException | None = options.pop("fail_open", None)
        self.fail_close: BaseException | None = options.pop("fail_close", None)
        self.failing_acks: int = options.pop("failing_acks", 0)  # owner: the consumer's thread
        self.ack_bug: Exception | None = options.pop("ack_bug", None)
        key = options.pop("key", "key")
        shards = options.pop("shards", 1)
        super().__init__(handler, key=key, key_kind="field", thread_name="keyedpool-memory",
                         options=None, args=options, shards=shards)
        self._inbox = list(messages)  # owner: the consumer's thread
        self.lock = threading.Lock()
        self.acked: list[tuple[int, bool]] = []  # (id, dead): owner: lock
        self.written: list[tuple[int, str, str]] = []  # (id, destination, error): owner: lock
        self.closed = threading.Event()
        self.expected_acks = len(messages)
        self.all_acked = threading.Event()

    def _open(self) -> None:
        if self.fail_open is not None:
            raise self.fail_open

    def _consume(self) -> None:
        while not self._stopping.is_set():
            self._flush_acks()
            room = self._handling.wait_for_room(self.options.poll_timeout)
            taken, self._inbox = self._inbox[:room], self._inbox[room:]
            for message in taken:
                self._receive(message)
            if not taken:
                self._stopping.wait(self.options.poll_timeout)

    def _send_acks(self, batch: list[tuple[Message, bool]]) -> None:
        if self.ack_bug is not None:
            raise self.ack_bug
        if self.failing_acks:
            self.failing_acks -= 1
            raise ConnectionError("the broker is away")
        with self.lock:
            self.acked.extend((message["id"], dead) for message, dead in batch)
            if len(self.acked) >= self.expected_acks:
                self.all_acked.set()

    def _shard(self, message: Message) -> int:
        return int(message.get("shard", 0))

    def _write_dead_letter(self, message: Message, error: BaseException, destination: str) -> None:
        with self.lock:
            self.written.append((message["id"], destination, repr(error)))

    def _default_dead_letter(self, message: Message) -> str:
        return "memory.dead"

    def _named_key(self, message: Message, name: str) -> object:
        return message.get(name)

    def _close(self) -> None:
        self.closed.set()
        if self.fail_close is not None:
            raise self.fail_close


class Seen:
    def __init__(self, expected: int) -> None:
        self.lock = threading.Lock()
        self.by_key: dict[object, list[int]] = defaultdict(list)
        self.count = 0
        self.expected = expected
        self.done = threading.Event()

    def handle(self, message: Message) -> None:
        with self.lock:
            self.by_key[message.get("key")].append(message["id"])
            self.count += 1
            if self.count >= self.expected:
                self.done.set()


def _messages(keys: list[str], per_key: int) -> list[Message]:
    return [{"id": i * len(keys) + k, "key": key, "n": i}
            for i in range(per_key) for k, key in enumerate(keys)]


def test_messages_run_in_order_per_key_and_are_acked_after_their_handler() -> None:
    messages = _messages(["a", "b", "c"], 20)
    seen = Seen(len(messages))
    consumer = MemoryConsumer(messages, seen.handle, max_workers=4, max_in_flight=5)
    with consumer:
        assert seen.done.wait(WAIT)
    for key in "abc":
        assert seen.by_key[key] == [m["id"] for m in messages if m["key"] == key]
    assert sorted(consumer.acked) == sorted((m["id"], False) for m in messages)
    stats = consumer.stats()
    assert (stats.received, stats.handled, stats.in_flight) == (60, 60, 0)
    assert consumer.closed.is_set()
    with pytest.raises(RuntimeError):
        consumer.pool.submit(None, int)  # its own pool was shut down


@pytest.mark.parametrize(
    ("dead_letter", "written_to"), [({}, "memory.dead"), ({"dead_letter": "x.dlq"}, "x.dlq"),
                                    ({"dead_letter": None}, None)],
    ids=["default", "named", "none"],
)
def test_a_dead_letter_goes_where_dead_letter_says_then_its_key_moves_on(
    dead_letter: dict[str, Any], written_to: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    seen = Seen(2)

    def handle(message: Message) -> None:
        if message["id"] == 1:
            raise DeadLetter("cannot parse")
        seen.handle(message)

    messages = [{"id": i, "key": "k"} for i in range(3)]
    consumer = MemoryConsumer(messages, handle, max_workers=2, **dead_letter)
    with caplog.at_level(logging.WARNING, logger="keyedpool.contrib"), consumer:
        assert seen.done.wait(WAIT)
    assert seen.by_key["k"] == [0, 2]
    assert sorted(consumer.acked) == [(0, False), (1, True), (2, False)]
    if written_to is None:
        assert consumer.written == []
        assert "dropped (dead_letter=None)" in caplog.text
    else:
        [(ident, destination, error)] = consumer.written
        assert (ident, destination) == (1, written_to) and "cannot parse" in error
        assert f"sent to {written_to}" in caplog.text
    assert consumer.stats().dead_lettered == 1


def test_retries_run_before_the_next_message_of_the_key() -> None:
    calls: list[int] = []
    seen = Seen(3)

    def handle(message: Message) -> None:
        calls.append(message["id"])
        if message["id"] == 0 and calls.count(0) < 3:
            raise ConnectionError("flaky")
        seen.handle(message)

    messages = [{"id": i, "key": "k"} for i in range(3)]
    retry = RetryPolicy(attempts=3, backoff=0.001)
    with MemoryConsumer(messages, handle, max_workers=2, retry=retry) as consumer:
        assert seen.done.wait(WAIT)
    assert calls == [0, 0, 0, 1, 2]
    assert consumer.stats().retries == 2


def test_a_message_whose_key_cannot_be_read_is_dead_lettered_and_the_rest_go_on() -> None:
    seen = Seen(2)
    messages = [{"id": 0, "key": "a"}, {"id": 1, "key": 1.5}, {"id": 2, "key": "b"}]
    consumer = MemoryConsumer(messages, seen.handle, max_workers=2)
    with consumer:
        assert seen.done.wait(WAIT)
    [(ident, destination, error)] = consumer.written
    assert (ident, destination) == (1, "memory.dead") and "float" in error
    assert (1, True) in consumer.acked


def test_a_raising_on_dead_letter_hook_is_logged_and_the_message_still_settled(
    caplog: pytest.LogCaptureFixture,
) -> None:
    told: list[int] = []

    def hook(message: Message, error: BaseException) -> None:
        told.append(message["id"])
        raise RuntimeError("hook bug")

    settled = threading.Event()

    def handle(message: Message) -> None:
        raise DeadLetter("no")

    consumer = MemoryConsumer([{"id": 7, "key": "k"}], handle, max_workers=1,
                              on_dead_letter=hook)
    consumer._handling._ack = lambda m, d: (consumer._settled(m, d), settled.set())
    with caplog.at_level(logging.ERROR, logger="keyedpool.contrib"), consumer:
        assert settled.wait(WAIT)
    assert told == [7] and consumer.acked == [(7, True)]
    assert "a consumer hook raised" in caplog.text


def test_a_start_that_cannot_connect_raises_there_and_leaves_no_threads() -> None:
    consumer = MemoryConsumer([], print, max_workers=2,
                              fail_open=ConnectionError("no broker at memory://"))
    with pytest.raises(ConnectionError, match="memory://"):
        consumer.start()
    assert isinstance(consumer.error, ConnectionError)
    assert consumer.closed.is_set()
    with pytest.raises(RuntimeError):
        consumer.pool.submit(None, int)
    assert consumer.stop() is False  # nothing runs
    with pytest.raises(RuntimeError, match="already started"):
        consumer.start()


def test_an_error_while_closing_is_raised_by_stop_and_kept() -> None:
    consumer = MemoryConsumer([], print, max_workers=1, fail_close=OSError("close failed"))
    consumer.start()
    with pytest.raises(OSError, match="close failed"):
        consumer.stop(WAIT)
    assert isinstance(consumer.error, OSError)


def test_a_stop_that_times_out_leaves_the_running_message_unacked() -> None:
    gate, started = threading.Event(), threading.Event()

    def handle(message: Message) -> None:
        started.set()
        assert gate.wait(WAIT)

    consumer = MemoryConsumer([{"id": 0, "key": "k"}, {"id": 1, "key": "k"}], handle,
                              max_workers=1)
    consumer.start()
    try:
        assert started.wait(WAIT)
        assert consumer.stop(0) is False  # one running, one waiting behind it
        assert consumer.acked == []  # neither was acked: the broker has them
    finally:
        gate.set()


def test_run_blocks_until_stop_is_called_from_another_thread() -> None:
    seen = Seen(1)
    consumer = MemoryConsumer([{"id": 0, "key": "k"}], seen.handle, max_workers=1)
    runner = threading.Thread(target=consumer.run)
    runner.start()
    assert seen.done.wait(WAIT)
    assert consumer.stop(WAIT) is True
    runner.join(WAIT)
    assert not runner.is_alive() and consumer.acked == [(0, False)]


def test_acks_that_fail_are_sent_again_counted_and_none_is_lost(
    caplog: pytest.LogCaptureFixture,
) -> None:
    messages = _messages(["a", "b"], 10)
    seen = Seen(len(messages))
    consumer = MemoryConsumer(messages, seen.handle, max_workers=2, failing_acks=3)
    with caplog.at_level(logging.WARNING, logger="keyedpool.contrib"), consumer:
        assert consumer.all_acked.wait(WAIT)  # the consumer's thread tried again
    assert sorted(consumer.acked) == sorted((m["id"], False) for m in messages)  # each once
    assert consumer.failing_acks == 0
    assert consumer.stats().ack_errors >= 3  # every message of a failed batch counts
    assert "could not ack" in caplog.text


def test_a_shard_counts_its_messages_until_their_acks_are_written() -> None:
    release = threading.Event()
    started = threading.Event()

    def handle(message: Message) -> None:
        if message["shard"] == 1:
            started.set()
            assert release.wait(WAIT)

    messages = [{"id": 0, "key": "a", "shard": 0}, {"id": 1, "key": "b", "shard": 1}]
    consumer = MemoryConsumer(messages, handle, max_workers=2, shards=2)
    consumer.start()
    try:
        assert started.wait(WAIT)
        assert consumer._acks.busy(1)  # running
        release.set()
    finally:
        release.set()
        assert consumer.stop(WAIT)
    assert sorted(consumer.acked) == [(0, False), (1, False)]
    assert not consumer._acks.busy(0) and not consumer._acks.busy(1)  # acks written


def test_an_ack_error_that_is_not_transient_stops_the_consumer_with_it() -> None:
    handled = threading.Event()
    consumer = MemoryConsumer([{"id": 1, "key": "k"}], lambda m: handled.set(), max_workers=1,
                              ack_bug=TypeError("a bug in _send_acks"))
    consumer.start()
    assert handled.wait(WAIT)
    with pytest.raises(TypeError, match="a bug in _send_acks"):
        consumer.stop(WAIT)  # (it stopped by itself: stop() waits for that and raises)
    assert isinstance(consumer.error, TypeError)
    assert consumer.acked == [] and consumer.stats().ack_errors >= 1
