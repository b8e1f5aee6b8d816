"""Consume Redis Streams on a keyed pool: in order per key, acked after success, scaled out.

Install with ``pip install keyedpool[redis]`` (redis-py; Redis 6.2 or newer on the server).

A Redis consumer group hands each entry to whichever consumer asks first, so it
keeps no key affinity on its own. Here the stream is therefore **sharded by key**:
an entry with key ``k`` goes to the stream ``f"{stream}:{shard_of(k, shards)}"``,
where ``shard_of`` is the mmh3 hash keyedpool routes with (the same in every
process and language binding of mmh3, seed 0). Exactly one consumer process at a
time reads each shard: the processes of a group share the shards through leases
kept in Redis (see ``keyedpool/contrib/_shards.py``), so processes can come and
go and the survivors take over a dead one's shards. Every key lives in one
shard, so one process sees all of a key's entries, in stream order, and its
pool runs them in order.

>>> import redis
>>> from keyedpool.contrib.redis import RedisConsumer, publish
>>> r = redis.Redis()
>>> publish(r, "orders", "order-123", {"event": "charged"}, shards=8)  # doctest: +SKIP
>>> def handle(message):            # a plain blocking function
...     print(message.key, message.get("event"))
>>> consumer = RedisConsumer(r, "orders", handle, group="billing", shards=8)  # doctest: +SKIP
>>> consumer.run()   # until consumer.stop() (e.g. from a SIGTERM handler)  # doctest: +SKIP

Guarantees and their limits:

* **Ack after success.** An entry is XACKed only after its handler returned (or
  after it was written to the dead-letter stream ``f"{stream}:dead"``).
* **At least once.** If a process dies, its unacked entries stay pending in
  Redis. Once its leases expire (``lease_ttl``), the processes that take its
  shards over claim them with XAUTOCLAIM and handle them again, in order,
  before any newer entry of those shards: an entry that was handled but not
  yet acked is handled twice. Such entries reach the handler with
  ``redelivered=True`` and are counted in ``stats().redelivered``.
* **Handover.** When a process joins, the shards that move to it are drained
  first: their old owner stops fetching from them, settles what it fetched,
  then releases the lease. A process cut off from Redis for ``lease_ttl``
  stops fetching; its handlers already running are not interrupted.
* **Errors.** ``start()`` sets up the client in the calling thread, so a
  bad address raises there. An error that later stops the consumer's thread
  is kept in ``consumer.error`` and raised again by ``stop()``. A message whose
  key cannot be read is dead-lettered with that error. The consumer's thread
  is not a daemon; it is stopped gracefully when the interpreter exits.
* **Pinned shards** (``process_index`` and ``process_count`` given): no
  leases; run exactly one live process per index (a supervisor restarts it
  when it dies; its replacement claims the pending entries at start). To
  change ``process_count``, stop all processes gracefully first.
* ``shards`` must be the same for publishers and consumers and never change
  while entries are pending. Redis Cluster is not supported (one XREADGROUP
  reads several shard streams).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from keyedpool.contrib import _require

_require("redis", "redis", "keyedpool.contrib.redis")

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
from ._shards import ShardLeases, new_token

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


# Refresh a member's heartbeat, drop expired members, renew its leases.
# KEYS: members zset, lease keys...; ARGV: token, ttl in ms. Uses the server's
# clock, so the processes' clocks need not agree.
_HEARTBEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
redis.call('PEXPIRE', KEYS[1], ttl * 10)
local mine = {}
for i = 2, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[1] then
    redis.call('PEXPIRE', KEYS[i], ttl)
    mine[#mine + 1] = 1
  else
    mine[#mine + 1] = 0
  end
end
return {redis.call('ZRANGE', KEYS[1], 0, -1), mine}
"""

