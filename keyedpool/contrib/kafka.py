"""Consume Kafka topics on a keyed pool: in order per key, committed after success, scaled out.

Install with ``pip install keyedpool[kafka]`` (it uses ``confluent-kafka``).

>>> from keyedpool.contrib.kafka import KafkaConsumer, RetryPolicy
>>> def handle(message):            # a plain blocking function; gets a confluent_kafka.Message
...     print(message.key(), message.value())
>>> consumer = KafkaConsumer(
...     "orders", handle,
...     config={"bootstrap.servers": "kafka:9092", "group.id": "billing"},
...     retry=RetryPolicy(attempts=5),
... )                                                               # doctest: +SKIP
>>> consumer.run()   # until consumer.stop() (e.g. from a SIGTERM handler)  # doctest: +SKIP

Guarantees and their limits:

* **Per-key order, even across failures.** Messages with the same key (by
  default the Kafka message key) are handled one at a time, in partition order.
  A failed message is retried (as the :class:`RetryPolicy` says) before the next
  message of its key starts; only that key waits. When the attempts run out the
  message goes to the dead-letter topic (default ``f"{topic}.dead"``), and only
  then does its key move on.
* **Commit after success.** For each partition the consumer tracks the offsets
  it has taken and not finished, and commits only up to the lowest unfinished
  one. Messages of different keys finish out of order; the commit never passes
  one that has not finished, so a crash never skips a message.
* **At least once.** After a crash (or a partition lost to a session timeout)
  the next owner starts at the last committed offset, so messages handled but
  not committed yet are handled again. Kafka does not say which messages are
  such repeats: make handlers idempotent (for example, remember the last
  offset handled per key).
* **Cooperative rebalancing.** Unless the configuration says otherwise
  (``partition.assignment.strategy``, or ``group.protocol="consumer"``), the
  consumer uses ``"cooperative-sticky"``: a rebalance takes away only the
  partitions that move to another process, and the others keep running
  through it. A clean hand-over repeats nothing: the revoked partitions are
  drained, what they finished is committed (tried again, with growing waits,
  if the coordinator is briefly out of reach), and only then are they let go.
  All members of a group must use the same kind of strategy: to move a running
  group of eager consumers over, stop them all before starting the new ones,
  or set ``"partition.assignment.strategy": "range,roundrobin"`` (librdkafka's
  default, eager) to keep it as it is.
* **Revoke timeout.** Draining revoked partitions and committing them takes
  at most about ``revoke_timeout`` seconds (keep it well under
  ``max.poll.interval.ms``: the rebalance callback blocks the consumer's poll).
  When it runs out, the consumer commits up to the lowest unfinished offset
  and lets the partitions go; the next owner handles the unfinished messages
  again, possibly **while they still run here** (the same key in two
  processes for a moment). Make handlers idempotent, or raise
  ``revoke_timeout`` if handlers are slow.
* **Backpressure.** At most ``max_in_flight`` messages are taken and not yet
  finished. A full consumer takes nothing more; if it stays full for a while
  (``5 * poll_timeout``), it pauses its partitions, so that librdkafka stops
  fetching them, and keeps polling (to stay in the group) until half of the
  in-flight messages have finished.
* **Graceful stop.** :meth:`KafkaConsumer.stop` stops fetching, waits for the
  in-flight messages, commits, and leaves the group.
* **Errors.** A bad configuration or a missing dead-letter topic raises at
  :meth:`KafkaConsumer.start`. An error that later stops the consumer's thread
  (a fatal Kafka error, say) is kept in :attr:`KafkaConsumer.error` and raised
  again by :meth:`KafkaConsumer.stop`. A message whose key cannot be read goes
  to the dead-letter topic. The consumer's thread is not a daemon; it is
  stopped gracefully when the interpreter exits.
* **Scale-out.** Start the same consumer in several processes (on one machine
  or many) with the same ``group.id``. Kafka gives each partition to one
  process, and producers put all messages with one key into one partition
  (the default partitioner hashes the message key), so one process sees all of
  a key's messages in order. Produce with the ordering key as the message key,
  and use at least as many partitions as processes.

No Kafka broker at hand? ``python -m keyedpool.contrib.kafka_mock`` runs
librdkafka's mock cluster (see :mod:`keyedpool.contrib.kafka_mock`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

from keyedpool.contrib import _require

_require("confluent_kafka", "kafka", "keyedpool.contrib.kafka")

from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)

from keyedpool import Key, KeyedPoolExecutor

from ._consumer import (
    ConsumerStats,
    DeadLetter,
    KeyedHandling,
    RetryPolicy,
    _ConsumerBase,
    check_handler,
    check_pool,
    check_positive,
    check_seconds,
    read_key,
)

__all__ = [
    "ConsumerStats",
    "DeadLetter",
    "KafkaConnectError",
    "KafkaConsumer",
    "RetryPolicy",
]

log = logging.getLogger("keyedpool.contrib.kafka")


class KafkaConnectError(KafkaException):
    """:meth:`KafkaConsumer.start` could not reach the brokers; the message names them.

    A ``confluent_kafka.KafkaException``, as the client's own errors are.
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else super().__str__()


