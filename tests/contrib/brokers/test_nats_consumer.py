"""keyedpool.contrib.nats against a real ``nats-server -js`` on 127.0.0.1 (started by conftest.py).

Scale-out: messages are published to ``f"{subject}.{shard}"`` (mmh3 of the key,
``SHARDS`` shards), each shard has its own durable pull consumer, and process
``i`` of 2 reads the shards ``s % 2 == i``. The multi-process tests run real
consumer processes (consumer_proc.py) that log every handled message to one
shared ``O_APPEND`` file, which ``check_log`` checks.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("nats", reason="nats-py is not installed (pip install keyedpool[nats])")

import nats  # noqa: E402
from _broker_checks import (  # noqa: E402
    WAIT,
    ConsumerProcess,
    Server,
    check_log,
    proc_config,
    read_log,
)
from _util import wait_until  # noqa: E402

from keyedpool import KeyedPoolExecutor  # noqa: E402
from keyedpool._routing import worker_index  # noqa: E402
from keyedpool.contrib.nats import (  # noqa: E402
    KEY_HEADER,
    DeadLetter,
    NatsConsumer,
    NatsMessage,
    NatsPublisher,
    RetryPolicy,
    shard_of,
    shard_subject,
)

pytestmark = pytest.mark.timeout(120)

SHARDS = 8
KEYS = [f"key-{i}" for i in range(100)]


@pytest.fixture
def stream() -> str:
    return f"ORDERS_{uuid.uuid4().hex[:8]}"


def _url(server: Server) -> str:
    return f"nats://{server.url}"


def _publish(server: Server, stream: str, keys: list[str], seqs: range) -> None:
    """Publish round by round (so each key's messages are in seq order), then wait until stored."""

    async def main() -> None:
        nc = await nats.connect(_url(server))
        js = nc.jetstream()
        try:
            await js.stream_info(stream)
        except nats.js.errors.NotFoundError:
            await js.add_stream(name=stream, subjects=[f"{stream}.*"])
        before = (await js.stream_info(stream)).state.messages
        items = [(key, seq) for seq in seqs for key in keys]
        for key, seq in items[:-1]:
            await nc.publish(
                shard_subject(stream, shard_of(key, SHARDS)), str(seq).encode(),
                headers={KEY_HEADER: key},
            )
        # The last one through JetStream: the server handles a connection's
        # messages in order, so once it is acknowledged all are stored (no polling).
        key, seq = items[-1]
        await js.publish(
            shard_subject(stream, shard_of(key, SHARDS)), str(seq).encode(),
            headers={KEY_HEADER: key},
        )
        stored = (await js.stream_info(stream)).state.messages
        assert stored == before + len(items), (stored, before, len(items))
        await nc.close()

    asyncio.run(main())


def _unacked(server: Server, stream: str) -> int:
    """Messages delivered to a shard consumer and not acked (all shards)."""

    async def main() -> int:
        nc = await nats.connect(_url(server))
        js = nc.jetstream()
        total = 0
        for shard in range(SHARDS):
            try:
                info = await js.consumer_info(stream, f"{stream}-keyedpool-{shard}")
            except nats.js.errors.NotFoundError:
                continue
            total += int(info.num_ack_pending or 0) + int(info.num_pending or 0)
        await nc.close()
        return total

    return asyncio.run(main())


def _dead_letters(server: Server, stream: str) -> list[tuple[bytes, dict[str, str]]]:
    async def main() -> list[tuple[bytes, dict[str, str]]]:
        nc = await nats.connect(_url(server))
        js = nc.jetstream()
        sub = await js.pull_subscribe(f"{stream}.dead", stream=stream)
        out: list[tuple[bytes, dict[str, str]]] = []
        try:
            for msg in await sub.fetch(10, timeout=2):
                out.append((msg.data, dict(msg.headers or {})))
                await msg.ack()
        except nats.errors.TimeoutError:
            pass
        await nc.close()
        return out

    return asyncio.run(main())


def _on_distinct_workers(count: int, workers: int, prefix: str) -> list[str]:
    """*count* keys that run on *count* different workers of a pool of *workers*."""
    keys: dict[int, str] = {}
    i = 0
    while len(keys) < count:
        keys.setdefault(worker_index(f"{prefix}{i}", workers), f"{prefix}{i}")
        i += 1
    return list(keys.values())


def _share(process_index: int, seqs: int) -> int:
    return sum(seqs for key in KEYS if shard_of(key, SHARDS) % 2 == process_index)


def _config(server: Server, log: Path, stream: str, index: int, **extra: Any) -> dict[str, Any]:
    return proc_config(
        log, broker="nats", url=server.url, stream=stream,
        shards=SHARDS, process_index=index, process_count=2, **extra,
    )


def test_two_processes_handle_10000_messages_in_order_per_key(
    nats_server: Server, stream: str, tmp_path: Path
) -> None:
    log = tmp_path / "handled.log"
    _publish(nats_server, stream, KEYS, range(100))
    procs = [ConsumerProcess(_config(nats_server, log, stream, i)) for i in range(2)]
    try:
        for i, proc in enumerate(procs):
            proc.wait_handled(_share(i, 100))
        stats = [proc.stop() for proc in procs]
    finally:
        for proc in procs:
            proc.close()
    check = check_log(log, dict.fromkeys(KEYS, 100))
    assert check.lost == []
    assert check.violations == []
    assert check.duplicates == 0
    assert check.total == 10_000
    for key, records in check.by_key.items():
        assert {pid for pid, _, _ in records} == {procs[shard_of(key, SHARDS) % 2].pid}
    assert sum(s["handled"] for s in stats) == 10_000
    assert _unacked(nats_server, stream) == 0


def test_sigkill_mid_stream_loses_nothing_and_keeps_order(
    nats_server: Server, stream: str, tmp_path: Path, capsys: Any
) -> None:
    log = tmp_path / "handled.log"
    _publish(nats_server, stream, KEYS, range(50))
    # Process 1 stops making progress after 300 messages, with more in flight:
    # it is killed there, mid-stream, with handlers running and acks unsent.
    p0 = ConsumerProcess(_config(nats_server, log, stream, 0))
    p1 = ConsumerProcess(_config(nats_server, log, stream, 1, stall_after=300))
    replacement = None
    try:
        p1.wait_handled(300)
        p1.kill()
        done_by_p1 = {(k, s) for pid, k, s, _ in read_log(log) if pid == p1.pid}
        assert 0 < len(done_by_p1) < _share(1, 50)
        _publish(nats_server, stream, KEYS, range(50, 100))
        # The replacement (same process_index) finds unacked messages on its
        # shard consumers and replays them from the ack floor, before newer ones.
        replacement = ConsumerProcess(_config(nats_server, log, stream, 1, progress=1))
        p0.wait_handled(_share(0, 100))
        replacement.wait_handled(_share(1, 100) - len(done_by_p1))
        stats0, stats1 = p0.stop(), replacement.stop()
    finally:
        for proc in (p0, p1, replacement):
            if proc is not None:
                proc.close()
    check = check_log(log, dict.fromkeys(KEYS, 100))
    assert check.lost == []
    assert check.violations == []
    # At least once: only the replacement handled anything twice, and every
    # copy it handled of a message the dead process had handled was flagged.
    assert set(check.duplicates_by_pid) <= {replacement.pid}
    dup_records = [
        (key, seq, flag)
        for key, records in check.by_key.items()
        for pid, seq, flag in records
        if pid == replacement.pid and (key, seq) in done_by_p1
    ]
    assert len(dup_records) == check.duplicates
    assert all(flag for _, _, flag in dup_records)
    assert stats1["redelivered"] >= check.duplicates
    assert stats0["redelivered"] == 0
    assert _unacked(nats_server, stream) == 0
    with capsys.disabled():
        print(
            f"\n[nats] SIGKILL mid-stream: {check.total} handled, 0 lost, "
            f"{check.duplicates} duplicates (at-least-once), "
            f"{stats1['redelivered']} redelivered to the replacement"
        )


class _InProcess:
    """Collects what a handler saw; signals when *expected* messages were handled."""

    def __init__(self, expected: int) -> None:
        self.lock = threading.Lock()
        self.handled: dict[str, list[int]] = defaultdict(list)
        self.calls: dict[tuple[str, int], int] = defaultdict(int)
        self.expected = expected
        self.count = 0
        self.done = threading.Event()

    def note_call(self, message: NatsMessage) -> int:
        with self.lock:
            self.calls[(str(message.key), int(message.data))] += 1
            return self.calls[(str(message.key), int(message.data))]

    def note_handled(self, message: NatsMessage) -> None:
        with self.lock:
            self.handled[str(message.key)].append(int(message.data))
            self.count += 1
            if self.count >= self.expected:
                self.done.set()


def _publish_small(server: Server, stream: str, keys: list[str], seqs: range) -> None:
    with NatsPublisher(_url(server), stream, shards=SHARDS) as pub:
        for seq in seqs:
            for key in keys:
                pub.publish(key, str(seq).encode())


def test_a_handler_that_fails_twice_then_succeeds_keeps_order(
    nats_server: Server, stream: str
) -> None:
    seen = _InProcess(expected=20)

    def handle(message: NatsMessage) -> None:
        call = seen.note_call(message)
        if message.key == "a" and message.data == b"3" and call <= 2:
            raise ConnectionError("flaky downstream")
        seen.note_handled(message)

    _publish_small(nats_server, stream, ["a", "b"], range(10))
    consumer = NatsConsumer(
        _url(nats_server), stream, handle, shards=SHARDS, max_workers=4,
        retry=RetryPolicy(attempts=3, backoff=0.01),
    )
    with consumer:
        assert seen.done.wait(WAIT)
    assert seen.handled["a"] == list(range(10))
    assert seen.handled["b"] == list(range(10))
    assert seen.calls[("a", 3)] == 3
    stats = consumer.stats()
    assert stats.retries == 2
    assert stats.dead_lettered == 0
    assert _unacked(nats_server, stream) == 0


def test_a_poison_message_goes_to_the_dead_letter_subject_and_its_key_moves_on(
    nats_server: Server, stream: str
) -> None:
    seen = _InProcess(expected=9 + 9)
    dead: list[tuple[NatsMessage, BaseException]] = []

    def handle(message: NatsMessage) -> None:
        seen.note_call(message)
        if message.key == "a" and message.data == b"4":
            raise ValueError("cannot parse this one, ever")
        if message.key == "b" and message.data == b"0":
            raise DeadLetter("unknown event type")  # no retries for this one
        seen.note_handled(message)

    _publish_small(nats_server, stream, ["a", "b"], range(10))
    consumer = NatsConsumer(
        _url(nats_server), stream, handle, shards=SHARDS, max_workers=4,
        retry=RetryPolicy(attempts=3, backoff=0.01),
        on_dead_letter=lambda m, e: dead.append((m, e)),
    )
    with consumer:
        # "a"-4 and "b"-0 are dead-lettered before their keys' next messages run.
        assert seen.done.wait(WAIT)
    assert seen.handled["a"] == [0, 1, 2, 3, 5, 6, 7, 8, 9]
    assert seen.handled["b"] == list(range(1, 10))
    assert seen.calls[("a", 4)] == 3
    assert seen.calls[("b", 0)] == 1
    letters = _dead_letters(nats_server, stream)
    assert sorted((h[KEY_HEADER], data) for data, h in letters) == [("a", b"4"), ("b", b"0")]
    errors = {h[KEY_HEADER]: h["Keyedpool-Error"] for _, h in letters}
    assert "ValueError" in errors["a"]
    assert sorted(str(m.key) for m, _ in dead) == ["a", "b"]
    stats = consumer.stats()
    assert stats.dead_lettered == 2 and stats.handled == 18
    assert _unacked(nats_server, stream) == 0


def _consumer_state(server: Server, stream: str, shard: int) -> tuple[int, int]:
    """(delivered and unacked, not yet delivered) for one shard consumer."""

    async def main() -> tuple[int, int]:
        nc = await nats.connect(_url(server))
        info = await nc.jetstream().consumer_info(stream, f"{stream}-keyedpool-{shard}")
        await nc.close()
        return int(info.num_ack_pending or 0), int(info.num_pending or 0)

    return asyncio.run(main())


def test_a_slow_key_does_not_stop_the_other_keys(nats_server: Server, stream: str) -> None:
    pool = KeyedPoolExecutor(4)
    # Keys on the slow key's worker wait behind it (a worker runs one handler
    # at a time); every other key, including those in the slow key's shard
    # subject, keeps going.
    others = [k for k in KEYS if pool.worker_index(k) != pool.worker_index("slow")][:30]
    assert any(shard_of(k, SHARDS) == shard_of("slow", SHARDS) for k in others)
    release = threading.Event()
    slow_started = threading.Event()
    seen = _InProcess(expected=len(others) * 5)
    slow_done: list[int] = []

    def handle(message: NatsMessage) -> None:
        if message.key == "slow":
            slow_started.set()
            assert release.wait(WAIT)
            slow_done.append(int(message.data))
        else:
            seen.note_handled(message)

    _publish(nats_server, stream, ["slow", *others], range(5))
    consumer = NatsConsumer(_url(nats_server), stream, handle, shards=SHARDS, pool=pool)
    try:
        with consumer:
            try:
                assert seen.done.wait(WAIT)  # every other key finished...
                assert slow_started.is_set() and slow_done == []  # ...while "slow" is stuck
            finally:
                release.set()
        assert slow_done == list(range(5))
        for key in others:
            assert seen.handled[key] == list(range(5))
    finally:
        release.set()
        pool.shutdown()
    assert _unacked(nats_server, stream) == 0


def test_backpressure_stops_fetching_while_full(nats_server: Server, stream: str) -> None:
    release = threading.Event()
    entered = threading.Semaphore(0)
    seen = _InProcess(expected=50)

    def handle(message: NatsMessage) -> None:
        entered.release()
        assert release.wait(WAIT)
        seen.note_handled(message)

    # The first five run at once, on five workers; the other 45 must wait unfetched.
    first = _on_distinct_workers(5, 8, "first-")
    with NatsPublisher(_url(nats_server), stream, shards=1) as pub:
        for key in first + [f"k{i}" for i in range(45)]:
            pub.publish(key, b"0")
    consumer = NatsConsumer(
        _url(nats_server), stream, handle, shards=1, max_workers=8, max_in_flight=5
    )
    with consumer:
        try:
            for _ in range(5):
                assert entered.acquire(timeout=WAIT)
            # Five handlers hold five messages; the consumer has fetched no more.
            assert _consumer_state(nats_server, stream, 0) == (5, 45)
            assert consumer.stats().in_flight == 5
            release.set()
            assert seen.done.wait(WAIT)
        finally:
            release.set()  # before the stop at the end of the block waits for the handlers
    assert seen.count == 50
    assert _unacked(nats_server, stream) == 0


def test_graceful_stop_drains_and_acks_in_flight_messages_and_fetches_no_more(
    nats_server: Server, stream: str
) -> None:
    release = threading.Event()
    entered = threading.Semaphore(0)
    seen = _InProcess(expected=3)

    def handle(message: NatsMessage) -> None:
        entered.release()
        assert release.wait(WAIT)
        seen.note_handled(message)

    with NatsPublisher(_url(nats_server), stream, shards=1) as pub:
        abc = _on_distinct_workers(3, 4, "in-flight-")
        for key in abc:
            pub.publish(key, b"0")
        consumer = NatsConsumer(
            _url(nats_server), stream, handle, shards=1, max_workers=4, max_in_flight=3
        ).start()
        try:
            for _ in range(3):
                assert entered.acquire(timeout=WAIT)
            consumer.stop(wait=False)  # stop fetching; three messages still in flight
            for key in ("d", "e"):
                pub.publish(key, b"1")
            release.set()
            assert consumer.stop() is True  # drained and acked
        finally:
            release.set()
            consumer.stop()
    assert sorted(seen.handled) == sorted(abc)
    assert _consumer_state(nats_server, stream, 0) == (0, 2)  # "d", "e" wait for the next one


def test_bad_arguments_fail_at_the_call() -> None:
    # Checked before connecting: no server needed.
    url = "nats://127.0.0.1:1"
    with pytest.raises(TypeError, match="handler"):
        NatsConsumer(url, "S", "not callable")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="stream"):
        NatsConsumer(url, "S.x", print)
    with pytest.raises(ValueError, match="process_index"):
        NatsConsumer(url, "S", print, shards=4, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="ack_wait"):
        NatsConsumer(url, "S", print, ack_wait=-1)
    with pytest.raises(TypeError, match="key"):
        NatsConsumer(url, "S", print, key=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="poll_timeout"):
        NatsConsumer(url, "S", print, poll_timeout=0)


