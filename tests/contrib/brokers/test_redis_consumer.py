"""keyedpool.contrib.redis against a real ``redis-server`` on 127.0.0.1 (started by conftest.py).

Scale-out: the stream is sharded by the mmh3 hash of the key into ``SHARDS``
streams; either process ``i`` of 2 reads the shards ``s % 2 == i`` (pinned), or
the processes share the shards through leases (a process joins; a process is
killed and the survivor takes over). The multi-process
tests run real consumer processes (consumer_proc.py) that log every handled
message to one shared ``O_APPEND`` file, which ``check_log`` checks.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("redis", reason="redis-py is not installed (pip install keyedpool[redis])")

import redis  # noqa: E402
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

from keyedpool.contrib.redis import (  # noqa: E402
    RedisConsumer,
    RedisMessage,
    dead_letter_stream,
    publish,
    shard_of,
    shard_stream,
)

pytestmark = pytest.mark.timeout(120)

SHARDS = 8
KEYS = [f"key-{i}" for i in range(100)]


@pytest.fixture
def client(redis_server: Server) -> Iterator[redis.Redis]:
    r = redis.Redis(host=redis_server.host, port=redis_server.port)
    yield r
    r.close()


@pytest.fixture
def stream() -> str:
    return f"orders-{uuid.uuid4().hex[:8]}"


def _publish(client: redis.Redis, stream: str, keys: list[str], seqs: range) -> None:
    # Round by round, so every key's messages are in seq order in its shard.
    with client.pipeline(transaction=False) as pipe:
        for seq in seqs:
            for key in keys:
                publish(pipe, stream, key, {"seq": seq}, shards=SHARDS)
        pipe.execute()


def _pending(client: redis.Redis, stream: str, group: str) -> int:
    total = 0
    for shard in range(SHARDS):
        name = shard_stream(stream, shard)
        try:
            total += int(client.xpending(name, group)["pending"])
        except redis.ResponseError as exc:  # no such group (yet): nothing pending
            assert "NOGROUP" in str(exc)
    return total


def _share(process_index: int, seqs: int) -> int:
    return sum(seqs for key in KEYS if shard_of(key, SHARDS) % 2 == process_index)


def _config(server: Server, log: Path, stream: str, index: int, **extra: Any) -> dict[str, Any]:
    return proc_config(
        log, broker="redis", url=server.url, stream=stream, group="g",
        shards=SHARDS, process_index=index, process_count=2, **extra,
    )


def test_two_processes_handle_10000_messages_in_order_per_key(
    redis_server: Server, client: redis.Redis, stream: str, tmp_path: Path
) -> None:
    log = tmp_path / "handled.log"
    _publish(client, stream, KEYS, range(100))
    run_two_sharded_processes(
        log,
        KEYS,
        lambda i: _config(redis_server, log, stream, i),
        lambda i: _share(i, 100),
        lambda key: shard_of(key, SHARDS) % 2,
    )
    assert _pending(client, stream, "g") == 0


def _assert_pending(client: redis.Redis, stream: str) -> None:
    assert _pending(client, stream, "g") > 0  # unacked entries of the dead process


def test_sigkill_mid_stream_loses_nothing_and_keeps_order(
    redis_server: Server, client: redis.Redis, stream: str, tmp_path: Path, capsys: Any
) -> None:
    log = tmp_path / "handled.log"
    sigkill_process_1_mid_stream(
        "redis",
        log,
        KEYS,
        lambda i, **extra: _config(redis_server, log, stream, i, **extra),
        lambda seqs: _publish(client, stream, KEYS, seqs),
        _share,
        capsys,
        after_kill=lambda: _assert_pending(client, stream),
    )
    assert _pending(client, stream, "g") == 0


def _shared_config(server: Server, log: Path, stream: str, **extra: Any) -> dict[str, Any]:
    """A process that shares the shards with the others through leases (no process_index)."""
    return proc_config(
        log, broker="redis", url=server.url, stream=stream, group="g",
        shards=SHARDS, lease_ttl=1.5, **extra,
    )


def test_a_process_that_joins_gets_half_the_shards_after_they_drain(
    redis_server: Server, client: redis.Redis, stream: str, tmp_path: Path
) -> None:
    log = tmp_path / "handled.log"
    a_second_process_joins_mid_stream(
        log,
        KEYS,
        lambda **extra: _shared_config(redis_server, log, stream, **extra),
        lambda seqs: _publish(client, stream, KEYS, seqs),
        lambda key: shard_of(key, SHARDS),
        SHARDS,
    )
    assert _pending(client, stream, "g") == 0


def test_sigkill_without_a_replacement_the_survivor_takes_over(
    redis_server: Server, client: redis.Redis, stream: str, tmp_path: Path, capsys: Any
) -> None:
    log = tmp_path / "handled.log"
    sigkill_one_the_other_takes_over(
        "redis",
        log,
        KEYS,
        lambda **extra: _shared_config(redis_server, log, stream, **extra),
        lambda seqs: _publish(client, stream, KEYS, seqs),
        SHARDS,
        capsys,
        after_kill=lambda: _assert_pending(client, stream),
    )
    assert _pending(client, stream, "g") == 0


def _seq_of(message: RedisMessage) -> int:
    """The sequence number of a message, as this module publishes it."""
    return int(message.get("seq") or -1)


def _in_process(expected: int) -> InProcess:
    """What the handler saw."""
    return InProcess(expected, _seq_of)


def _consumer_for(client: redis.Redis, stream: str) -> Callable[..., RedisConsumer]:
    """``(handler, **options)`` -> a consumer of all *stream*'s shards, with 4 workers."""
    return functools.partial(
        RedisConsumer, client, stream, group="g", shards=SHARDS, max_workers=4
    )


