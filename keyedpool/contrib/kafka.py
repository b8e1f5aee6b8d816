"""Consume Kafka topics on a keyed pool: in order per key, committed after success, scaled out.

``pip install keyedpool[kafka]`` (it uses confluent-kafka). What every consumer
guarantees is in :mod:`keyedpool.contrib.consumer`. Kafka adds: per partition,
commits only up to the lowest unfinished offset (a crash skips nothing; Kafka
does not mark the repeats); cooperative rebalancing, whose revoked partitions are
drained and committed within ``revoke_timeout`` before they go (a clean hand-over
repeats nothing); and partitions paused while the consumer stays full. Run it in
several processes of one ``group.id``, producing with the ordering key as the
message key. Details and an example: docs/consumers.md; a mock cluster to try it
on: ``python -m keyedpool.contrib.kafka_mock``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import Future
from operator import methodcaller
from typing import TYPE_CHECKING, Any, NamedTuple

from keyedpool.contrib import _require

_require("confluent_kafka", "kafka", "keyedpool.contrib.kafka")

from confluent_kafka import Consumer as KafkaClient
from confluent_kafka import KafkaError, KafkaException, Message, Producer, TopicPartition

from keyedpool import Key

from .consumer import Consumer, ConsumerOptions, ConsumerStats, DeadLetter, Default, RetryPolicy
from .consumer._handling import call_hook
from .consumer._options import check_seconds

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from .consumer import ConsumerArgs

__all__ = ["ConsumerOptions", "ConsumerStats", "DeadLetter", "KafkaConnectError",
           "KafkaConsumer", "RetryPolicy"]

log = logging.getLogger("keyedpool.contrib.kafka")

# A worker waits for its dead letter: fail it (to try again after the backoff)
# after 30 s, not librdkafka's 300 s.
_DEAD_LETTER_TIMEOUT_MS = 30_000
# Revoked partitions' commit: attempts at most, and the first wait (doubling).
_REVOKE_COMMIT_ATTEMPTS, _REVOKE_COMMIT_BACKOFF = 4, 0.1
# Worth another attempt: the coordinator is moving, loading or briefly out of
# reach. Not REBALANCE_IN_PROGRESS: a member inside its revoke callback cannot
# rejoin, so the group can only go on without it and refuse the commit for good.
_RETRIABLE_COMMIT_ERRORS = frozenset((
    KafkaError.COORDINATOR_LOAD_IN_PROGRESS, KafkaError.COORDINATOR_NOT_AVAILABLE,
    KafkaError.NOT_COORDINATOR, KafkaError.REQUEST_TIMED_OUT, KafkaError.NETWORK_EXCEPTION,
    KafkaError._TRANSPORT, KafkaError._TIMED_OUT, KafkaError._WAIT_COORD,
))
# The consumer settings the dead-letter producer reuses (and every ``*_cb`` callback).
_CONNECTION_PREFIXES = (
    "bootstrap.servers", "client.", "security.", "sasl.", "ssl.", "socket.", "broker.", "log",
)


class KafkaConnectError(KafkaException):
    """:meth:`KafkaConsumer.start` could not reach the brokers; the message names them."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else super().__str__()


class _PartitionOffsets:
    """The offsets of one assigned partition in flight, and what is safe to commit.

    Offsets are added in increasing order and finish in any order; the commit
    position is the lowest unfinished one. Owner: the polling thread.
    """

    __slots__ = ("_finished", "_next", "_pending", "committed", "partition", "topic")

    def __init__(self, topic: str, partition: int) -> None:
        self.topic, self.partition = topic, partition
        self._pending: deque[int] = deque()  # added, and not finished or finished early
        self._finished: set[int] = set()  # finished above the lowest unfinished one
        self._next: int | None = None  # one past the last offset added
        self.committed: int | None = None  # the position last committed, if any

    def add(self, offset: int) -> None:
        self._pending.append(offset)
        self._next = offset + 1

    def finish(self, offset: int) -> None:
        pending, finished = self._pending, self._finished
        if pending and pending[0] == offset:
            pending.popleft()
            while pending and pending[0] in finished:
                finished.discard(pending.popleft())
        else:
            finished.add(offset)

    @property
    def in_flight(self) -> int:
        return len(self._pending) - len(self._finished)

    def position(self) -> int | None:
        """The offset to commit: every message below it is finished."""
        return self._pending[0] if self._pending else self._next

    def to_commit(self) -> TopicPartition | None:
        """The position to commit, if it moved since the last commit."""
        position = self.position()
        if position is None or position == self.committed:
            return None
        return TopicPartition(self.topic, self.partition, position)