# The consumer stores and commits offsets itself, only after the handler succeeded.
_OWNED_SETTINGS = ("enable.auto.commit", "enable.auto.offset.store")
# A dead letter is written on a worker, which waits for it: fail it (and try
# again later) after this long instead of librdkafka's default 300 s.
_DEAD_LETTER_TIMEOUT_MS = 30_000
# Cooperative rebalancing moves only the partitions that change owner; the
# others keep running through a rebalance. (librdkafka's default, "range,
# roundrobin", is eager: every rebalance revokes every partition of every member.)
_DEFAULT_ASSIGNMENT_STRATEGY = "cooperative-sticky"
# The commit of revoked partitions is tried this many times at most, the waits
# between attempts doubling from _REVOKE_COMMIT_BACKOFF seconds, all within
# revoke_timeout: a commit that fails makes the next owner repeat those messages.
_REVOKE_COMMIT_ATTEMPTS = 4
_REVOKE_COMMIT_BACKOFF = 0.1
# Commit errors worth another attempt: the coordinator is moving, loading or out
# of reach for a moment. Not REBALANCE_IN_PROGRESS: while this member sits in its
# revoke callback it cannot rejoin, so the group can only go on to a generation
# without it, where the commit is refused for good; waiting for that only delays
# the rebalance. (Real brokers accept the commit while a rebalance waits for its
# members; librdkafka's mock cluster refuses it.)
_RETRIABLE_COMMIT_ERRORS = frozenset(
    (
        KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
        KafkaError.COORDINATOR_NOT_AVAILABLE,
        KafkaError.NOT_COORDINATOR,
        KafkaError.REQUEST_TIMED_OUT,
        KafkaError.NETWORK_EXCEPTION,
        KafkaError._TRANSPORT,
        KafkaError._TIMED_OUT,
        KafkaError._WAIT_COORD,
    )
)
# Settings of the consumer configuration that the dead-letter producer reuses
# (and every callback setting, ``*_cb``: oauth_cb, error_cb, ...).
_CONNECTION_PREFIXES = (
    "bootstrap.servers",
    "client.",
    "security.",
    "sasl.",
    "ssl.",
    "socket.",
    "broker.",
    "log",
)


class _Delivery:
    """A message taken from Kafka, with the partition bookkeeping it must finish in."""

    __slots__ = ("message", "offset", "partition")

    def __init__(self, message: Message, partition: _PartitionOffsets, offset: int) -> None:
        self.message = message
        self.partition = partition
        self.offset = offset


class _PartitionOffsets:
    """The offsets of one assigned partition that are in flight, and what is safe to commit.

    Offsets arrive in increasing order (as Kafka delivers them) and finish in
    any order (different keys run concurrently). The commit position is the
    lowest unfinished offset, or one past the last finished offset when nothing
    is in flight: committing it never skips an unfinished message. Used by the
    polling thread only.
    """

    __slots__ = (
        "_finished",
        "_pending",
        "_position",
        "committed",
        "partition",
        "topic",
    )

    def __init__(self, topic: str, partition: int) -> None:
        self.topic = topic
        self.partition = partition
        self._pending: deque[int] = deque()
        self._finished: set[int] = set()
        self._position: int | None = None
        #: The position last committed (None: nothing committed by us yet).
        self.committed: int | None = None

    def add(self, offset: int) -> None:
        """Note that the message at *offset* was taken (offsets must increase)."""
        self._pending.append(offset)

    def finish(self, offset: int) -> None:
        """Note that the message at *offset* is finished (handled or dead-lettered)."""
        pending = self._pending
        if pending and pending[0] == offset:
            pending.popleft()
            self._position = offset + 1
            finished = self._finished
            while pending and pending[0] in finished:
                done = pending.popleft()
                finished.discard(done)
                self._position = done + 1
        else:
            self._finished.add(offset)

    @property
    def in_flight(self) -> int:
        """Messages taken from this partition and not finished."""
        return len(self._pending) - len(self._finished)

    def position(self) -> int | None:
        """The offset to commit: every message below it is finished."""
        if self._pending:
            return self._pending[0]
        return self._position

    def to_commit(self) -> TopicPartition | None:
        """The position to commit, if it moved since the last commit."""
        position = self.position()
        if position is None or position == self.committed:
            return None
        return TopicPartition(self.topic, self.partition, position)


