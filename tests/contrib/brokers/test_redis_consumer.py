"""keyedpool.contrib.redis against a real ``redis-server`` on 127.0.0.1 (started by conftest.py).

Scale-out: the stream is sharded by the mmh3 hash of the key into ``SHARDS``
streams; process ``i`` of 2 reads the shards ``s % 2 == i``. The multi-process
tests run real consumer processes (consumer_proc.py) that log every handled
message to one shared ``O_APPEND`` file, which ``check_log`` checks.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import uuid
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("redis", reason="redis-py is not installed (pip install keyedpool[redis])")

import redis  # noqa: E402
from _broker_checks import (  # noqa: E402
    WAIT,
    ConsumerProcess,
    Server,
    check_log,
    proc_config,
)
from _util import wait_until  # noqa: E402

from keyedpool import KeyedPoolExecutor  # noqa: E402
from keyedpool._routing import worker_index  # noqa: E402
from keyedpool.contrib.redis import (  # noqa: E402
    DeadLetter,
    RedisConsumer,
    RedisMessage,
    RetryPolicy,
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
        log, broker="redis", url=server.url, stream=stream, group="g",
        shards=SHARDS, process_index=index, process_count=2, **extra,
    )


def test_two_processes_handle_10000_messages_in_order_per_key(
    redis_server: Server, client: redis.Redis, stream: str, tmp_path: Path
) -> None:
    log = tmp_path / "handled.log"
    _publish(client, stream, KEYS, range(100))
    procs = [ConsumerProcess(_config(redis_server, log, stream, i)) for i in range(2)]
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
    # Each key was handled by exactly one process: the one that owns its shard.
    for key, records in check.by_key.items():
        assert {pid for pid, _, _ in records} == {procs[shard_of(key, SHARDS) % 2].pid}
    assert sum(s["handled"] for s in stats) == 10_000
    assert _pending(client, stream, "g") == 0


def test_sigkill_mid_stream_loses_nothing_and_keeps_order(
    redis_server: Server, client: redis.Redis, stream: str, tmp_path: Path, capsys: Any
) -> None:
    log = tmp_path / "handled.log"
    _publish(client, stream, KEYS, range(50))
    # Process 1 stops making progress after 300 messages, with more in flight:
    # it is killed there, mid-stream, with handlers running and acks unsent.
    p0 = ConsumerProcess(_config(redis_server, log, stream, 0))
    p1 = ConsumerProcess(_config(redis_server, log, stream, 1, stall_after=300))
    replacement = None
    try:
        p1.wait_handled(300)
        p1.kill()
        assert _pending(client, stream, "g") > 0  # unacked entries of the dead process
        done_by_p1 = {(k, s) for pid, k, s, _ in _records(log) if pid == p1.pid}
        assert 0 < len(done_by_p1) < _share(1, 50)
        _publish(client, stream, KEYS, range(50, 100))
        # Its replacement (same process_index, new consumer name) claims the
        # dead one's pending entries and handles them before newer ones.
        replacement = ConsumerProcess(_config(redis_server, log, stream, 1, progress=1))
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
    # At least once: what the dead process handled but had not acked ran again,
    # in the replacement, flagged as redelivered; nothing else ran twice.
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
    assert _pending(client, stream, "g") == 0
    with capsys.disabled():
        print(
            f"\n[redis] SIGKILL mid-stream: {check.total} handled, 0 lost, "
            f"{check.duplicates} duplicates (at-least-once), "
            f"{stats1['redelivered']} redelivered to the replacement"
        )


def _records(log: Path) -> list[tuple[int, str, int, bool]]:
    from _broker_checks import read_log

    return read_log(log)


class _InProcess:
    """Collects what a handler saw; signals when *expected* messages were handled."""

    def __init__(self, expected: int) -> None:
        self.lock = threading.Lock()
        self.handled: dict[str, list[int]] = defaultdict(list)
        self.calls: dict[tuple[str, int], int] = defaultdict(int)
        self.expected = expected
        self.count = 0
        self.done = threading.Event()

    def note_call(self, message: RedisMessage) -> int:
        with self.lock:
            self.calls[(str(message.key), int(message.get("seq") or -1))] += 1
            return self.calls[(str(message.key), int(message.get("seq") or -1))]

    def note_handled(self, message: RedisMessage) -> None:
        with self.lock:
            self.handled[str(message.key)].append(int(message.get("seq") or -1))
            self.count += 1
            if self.count >= self.expected:
                self.done.set()


def test_a_handler_that_fails_twice_then_succeeds_keeps_order(
    client: redis.Redis, stream: str
) -> None:
    seen = _InProcess(expected=20)

    def handle(message: RedisMessage) -> None:
        call = seen.note_call(message)
        if message.key == "a" and message.get("seq") == "3" and call <= 2:
            raise ConnectionError("flaky downstream")
        seen.note_handled(message)

    _publish(client, stream, ["a", "b"], range(10))
    consumer = RedisConsumer(
        client, stream, handle, group="g", shards=SHARDS, max_workers=4,
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
    assert _pending(client, stream, "g") == 0


def test_a_poison_message_goes_to_the_dead_letter_stream_and_its_key_moves_on(
    client: redis.Redis, stream: str
) -> None:
    seen = _InProcess(expected=9 + 9)
    dead: list[tuple[RedisMessage, BaseException]] = []

    def handle(message: RedisMessage) -> None:
        seen.note_call(message)
        if message.key == "a" and message.get("seq") == "4":
            raise ValueError("cannot parse this one, ever")
        if message.key == "b" and message.get("seq") == "0":
            raise DeadLetter("unknown event type")  # no retries for this one
        seen.note_handled(message)

    _publish(client, stream, ["a", "b"], range(10))
    consumer = RedisConsumer(
        client, stream, handle, group="g", shards=SHARDS, max_workers=4,
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
    entries: list[tuple[bytes, dict[bytes, bytes]]] = client.xrange(  # type: ignore[assignment]
        dead_letter_stream(stream)
    )
    assert sorted((f[b"key"], f[b"seq"]) for _, f in entries) == [(b"a", b"4"), (b"b", b"0")]
    errors = {f[b"key"]: f[b"dead_letter.error"] for _, f in entries}
    assert b"ValueError" in errors[b"a"]
    assert sorted(str(m.key) for m, _ in dead) == ["a", "b"]
    stats = consumer.stats()
    assert stats.dead_lettered == 2 and stats.handled == 18
    assert _pending(client, stream, "g") == 0


def test_a_slow_key_does_not_stop_the_other_keys(client: redis.Redis, stream: str) -> None:
    pool = KeyedPoolExecutor(4)
    # Keys on the slow key's worker wait behind it (a worker runs one handler
    # at a time); every other key, including those in the slow key's shard
    # stream, keeps going.
    others = [k for k in KEYS if pool.worker_index(k) != pool.worker_index("slow")][:30]
    assert any(shard_of(k, SHARDS) == shard_of("slow", SHARDS) for k in others)
    release = threading.Event()
    slow_started = threading.Event()
    seen = _InProcess(expected=len(others) * 5)
    slow_done: list[int] = []

    def handle(message: RedisMessage) -> None:
        if message.key == "slow":
            slow_started.set()
            assert release.wait(WAIT)
            slow_done.append(int(message.get("seq") or -1))
        else:
            seen.note_handled(message)

    _publish(client, stream, ["slow", *others], range(5))
    consumer = RedisConsumer(client, stream, handle, group="g", shards=SHARDS, pool=pool)
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
    assert _pending(client, stream, "g") == 0


def test_backpressure_stops_fetching_while_full(client: redis.Redis, stream: str) -> None:
    release = threading.Event()
    entered = threading.Semaphore(0)
    seen = _InProcess(expected=50)

    def handle(message: RedisMessage) -> None:
        entered.release()
        assert release.wait(WAIT)
        seen.note_handled(message)

    # The first five run at once, on five workers; the other 45 must wait unfetched.
    first = _on_distinct_workers(5, 8, "first-")
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
    seen = _InProcess(expected=3)

    def handle(message: RedisMessage) -> None:
        entered.release()
        assert release.wait(WAIT)
        seen.note_handled(message)

    abc = _on_distinct_workers(3, 4, "in-flight-")
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
    with pytest.raises(TypeError, match="group"):
        RedisConsumer(client, "s", print, group="")
    with pytest.raises(ValueError, match="poll_timeout"):
        RedisConsumer(client, "s", print, group="g", poll_timeout=0)
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
    uncaught: list[threading.ExceptHookArgs] = []
    monkeypatch.setattr(threading, "excepthook", uncaught.append)
    pool = KeyedPoolExecutor(2)
    pool.shutdown()  # a shared pool shut down under a running consumer: dispatch fails
    consumer = RedisConsumer(client, stream, print, group="g", shards=1, pool=pool).start()
    publish(client, stream, "a", {"seq": 0}, shards=1)
    wait_until(lambda: consumer.error is not None)  # set by the dying thread; no event
    with pytest.raises(RuntimeError, match="shut"):
        consumer.stop(WAIT)
    assert consumer.stopping and isinstance(consumer.error, RuntimeError)
    assert uncaught == []  # kept for stop(), not left to threading.excepthook


def test_an_entry_whose_key_cannot_be_read_is_dead_lettered(
    client: redis.Redis, stream: str
) -> None:
    seen = _InProcess(expected=2)

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
