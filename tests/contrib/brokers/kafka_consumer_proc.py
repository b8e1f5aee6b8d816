"""Kafka consumers for ``consumer_proc.py``: each runs in a real OS process of its own.

``consumer_proc.py`` (shared by all broker tests) loads this file with
``"broker": "<this file>:make"`` (or ``:make_serial``) and calls the factory
with its JSON config and a ``record(key, seq, redelivered)`` function that the
handler calls once per handled message. Message values are ``b"<key>:<seq>"``.

Config keys used here: ``url`` (bootstrap servers), ``topic``, ``group``,
``workers``, ``session_timeout_ms``, ``commit_interval``, ``strategy`` (the
``partition.assignment.strategy``; default: the consumer's), and ``assignments``:
a file to which the consumer appends ``<pid> assign|revoke <p1,p2,...>`` on
every rebalance (``O_APPEND``, one ``write()`` per line), so a test can wait
until the group has settled (see :func:`owners`; the bench uses it).

:func:`make` also reports on stdout (read by ``_broker_checks.ConsumerProcess``,
so tests wait on these lines instead of polling): ``assign p1,p2,...`` and
``revoke p1,...`` on every rebalance, each ``revoke`` line followed by
``in-flight N`` (the messages of those partitions taken and not finished when
the revoke began), and ``committed p:offset,...`` for every successful offset
commit (from the consumer's ``on_commit``). See :func:`owned_from_lines`,
:func:`committed_from_lines` and :func:`in_flight_at_revokes`.

* :func:`make`: :class:`keyedpool.contrib.kafka.KafkaConsumer`.
* :func:`make_serial`: the baseline for the bench, a plain confluent-kafka
  consumer that handles one message at a time on its polling thread and stores
  its offset after handling (auto-committed as often as the keyed one
  commits, every 0.2 s by default): the usual at-least-once consumer
  without a pool.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, Message, TopicPartition

from keyedpool.contrib.consumer import ConsumerStats
from keyedpool.contrib.kafka import KafkaConsumer

Record = Callable[[str, int, bool], None]


def _parse(message: Message) -> tuple[str, int]:
    key, _, seq = (message.value() or b"").decode().partition(":")
    return key, int(seq)


def _client_config(config: dict[str, Any]) -> dict[str, Any]:
    session = int(config.get("session_timeout_ms", 3000))
    client = {
        "bootstrap.servers": config["url"],
        "group.id": config["group"],
        "session.timeout.ms": session,
        "heartbeat.interval.ms": max(100, session // 10),
        "log_level": 3,
    }
    if config.get("strategy"):
        client["partition.assignment.strategy"] = config["strategy"]
    return client


def make(config: dict[str, Any], record: Record) -> KafkaConsumer:
    """A keyedpool KafkaConsumer whose handler records each message."""

    def handle(message: Message) -> None:
        key, seq = _parse(message)
        record(key, seq, False)

    on_assign, on_revoke = _assignment_log(config.get("assignments"))

    def assigned(partitions: list[TopicPartition]) -> None:
        if on_assign is not None:
            on_assign(partitions)
        _say("assign", ",".join(str(tp.partition) for tp in partitions))

    def revoked(partitions: list[TopicPartition]) -> None:
        if on_revoke is not None:
            on_revoke(partitions)
        _say("revoke", ",".join(str(tp.partition) for tp in partitions))
        # Called before the consumer finishes and commits these partitions: what
        # is unfinished now is what a hand-over may repeat at most. (The
        # per-partition bookkeeping is private; this is a test helper.)
        states = [consumer._partitions.get((tp.topic, tp.partition)) for tp in partitions]
        _say("in-flight", str(sum(state.in_flight for state in states if state is not None)))

    def on_commit(error: object, partitions: list[TopicPartition]) -> None:
        if error is None:
            done = [f"{tp.partition}:{tp.offset}" for tp in partitions
                    if tp.error is None and tp.offset >= 0]
            if done:
                _say("committed", ",".join(done))

    consumer = KafkaConsumer(
        config["topic"],
        handle,
        config={**_client_config(config), "on_commit": on_commit},
        dead_letter=None,
        max_workers=int(config.get("workers", 8)),
        commit_interval=float(config.get("commit_interval", 0.2)),
        on_assign=assigned,
        on_revoke=revoked,
    )
    return consumer


def _say(what: str, detail: str) -> None:
    # One write() per line (as consumer_proc.say), so lines from threads never interleave.
    os.write(sys.stdout.fileno(), f"{what} {detail}\n".encode())


def owned_from_lines(lines: list[str]) -> set[int]:
    """Replay a process's ``assign``/``revoke`` lines: the partitions it owns now."""
    owned: set[int] = set()
    for line in lines:
        what, _, listed = line.partition(" ")
        if what not in ("assign", "revoke"):
            continue
        partitions = {int(p) for p in listed.split(",") if p}
        if what == "assign":
            owned |= partitions
        elif what == "revoke":
            owned -= partitions
    return owned