def test_a_handler_that_fails_twice_then_succeeds_keeps_order(
    client: redis.Redis, stream: str
) -> None:
    _publish(client, stream, ["a", "b"], range(10))
    check_a_flaky_message_is_retried_in_order(_consumer_for(client, stream), _seq_of)
    assert _pending(client, stream, "g") == 0


def test_a_poison_message_goes_to_the_dead_letter_stream_and_its_key_moves_on(
    client: redis.Redis, stream: str
) -> None:
    _publish(client, stream, ["a", "b"], range(10))
    check_a_poison_message_is_dead_lettered(_consumer_for(client, stream), _seq_of)
    entries: list[tuple[bytes, dict[bytes, bytes]]] = client.xrange(  # type: ignore[assignment]
        dead_letter_stream(stream)
    )
    assert sorted((f[b"key"], f[b"seq"]) for _, f in entries) == [(b"a", b"4"), (b"b", b"0")]
    errors = {f[b"key"]: f[b"dead_letter.error"] for _, f in entries}
    assert b"ValueError" in errors[b"a"]
    assert _pending(client, stream, "g") == 0


def test_a_slow_key_does_not_stop_the_other_keys(client: redis.Redis, stream: str) -> None:
    check_a_slow_key_does_not_stop_the_others(
        functools.partial(RedisConsumer, client, stream, group="g", shards=SHARDS),
        lambda keys, seqs: _publish(client, stream, keys, seqs),
        _seq_of,
        KEYS,
        SHARDS,
    )
    assert _pending(client, stream, "g") == 0


def test_backpressure_stops_fetching_while_full(client: redis.Redis, stream: str) -> None:
    release = threading.Event()
    entered = threading.Semaphore(0)
    seen = _in_process(expected=50)

    def handle(message: RedisMessage) -> None:
        entered.release()
        assert release.wait(WAIT)
        seen.note_handled(message)

    # The first five run at once, on five workers; the other 45 must wait unfetched.
    first = keys_on_distinct_workers(5, 8, "first-")
    keys = first + [f"k{i}" for i in range(45)]
    with client.pipeline(transaction=False) as pipe:
        for key in keys:
            publish(pipe, stream, key, {"seq": 0}, shards=1)
        pipe.execute()
    consumer = RedisConsumer(
        client, stream, handle, group="g", shards=1, max_workers=8, max_in_flight=5
    )
    with consumer:
        try:
            for _ in range(5):
                assert entered.acquire(timeout=WAIT)
            # Five handlers hold five entries; the consumer has fetched no more.
            assert client.xpending(shard_stream(stream, 0), "g")["pending"] == 5
            assert consumer.stats().in_flight == 5
            release.set()
            assert seen.done.wait(WAIT)
        finally:
            release.set()  # before the stop at the end of the block waits for the handlers
    assert seen.count == 50
    assert client.xpending(shard_stream(stream, 0), "g")["pending"] == 0


def test_graceful_stop_drains_and_acks_in_flight_entries_and_fetches_no_more(
    client: redis.Redis, stream: str
) -> None:
    release = threading.Event()
    entered = threading.Semaphore(0)
    seen = _in_process(expected=3)

    def handle(message: RedisMessage) -> None:
        entered.release()
        assert release.wait(WAIT)
        seen.note_handled(message)

    abc = keys_on_distinct_workers(3, 4, "in-flight-")
    for key in abc:
        publish(client, stream, key, {"seq": 0}, shards=1)
    consumer = RedisConsumer(
        client, stream, handle, group="g", shards=1, max_workers=4, max_in_flight=3
    ).start()
    try:
        for _ in range(3):
            assert entered.acquire(timeout=WAIT)
        consumer.stop(wait=False)  # stop fetching; three entries still in flight
        for key in ("d", "e"):
            publish(client, stream, key, {"seq": 1}, shards=1)
        release.set()
        assert consumer.stop() is True  # drained and acked
    finally:
        release.set()
        consumer.stop()
    assert sorted(seen.handled) == sorted(abc)
    name = shard_stream(stream, 0)
    assert client.xpending(name, "g")["pending"] == 0
    group = client.xinfo_groups(name)[0]
    assert group["lag"] == 2  # "d" and "e" wait for the next consumer


