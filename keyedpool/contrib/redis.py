"""Consume Redis Streams on a keyed pool: in order per key, acked after success, scaled out.

Install with ``pip install keyedpool[redis]`` (redis-py; Redis 6.2 or newer on the server).

A Redis consumer group hands each entry to whichever consumer asks first, so it
keeps no key affinity on its own. The stream is therefore **sharded by key**: an
entry with key ``k`` goes to the stream ``f"{stream}:{shard_of(k, shards)}"``
(:func:`publish` does that), and one consumer process at a time reads each
shard, so one process sees all of a key's entries, in stream order. The
processes of a group share the shards through leases kept in Redis.

>>> import redis
>>> from keyedpool.contrib.redis import RedisConsumer, publish
>>> r = redis.Redis()
>>> publish(r, "orders", "order-123", {"event": "charged"}, shards=8)  # doctest: +SKIP
>>> def handle(message):            # a plain blocking function
...     print(message.key, message.get("event"))
>>> consumer = RedisConsumer(r, "orders", handle, group="billing", shards=8)  # doctest: +SKIP
>>> consumer.run()   # until consumer.stop() (e.g. from a SIGTERM handler)  # doctest: +SKIP

What every consumer guarantees is in :mod:`keyedpool.contrib.consumer`; here:

* **Takeover.** A dead process's unacked entries stay pending in Redis. The
  process that takes its shards over claims them with XAUTOCLAIM and handles
  them, in order, before any newer entry of those shards (with
  ``redelivered=True``; an entry handled but not acked yet is handled twice).
* **Dead letters** go to the stream ``f"{stream}:dead"`` with the entry's fields
  plus ``dead_letter.stream``, ``dead_letter.id`` and ``dead_letter.error``.
* **Pinned shards** (``process_index`` and ``process_count``): run exactly one
  live process per index; its replacement claims the pending entries at start.
* ``shards`` must be the same for publishers and consumers and never change
  while entries are pending. Redis Cluster is not supported (one XREADGROUP
  reads several shard streams).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from keyedpool.contrib import _require

_require("redis", "redis", "keyedpool.contrib.redis")

import redis

from keyedpool import Key

from .consumer import (
    ConsumerOptions,
    ConsumerStats,
    DeadLetter,
    RetryPolicy,
    ShardedConsumer,
    shard_of,
)

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from .consumer import ShardedConsumerArgs

__all__ = [
    "ConsumerOptions",
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
        raise ValueError(f"stream must be a non-empty str, not {stream!r}")
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
        value = self._field(name)
        if value is None:
            return default
        return value.decode() if isinstance(value, bytes) else str(value)

    def _field(self, name: str) -> Any:
        # The field as the client returned it, its name str or bytes (None: missing).
        value = self.fields.get(name)
        return self.fields.get(name.encode()) if value is None else value


class RedisConsumer(ShardedConsumer[RedisMessage]):
    """Read a sharded Redis stream with a consumer group and run a handler per entry on a pool.

    Args:
        client: a ``redis.Redis`` client (thread-safe: the consumer's thread
            and the pool's workers use it).
        stream: the stream's base name; shard ``i`` is the stream ``f"{stream}:{i}"``.
        handler: a plain blocking function called with each :class:`RedisMessage`.
        group: the consumer group (created on the shard streams if missing,
            reading from the beginning).
        key: where the key is: a field name (default ``"key"``; no such field:
            no order kept) or a function of the message returning ``str``,
            ``bytes``, ``int`` or ``None``.
        name: this consumer's name in the group. Default: ``host-pid``.
        options: :class:`~keyedpool.contrib.consumer.ConsumerOptions`; its fields,
            and the sharding arguments of
            :class:`~keyedpool.contrib.consumer.ShardedConsumer` (``shards``,
            ``process_index``, ``process_count``, ``lease_ttl``,
            ``on_rebalance``), may also be given as keyword arguments.
    """

    def __init__(
        self,
        client: redis.Redis,
        stream: str,
        handler: Callable[[RedisMessage], object],
        *,
        group: str,
        key: str | Callable[[RedisMessage], Key | None] = "key",
        name: str | None = None,
        options: ConsumerOptions | None = None,
        **args: Unpack[ShardedConsumerArgs],
    ) -> None:
        for what, value in (("stream", stream), ("group", group)):
            if not isinstance(value, str) or not value:
                raise ValueError(f"{what} must be a non-empty str, not {value!r}")
        super().__init__(handler, key=key, key_kind="field", options=options, args=args,
                         thread_name=f"keyedpool-redis-{stream}")
        self._client = client
        self._stream = stream
        self._group = group
        self._name = name or f"{socket.gethostname()}-{os.getpid()}"
        self._streams = [shard_stream(stream, s) for s in range(self._shard_count)]
        self._shard_of = {name: s for s, name in enumerate(self._streams)}
        self._share_shards(_RedisLeases(client, stream, group), self._name)
        #: Owner: the consumer's thread. Shards whose pending entries are being
        #: taken over: shard -> XAUTOCLAIM cursor.
        self._claiming: dict[int, str] = {}

    @property
    def shard_streams(self) -> list[str]:
        """The shard streams this process reads now."""
        return [self._streams[s] for s in sorted(self.shards)]

    @property
    def name(self) -> str:
        """This consumer's name in the group."""
        return self._name

    # -- the consumer's thread ------------------------------------------------------

    def _open(self) -> None:
        # Create the group on every shard stream (reading from the beginning).
        for stream in self._streams:
            try:
                self._client.xgroup_create(stream, self._group, id="0", mkstream=True)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    def _consume(self) -> None:
        poll = self.options.poll_timeout
        while not self._stopping.is_set():
            self._flush_acks()
            readable, gained = self._tick()
            for shard in gained - self._claiming.keys():
                self._claiming[shard] = "0-0"  # its pending entries come first
            for shard in self._claiming.keys() - gained - readable:
                del self._claiming[shard]  # lost before it was taken over
            room = self._handling.wait_for_room(poll)
            if not room or self._stopping.is_set():
                continue
            reading = [self._streams[s] for s in sorted(readable) if s not in self._claiming]
            try:
                if self._claiming:
                    room -= self._claim(room)
                if reading and room > 0:
                    self._fetch(reading, room)
            except redis.ReadOnlyError:
                log.warning("keyedpool: Redis is read-only (a failover?); retrying",
                            exc_info=True)
                self._stopping.wait(poll)
            except redis.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                self._open()  # someone deleted the stream: start it over
            except (redis.ConnectionError, redis.TimeoutError):
                log.warning("keyedpool: Redis unavailable; retrying", exc_info=True)
                self._stopping.wait(poll)
            if not reading and not self._claiming:
                self._stopping.wait(poll)  # no shard here (yet): idle a poll

    # -- fetching -----------------------------------------------------------------

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
            reply = self._client.xautoclaim(stream, self._group, self._name, 0, start_id=start,
                                            count=min(room - dispatched, self.options.batch))
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
                    self._leases.gained.discard(shard)  # taken over
                self._forget_dead_consumers(stream)
        return dispatched

    def _forget_dead_consumers(self, stream: str) -> None:
        try:
            for info in self._client.xinfo_consumers(stream, self._group):
                other = _text(info.get("name", ""))
                # Idle for long: not a live process whose XREADGROUP is on its way.
                idle = int(info.get("idle", 0)) / 1000
                if other not in ("", self._name) and not info.get("pending") and (
                    idle > 3 * self._lease_ttl
                ):
                    self._client.xgroup_delconsumer(stream, self._group, other)
        except redis.RedisError:
            log.debug("keyedpool: could not clean up old consumers of %s", stream, exc_info=True)

    def _fetch(self, streams: list[str], room: int) -> None:
        count = max(1, min(room, self.options.batch) // len(streams))
        block = max(1, int(self.options.poll_timeout * 1000))
        reply = self._client.xreadgroup(
            self._group, self._name, dict.fromkeys(streams, ">"), count=count, block=block
        )
        for stream, entry_id, fields in _entries(reply):
            self._dispatch(stream, entry_id, fields, redelivered=False)

    def _dispatch(
        self, stream: str, entry_id: str, fields: Mapping[Any, Any], *, redelivered: bool
    ) -> None:
        shard = self._shard_of[stream]
        self._receive(
            RedisMessage(stream, shard, entry_id, fields, key=None, redelivered=redelivered),
            redelivered=redelivered,
        )

    _transient_ack_errors = (redis.RedisError,)

    def _send_acks(self, batch: list[tuple[RedisMessage, bool]]) -> None:
        # One XACK per shard stream, in one round trip.
        by_stream: dict[str, list[str]] = {}
        for message, _ in batch:
            by_stream.setdefault(message.stream, []).append(message.id)
        with self._client.pipeline(transaction=False) as pipe:
            for stream, ids in by_stream.items():
                pipe.xack(stream, self._group, *ids)
            pipe.execute()

    def _shard(self, message: RedisMessage) -> int:
        return message.shard

    # -- on the workers ---------------------------------------------------------------

    def _write_dead_letter(
        self, message: RedisMessage, error: BaseException, destination: str
    ) -> None:
        entry = dict(message.fields)
        entry["dead_letter.stream"] = message.stream
        entry["dead_letter.id"] = message.id
        entry["dead_letter.error"] = repr(error)[:2000]
        self._client.xadd(destination, entry)

    def _default_dead_letter(self, message: RedisMessage) -> str:
        return dead_letter_stream(self._stream)

    def _named_key(self, message: RedisMessage, name: str) -> object:
        key = message._field(name)
        if isinstance(key, bytes):
            with contextlib.suppress(UnicodeDecodeError):
                key = key.decode()
        return key

    def _set_key(self, message: RedisMessage, key: Key | None) -> None:
        object.__setattr__(message, "key", key)

    def _describe(self, message: RedisMessage) -> str:
        return f"entry {message.id} of {message.stream} (key {message.key!r})"


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
