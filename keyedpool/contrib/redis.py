"""Consume Redis Streams on a keyed pool: in order per key, acked after success, scaled out.

Install with ``pip install keyedpool[redis]`` (redis-py; Redis 6.2 or newer on the server).

A Redis consumer group hands each entry to whichever consumer asks first, so it
keeps no key affinity on its own. Here the stream is therefore **sharded by key**:
an entry with key ``k`` goes to the stream ``f"{stream}:{shard_of(k, shards)}"``,
where ``shard_of`` is the mmh3 hash keyedpool routes with (the same in every
process and language binding of mmh3, seed 0). Each consumer process reads a
fixed set of shards: with ``process_count=2``, process 0 reads the even shards and
process 1 the odd ones. Every key lives in one shard, so one process sees all of
a key's entries, in stream order, and its pool runs them in order.

>>> import redis
>>> from keyedpool.contrib.redis import RedisConsumer, publish
>>> r = redis.Redis()
>>> publish(r, "orders", "order-123", {"event": "charged"}, shards=8)  # doctest: +SKIP
>>> def handle(message):            # a plain blocking function
...     print(message.key, message.get("event"))
>>> consumer = RedisConsumer(r, "orders", handle, group="billing", shards=8,
...                          process_index=0, process_count=2)   # doctest: +SKIP
>>> consumer.run()   # until consumer.stop() (e.g. from a SIGTERM handler)  # doctest: +SKIP

Guarantees and their limits:

* **Ack after success.** An entry is XACKed only after its handler returned (or
  after it was written to the dead-letter stream ``f"{stream}:dead"``).
* **At least once.** If a process dies, its unacked entries stay pending in
  Redis. Its replacement (same ``process_index``; any consumer name) claims
  them with XAUTOCLAIM when it starts and handles them again, in order, before
  any newer entry of those shards: an entry that was handled but not yet acked
  is handled twice. Such entries reach the handler with ``redelivered=True``
  and are counted in ``stats().redelivered``.
* **Errors.** ``start()`` sets up the client in the calling thread, so a
  bad address raises there. An error that later stops the consumer's thread
  is kept in ``consumer.error`` and raised again by ``stop()``. A message whose
  key cannot be read is dead-lettered with that error. The consumer's thread
  is not a daemon; it is stopped gracefully when the interpreter exits.
* **Static ownership.** Run exactly one live process per ``process_index``
  (a supervisor such as systemd or a Kubernetes StatefulSet restarts it when it
  dies). To change ``process_count``, stop all processes gracefully first.
  ``shards`` must be the same for publishers and consumers and never change
  while entries are pending.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import redis

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
    check_sharding,
    read_key,
    shard_of,
)

__all__ = [
    "ConsumerStats",
    "DeadLetter",
    "RedisConsumer",
    "RedisMessage",
    "RetryPolicy",
    "dead_letter_stream",
    "publish",
    "shard_of",
    "shard_stream",
]

log = logging.getLogger("keyedpool.contrib.redis")


def shard_stream(stream: str, shard: int) -> str:
    """The name of one shard's Redis stream: ``f"{stream}:{shard}"``."""
    return f"{stream}:{shard}"


def dead_letter_stream(stream: str) -> str:
    """The default dead-letter stream of *stream*: ``f"{stream}:dead"``."""
    return f"{stream}:dead"


def publish(
    client: Any,
    stream: str,
    key: Key,
    fields: Mapping[Any, Any],
    *,
    shards: int,
    key_field: str = "key",
    maxlen: int | None = None,
) -> Any:
    """Append an entry to the shard of *key*; return its ID (or the pipeline, when *client* is one).

    *client* is a ``redis.Redis`` or a pipeline of one. The key is stored in the
    field *key_field*, which is where :class:`RedisConsumer` looks for it by default.
    """
    if not isinstance(stream, str) or not stream:
        raise TypeError("stream must be a non-empty str")
    shard = shard_of(key, shards)
    entry = dict(fields)
    entry[key_field] = key
    return client.xadd(shard_stream(stream, shard), entry, maxlen=maxlen)