def committed_from_lines(lines: list[str]) -> dict[int, int]:
    """The highest committed offset per partition in ``committed`` lines."""
    best: dict[int, int] = {}
    for line in lines:
        if line.startswith("committed "):
            for item in line.split()[1].split(","):
                partition, offset = (int(x) for x in item.split(":"))
                best[partition] = max(best.get(partition, 0), offset)
    return best


def in_flight_at_revokes(lines: list[str]) -> int:
    """The sum of the ``in-flight N`` lines: messages unfinished when revokes began."""
    return sum(int(line.split()[1]) for line in lines if line.startswith("in-flight "))


Hook = Callable[[list[TopicPartition]], None]


def _assignment_log(path: str | None) -> tuple[Hook | None, Hook | None]:
    if not path:
        return None, None
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    pid = os.getpid()

    def note(what: str) -> Hook:
        def hook(partitions: list[TopicPartition]) -> None:
            listed = ",".join(str(tp.partition) for tp in partitions)
            os.write(fd, f"{pid} {what} {listed}\n".encode())

        return hook

    return note("assign"), note("revoke")


def owners(path: Path) -> dict[int, set[int]]:
    """Replay an ``assignments`` file: the partitions each process owns now."""
    owned: dict[int, set[int]] = {}
    text = path.read_text() if path.exists() else ""
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 2:
            continue
        pid, what = int(parts[0]), parts[1]
        partitions = {int(p) for p in parts[2].split(",")} if len(parts) > 2 else set()
        mine = owned.setdefault(pid, set())
        if what == "assign":
            mine |= partitions
        else:
            mine -= partitions
    return owned


def settled(path: Path, pids: list[int], partitions: int) -> bool:
    """Whether each of *pids* owns partitions, and together they own each one once."""
    owned = owners(path)
    mine = [owned.get(pid, set()) for pid in pids]
    every = [p for parts in mine for p in parts]
    return all(mine) and sorted(every) == list(range(partitions))


class SerialConsumer:
    """A plain consumer: poll one message, handle it, store its offset; no pool."""

    def __init__(self, config: dict[str, Any], record: Record) -> None:
        self._config = {
            **_client_config(config),
            "auto.offset.reset": "earliest",
            "enable.auto.offset.store": False,
            "auto.commit.interval.ms": int(config.get("commit_interval", 0.2) * 1000),
        }
        self._topic = config["topic"]
        self._record = record
        self._on_assign, self._on_revoke = _assignment_log(config.get("assignments"))
        self._stopping = threading.Event()
        self._handled = 0

    def run(self) -> None:
        """Poll and handle until :meth:`stop`; then commit and close."""
        consumer = Consumer(self._config)
        on_assign, on_revoke = self._on_assign, self._on_revoke
        consumer.subscribe(
            [self._topic],
            on_assign=lambda _c, parts: on_assign(parts) if on_assign else None,
            on_revoke=lambda _c, parts: on_revoke(parts) if on_revoke else None,
        )
        try:
            while not self._stopping.is_set():
                message = consumer.poll(0.1)
                if message is None or message.error() is not None:
                    continue
                key, seq = _parse(message)
                self._record(key, seq, False)
                consumer.store_offsets(message=message)
                self._handled += 1
        finally:
            consumer.close()  # commits the stored offsets

    def stop(self, timeout: float | None = None) -> bool:
        """Ask :meth:`run` to return after the current message."""
        self._stopping.set()
        return True

    def stats(self) -> ConsumerStats:
        """Counters in the shape the other consumers report."""
        n = self._handled
        return ConsumerStats(
            received=n,
            handled=n,
            retries=0,
            dead_lettered=0,
            redelivered=0,
            duplicates=0,
            in_flight=0,
            parked=0,
            ack_errors=0,
        )


def make_serial(config: dict[str, Any], record: Record) -> SerialConsumer:
    """The serial baseline consumer (for the bench)."""
    return SerialConsumer(config, record)