def test_bad_arguments_fail_at_the_call(client: redis.Redis) -> None:
    with pytest.raises(TypeError, match="handler"):
        RedisConsumer(client, "s", "not callable", group="g")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="process_index"):
        RedisConsumer(client, "s", print, group="g", shards=4, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="shards"):
        RedisConsumer(client, "s", print, group="g", shards=1, process_count=2, process_index=1)
    with pytest.raises(ValueError, match="group"):
        RedisConsumer(client, "s", print, group="")
    with pytest.raises(ValueError, match="poll_timeout"):
        RedisConsumer(client, "s", print, group="g", poll_timeout=0)
    with pytest.raises(TypeError, match="give both process_index and process_count"):
        RedisConsumer(client, "s", print, group="g", shards=4, process_index=1)
    with pytest.raises(ValueError, match="lease_ttl"):
        RedisConsumer(client, "s", print, group="g", lease_ttl=0)
    with pytest.raises(TypeError, match="on_rebalance"):
        RedisConsumer(client, "s", print, group="g", on_rebalance=3)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        publish(client, "s", 1.5, {}, shards=2)  # type: ignore[arg-type]


def test_start_raises_when_redis_cannot_be_reached() -> None:
    unreachable = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=5)
    consumer = RedisConsumer(unreachable, "s", print, group="g")
    with pytest.raises(redis.ConnectionError):
        consumer.start()  # at the call, not later in a background thread
    assert isinstance(consumer.error, redis.ConnectionError)
    assert consumer.stop() is False  # never ran


def test_an_error_that_stops_the_consumer_is_raised_by_stop(
    client: redis.Redis, stream: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    check_an_error_that_stops_the_consumer_is_raised_by_stop(
        lambda pool: RedisConsumer(client, stream, print, group="g", shards=1, pool=pool).start(),
        lambda: publish(client, stream, "a", {"seq": 0}, shards=1),
        monkeypatch,
    )


def test_an_entry_whose_key_cannot_be_read_is_dead_lettered(
    client: redis.Redis, stream: str
) -> None:
    seen = _in_process(expected=2)

    def key_of(message: RedisMessage) -> object:
        key = message.get("key")
        if key == "boom":
            raise LookupError("no aggregate id")
        return 1.5 if key == "float" else key

    for key in ("a", "boom", "float", "a"):
        publish(client, stream, key, {"seq": 0}, shards=1)
    consumer = RedisConsumer(
        client, stream, seen.note_handled, group="g", shards=1,
        key=key_of,  # type: ignore[arg-type]
    )
    with consumer:
        assert seen.done.wait(WAIT)
    assert consumer.stats().dead_lettered == 2  # stop() drained them
    entries: list[tuple[bytes, dict[bytes, bytes]]] = client.xrange(  # type: ignore[assignment]
        dead_letter_stream(stream)
    )
    errors = {f[b"key"]: f[b"dead_letter.error"] for _, f in entries}
    assert set(errors) == {b"boom", b"float"}
    assert b"no aggregate id" in errors[b"boom"] and b"TypeError" in errors[b"float"]
    assert client.xpending(shard_stream(stream, 0), "g")["pending"] == 0


def test_interpreter_exit_stops_the_consumer_gracefully(
    redis_server: Server, client: redis.Redis, stream: str
) -> None:
    # The program returns from its main thread with a message in its handler and
    # never calls stop(): the exit hook stops the (non-daemon) consumer thread
    # gracefully, so the entry is acked. (A daemon thread would die unacked.)
    script = f"""
import threading, redis
from keyedpool.contrib.redis import RedisConsumer
entered, release = threading.Event(), threading.Event()
def handle(message):
    entered.set()
    release.wait(60)
    print("handled", flush=True)
client = redis.Redis(host="127.0.0.1", port={redis_server.port})
consumer = RedisConsumer(client, {stream!r}, handle, group="g", shards=1).start()
assert entered.wait(60)
threading._register_atexit(release.set)  # runs before the consumer's exit hook
print("main returns", flush=True)
"""
    publish(client, stream, "a", {"seq": 0}, shards=1)
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=WAIT,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[3])},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["main", "returns", "handled"]
    assert client.xpending(shard_stream(stream, 0), "g")["pending"] == 0


def test_the_threads_are_named_after_the_broker(client: redis.Redis, stream: str) -> None:
    consumer = RedisConsumer(client, stream, print, group="g", shards=1).start()
    try:
        names = {t.name for t in threading.enumerate()}
        assert f"keyedpool-redis-{stream}" in names
    finally:
        assert consumer.stop(WAIT)