# Delete a lease only if this token holds it.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class _RedisLeases:
    """Members and shard leases in Redis keys beside the stream (see ``_shards.py``).

    ``f"{stream}:keyedpool:{group}:members"`` is a sorted set of member tokens
    scored by their expiry (server time, ms); ``f"{stream}:keyedpool:{group}:lease:{shard}"``
    holds the token of the shard's owner and expires unless renewed.
    """

    def __init__(self, client: redis.Redis, stream: str, group: str) -> None:
        self._client = client
        self._prefix = f"{stream}:keyedpool:{group}"
        self._heartbeat = client.register_script(_HEARTBEAT)
        self._release = client.register_script(_RELEASE)

    def _lease(self, shard: int) -> str:
        return f"{self._prefix}:lease:{shard}"

    def heartbeat(
        self, token: str, ttl: float, held: Sequence[int]
    ) -> tuple[list[str], list[bool]]:
        members, mine = self._heartbeat(
            keys=[f"{self._prefix}:members", *(self._lease(s) for s in held)],
            args=[token, _ms(ttl)],
        )
        return [_text(m) for m in members], [bool(flag) for flag in mine]

    def acquire(self, shard: int, token: str, ttl: float) -> bool:
        return bool(self._client.set(self._lease(shard), token, nx=True, px=_ms(ttl)))

    def release(self, shard: int, token: str) -> None:
        self._release(keys=[self._lease(shard)], args=[token])

    def leave(self, token: str) -> None:
        self._client.zrem(f"{self._prefix}:members", token)


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


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
        process_index, process_count: leave both out (the default) and the
            processes that run this consumer (same *stream* and *group*)
            share the shards among themselves through leases in Redis: one
            that starts gets its part, one that stops or dies has its shards
            taken over by the others. Give both to pin the shards instead:
            this process then always reads the shards ``s`` with
            ``s % process_count == process_index``, and a dead process's
            shards wait for a process with its index.
        lease_ttl: seconds a shard lease and a member's heartbeat last
            (without pinned shards). A process that dies loses its shards
            after at most this long; one cut off from Redis this long stops
            fetching. Keep it well above a handler's running time.
        on_rebalance: called with the set of shard numbers this process
            reads, whenever it changes (on the fetching thread).
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
        process_index: int | None = None,
        process_count: int | None = None,
        lease_ttl: float = 10.0,
        on_rebalance: Callable[[frozenset[int]], None] | None = None,
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
        pinned = check_sharding(
            shards, process_index, process_count,
            lease_ttl=lease_ttl, on_rebalance=on_rebalance,
        )
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
        self._streams = [shard_stream(stream, s) for s in range(shards)]
        self._shard_of = {name: s for s, name in enumerate(self._streams)}
        self._on_rebalance = on_rebalance
        self._lease_ttl = lease_ttl
        self._pinned: frozenset[int] = frozenset()
        self._leases: ShardLeases | None = None
        if pinned:
            assert process_index is not None and process_count is not None
            self._pinned = frozenset(
                s for s in range(shards) if s % process_count == process_index
            )
        else:
            self._leases = ShardLeases(
                _RedisLeases(client, stream, group),
                shards,
                lease_ttl,
                new_token(self._name),
                on_change=on_rebalance,
            )
        # Shards whose unacked entries are being taken over: shard -> XAUTOCLAIM cursor.
        self._claiming: dict[int, str] = {}
        # Entries fetched per shard and not acked yet: a shard is handed over only at 0.
        self._unsettled = [0] * shards
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
    def shards(self) -> frozenset[int]:
        """The shard numbers this process reads now (changes as processes come and go)."""
        return self._pinned if self._leases is None else self._leases.readable

    @property
    def shard_streams(self) -> list[str]:
        """The shard streams this process reads now."""
        return [self._streams[s] for s in sorted(self.shards)]

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
        unsettled stay pending in Redis and are handled again by the process
        that takes their shard over. If the consumer stopped because of
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
        if self._leases is None:
            # Take over what an earlier process of this index left unacked, first.
            self._claiming = dict.fromkeys(sorted(self._pinned), "0-0")
            if self._on_rebalance is not None:
                KeyedHandling._call_hook(self._on_rebalance, self._pinned)
        while not self._stopping.is_set():
            self._flush_acks()
            self._rebalance()
            room = self._handling.wait_for_room(self._block)
            if not room or self._stopping.is_set():
                continue
            reading = [
                self._streams[s] for s in sorted(self.shards) if s not in self._claiming
            ]
            try:
                if self._claiming:
                    room -= self._claim(room)
                if reading and room > 0:
                    self._fetch(reading, room)
            except redis.ReadOnlyError:
                log.warning("keyedpool: Redis is read-only (a failover?); retrying",
                            exc_info=True)
                self._stopping.wait(self._block)
            except redis.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                self._open()  # someone deleted the stream: start it over
            except (redis.ConnectionError, redis.TimeoutError):
                log.warning("keyedpool: Redis unavailable; retrying", exc_info=True)
                self._stopping.wait(self._block)
            if not reading and not self._claiming:
                self._stopping.wait(self._block)  # no shard here (yet): idle a poll

    # -- fetching -----------------------------------------------------------------

    def _open(self) -> None:
        for stream in self._streams:
            try:
                self._client.xgroup_create(stream, self._group, id="0", mkstream=True)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
        self._set_up = True

    def _busy(self, shard: int) -> bool:
        # Entries of this shard are in flight here, or acked but the XACK is unsent.
        with self._acks_lock:
            return self._unsettled[shard] > 0

    def _rebalance(self) -> None:
        leases = self._leases
        if leases is None:
            return
        leases.tick(self._busy)
        for shard in leases.gained - self._claiming.keys():
            self._claiming[shard] = "0-0"
        for shard in self._claiming.keys() - leases.gained:
            del self._claiming[shard]  # handed back before it was taken over

    def _claim(self, room: int) -> int:
        # Take over the entries a dead (or earlier) owner left pending, and
        # dispatch them (in ID order) before anything newer in their shards.
        # Returns how many were dispatched.
        dispatched = 0
        for shard, start in list(self._claiming.items()):
            if dispatched >= room:
                break
            stream = self._streams[shard]
            # XAUTOCLAIM walks the group's pending entries in ID order and makes
            # them ours; deleted ones are only reported.
            reply = self._client.xautoclaim(
                stream,
                self._group,
                self._name,
                0,
                start_id=start,
                count=min(room - dispatched, self._batch),
            )
            cursor = _text(reply[0])
            gone = list(reply[2]) if len(reply) > 2 else []
            for entry_id, fields in reply[1]:
                if fields:
                    self._dispatch(stream, _text(entry_id), fields, redelivered=True)
                    dispatched += 1
                elif entry_id is not None:  # Redis 6.2 reports deleted entries here
                    gone.append(entry_id)
            # The cursor first: a retry after an error below must not claim
            # (and dispatch) the entries just dispatched again.
            self._claiming[shard] = cursor
            if gone:
                try:
                    self._client.xack(stream, self._group, *gone)
                except redis.RedisError:
                    log.debug("keyedpool: could not ack deleted entries", exc_info=True)
            if cursor == "0-0":
                del self._claiming[shard]
                if self._leases is not None:
                    self._leases.gained.discard(shard)
                self._forget_dead_consumers(stream)
        return dispatched

    def _forget_dead_consumers(self, stream: str) -> None:
        try:
            for info in self._client.xinfo_consumers(stream, self._group):
                other = _text(info.get("name", ""))
                # Idle for long: not a live process whose XREADGROUP is on its way.
                idle = int(info.get("idle", 0)) / 1000
                if (
                    other
                    and other != self._name
                    and not info.get("pending")
                    and idle > 3 * self._lease_ttl
                ):
                    self._client.xgroup_delconsumer(stream, self._group, other)
        except redis.RedisError:
            log.debug(
                "keyedpool: could not clean up old consumers of %s",
                stream,
                exc_info=True,
            )

    def _fetch(self, streams: list[str], room: int) -> None:
        count = max(1, min(room, self._batch) // len(streams))
        reply = self._client.xreadgroup(
            self._group,
            self._name,
            dict.fromkeys(streams, ">"),
            count=count,
            block=max(1, int(self._block * 1000)),
        )
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
        shard = self._shard_of[stream]
        with self._acks_lock:
            self._unsettled[shard] += 1
        message = RedisMessage(
            stream=stream,
            shard=shard,
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
            return
        with self._acks_lock:
            for stream, ids in by_stream.items():
                self._unsettled[self._shard_of[stream]] -= len(ids)

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

    def _while_draining(self) -> None:
        # Send the acks, keep the leases of the shards still draining, hand over the rest.
        self._flush_acks()
        if self._leases is not None:
            self._leases.tick(self._busy)

    def _finish(self) -> None:
        try:
            leases = self._leases
            if leases is not None:
                leases.stop_taking()
            if not self._handling.drain(
                self._drain_timeout, every=self._block, meanwhile=self._while_draining
            ):
                log.warning(
                    "keyedpool: %d entries still in flight at stop; they stay pending "
                    "and will be handled again",
                    self._handling.in_flight,
                )
            self._flush_acks()
            if leases is not None:
                # Hand the drained shards to the others at once (the rest expire).
                leases.leave(self._busy)
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