def test_start_raises_when_nats_cannot_be_reached() -> None:
    consumer = NatsConsumer(
        "nats://127.0.0.1:1", "S", print,
        # nats-py tries a server max_reconnect_attempts times (default 60, 2 s apart).
        connect_options={"max_reconnect_attempts": 1, "reconnect_time_wait": 0.05},
    )
    with pytest.raises(Exception) as raised:  # nats-py: NoServersError or OSError
        consumer.start()  # at the call, not later in a background thread
    assert consumer.error is raised.value
    assert consumer.stop() is False  # never ran
    assert not any(t.name.startswith("keyedpool-nats-S") for t in threading.enumerate())


def test_an_error_that_stops_the_consumer_is_raised_by_stop(
    nats_server: Server, stream: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    uncaught: list[threading.ExceptHookArgs] = []
    monkeypatch.setattr(threading, "excepthook", uncaught.append)
    pool = KeyedPoolExecutor(2)
    pool.shutdown()  # a shared pool shut down under a running consumer: dispatch fails
    consumer = NatsConsumer(_url(nats_server), stream, print, shards=1, pool=pool,
                            poll_timeout=0.1).start()
    _publish_small_shards(nats_server, stream, ["a"], 1)
    wait_until(lambda: consumer.error is not None)  # set by the dying thread; no event
    with pytest.raises(RuntimeError, match="shut"):
        consumer.stop(WAIT)
    assert consumer.stopping and isinstance(consumer.error, RuntimeError)
    assert uncaught == []  # kept for stop(), not left to threading.excepthook


def _publish_small_shards(server: Server, stream: str, keys: list[str], shards: int) -> None:
    with NatsPublisher(_url(server), stream, shards=shards) as pub:
        for key in keys:
            pub.publish(key, b"0")


def test_a_message_whose_key_cannot_be_read_is_dead_lettered(
    nats_server: Server, stream: str
) -> None:
    seen = _InProcess(expected=2)

    def key_of(message: NatsMessage) -> object:
        key = (message.headers or {}).get(KEY_HEADER)
        if key == "boom":
            raise LookupError("no aggregate id")
        return 1.5 if key == "float" else key

    _publish_small_shards(nats_server, stream, ["a", "boom", "float", "a"], 1)
    consumer = NatsConsumer(
        _url(nats_server), stream, seen.note_handled, shards=1,
        key=key_of,  # type: ignore[arg-type]
    )
    with consumer:
        assert seen.done.wait(WAIT)
    assert consumer.stats().dead_lettered == 2  # stop() drained them
    letters = _dead_letters(nats_server, stream)
    errors = {h[KEY_HEADER]: h["Keyedpool-Error"] for _, h in letters}
    assert set(errors) == {"boom", "float"}
    assert "no aggregate id" in errors["boom"] and "TypeError" in errors["float"]
    assert _unacked(nats_server, stream) == 0