class _Delivery(NamedTuple):
    """A message taken from Kafka, and the partition bookkeeping it finishes in."""

    message: Message
    partition: _PartitionOffsets
    offset: int


class KafkaConsumer(Consumer[_Delivery]):
    """Consume Kafka topics in a consumer group and run a handler per message on a keyed pool.

    Args:
        topics: a topic name or a list of them (``^...``: a regular expression).
        handler: called with each ``confluent_kafka.Message`` (so are the hooks).
        config: the confluent-kafka consumer configuration, with ``bootstrap.servers``
            and ``group.id``; ``auto.offset.reset`` defaults to ``"earliest"`` and
            ``partition.assignment.strategy`` to ``"cooperative-sticky"`` (except
            with ``group.protocol="consumer"``). The consumer commits by itself:
            leave ``enable.auto.*`` alone (an ``on_commit`` is still called).
        key: a header name or a function of the message. Default: the message key.
        dead_letter_config: the dead-letter producer's configuration. Default:
            *config*'s connection settings and ``*_cb`` callbacks. Its
            ``message.timeout.ms`` defaults to 30 s.
        on_assign, on_revoke: called on the polling thread with the partitions
            that come, and those that go (before they are drained and committed)
            or were lost. With cooperative rebalancing, only those that move.
        commit_interval: seconds between commits while running.
        revoke_timeout: the most seconds to drain and commit revoked partitions
            (less than half of ``max.poll.interval.ms``).
        options: :class:`~keyedpool.contrib.consumer.ConsumerOptions`, or as keyword
            arguments. The default ``dead_letter`` is ``f"{topic}.dead"``; it must
            exist (:meth:`start` checks, but not for ``^...`` topics). A dead letter
            has the message's key, value and headers, and ``keyedpool.topic``,
            ``keyedpool.partition``, ``keyedpool.offset`` and ``keyedpool.error``.
    """

    def __init__(
        self, topics: str | Sequence[str], handler: Callable[[Message], object], *,
        config: Mapping[str, Any], key: str | Callable[[Message], Key | None] | None = None,
        dead_letter_config: Mapping[str, Any] | None = None,
        on_assign: Callable[[list[TopicPartition]], object] | None = None,
        on_revoke: Callable[[list[TopicPartition]], object] | None = None,
        commit_interval: float = 1.0, revoke_timeout: float = 10.0,
        options: ConsumerOptions | None = None, **args: Unpack[ConsumerArgs],
    ) -> None:
        # Checked before the engine makes its pool, so that an error leaves no threads.
        self._topics = _check_topics(topics)
        if not isinstance(config, Mapping):
            raise TypeError(f"config must be a mapping, not {type(config).__name__}")
        for required in ("bootstrap.servers", "group.id"):
            if not config.get(required):
                raise ValueError(f"config must set {required!r}")
        for owned in ("enable.auto.commit", "enable.auto.offset.store"):
            if str(config.get(owned, False)).lower() not in ("false", "0"):
                raise ValueError(f"do not set {owned!r}: KafkaConsumer commits offsets "
                                 "itself, after the handler succeeded")
        if dead_letter_config is not None and not isinstance(dead_letter_config, Mapping):
            raise TypeError("dead_letter_config must be a mapping or None")
        for name, hook in (("on_assign", on_assign), ("on_revoke", on_revoke)):
            if hook is not None and not callable(hook):
                raise TypeError(f"{name} must be callable or None, not {type(hook).__name__}")
        check_seconds("commit_interval", commit_interval, allow_zero=True)
        check_seconds("revoke_timeout", revoke_timeout)
        interval_ms = config.get("max.poll.interval.ms")
        if interval_ms is not None and revoke_timeout * 2000 > float(interval_ms):
            raise ValueError(f"revoke_timeout ({revoke_timeout} s) must be less than half of "
                             f"max.poll.interval.ms ({interval_ms} ms): the rebalance "
                             "callback blocks polling while it waits")
        super().__init__(handler, key=methodcaller("key") if key is None else key,
                         key_kind="header", thread_name=f"keyedpool-kafka-{self._topics[0]}",
                         options=options, args=args)
        self._config: dict[str, Any] = {"auto.offset.reset": "earliest", **config}
        next_protocol = str(config.get("group.protocol", "")).lower() == "consumer"
        self._classic = not next_protocol
        if not next_protocol:  # (KIP-848 refuses it: its assignors run on the broker)
            self._config.setdefault("partition.assignment.strategy", "cooperative-sticky")
        # Incremental rebalancing hands the callbacks only the partitions that
        # move; eager rebalancing, the whole assignment.
        self._incremental = next_protocol or "cooperative" in str(
            self._config.get("partition.assignment.strategy", "")).lower()
        self._user_on_commit = self._config.get("on_commit")
        self._config.update({"enable.auto.commit": False, "enable.auto.offset.store": False,
                             "on_commit": self._on_commit})
        if dead_letter_config is None:
            dead_letter_config = {k: v for k, v in config.items()
                                  if k.startswith(_CONNECTION_PREFIXES) or k.endswith("_cb")}
        self._dead_config = {"message.timeout.ms": _DEAD_LETTER_TIMEOUT_MS, **dead_letter_config}
        self._user_on_assign, self._user_on_revoke = on_assign, on_revoke
        self._commit_interval, self._revoke_timeout = float(commit_interval), float(revoke_timeout)
        self._resume_at = self._handling.max_in_flight // 2
        #: Set when a finished message's ack waits (_acks_waiting) and by stop(); the
        #: polling thread waits on it (emptying the acks first, so the next one sets it).
        self._wakeup = threading.Event()
        #: Owner of these three: the polling thread (the rebalance callbacks run on it).
        self._partitions: dict[tuple[str, int], _PartitionOffsets] = {}
        self._paused = False
        self._commits = 0
        #: Owner: the thread that opens it (in start() or run()), then the polling thread.
        self._consumer: KafkaClient | None = None
        #: Owner: _producer_lock (made by the first worker that writes a dead letter).
        self._producer_lock = threading.Lock()
        self._producer: Producer | None = None

    @property
    def paused(self) -> bool:
        """True while fetching is paused: the consumer is full, or stopping."""
        return self._paused

    @property
    def commits(self) -> int:
        """How many offset commits this consumer has sent."""
        return self._commits

    # -- the polling thread -------------------------------------------------------

    def _open(self) -> None:
        consumer = KafkaClient(self._config)
        wait = max(10.0, self.options.poll_timeout)
        try:
            try:  # a wrong address fails here, named, not retried in the background for ever
                consumer.list_topics(timeout=wait)
            except KafkaException as exc:
                raise KafkaConnectError(
                    "keyedpool: could not get metadata from the Kafka brokers at "
                    f"{self._config['bootstrap.servers']!r} ({_error_of(exc).str()}). Check "
                    "that a broker is running at that address and port and can be reached "
                    "from this host, and the security settings (security.protocol, sasl.*, "
                    "ssl.*).") from exc
            dead = self.options.dead_letter
            if isinstance(dead, Default):
                dead_topics = [f"{t}.dead" for t in self._topics if not t.startswith("^")]
            else:
                dead_topics = [] if dead is None else [dead]
            for name in dead_topics:
                topic = consumer.list_topics(name, timeout=wait).topics.get(name)
                if topic is None or topic.error is not None:
                    raise ValueError(
                        f"the dead-letter topic {name!r} does not exist ("
                        f"{'not in the metadata' if topic is None else topic.error}): create "
                        "it, name another one with dead_letter=..., or pass dead_letter=None "
                        "to log and skip failed messages")
            consumer.subscribe(self._topics, on_assign=self._on_assign,
                               on_revoke=self._on_revoke, on_lost=self._on_lost)
        except BaseException:
            consumer.close()
            raise
        self._consumer = consumer

    def _consume(self) -> None:
        consumer, handling = self._consumer, self._handling
        assert consumer is not None
        poll, batch = self.options.poll_timeout, self.options.batch
        next_commit = time.monotonic() + self._commit_interval
        while not self._stopping.is_set():
            self._flush_acks()
            if (now := time.monotonic()) >= next_commit:
                error = self._commit(consumer, synchronous=False)
                if error is not None:  # sent again next time; a crash first repeats them
                    log.warning("keyedpool kafka consumer: commit failed: %s", error)
                next_commit = now + self._commit_interval
            if self._paused:
                if handling.in_flight <= self._resume_at:
                    self._pause(consumer, False)
                else:  # full: fetch nothing, but keep serving rebalances and commits
                    self._wakeup.clear()
                    self._flush_acks()  # emptied: the next ack sets _wakeup again
                    if handling.in_flight > self._resume_at:
                        self._wakeup.wait(poll)
                    self._take(consumer.consume(batch, 0))
                    continue
            if (room := handling.room()) > 0:
                self._take(consumer.consume(min(room, batch), poll))
            elif handling.wait_for_room(5 * poll) <= 0:
                # Full for a while (a pause costs a fetch round trip): pause the
                # partitions, and go on polling to stay in the group.
                self._pause(consumer, True)

    def _take(self, messages: list[Message]) -> None:
        for message in messages:
            if (error := message.error()) is not None:
                if error.fatal():
                    raise KafkaException(error)
                if error.code() != KafkaError._PARTITION_EOF:
                    log.warning("keyedpool kafka consumer: %s", error)
                continue
            where = (message.topic(), message.partition())  # (None only for errors)
            state = self._partitions.get(where)  # type: ignore[arg-type]
            offset = message.offset()
            if state is None or offset is None:
                continue  # not ours any more: its new owner fetches it
            self._receive(_Delivery(message, state, offset))
            state.add(offset)  # finished on this thread (_send_acks): it cannot overtake this

    def _pause(self, consumer: KafkaClient, paused: bool) -> None:
        if assignment := consumer.assignment():
            (consumer.pause if paused else consumer.resume)(assignment)
        self._paused = paused

    def _commit(self, consumer: KafkaClient, *, synchronous: bool,
                states: Collection[_PartitionOffsets] | None = None) -> KafkaError | None:
        """Commit what *states* (default: all) finished; return why it failed, if it did.

        A synchronous commit fails if it is refused for any partition.
        """
        self._flush_acks()
        chosen = self._partitions.values() if states is None else states
        offsets = [tp for tp in (state.to_commit() for state in chosen) if tp is not None]
        if not offsets:
            return None
        try:
            results = (consumer.commit(offsets=offsets, asynchronous=False) if synchronous
                       else consumer.commit(offsets=offsets)) or offsets
        except KafkaException as exc:
            return _error_of(exc)
        self._commits += 1
        failed: KafkaError | None = None
        for tp in results:
            if tp.error is not None:
                failed = failed or tp.error
            elif (state := self._partitions.get((tp.topic, tp.partition))) is not None:
                state.committed = tp.offset
        return failed

    def _on_commit(self, error: KafkaError | None, partitions: list[TopicPartition]) -> None:
        # Served by consume() on the polling thread. A failed commit is sent again.
        for tp in partitions if error is not None else ():
            state = self._partitions.get((tp.topic, tp.partition))
            if state is not None and state.committed == tp.offset:
                state.committed = None
        if self._user_on_commit is not None:
            call_hook(self._user_on_commit, error, partitions)

    def _cut(self, deadline: float) -> float:
        # *deadline*, or stop(timeout)'s if that comes first.
        stop = self._deadline if self._stopping.is_set() else None
        return deadline if stop is None else min(deadline, stop)

    def _drain(self, states: Collection[_PartitionOffsets], deadline: float) -> bool:
        """Wait until *states* have nothing in flight; False if *deadline* came first."""
        while True:
            self._wakeup.clear()
            idle = self._handling.in_flight == 0  # then nothing more will finish
            self._flush_acks()
            done = all(state.in_flight == 0 for state in states)
            left = self._cut(deadline) - time.monotonic()
            if done or idle or left <= 0:
                return done
            self._wakeup.wait(min(self.options.poll_timeout, left))

    def _commit_revoked(self, consumer: KafkaClient, states: Collection[_PartitionOffsets],
                        deadline: float) -> None:
        # The next owner starts at the committed offset and repeats what this
        # misses: try again on passing errors, with growing waits, by *deadline*.
        backoff, attempt = _REVOKE_COMMIT_BACKOFF, 1
        while (error := self._commit(consumer, synchronous=True, states=states)) is not None:
            if (attempt >= _REVOKE_COMMIT_ATTEMPTS or error.code() not in _RETRIABLE_COMMIT_ERRORS
                    or time.monotonic() + backoff > self._cut(deadline)):
                log.warning("keyedpool kafka consumer: commit of revoked partitions failed "
                            "after %d attempt(s): %s. Their next owner handles the messages "
                            "finished since the last commit again.", attempt, error)
                return
            log.info("keyedpool kafka consumer: commit of revoked partitions failed (%s); "
                     "trying again in %.2f s", error, backoff)
            time.sleep(backoff)  # blocks the rebalance, as the drain does: both in the limit
            backoff, attempt = backoff * 2, attempt + 1

    # -- what the engine calls on the consumer's thread when stopping -------------

    def _stop_fetching(self) -> None:
        if self._consumer is not None:
            self._pause(self._consumer, True)

    def _after_drain(self) -> None:
        if self._consumer is not None:
            error = self._commit(self._consumer, synchronous=True)
            if error is not None:
                log.warning("keyedpool kafka consumer: final commit failed: %s", error)

    def _close(self) -> None:
        consumer, self._consumer = self._consumer, None
        try:
            if consumer is not None:
                try:
                    self._leave_group(consumer)
                finally:
                    consumer.close()  # leaves the group: the others take over at once
        finally:
            with self._producer_lock:
                producer = self._producer
            if producer is not None:
                producer.flush(10)

    def _leave_group(self, consumer: KafkaClient) -> None:
        # Unsubscribe and serve the rebalance callbacks here until the group is
        # left, then close(). librdkafka runs a closing consumer's callbacks inside
        # close(), and an assignment that arrives then (a join was on its way) can
        # leave the revoke callback's unassign waiting for an answer that never
        # comes: close() hangs. (Everything is drained and committed, so the
        # revoke callback has nothing to wait for; a message fetched meanwhile is
        # dropped, uncommitted, for the partition's next owner.) The classic
        # protocol clears the member id once it has left the group; with KIP-848's
        # (group.protocol=consumer) only the assignment is awaited, so a stop
        # while the first join is in flight may still meet that assignment in
        # close() (seen on librdkafka's mock cluster; no hang seen there).
        now = time.monotonic()
        deadline = max(self._cut(now + self._revoke_timeout), now + self.options.poll_timeout)
        try:
            consumer.unsubscribe()
            while consumer.assignment() or (self._classic and consumer.memberid()):
                if time.monotonic() >= deadline:
                    log.warning("keyedpool kafka consumer: still in the group after "
                                "revoke_timeout (%s s) or stop's timeout; closing anyway",
                                self._revoke_timeout)
                    break
                consumer.consume(self.options.batch, self.options.poll_timeout)
        except KafkaException as exc:  # close() still leaves the group
            log.warning("keyedpool kafka consumer: leaving the group failed: %s",
                        _error_of(exc))

    def _wake(self) -> None:
        self._wakeup.set()

    # -- rebalance callbacks (served inside consume(), on the polling thread) -----
    # *partitions* are those that move (incremental) or the whole assignment
    # (eager); the callbacks make the matching assign/unassign call themselves.

    def _on_assign(self, consumer: KafkaClient, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self._partitions[(tp.topic, tp.partition)] = _PartitionOffsets(tp.topic, tp.partition)
        if self._paused and partitions:
            consumer.pause(partitions)  # still full: do not start fetching them
        (consumer.incremental_assign if self._incremental else consumer.assign)(partitions)
        if self._user_on_assign is not None:
            call_hook(self._user_on_assign, partitions)

    def _on_revoke(self, consumer: KafkaClient, partitions: list[TopicPartition],
                   lost: bool = False) -> None:
        try:
            self._flush_acks()  # so that the hook sees what is still unfinished
            if self._user_on_revoke is not None:
                call_hook(self._user_on_revoke, partitions)
            states = [state for state in (self._partitions.get((tp.topic, tp.partition))
                                          for tp in partitions) if state is not None]
            if not lost:
                # Finish and commit what was taken from them, so that their next owner
                # starts right after it. Not for longer than revoke_timeout: this blocks
                # the poll, and a member that does not poll is thrown out of the group.
                deadline = time.monotonic() + self._revoke_timeout
                if not self._drain(states, deadline):
                    log.warning("keyedpool kafka consumer: %d messages of revoked partitions "
                                "unfinished after revoke_timeout (%s s); committing up to the "
                                "lowest unfinished offset. Their next owner handles them "
                                "again, possibly while they still run here.",
                                sum(state.in_flight for state in states), self._revoke_timeout)
                self._commit_revoked(consumer, states, deadline)
            for state in states:
                self._partitions.pop((state.topic, state.partition), None)
            if partitions:  # librdkafka would keep them paused if they came back
                consumer.resume(partitions)
        finally:
            if self._incremental:
                consumer.incremental_unassign(partitions)
            else:
                consumer.unassign()

    def _on_lost(self, consumer: KafkaClient, partitions: list[TopicPartition]) -> None:
        # The group went on without us (session timeout): committing is no longer
        # allowed. What is in flight still finishes; the new owner handles it again.
        self._on_revoke(consumer, partitions, lost=True)

    # -- what the engine calls on the workers ------------------------------------

    def _send_acks(self, batch: list[tuple[_Delivery, bool]]) -> None:
        # On the polling thread: the commit position moves past finished messages.
        for delivery, _ in batch:
            delivery.partition.finish(delivery.offset)

    def _acks_waiting(self) -> None:
        self._wakeup.set()  # a revoke's drain, or a pause, may be waiting for it

    def _write_dead_letter(self, delivery: _Delivery, error: BaseException,
                           destination: str) -> None:
        # Waits until the dead letter is stored: only then may the commit pass the
        # message. If this raises, the engine tries again after the backoff.
        message = delivery.message
        ours = {"topic": message.topic(), "partition": message.partition(),
                "offset": delivery.offset, "error": f"{type(error).__name__}: {error}"}
        headers: list[tuple[str, str | bytes | None]] = [*_header_items(message)]
        headers += [(f"keyedpool.{name}", str(v).encode()) for name, v in ours.items()]
        with self._producer_lock:
            if self._producer is None:
                self._producer = Producer(self._dead_config)
            producer = self._producer
        stored: Future[KafkaError | None] = Future()
        producer.produce(destination, value=message.value(), key=message.key(), headers=headers,
                         on_delivery=lambda failure, _: stored.set_result(failure))
        while not stored.done():
            producer.poll(0.05)
        if (failure := stored.result()) is not None:
            raise KafkaException(failure)

    def _default_dead_letter(self, delivery: _Delivery) -> str:
        return f"{delivery.message.topic()}.dead"

    def _named_key(self, delivery: _Delivery, name: str) -> object:
        return next((v for n, v in _header_items(delivery.message) if n == name), None)

    def _public(self, delivery: _Delivery) -> Message:
        return delivery.message

    def _describe(self, delivery: _Delivery) -> str:
        message = delivery.message
        return f"message {message.topic()}[{message.partition()}]@{delivery.offset}"


def _error_of(exc: KafkaException) -> KafkaError:
    error = exc.args[0] if exc.args else None
    return error if isinstance(error, KafkaError) else KafkaError(KafkaError._FAIL, str(exc))


def _header_items(message: Message) -> list[tuple[str, bytes | None]]:
    headers = message.headers() or []
    pairs = headers.items() if isinstance(headers, dict) else headers
    return [(str(name), v if v is None or isinstance(v, bytes) else str(v).encode())
            for name, v in pairs]


def _check_topics(topics: object) -> list[str]:
    names = [topics] if isinstance(topics, str) else topics
    if not isinstance(names, (list, tuple)):
        raise TypeError("topics must be a topic name or a list of topic names")
    if not names or not all(isinstance(name, str) and name for name in names):
        raise ValueError("topics must be one or more non-empty topic names")
    return [str(name) for name in names]