@dataclass(frozen=True)
class RedisMessage:
    """One stream entry, as the handler gets it."""

    #: The shard stream it came from, e.g. ``"orders:3"``.
    stream: str
    #: Its shard number.
    shard: int
    #: Its entry ID, e.g. ``"1700000000000-0"``.
    id: str
    #: Its fields, as the client returns them (``bytes`` unless ``decode_responses=True``).
    fields: Mapping[Any, Any]
    #: The key it is ordered by (``None``: no order kept for it).
    key: Key | None
    #: True if this entry was delivered before (to a process that died before acking it).
    redelivered: bool

    def get(self, name: str, default: str | None = None) -> str | None:
        """The field *name* as a ``str`` (decoded as UTF-8), or *default* if it is missing."""
        value = self.fields.get(name)
        if value is None:
            value = self.fields.get(name.encode())
        if value is None:
            return default
        return value.decode() if isinstance(value, bytes) else str(value)


class RedisConsumer(_ConsumerBase):
    """Read a sharded Redis stream with a consumer group and run a handler per entry on a pool.

    Args:
        client: a ``redis.Redis`` client (thread-safe; it is used from the
            fetching thread and from pool workers).
        stream: the stream's base name; shard ``i`` is the stream ``f"{stream}:{i}"``.
        handler: a plain blocking function called with each :class:`RedisMessage`.
            Entries of one key run one at a time, in stream order. Raising means
            failure: the entry is retried as *retry* says, then dead-lettered.
        group: the consumer group (created on the shard streams if missing,
            reading from the beginning).
        shards: how many shard streams there are (the same as in :func:`publish`).
        process_index, process_count: this process reads the shards ``s`` with
            ``s % process_count == process_index``.
        key: where the key is: a field name (default ``"key"``; no such
            field: no order kept) or a function of the message returning
            ``str``, ``bytes``, ``int`` or ``None``. The key orders entries
            inside the process. An entry whose key cannot be read (the
            function raises or returns another type) is dead-lettered with
            that error.
        name: this consumer's name in the group. Default: ``host-pid``.
        pool: the pool to run handlers on. Default: a pool of its own with
            *max_workers* workers, shut down by :meth:`stop`.
        max_workers: the size of that pool (ignored with *pool*).
        retry: the :class:`RetryPolicy` (default: 3 attempts, 0.1 s backoff doubling).
        dead_letter: the stream failed entries go to, with their fields plus
            ``dead_letter.stream``, ``dead_letter.id`` and ``dead_letter.error``.
            Default: ``f"{stream}:dead"``. ``None``: log and drop them.
        on_dead_letter: called (on a worker) with each dead-lettered message and
            its error. If it raises, the error is logged.
        on_redelivered: called with each redelivered message before it is handled.
        max_in_flight: the most entries fetched and not yet acked (backpressure).
            Default: the pool's ``max_pending``.
        batch: the most entries one XREADGROUP returns per shard.
        poll_timeout: seconds one XREADGROUP waits for new entries (also how
            quickly :meth:`stop` is noticed).
    """

    def __init__(
        self,
        client: redis.Redis,
        stream: str,
        handler: Callable[[RedisMessage], object],
        *,
        group: str,
        shards: int = 1,
        process_index: int = 0,
        process_count: int = 1,
        key: str | Callable[[RedisMessage], Key | None] = "key",
        name: str | None = None,
        pool: KeyedPoolExecutor | None = None,
        max_workers: int | None = None,
        retry: RetryPolicy | None = None,
        dead_letter: str | None = "",
        on_dead_letter: Callable[[RedisMessage, BaseException], None] | None = None,
        on_redelivered: Callable[[RedisMessage], None] | None = None,
        max_in_flight: int | None = None,
        batch: int = 100,
        poll_timeout: float = 0.1,
    ) -> None:
        if not isinstance(stream, str) or not stream:
            raise TypeError("stream must be a non-empty str")
        if not isinstance(group, str) or not group:
            raise TypeError("group must be a non-empty str")
        check_handler(handler)
        check_sharding(shards, process_index, process_count)
        if not (isinstance(key, str) or callable(key)):
            raise TypeError(
                "key must be a field name (str) or a function of the message"
            )
        if on_dead_letter is not None and not callable(on_dead_letter):
            raise TypeError("on_dead_letter must be callable or None")
        check_positive("batch", batch)
        check_seconds("poll_timeout", poll_timeout)
        check_pool(pool)
        self._client = client
        self._stream = stream
        self._group = group
        self._name = name or f"{socket.gethostname()}-{os.getpid()}"
        self._shards = {
            shard_stream(stream, s): s
            for s in range(shards)
            if s % process_count == process_index
        }
        self._key = key
        self._dead_stream = (
            dead_letter_stream(stream) if dead_letter == "" else dead_letter
        )
        self._on_dead_letter = on_dead_letter
        self._batch = batch
        self._block = poll_timeout
        self._init_lifecycle(f"keyedpool-redis-{stream}", pool, max_workers)
        self._user_handler = handler
        self._handling: KeyedHandling[RedisMessage] = KeyedHandling(
            handler,
            pool=self._pool,
            ack=self._ack,
            dead_letter=self._write_dead_letter,
            retry=retry,
            max_in_flight=max_in_flight,
            on_redelivered=on_redelivered,
        )
        self._acks: list[tuple[str, str]] = []
        self._acks_lock = threading.Lock()
        self._drain_timeout: float | None = None
        self._set_up = False

    # -- public -------------------------------------------------------------------

    @property
    def shard_streams(self) -> list[str]:
        """The shard streams this process reads."""
        return list(self._shards)

    @property
    def name(self) -> str:
        """This consumer's name in the group."""
        return self._name

    def run(self) -> None:
        """Fetch and handle entries until :meth:`stop` is called, then stop gracefully.

        Blocks the calling thread. Use :meth:`start` to run it in the background.
        An error that stops it (a Redis error other than a lost connection,
        say) is raised after a graceful stop, kept in :attr:`error`, and raised
        again by :meth:`stop`.
        """
        super().run()

    def start(self) -> RedisConsumer:
        """Create the consumer groups, then run :meth:`run` in a background thread; return self.

        Redis errors at setup (cannot connect, wrong type of key) raise here.
        The thread is not a daemon; the consumer is stopped gracefully (as by
        :meth:`stop`) when the interpreter exits.
        """
        return super().start()

    def stop(self, timeout: float | None = 30.0, *, wait: bool = True) -> bool:
        """Stop fetching, wait for the in-flight entries (at most *timeout* s), ack them, close.

        From another thread this blocks until the consumer has stopped and
        returns True if every in-flight entry was settled. From the thread that
        runs :meth:`run` (a signal handler, say), or with ``wait=False``, it
        only asks :meth:`run` to return, and returns False. Entries left
        unsettled stay pending in Redis and are handled again by the next
        process of this ``process_index``. If the consumer stopped because of
        an error (see :attr:`error`), that error is raised here.
        """
        return super().stop(timeout, wait=wait)

    def stats(self) -> ConsumerStats:
        """Counters: handled, retries, dead-lettered, redelivered, in flight..."""
        return self._handling.stats()

    def _set_stop_timeout(self, timeout: float | None) -> None:
        self._drain_timeout = timeout

    def _consume(self) -> None:
        if not self._set_up:
            self._open()
        self._recover()
        while not self._stopping.is_set():
            self._flush_acks()
            room = self._handling.wait_for_room(self._block)
            if room and not self._stopping.is_set():
                self._fetch(room)

    # -- fetching -----------------------------------------------------------------

    def _open(self) -> None:
        for stream in self._shards:
            try:
                self._client.xgroup_create(stream, self._group, id="0", mkstream=True)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
        self._set_up = True

    def _recover(self) -> None:
        # Take over the entries a dead process of this index left pending, and
        # handle them (in ID order) before anything newer in their shards.
        for stream in self._shards:
            start = "0-0"
            while not self._stopping.is_set():
                room = self._handling.wait_for_room(self._block)
                self._flush_acks()
                if not room:
                    continue
                # XAUTOCLAIM walks the group's pending entries in ID order (ours
                # included) and makes them ours; deleted ones are only reported.
                reply = self._client.xautoclaim(
                    stream,
                    self._group,
                    self._name,
                    0,
                    start_id=start,
                    count=min(room, self._batch),
                )
                start = _text(reply[0])
                gone = list(reply[2]) if len(reply) > 2 else []
                for entry_id, fields in reply[1]:
                    if fields:
                        self._dispatch(
                            stream, _text(entry_id), fields, redelivered=True
                        )
                    else:  # Redis 6.2 reports deleted entries here
                        gone.append(entry_id)
                if gone:
                    self._client.xack(stream, self._group, *gone)
                if start == "0-0":
                    break
            self._forget_dead_consumers(stream)

    def _forget_dead_consumers(self, stream: str) -> None:
        try:
            for info in self._client.xinfo_consumers(stream, self._group):
                other = _text(info.get("name", ""))
                if other and other != self._name and not info.get("pending"):
                    self._client.xgroup_delconsumer(stream, self._group, other)
        except redis.RedisError:
            log.debug(
                "keyedpool: could not clean up old consumers of %s",
                stream,
                exc_info=True,
            )

    def _fetch(self, room: int) -> None:
        count = max(1, min(room, self._batch) // len(self._shards))
        try:
            reply = self._client.xreadgroup(
                self._group,
                self._name,
                dict.fromkeys(self._shards, ">"),
                count=count,
                block=max(1, int(self._block * 1000)),
            )
        except redis.ResponseError as exc:
            if "NOGROUP" in str(exc):
                self._open()
                return
            raise
        except redis.ConnectionError:
            log.warning("keyedpool: Redis connection lost; retrying", exc_info=True)
            self._stopping.wait(self._block)
            return
        for stream, entry_id, fields in _entries(reply):
            self._dispatch(stream, entry_id, fields, redelivered=False)

    def _dispatch(
        self,
        stream: str,
        entry_id: str,
        fields: Mapping[Any, Any],
        *,
        redelivered: bool,
    ) -> None:
        message = RedisMessage(
            stream=stream,
            shard=self._shards[stream],
            id=entry_id,
            fields=fields,
            key=None,
            redelivered=redelivered,
        )
        try:
            key = read_key(self._read_key, message)
        except Exception as exc:
            # Its key cannot be read: dead-letter it (with the error), go on.
            self._handling.dispatch_dead(message, exc, redelivered=redelivered)
            return
        object.__setattr__(message, "key", key)
        self._handling.dispatch(key, message, redelivered=redelivered)

    def _read_key(self, message: RedisMessage) -> object:
        key: object
        if callable(self._key):
            key = self._key(message)
        else:
            key = message.fields.get(self._key)
            if key is None:
                key = message.fields.get(self._key.encode())
        if isinstance(key, bytes):
            try:
                key = key.decode()
            except UnicodeDecodeError:
                pass
        return key

    # -- settling (on workers) ----------------------------------------------------

    def _ack(self, message: RedisMessage) -> None:
        # Batched: the fetching thread sends them with one XACK per shard.
        with self._acks_lock:
            self._acks.append((message.stream, message.id))

    def _flush_acks(self) -> None:
        with self._acks_lock:
            acks, self._acks = self._acks, []
        if not acks:
            return
        by_stream: dict[str, list[str]] = {}
        for stream, entry_id in acks:
            by_stream.setdefault(stream, []).append(entry_id)
        try:
            with self._client.pipeline(transaction=False) as pipe:
                for stream, ids in by_stream.items():
                    pipe.xack(stream, self._group, *ids)
                pipe.execute()
        except redis.RedisError:
            log.warning("keyedpool: XACK failed; trying again", exc_info=True)
            with self._acks_lock:
                self._acks[:0] = acks

    def _write_dead_letter(self, message: RedisMessage, error: BaseException) -> None:
        if self._dead_stream is not None:
            entry = dict(message.fields)
            entry["dead_letter.stream"] = message.stream
            entry["dead_letter.id"] = message.id
            entry["dead_letter.error"] = repr(error)[:2000]
            self._client.xadd(self._dead_stream, entry)
        else:
            log.error(
                "keyedpool: dropping entry %s of %s (key %r) after: %r",
                message.id,
                message.stream,
                message.key,
                error,
            )
        if self._on_dead_letter is not None:
            try:
                self._on_dead_letter(message, error)
            except Exception:
                log.exception("keyedpool: on_dead_letter raised")

    # -- stopping -----------------------------------------------------------------

    def _finish(self) -> None:
        try:
            if not self._handling.drain(self._drain_timeout):
                log.warning(
                    "keyedpool: %d entries still in flight at stop; they stay pending "
                    "and will be handled again",
                    self._handling.in_flight,
                )
            self._flush_acks()
        finally:
            self._handling.close()
            if self._own_pool:
                self._pool.shutdown(wait=True)
            self._stopped.set()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _entries(reply: Any) -> Iterable[tuple[str, str, Any]]:
    """(stream, id, fields) from an XREADGROUP reply, in RESP2 (list) or RESP3 (dict) form."""
    if not reply:
        return []
    pairs = reply.items() if isinstance(reply, dict) else reply
    out = []
    for stream, entries in pairs:
        name = _text(stream)
        if entries and isinstance(entries[0], list):
            entries = entries[0]  # RESP3 wraps the entries in one more list
        for entry_id, fields in entries:
            out.append((name, _text(entry_id), fields))
    return out