class KafkaConsumer(_ConsumerBase):
    """Consume Kafka topics in a consumer group and run a handler per message on a keyed pool.

    Args:
        topics: a topic name or a list of them (names starting with ``^`` are
            regular expressions, as in confluent-kafka).
        handler: a plain blocking function called with each
            ``confluent_kafka.Message``. Messages of one key run one at a time,
            in partition order. Returning means success; raising means failure:
            the message is retried as *retry* says, then dead-lettered (raise
            :class:`DeadLetter` to skip the retries).
        config: the confluent-kafka consumer configuration; ``bootstrap.servers``
            and ``group.id`` are required. ``auto.offset.reset`` defaults to
            ``"earliest"`` and ``partition.assignment.strategy`` to
            ``"cooperative-sticky"`` (not with ``group.protocol="consumer"``,
            which is incremental anyway). Leave ``enable.auto.commit`` and
            ``enable.auto.offset.store`` alone: this consumer commits by itself.
        key: where the ordering key is: a header name (``str``; its value,
            ``bytes``, is the key; no such header: no order kept), or a function
            of the message returning ``str``, ``bytes``, ``int`` or ``None``
            (no order). Default ``None``: the Kafka message key. A message
            whose key cannot be read (the function raises, or returns another
            type) goes to the dead-letter topic with that error. Messages of
            one ordering key must share a partition (produce them with one
            message key), or their order cannot hold across processes.
        pool: the pool to run handlers on. Default: a pool of its own with
            *max_workers* workers, shut down when the consumer stops.
        max_workers: the size of that pool (only without *pool*).
        retry: the :class:`RetryPolicy` (default: 3 attempts, 0.1 s backoff doubling).
        dead_letter: the topic failed messages go to, with their key, value and
            headers plus ``keyedpool.topic``, ``keyedpool.partition``,
            ``keyedpool.offset`` and ``keyedpool.error`` headers. Default:
            ``f"{topic}.dead"`` for a message of ``topic``. ``None``: log and
            skip them. The topic must exist: :meth:`start` (and :meth:`run`)
            raise ``ValueError`` if it does not (not checked for ``^regex``
            topics with the default).
        dead_letter_config: the producer configuration for dead letters.
            Default: the connection settings of *config* (``bootstrap.servers``,
            ``security.*``, ``sasl.*``, ``ssl.*``, ...) and its callbacks
            (``*_cb``, e.g. ``oauth_cb``). ``message.timeout.ms`` defaults to
            30 s here: a worker waits for its dead letter to be stored, and one
            that fails is tried again after the backoff (up to ``retry.max_backoff``).
        on_dead_letter: called (on a worker) with each dead-lettered message and
            its error, after it was written. If it raises, the error is logged.
        on_redelivered: called with each message known to be a redelivery.
            Kafka does not mark redeliveries, so today it is never called; it
            is here so that all keyedpool consumers take the same arguments.
        on_assign: called (on the polling thread) at each rebalance with the
            partitions this consumer was given, e.g. for logging or a
            readiness check. With cooperative rebalancing (the default) these
            are only the partitions added, often none: the list may be empty.
        on_revoke: called (on the polling thread) with the partitions being
            taken away: revoked (called before their in-flight messages are
            finished and committed) or lost to a session timeout. With
            cooperative rebalancing only the partitions that move. Hooks that
            raise are logged.
        max_in_flight: the most messages taken and not yet finished
            (backpressure). Default: the pool's ``max_pending``.
        batch: the most messages taken per poll.
        revoke_timeout: the longest wait, in seconds, for the in-flight
            messages of revoked partitions to finish and be committed before
            they are handed over (see the module docs). Must be less than half
            of ``max.poll.interval.ms``.
        commit_interval: seconds between offset commits while running (commits
            also happen when partitions are revoked and on stop).
        poll_timeout: the longest single wait for Kafka, in seconds (also how
            quickly :meth:`stop` is noticed). A consumer that stays full for
            five times this long pauses its partitions.
    """

    def __init__(
        self,
        topics: str | Sequence[str],
        handler: Callable[[Message], object],
        *,
        config: Mapping[str, Any],
        key: str | Callable[[Message], Key | None] | None = None,
        pool: KeyedPoolExecutor | None = None,
        max_workers: int | None = None,
        retry: RetryPolicy | None = None,
        dead_letter: str | None = "",
        dead_letter_config: Mapping[str, Any] | None = None,
        on_dead_letter: Callable[[Message, BaseException], None] | None = None,
        on_redelivered: Callable[[Message], None] | None = None,
        on_assign: Callable[[list[TopicPartition]], None] | None = None,
        on_revoke: Callable[[list[TopicPartition]], None] | None = None,
        max_in_flight: int | None = None,
        batch: int = 100,
        commit_interval: float = 1.0,
        poll_timeout: float = 0.1,
        revoke_timeout: float = 10.0,
    ) -> None:
        self._topics = _check_topics(topics)
        check_handler(handler)
        if key is not None and not (isinstance(key, str) or callable(key)):
            raise TypeError(
                f"key must be a header name (str), a function of the message or None, "
                f"not {type(key).__name__}"
            )
        if not isinstance(config, Mapping):
            raise TypeError(f"config must be a mapping, not {type(config).__name__}")
        for required in ("bootstrap.servers", "group.id"):
            if not config.get(required):
                raise ValueError(f"config must set {required!r}")
        for owned in _OWNED_SETTINGS:
            if owned in config and str(config[owned]).lower() not in ("false", "0"):
                raise ValueError(
                    f"do not set {owned!r}: KafkaConsumer commits offsets itself, "
                    "after the handler succeeded"
                )
        if dead_letter is not None and not isinstance(dead_letter, str):
            raise TypeError("dead_letter must be a topic name, '' for the default, or None")
        if dead_letter_config is not None and not isinstance(dead_letter_config, Mapping):
            raise TypeError("dead_letter_config must be a mapping or None")
        for name, hook in (
            ("on_dead_letter", on_dead_letter),
            ("on_redelivered", on_redelivered),
            ("on_assign", on_assign),
            ("on_revoke", on_revoke),
        ):
            if hook is not None and not callable(hook):
                raise TypeError(f"{name} must be callable or None, not {type(hook).__name__}")
        check_pool(pool)
        if pool is not None and max_workers is not None:
            raise ValueError("give either pool or max_workers, not both")
        check_positive("batch", batch)
        check_seconds("commit_interval", commit_interval, allow_zero=True)
        check_seconds("poll_timeout", poll_timeout)
        check_seconds("revoke_timeout", revoke_timeout)
        poll_interval_ms = config.get("max.poll.interval.ms")
        if poll_interval_ms is not None and revoke_timeout * 1000 * 2 > float(poll_interval_ms):
            raise ValueError(
                f"revoke_timeout ({revoke_timeout} s) must be less than half of "
                f"max.poll.interval.ms ({poll_interval_ms} ms): the rebalance callback "
                "blocks polling while it waits"
            )

        self._handler = handler
        self._key: Callable[[Message], object]
        if key is None:
            self._key = _message_key
        elif isinstance(key, str):
            self._key = _HeaderKey(key)
        else:
            self._key = key
        self._config: dict[str, Any] = {"auto.offset.reset": "earliest", **config}
        if (
            "partition.assignment.strategy" not in config
            and str(config.get("group.protocol", "")).lower() != "consumer"
        ):
            self._config["partition.assignment.strategy"] = _DEFAULT_ASSIGNMENT_STRATEGY
        # Incremental rebalancing hands the callbacks only the partitions that
        # move; eager rebalancing revokes and assigns the whole assignment.
        self._incremental = _is_incremental(self._config)
        self._user_on_commit = self._config.get("on_commit")
        self._config.update(
            {
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "on_commit": self._on_commit,
            }
        )
        self._dead_topic = dead_letter
        if dead_letter_config is None:
            dead_letter_config = {
                k: v
                for k, v in config.items()
                if k.startswith(_CONNECTION_PREFIXES) or k.endswith("_cb")
            }
        self._dead_config = {"message.timeout.ms": _DEAD_LETTER_TIMEOUT_MS, **dead_letter_config}
        self._on_dead_letter = on_dead_letter
        self._user_on_assign = on_assign
        self._user_on_revoke = on_revoke
        self._batch = batch
        self._commit_interval = float(commit_interval)
        self._poll_timeout = float(poll_timeout)
        self._revoke_timeout = float(revoke_timeout)

        self._init_lifecycle(f"keyedpool-kafka-{self._topics[0]}", pool, max_workers)
        self._handling: KeyedHandling[_Delivery] = KeyedHandling(
            self._call_handler,
            pool=self._pool,
            ack=self._ack,
            dead_letter=self._write_dead_letter,
            retry=retry,
            max_in_flight=max_in_flight,
            on_redelivered=(
                None if on_redelivered is None else lambda d: on_redelivered(d.message)
            ),
        )
        self._resume_at = self._handling.max_in_flight // 2
        # Pausing costs a fetch round trip on resume, so only a consumer that stays
        # full for a while pauses.
        self._pause_after = 5 * self._poll_timeout

        # Finished messages, from the workers to the polling thread.
        self._finished: deque[_Delivery] = deque()
        self._wakeup = threading.Event()
        self._partitions: dict[tuple[str, int], _PartitionOffsets] = {}
        self._paused = False
        self._commits = 0
        self._producer: Producer | None = None
        self._producer_lock = threading.Lock()
        self._deadline: float | None = None
        self._consumer: Consumer | None = None

    # -- public -------------------------------------------------------------------

    def run(self) -> None:
        """Consume and handle messages until :meth:`stop` is called, then stop gracefully.

        Blocks the calling thread; a consumer runs once. Raises what stopped
        it (a fatal ``KafkaException``, a bad configuration, a missing
        dead-letter topic), after stopping as gracefully as it can; the same
        error is kept in :attr:`error` and raised again by :meth:`stop`.
        """
        super().run()

    def start(self) -> KafkaConsumer:
        """Connect and subscribe, then run :meth:`run` in a background thread; return self.

        A bad configuration or a missing dead-letter topic raises here. The
        thread is not a daemon; the consumer is stopped gracefully (as by
        :meth:`stop`) when the interpreter exits.
        """
        return super().start()

    def stop(self, timeout: float | None = 30.0, *, wait: bool = True) -> bool:
        """Stop fetching, wait (at most *timeout* s) for in-flight messages, commit, close.

        From another thread this blocks until the consumer has stopped and
        returns True if every in-flight message finished. From the thread that
        runs :meth:`run` (a signal handler, say), or with ``wait=False``, it
        only asks :meth:`run` to return, and returns False. Messages that did
        not finish in time are not committed: the partition's next owner
        handles them (those that had not started are cancelled here, when the
        consumer made its own pool). If the consumer stopped because of an
        error (see :attr:`error`), that error is raised here.
        """
        return super().stop(timeout, wait=wait)

    def _set_stop_timeout(self, timeout: float | None) -> None:
        if timeout is not None:
            self._deadline = time.monotonic() + timeout

    def _wake(self) -> None:
        self._wakeup.set()

    @property
    def stopping(self) -> bool:
        """True once :meth:`stop` was called (or the consumer stopped): no more fetching."""
        return self._stopping.is_set()

    def stats(self) -> ConsumerStats:
        """Counters: received, handled, retries, dead-lettered, in flight...

        Kafka does not mark redelivered messages, so ``redelivered`` stays 0.
        """
        return self._handling.stats()

    @property
    def paused(self) -> bool:
        """True while fetching is paused because ``max_in_flight`` messages are in flight."""
        return self._paused

    @property
    def commits(self) -> int:
        """How many offset commits this consumer has sent."""
        return self._commits

    @property
    def pool(self) -> KeyedPoolExecutor:
        """The pool the handlers run on."""
        return self._pool

    # -- the polling thread -------------------------------------------------------

    def _open(self) -> None:
        self._consumer = self._open_consumer()

    def _open_consumer(self) -> Consumer:
        consumer = Consumer(self._config)
        try:
            self._check_brokers(consumer)
            self._check_dead_letter_topics(consumer)
            consumer.subscribe(
                self._topics,
                on_assign=self._on_assign,
                on_revoke=self._on_revoke,
                on_lost=self._on_lost,
            )
        except BaseException:
            consumer.close()
            raise
        return consumer

    def _check_brokers(self, consumer: Consumer) -> None:
        # One metadata request, so that a wrong address fails here, at start(),
        # with the address in the message (librdkafka would otherwise retry it
        # in the background for ever).
        try:
            consumer.list_topics(timeout=max(10.0, self._poll_timeout))
        except KafkaException as exc:
            error = exc.args[0] if exc.args else None
            reason = error.str() if isinstance(error, KafkaError) else str(exc)
            raise KafkaConnectError(
                "keyedpool: could not get metadata from the Kafka brokers at "
                f"{self._config.get('bootstrap.servers')!r} ({reason}). Check that a broker "
                "is running at that address and port and can be reached from this host, and "
                "the security settings (security.protocol, sasl.*, ssl.*)."
            ) from exc

    def _check_dead_letter_topics(self, consumer: Consumer) -> None:
        if self._dead_topic is None:
            return
        if self._dead_topic:
            names = [self._dead_topic]
        else:
            names = [f"{topic}.dead" for topic in self._topics if not topic.startswith("^")]
        for name in names:
            metadata = consumer.list_topics(name, timeout=max(10.0, self._poll_timeout))
            topic = metadata.topics.get(name)
            if topic is None or topic.error is not None:
                raise ValueError(
                    f"the dead-letter topic {name!r} does not exist "
                    f"({topic.error if topic is not None else 'not in the metadata'}): "
                    "create it, name another one with dead_letter=..., or pass "
                    "dead_letter=None to log and skip failed messages"
                )

    def _consume(self) -> None:
        if self._consumer is None:
            self._open()
        assert self._consumer is not None
        self._loop(self._consumer)

    def _loop(self, consumer: Consumer) -> None:
        handling = self._handling
        next_commit = time.monotonic() + self._commit_interval
        while not self._stopping.is_set():
            self._collect()
            now = time.monotonic()
            if now >= next_commit:
                error = self._commit(consumer, synchronous=False)
                if error is not None:
                    # Sent again at the next interval; a crash before that
                    # repeats these messages (at least once).
                    log.warning("keyedpool kafka consumer: commit failed: %s", error)
                next_commit = now + self._commit_interval
            if self._paused:
                if handling.in_flight <= self._resume_at:
                    self._pause(consumer, False)
                else:
                    # Full: fetch nothing, but keep serving rebalances and commits.
                    self._wakeup.clear()
                    if handling.in_flight > self._resume_at:
                        self._wakeup.wait(self._poll_timeout)
                    self._take(consumer.consume(self._batch, 0))
                    continue
            room = handling.room()
            if room <= 0:
                # Full. Room usually comes back within moments: wait for it without
                # fetching. Still full after that: pause the partitions (librdkafka
                # stops fetching them) and go on polling, to stay in the group.
                if handling.wait_for_room(self._pause_after) <= 0:
                    self._pause(consumer, True)
                continue
            self._take(consumer.consume(min(room, self._batch), self._poll_timeout))

    def _take(self, messages: list[Message]) -> None:
        for message in messages:
            error = message.error()
            if error is not None:
                self._on_error(error)
                continue
            topic, partition, offset = (
                message.topic(),
                message.partition(),
                message.offset(),
            )
            if topic is None or partition is None or offset is None:
                continue
            state = self._partitions.get((topic, partition))
            if state is None:
                continue  # not ours any more: its new owner fetches it
            # Finishing is applied on this thread, so it cannot overtake add().
            delivery = _Delivery(message, state, offset)
            try:
                key = read_key(self._key, message)
            except Exception as exc:
                # A message whose key cannot be read goes to the dead letters.
                self._handling.dispatch_dead(delivery, exc)
            else:
                self._handling.dispatch(key, delivery)
            state.add(offset)

    def _on_error(self, error: KafkaError) -> None:
        if error.code() == KafkaError._PARTITION_EOF:
            return
        if error.fatal():
            raise KafkaException(error)
        log.warning("keyedpool kafka consumer: %s", error)

    def _collect(self) -> None:
        """Apply finished messages to their partitions' offsets."""
        finished = self._finished
        while finished:
            delivery = finished.popleft()
            delivery.partition.finish(delivery.offset)

    def _pause(self, consumer: Consumer, paused: bool) -> None:
        assignment = consumer.assignment()
        if assignment:
            if paused:
                consumer.pause(assignment)
            else:
                consumer.resume(assignment)
        self._paused = paused

    def _commit(
        self,
        consumer: Consumer,
        *,
        synchronous: bool,
        states: Collection[_PartitionOffsets] | None = None,
    ) -> KafkaError | None:
        """Commit what is finished in *states* (default: every partition).

        Returns the error if the commit could not be sent, or (when
        *synchronous*) if the broker refused it for some partition; else None.
        """
        self._collect()
        chosen = self._partitions.values() if states is None else states
        offsets = [tp for tp in (state.to_commit() for state in chosen) if tp is not None]
        if not offsets:
            return None
        try:
            if synchronous:
                results = consumer.commit(offsets=offsets, asynchronous=False) or offsets
            else:
                consumer.commit(offsets=offsets, asynchronous=True)
                results = offsets
        except KafkaException as exc:
            error = exc.args[0] if exc.args else None
            if isinstance(error, KafkaError):
                return error
            return KafkaError(KafkaError._FAIL, str(exc))
        self._commits += 1
        failed: KafkaError | None = None
        for tp in results:
            if tp.error is not None:
                failed = failed or tp.error
                continue
            state = self._partitions.get((tp.topic, tp.partition))
            if state is not None:
                state.committed = tp.offset
        return failed

    def _commit_revoked(
        self, consumer: Consumer, states: Collection[_PartitionOffsets], deadline: float
    ) -> None:
        """Commit what is finished in revoked partitions, retrying briefly if that fails.

        The next owner starts at the committed offset: what this commit misses
        is handled again there. At most _REVOKE_COMMIT_ATTEMPTS attempts, with
        growing waits, none of them starting after *deadline* (the first
        attempt always runs).
        """
        if self._stopping.is_set() and self._deadline is not None:
            deadline = min(deadline, self._deadline)
        backoff = _REVOKE_COMMIT_BACKOFF
        attempt = 1
        while True:
            error = self._commit(consumer, synchronous=True, states=states)
            if error is None:
                return
            if (
                attempt >= _REVOKE_COMMIT_ATTEMPTS
                or error.code() not in _RETRIABLE_COMMIT_ERRORS
                or time.monotonic() + backoff > deadline
            ):
                break
            log.info(
                "keyedpool kafka consumer: commit of revoked partitions failed (%s); "
                "trying again in %.2f s",
                error,
                backoff,
            )
            # This blocks the rebalance, as the drain does; revoke_timeout bounds both.
            time.sleep(backoff)
            backoff *= 2
            attempt += 1
        log.warning(
            "keyedpool kafka consumer: commit of revoked partitions failed after %d "
            "attempt(s): %s. Their next owner handles the messages finished since the "
            "last commit again.",
            attempt,
            error,
        )

    def _on_commit(self, error: KafkaError | None, partitions: list[TopicPartition]) -> None:
        # Served by consume() on the polling thread. A failed commit is sent again.
        if error is not None:
            for tp in partitions:
                state = self._partitions.get((tp.topic, tp.partition))
                if state is not None and state.committed == tp.offset:
                    state.committed = None
        if self._user_on_commit is not None:
            _call_hook(self._user_on_commit, error, partitions)

    def _drain(self, states: Collection[_PartitionOffsets], limit: float | None = None) -> bool:
        """Wait until *states* have nothing in flight.

        False if *limit* seconds or the stop deadline passed first.
        """
        until = None if limit is None else time.monotonic() + limit
        while True:
            self._wakeup.clear()
            self._collect()
            if all(state.in_flight == 0 for state in states):
                return True
            deadlines = [] if until is None else [until]
            if self._stopping.is_set() and self._deadline is not None:
                deadlines.append(self._deadline)
            wait = self._poll_timeout
            if deadlines:
                left = min(deadlines) - time.monotonic()
                if left <= 0:
                    return False
                wait = min(wait, left)
            self._wakeup.wait(wait)

    def _finish(self) -> None:
        consumer = self._consumer
        try:
            if consumer is not None:
                assignment = consumer.assignment()
                if assignment:
                    consumer.pause(assignment)
                self._paused = True
                self._drain(list(self._partitions.values()))
                error = self._commit(consumer, synchronous=True)
                if error is not None:
                    log.warning("keyedpool kafka consumer: final commit failed: %s", error)
                # close() revokes what is left (draining and committing it again is
                # a no-op) and leaves the group, so the others take over at once.
                consumer.close()
        finally:
            self._handling.close()
            producer = self._producer
            if producer is not None:
                producer.flush(10)
            if self._own_pool:
                # After a stop timeout, messages not started yet are not handled
                # here any more: they were not committed, their next owner has them.
                self._pool.shutdown(wait=True, cancel_futures=True)
            self._stopped.set()

    # -- rebalance callbacks (served inside consume(), on the polling thread) -----

    # With incremental (cooperative) rebalancing *partitions* are only those that
    # move: the rest of the assignment keeps running through the rebalance. With
    # eager rebalancing they are the whole assignment. Either way the callbacks
    # act on exactly the partitions they are given, and make the matching
    # assign/unassign call themselves (confluent-kafka would otherwise make it
    # after they return).

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self._partitions[(tp.topic, tp.partition)] = _PartitionOffsets(tp.topic, tp.partition)
        if self._paused and partitions:
            consumer.pause(partitions)  # still full: do not start fetching them
        if self._incremental:
            consumer.incremental_assign(partitions)
        else:
            consumer.assign(partitions)
        if self._user_on_assign is not None:
            _call_hook(self._user_on_assign, partitions)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        try:
            self._collect()  # so that the hook sees what is still unfinished
            if self._user_on_revoke is not None:
                _call_hook(self._user_on_revoke, partitions)
            states = [
                state
                for state in (self._partitions.get((tp.topic, tp.partition)) for tp in partitions)
                if state is not None
            ]
            # Finish what was taken from these partitions and commit it, so their
            # next owner starts right after it: a clean rebalance repeats nothing.
            # Not for longer than revoke_timeout: this blocks the poll, and a member
            # that does not poll for max.poll.interval.ms is thrown out of the group.
            deadline = time.monotonic() + self._revoke_timeout
            if not self._drain(states, self._revoke_timeout):
                log.warning(
                    "keyedpool kafka consumer: %d messages of revoked partitions still "
                    "unfinished after revoke_timeout (%s s); committing up to the lowest "
                    "unfinished offset. Their next owner handles them again, possibly "
                    "while they still run here.",
                    sum(state.in_flight for state in states),
                    self._revoke_timeout,
                )
            self._commit_revoked(consumer, states, deadline)
            for state in states:
                self._partitions.pop((state.topic, state.partition), None)
            self._forget_pause(consumer, partitions)
        finally:
            self._unassign(consumer, partitions)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # The group went on without us (session timeout): committing is no longer
        # allowed. In-flight messages still finish, their new owner handles them again.
        try:
            if self._user_on_revoke is not None:
                _call_hook(self._user_on_revoke, partitions)
            for tp in partitions:
                self._partitions.pop((tp.topic, tp.partition), None)
            self._forget_pause(consumer, partitions)
        finally:
            self._unassign(consumer, partitions)

    def _unassign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        if self._incremental:
            consumer.incremental_unassign(partitions)
        else:
            consumer.unassign()

    def _forget_pause(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # librdkafka remembers that a partition was paused even after it was taken
        # away; if it comes back, it would stay paused for good.
        if partitions:
            consumer.resume(partitions)

    # -- on the workers -----------------------------------------------------------

    def _call_handler(self, delivery: _Delivery) -> object:
        return self._handler(delivery.message)

    def _ack(self, delivery: _Delivery) -> None:
        self._finished.append(delivery)
        self._wakeup.set()

    def _write_dead_letter(self, delivery: _Delivery, error: BaseException) -> None:
        message = delivery.message
        where = f"{message.topic()}[{message.partition()}]@{delivery.offset}"
        topic = self._dead_topic
        if topic == "":
            topic = f"{message.topic()}.dead"
        if topic is None:
            log.error(
                "keyedpool kafka consumer: message %s failed; skipped (no dead-letter topic)",
                where,
                exc_info=error,
            )
        else:
            headers: list[tuple[str, str | bytes | None]] = [
                (name, value) for name, value in _header_items(message)
            ]
            headers += [
                ("keyedpool.topic", str(message.topic()).encode()),
                ("keyedpool.partition", str(message.partition()).encode()),
                ("keyedpool.offset", str(delivery.offset).encode()),
                ("keyedpool.error", f"{type(error).__name__}: {error}".encode()),
            ]
            self._produce_and_wait(topic, message.key(), message.value(), headers)
            log.warning(
                "keyedpool kafka consumer: message %s failed (%s: %s); sent to %s",
                where,
                type(error).__name__,
                error,
                topic,
            )
        if self._on_dead_letter is not None:
            # The dead letter is stored: a raising hook must not make it count as failed.
            _call_hook(self._on_dead_letter, message, error)

    def _produce_and_wait(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: list[tuple[str, str | bytes | None]],
    ) -> None:
        # The message counts as finished (and may be committed past) only once the
        # dead letter is stored. If this raises, it is tried again later.
        delivered = threading.Event()
        failures: list[KafkaError] = []

        def on_delivery(error: KafkaError | None, _message: Message) -> None:
            if error is not None:
                failures.append(error)
            delivered.set()

        with self._producer_lock:
            if self._producer is None:
                self._producer = Producer(self._dead_config)
            producer = self._producer
        producer.produce(topic, value=value, key=key, headers=headers, on_delivery=on_delivery)
        while not delivered.is_set():
            producer.poll(0.05)
        if failures:
            raise KafkaException(failures[0])


def _call_hook(hook: Callable[..., object], *args: object) -> None:
    try:
        hook(*args)
    except Exception:
        log.exception("keyedpool kafka consumer: a hook raised")


class _HeaderKey:
    """The value of one header, as the ordering key (None if the message has no such header)."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, message: Message) -> bytes | None:
        for name, header_value in _header_items(message):
            if name == self.name:
                return header_value
        return None


def _header_items(message: Message) -> list[tuple[str, bytes | None]]:
    headers = message.headers()
    if headers is None:
        return []
    if isinstance(headers, dict):
        return [(str(name), _as_bytes(value)) for name, value in headers.items()]
    return [(str(name), _as_bytes(value)) for name, value in headers]


def _as_bytes(value: object) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    return str(value).encode()


def _message_key(message: Message) -> Key | None:
    return message.key()


def _is_incremental(config: Mapping[str, Any]) -> bool:
    """Whether the consumer group rebalances incrementally with this configuration."""
    if str(config.get("group.protocol", "")).lower() == "consumer":
        return True  # the KIP-848 protocol is always incremental
    strategy = str(config.get("partition.assignment.strategy", "")).lower()
    # librdkafka does not allow mixing cooperative and eager assignors.
    return "cooperative" in strategy


def _check_topics(topics: object) -> list[str]:
    if isinstance(topics, str):
        topics = [topics]
    if not isinstance(topics, (list, tuple)):
        raise TypeError("topics must be a topic name or a list of topic names")
    names: list[object] = list(topics)
    if not names or not all(isinstance(name, str) and name for name in names):
        raise ValueError("topics must be one or more non-empty topic names")
    return [str(name) for name in names]
