"""Helpers shared by the broker tests: consumer processes, and what their log must show.

``ConsumerProcess`` starts ``consumer_proc.py`` as a real OS process and follows
its stdout (``ready``, ``handled N``, ``stats {...}``) on a thread, so a test
waits on a condition instead of sleeping. ``check_log`` reads the shared
``O_APPEND`` log the processes write and counts lost messages, order violations
and duplicates, allowing for at-least-once redelivery.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RUNNER = Path(__file__).with_name("consumer_proc.py")
#: The repository, so that the processes import this keyedpool even when it is not installed.
REPO = Path(__file__).resolve().parents[3]

# Upper bounds that turn a hang into a failure; nothing is timed.
WAIT = 60.0


class ConsumerProcess:
    """A ``consumer_proc.py`` process with its stdout followed on a thread.

    Every stdout line is kept in :attr:`lines`; all processes share one
    condition (:attr:`changed`), so :meth:`wait` can wait for a predicate over
    several processes' output (e.g. the offsets a group committed).
    """

    #: Notified on every line any process prints (and when one exits).
    changed = threading.Condition()

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        self.proc = subprocess.Popen(
            [sys.executable, str(RUNNER), json.dumps(config)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.pid = self.proc.pid
        self._changed = ConsumerProcess.changed
        self.lines: list[str] = []
        self.ready = False
        self.handled = 0
        self.stats: dict[str, int] | None = None
        #: The (key, seq) pairs it handled (only with ``progress=1``, which names them).
        self.done: set[tuple[str, int]] = set()
        #: The shards it reads, as it last printed them (None: not printed yet).
        self.shards: frozenset[int] | None = None
        self.stderr: list[str] = []
        self._out = threading.Thread(target=self._follow_stdout, daemon=True)
        self._err = threading.Thread(target=self._follow_stderr, daemon=True)
        self._out.start()
        self._err.start()

    def _follow_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                if line.startswith("handled "):
                    parts = line.split()
                    self.handled = int(parts[1])
                    if len(parts) == 4:
                        self.done.add((parts[2], int(parts[3])))
                elif line.startswith("ready"):
                    self.ready = True
                elif line.startswith("shards"):
                    numbers = line.split()[1:]
                    self.shards = frozenset(
                        int(n) for n in numbers[0].split(",")
                    ) if numbers else frozenset()
                elif line.startswith("stats "):
                    self.stats = json.loads(line[6:])
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def _follow_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line)

    def wait_handled(self, count: int, timeout: float = WAIT) -> None:
        """Wait until the process reported at least *count* handled messages."""
        with self._changed:
            ok = self._changed.wait_for(
                lambda: self.handled >= count or self.proc.poll() is not None, timeout
            )
        assert ok and self.handled >= count, (
            f"process {self.pid} handled {self.handled} < {count}; "
            f"stderr: {''.join(self.stderr)[-3000:]}"
        )

    @classmethod
    def wait(cls, predicate: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
        """Wait (on the processes' output, no polling) until *predicate()* holds."""
        with cls.changed:
            ok = cls.changed.wait_for(predicate, timeout)
        assert ok, f"timed out waiting for {what}"

    def kill(self) -> None:
        """SIGKILL: no drain, no ack, no goodbye."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(WAIT)
        self._out.join(WAIT)

    def stop(self) -> dict[str, int]:
        """SIGTERM (graceful stop); return the stats it printed. Asserts exit code 0."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(WAIT)
        except subprocess.TimeoutExpired:
            # A hang: SIGABRT makes the process print every thread's stack (faulthandler).
            self.proc.send_signal(signal.SIGABRT)
            self.proc.wait(WAIT)
            self._err.join(WAIT)
            raise AssertionError(
                f"process {self.pid} did not stop within {WAIT} s; its threads:\n"
                + "".join(self.stderr)[-12000:]
            ) from None
        self._out.join(WAIT)
        self._err.join(WAIT)
        assert code == 0, f"exit {code}: {''.join(self.stderr)[-3000:]}"
        assert self.stats is not None, "no stats printed"
        return self.stats

    def close(self) -> None:
        """Kill the process if it still runs (test teardown)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(WAIT)


@dataclass(frozen=True)
class Server:
    """A broker server a fixture started (see conftest.py)."""

    host: str
    port: int
    directory: Path

    @property
    def url(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass
class LogCheck:
    """What a shared consumer log shows."""

    #: Handled messages per key, in log order: (pid, seq, redelivered).
    by_key: dict[str, list[tuple[int, int, bool]]] = field(default_factory=dict)
    lost: list[tuple[str, int]] = field(default_factory=list)
    #: (key, description) for each message of a key that ran before an earlier one.
    violations: list[tuple[str, str]] = field(default_factory=list)
    #: Messages handled more than once (at-least-once delivery after a crash).
    duplicates: int = 0
    #: Duplicates per process id (the process that handled the copy).
    duplicates_by_pid: dict[int, int] = field(default_factory=dict)
    total: int = 0


def read_log(path: Path) -> list[tuple[int, str, int, bool]]:
    """(pid, key, seq, redelivered) per complete line; a line cut by SIGKILL is skipped."""
    out = []
    data = path.read_bytes() if path.exists() else b""
    for line in data.split(b"\n"):
        parts = line.split()
        if len(parts) == 4:
            out.append((int(parts[0]), parts[1].decode(), int(parts[2]), parts[3] == b"1"))
    return out


def count_handled(path: Path) -> set[tuple[str, int]]:
    """The distinct (key, seq) pairs in the log."""
    return {(key, seq) for _, key, seq, _ in read_log(path)}


def check_log(path: Path, expected: dict[str, int], *, rewinds: bool = False) -> LogCheck:
    """Check the log against *expected* (key -> message count, seqs 0..n-1).

    Rules (at least once, in order per key):

    * every (key, seq) is handled at least once (else: lost);
    * within one process, a key's seqs strictly increase (a redelivery starts a
      new process's run, never goes back inside one); with ``rewinds=True``
      this rule is off: a process may go back in a key (Kafka hands a
      partition back to the same process at its committed offset after a
      rebalance whose commit failed: a redelivery, not a reordering);
    * across the whole log, a key never jumps ahead: each seq is at most one
      more than the highest handled before it (else a later message overtook).
      With ``rewinds=True`` the stricter form: a seq runs only after every
      earlier seq of its key ran at least once.

    A seq handled again is a duplicate.
    """
    if rewinds:
        return _check_log_rewinds(path, expected)
    check = LogCheck()
    by_key: dict[str, list[tuple[int, int, bool]]] = defaultdict(list)
    for pid, key, seq, redelivered in read_log(path):
        by_key[key].append((pid, seq, redelivered))
        check.total += 1
    check.by_key = dict(by_key)
    for key, count in expected.items():
        records = by_key.get(key, [])
        seen = {seq for _, seq, _ in records}
        check.lost.extend((key, s) for s in range(count) if s not in seen)
        high = -1
        last_in_pid: dict[int, int] = {}
        for pid, seq, _ in records:
            previous = last_in_pid.get(pid)
            if previous is not None and seq <= previous:
                check.violations.append((key, f"pid {pid} ran {seq} after {previous}"))
            last_in_pid[pid] = seq
            if seq > high + 1:
                check.violations.append((key, f"{seq} ran before {high + 1}"))
            if seq <= high:
                check.duplicates += 1
                check.duplicates_by_pid[pid] = check.duplicates_by_pid.get(pid, 0) + 1
            high = max(high, seq)
    unexpected = set(by_key) - set(expected)
    for key in unexpected:
        check.violations.append((key, "unexpected key"))
    return check


def proc_config(log: Path, **config: Any) -> dict[str, Any]:
    """A ``consumer_proc.py`` config with the test defaults filled in."""
    base: dict[str, Any] = {"log": str(log), "progress": 100, "workers": 8, "cost": 0.0}
    base.update(config)
    return base



def _check_log_rewinds(path: Path, expected: dict[str, int]) -> LogCheck:
    check = LogCheck()
    by_key: dict[str, list[tuple[int, int, bool]]] = defaultdict(list)
    for pid, key, seq, redelivered in read_log(path):
        by_key[key].append((pid, seq, redelivered))
        check.total += 1
    check.by_key = dict(by_key)
    for key in set(by_key) - set(expected):
        check.violations.append((key, "unexpected key"))
    for key, count in expected.items():
        seen: set[int] = set()
        prefix = 0  # seqs below this were all handled
        for pid, seq, _ in by_key.get(key, []):
            if seq > prefix:
                check.violations.append((key, f"{seq} ran before {prefix}"))
            if seq in seen:
                check.duplicates += 1
                check.duplicates_by_pid[pid] = check.duplicates_by_pid.get(pid, 0) + 1
            seen.add(seq)
            while prefix in seen:
                prefix += 1
        check.lost.extend((key, s) for s in range(count) if s not in seen)
    return check


def keys_on_distinct_workers(count: int, workers: int, prefix: str) -> list[str]:
    """*count* keys that run on *count* different workers of a pool of *workers*."""
    from keyedpool._routing import worker_index

    keys: dict[int, str] = {}
    i = 0
    while len(keys) < count:
        keys.setdefault(worker_index(f"{prefix}{i}", workers), f"{prefix}{i}")
        i += 1
    return list(keys.values())


def run_two_sharded_processes(
    log: Path,
    keys: list[str],
    config: Callable[[int], dict[str, Any]],
    share: Callable[[int], int],
    owner: Callable[[str], int],
) -> None:
    """Run processes 0 and 1 until each handled its *share* of 100 messages per key.

    Checks that nothing was lost, duplicated or reordered, and that each key ran
    only in the process that owns its shard (``owner(key)``).
    """
    procs = [ConsumerProcess(config(i)) for i in range(2)]
    try:
        for i, proc in enumerate(procs):
            proc.wait_handled(share(i))
        stats = [proc.stop() for proc in procs]
    finally:
        for proc in procs:
            proc.close()
    check = check_log(log, dict.fromkeys(keys, 100))
    assert check.lost == []
    assert check.violations == []
    assert check.duplicates == 0
    assert check.total == len(keys) * 100
    # Each key was handled by exactly one process: the one that owns its shard.
    for key, records in check.by_key.items():
        assert {pid for pid, _, _ in records} == {procs[owner(key)].pid}
    assert sum(s["handled"] for s in stats) == len(keys) * 100


def sigkill_process_1_mid_stream(
    broker: str,
    log: Path,
    keys: list[str],
    config: Callable[..., dict[str, Any]],
    publish: Callable[[range], None],
    share: Callable[[int, int], int],
    capsys: Any,
    *,
    after_kill: Callable[[], None] | None = None,
) -> None:
    """Kill process 1 mid-stream, start its replacement: nothing lost, order kept.

    50 messages per key are published, then 50 more after the kill. *config*
    is ``config(process_index, **extra)``; *share* is ``share(process_index,
    seqs_per_key)``. *after_kill* runs right after the kill (to check that
    the broker still holds the dead process's unacked messages).
    """
    publish(range(50))
    # Process 1 stops making progress after 300 messages, with more in flight:
    # it is killed there, mid-stream, with handlers running and acks unsent.
    p0 = ConsumerProcess(config(0))
    p1 = ConsumerProcess(config(1, stall_after=300))
    replacement = None
    try:
        p1.wait_handled(300)
        p1.kill()
        if after_kill is not None:
            after_kill()
        done_by_p1 = {(k, s) for pid, k, s, _ in read_log(log) if pid == p1.pid}
        assert 0 < len(done_by_p1) < share(1, 50)
        publish(range(50, 100))
        # The replacement (same process_index) takes over the dead one's
        # unacked messages and handles them before newer ones.
        replacement = ConsumerProcess(config(1, progress=1))
        p0.wait_handled(share(0, 100))
        replacement.wait_handled(share(1, 100) - len(done_by_p1))
        stats0, stats1 = p0.stop(), replacement.stop()
    finally:
        for proc in (p0, p1, replacement):
            if proc is not None:
                proc.close()
    check = check_after_a_kill(log, keys, replacement.pid, done_by_p1, stats1)
    assert stats0["redelivered"] == 0
    with capsys.disabled():
        print(
            f"\n[{broker}] SIGKILL mid-stream: {check.total} handled, 0 lost, "
            f"{check.duplicates} duplicates (at-least-once), "
            f"{stats1['redelivered']} redelivered to the replacement"
        )


def check_after_a_kill(
    log: Path,
    keys: list[str],
    heir: int,
    done_by_dead: set[tuple[str, int]],
    heir_stats: dict[str, int],
) -> LogCheck:
    """Check the log after a SIGKILL: nothing lost, no reordering, duplicates only where due.

    At least once: only *heir* (the process that took the dead one's shards)
    handled anything twice, and every copy it handled of a message the dead
    process had handled (*done_by_dead*) was flagged ``redelivered``.
    """
    check = check_log(log, dict.fromkeys(keys, 100))
    assert check.lost == []
    assert check.violations == []
    assert set(check.duplicates_by_pid) <= {heir}
    dup_records = [
        (key, seq, flag)
        for key, records in check.by_key.items()
        for pid, seq, flag in records
        if pid == heir and (key, seq) in done_by_dead
    ]
    assert len(dup_records) == check.duplicates
    assert all(flag for _, _, flag in dup_records)
    assert heir_stats["redelivered"] >= check.duplicates
    return check


def wait_for_even_shards(procs: list[ConsumerProcess], shards: int) -> None:
    """Wait until *procs* say they read disjoint, equal parts that cover all *shards*."""

    def even() -> bool:
        sets = [p.shards for p in procs]
        if any(s is None for s in sets):
            return False
        parts = [s for s in sets if s is not None]
        return (
            sum(len(s) for s in parts) == shards
            and frozenset().union(*parts) == frozenset(range(shards))
            and {len(s) for s in parts} == {shards // len(procs)}
        )

    ConsumerProcess.wait(even, f"{len(procs)} processes to share {shards} shards evenly")


def a_second_process_joins_mid_stream(
    log: Path,
    keys: list[str],
    config: Callable[..., dict[str, Any]],
    publish: Callable[[range], None],
    shard_of_key: Callable[[str], int],
    shards: int,
) -> None:
    """Process 0 reads every shard; process 1 joins: half the shards move, drained first.

    No message is lost, handled twice or reordered (the log shows one global
    order across both processes), and after the move each key runs in the
    process that now owns its shard.
    """
    publish(range(50))
    # Slow handlers, so that process 0 still has a backlog when process 1 joins.
    p0 = ConsumerProcess(config(progress=1, cost=0.002))
    p1 = None
    try:
        ConsumerProcess.wait(lambda: p0.shards == frozenset(range(shards)), "p0 to own all")
        p0.wait_handled(100)
        p1 = ConsumerProcess(config(progress=1, cost=0.002))
        wait_for_even_shards([p0, p1], shards)
        publish(range(50, 100))
        expected = len(keys) * 100
        ConsumerProcess.wait(lambda: len(p0.done | p1.done) >= expected, "all handled")
        owners = {p0.pid: p0.shards, p1.pid: p1.shards}
        stats = [p0.stop(), p1.stop()]
    finally:
        for proc in (p0, p1):
            if proc is not None:
                proc.close()
    check = check_log(log, dict.fromkeys(keys, 100))
    assert check.lost == []
    assert check.violations == []
    assert check.duplicates == 0
    assert check.total == expected
    assert sum(s["handled"] for s in stats) == expected
    assert sum(s["redelivered"] for s in stats) == 0
    # Messages published after the move ran in the shard's new owner only.
    for key, records in check.by_key.items():
        later = {pid for pid, seq, _ in records if seq >= 50}
        owner = [pid for pid, owned in owners.items() if shard_of_key(key) in (owned or ())]
        assert later == set(owner), key


def sigkill_one_the_other_takes_over(
    broker: str,
    log: Path,
    keys: list[str],
    config: Callable[..., dict[str, Any]],
    publish: Callable[[range], None],
    shards: int,
    capsys: Any,
    *,
    after_kill: Callable[[], None] | None = None,
) -> None:
    """Kill one of two processes mid-stream, start none: the survivor takes its shards over.

    Nothing is lost, per-key order holds through the redelivery, and only the
    survivor handles anything twice (each such copy flagged ``redelivered``).
    """
    p0 = ConsumerProcess(config(progress=1))
    p1 = ConsumerProcess(config(stall_after=300))
    try:
        wait_for_even_shards([p0, p1], shards)
        publish(range(50))
        p1.wait_handled(300)
        p1.kill()
        if after_kill is not None:
            after_kill()
        done_by_p1 = {(k, s) for pid, k, s, _ in read_log(log) if pid == p1.pid}
        assert len(done_by_p1) >= 300
        publish(range(50, 100))
        # Nobody is started: p0 takes the dead one's shards once its leases expire.
        ConsumerProcess.wait(lambda: p0.shards == frozenset(range(shards)), "the takeover")
        expected = len(keys) * 100
        ConsumerProcess.wait(lambda: len(p0.done | done_by_p1) >= expected, "all handled")
        stats0 = p0.stop()
    finally:
        for proc in (p0, p1):
            proc.close()
    check = check_after_a_kill(log, keys, p0.pid, done_by_p1, stats0)
    with capsys.disabled():
        print(
            f"\n[{broker}] SIGKILL, no replacement: the survivor took over; "
            f"{check.total} handled, 0 lost, {check.duplicates} duplicates "
            f"(at-least-once), {stats0['redelivered']} redelivered"
        )


class InProcess:
    """Collects what an in-process handler saw; signals when *expected* messages were handled.

    *seq_of* reads a message's sequence number (how each broker's test publishes it).
    """

    def __init__(self, expected: int, seq_of: Callable[[Any], int]) -> None:
        self.lock = threading.Lock()
        self.handled: dict[str, list[int]] = defaultdict(list)
        self.calls: dict[tuple[str, int], int] = defaultdict(int)
        self.expected = expected
        self.count = 0
        self.done = threading.Event()
        self._seq_of = seq_of

    def note_call(self, message: Any) -> int:
        """Count a call of the handler with *message*; return how many it had so far."""
        with self.lock:
            self.calls[(str(message.key), self._seq_of(message))] += 1
            return self.calls[(str(message.key), self._seq_of(message))]

    def note_handled(self, message: Any) -> None:
        """Note that *message* was handled (and set :attr:`done` at *expected*)."""
        with self.lock:
            self.handled[str(message.key)].append(self._seq_of(message))
            self.count += 1
            if self.count >= self.expected:
                self.done.set()


def check_a_flaky_message_is_retried_in_order(
    consumer_for: Callable[..., Any], seq_of: Callable[[Any], int]
) -> Any:
    """Keys "a" and "b", seqs 0-9 published: "a"-3 fails twice, then succeeds, in order.

    ``consumer_for(handler, retry=...)`` makes the (not started) consumer.
    Returns the consumer, stopped, for broker-specific checks.
    """
    from keyedpool.contrib.consumer import RetryPolicy

    seen = InProcess(20, seq_of)

    def handle(message: Any) -> None:
        call = seen.note_call(message)
        if message.key == "a" and seq_of(message) == 3 and call <= 2:
            raise ConnectionError("flaky downstream")
        seen.note_handled(message)

    consumer = consumer_for(handle, retry=RetryPolicy(attempts=3, backoff=0.01))
    with consumer:
        assert seen.done.wait(WAIT)
    assert seen.handled["a"] == list(range(10))
    assert seen.handled["b"] == list(range(10))
    assert seen.calls[("a", 3)] == 3
    stats = consumer.stats()
    assert stats.retries == 2
    assert stats.dead_lettered == 0
    return consumer


def check_a_poison_message_is_dead_lettered(
    consumer_for: Callable[..., Any], seq_of: Callable[[Any], int]
) -> Any:
    """Keys "a" and "b", seqs 0-9 published: "a"-4 always fails, "b"-0 raises DeadLetter.

    Both are dead-lettered (after 3 attempts, and at once) and their keys move
    on. ``consumer_for(handler, retry=..., on_dead_letter=...)`` makes the (not
    started) consumer. Returns it, stopped, to check what the broker holds.
    """
    from keyedpool.contrib.consumer import DeadLetter, RetryPolicy

    seen = InProcess(9 + 9, seq_of)
    dead: list[tuple[Any, BaseException]] = []

    def handle(message: Any) -> None:
        seen.note_call(message)
        if message.key == "a" and seq_of(message) == 4:
            raise ValueError("cannot parse this one, ever")
        if message.key == "b" and seq_of(message) == 0:
            raise DeadLetter("unknown event type")  # no retries for this one
        seen.note_handled(message)

    consumer = consumer_for(
        handle,
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
    assert sorted(str(m.key) for m, _ in dead) == ["a", "b"]
    stats = consumer.stats()
    assert stats.dead_lettered == 2 and stats.handled == 18
    return consumer


def check_a_slow_key_does_not_stop_the_others(
    consumer_for: Callable[..., Any],
    publish: Callable[[list[str], range], None],
    seq_of: Callable[[Any], int],
    keys: list[str],
    shards: int,
) -> None:
    """Key "slow" blocks its handler; the other keys (30 of *keys*) all finish meanwhile.

    ``publish(keys, seqs)`` publishes; ``consumer_for(handler, pool=...)``
    makes the (not started) consumer over *shards* shards.
    """
    from keyedpool import KeyedPoolExecutor
    from keyedpool.contrib.consumer import shard_of

    pool = KeyedPoolExecutor(4, routing="hash")
    # routing="hash": keys on the slow key's worker wait behind it (a worker runs one handler
    # at a time); every other key, including those in the slow key's shard,
    # keeps going.
    others = [k for k in keys if pool.worker_index(k) != pool.worker_index("slow")][:30]
    assert any(shard_of(k, shards) == shard_of("slow", shards) for k in others)
    release = threading.Event()
    slow_started = threading.Event()
    seen = InProcess(len(others) * 5, seq_of)
    slow_done: list[int] = []

    def handle(message: Any) -> None:
        if message.key == "slow":
            slow_started.set()
            assert release.wait(WAIT)
            slow_done.append(seq_of(message))
        else:
            seen.note_handled(message)

    publish(["slow", *others], range(5))
    consumer = consumer_for(handle, pool=pool)
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


def check_an_error_that_stops_the_consumer_is_raised_by_stop(
    start_consumer: Callable[[Any], Any], publish_one: Callable[[], None], monkeypatch: Any
) -> None:
    """A shared pool shut down under a running consumer stops it; stop() raises why.

    ``start_consumer(pool)`` starts a consumer of one shard on *pool*;
    ``publish_one()`` publishes one message to it.
    """
    import pytest
    from _util import wait_until

    from keyedpool import KeyedPoolExecutor

    uncaught: list[threading.ExceptHookArgs] = []
    monkeypatch.setattr(threading, "excepthook", uncaught.append)
    pool = KeyedPoolExecutor(2)
    pool.shutdown()  # a shared pool shut down under a running consumer: dispatch fails
    consumer = start_consumer(pool)
    publish_one()
    wait_until(lambda: consumer.error is not None)  # set by the dying thread; no event
    with pytest.raises(RuntimeError, match="shut"):
        consumer.stop(WAIT)
    assert consumer.stopping and isinstance(consumer.error, RuntimeError)
    assert uncaught == []  # kept for stop(), not left to threading.excepthook
