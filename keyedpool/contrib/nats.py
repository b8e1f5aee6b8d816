"""Consume NATS JetStream on a keyed pool: in order per key, acked after success, scaled out.

Install with ``pip install keyedpool[nats]`` (nats-py; nats-server 2.9 or newer with ``-js``).

nats-py is asyncio-only; this module keeps your handler a **plain blocking
function**. It runs one asyncio event loop in a background thread for all NATS
I/O (connect, fetch, ack), hands each message to a
:class:`~keyedpool.KeyedPoolExecutor`, and acks from the workers through
``asyncio.run_coroutine_threadsafe``. Workers never wait for the loop, except
to write a dead letter.

**Scale-out: a subject per shard, a durable pull consumer per shard.** A message
with key ``k`` is published to ``f"{subject}.{shard_of(k, shards)}"`` (mmh3 of
the key, seed 0, as keyedpool routes) with the key in the ``Keyedpool-Key``
header; :func:`publish` and :class:`NatsPublisher` do that. The stream captures
``f"{subject}.*"``. Shard ``i`` has its own durable pull consumer
``f"{durable}-{i}"`` filtered on its subject. Exactly one process at a time
reads each shard: the processes share the shards through leases in a JetStream
key-value bucket (see ``keyedpool/contrib/_shards.py``), so processes can come
and go and the survivors take over a dead one's shards. One key lives in one
shard, so one process gets all of a key's messages, in stream order.

>>> from keyedpool.contrib.nats import NatsConsumer, NatsPublisher
>>> with NatsPublisher("nats://127.0.0.1:4222", "ORDERS", shards=8) as pub:  # doctest: +SKIP
...     pub.publish("order-123", b'{"event": "charged"}')
>>> def handle(message):            # a plain blocking function
...     print(message.key, message.data)
>>> consumer = NatsConsumer("nats://127.0.0.1:4222", "ORDERS", handle, shards=8)  # doctest: +SKIP
>>> consumer.run()   # until consumer.stop() (e.g. from a SIGTERM handler)  # doctest: +SKIP

Guarantees and their limits:

* **Ack after success**; a message whose retries ran out is published to the
  dead-letter subject ``f"{subject}.dead"`` (stored in the same stream, with
  ``Keyedpool-Error`` and ``Keyedpool-Source-Seq`` headers) and then
  terminated (``AckTerm``), so JetStream never delivers it again.
* **At least once.** When a process takes a shard over and finds its shard
  consumer with unacked messages (the owner died), it recreates that consumer from the
  ack floor (the last message below which everything was acked), so the
  unacked messages come again **before** any newer one, in stream order.
  Messages above the floor that were already acked are handled again; all of
  them reach the handler with ``redelivered=True`` and are counted in
  ``stats().redelivered``. While a message is in flight, the consumer tells
  JetStream it is still working on it (``+WPI``), so ``ack_wait`` never expires
  under it; a redelivered copy of a message still in flight is dropped and
  counted in ``stats().duplicates``.
* **Errors.** ``start()`` sets up the client in the calling thread, so a
  bad address raises there, within seconds: :class:`NatsConnectError` (a
  ``nats.errors.NoServersError``) naming the addresses tried, once each
  server was tried twice. An error that later stops the consumer's thread
  is kept in ``consumer.error`` and raised again by ``stop()``. A message whose
  key cannot be read is dead-lettered with that error. The consumer's thread
  is not a daemon; it is stopped gracefully when the interpreter exits.
* **Handover.** When a process joins, the shards that move to it are drained
  first: their old owner stops fetching from them, settles what it fetched,
  then releases the lease. A dead process's leases expire after ``lease_ttl``.
* **Pinned shards** (``process_index`` and ``process_count`` given): no
  leases; run exactly one live process per index (a supervisor restarts it).
  ``shards`` must be the same for publishers and consumers.
* **Reconnects.** nats-py reconnects on its own. A fetch's messages that were
  on the wire when the connection dropped would come again only after
  ``ack_wait``, after newer ones; so after a reconnect each shard stops
  fetching, drains, and is bound afresh from its ack floor: the lost messages
  come first, in order (messages handled meanwhile whose acks had not arrived
  are recognised and dropped as duplicates).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import os
import re
import socket
import threading
from collections import deque
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from time import monotonic
from typing import TYPE_CHECKING, Any, TypeVar

from keyedpool.contrib import _require

_require("nats", "nats", "keyedpool.contrib.nats")

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import DEFAULT_MAX_RECONNECT_ATTEMPTS
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

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

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.aio.msg import Msg
    from nats.js import JetStreamContext
    from nats.js.kv import KeyValue
    from typing_extensions import Self  # noqa: UP035 - typing.Self is 3.11+

__all__ = [
    "KEY_HEADER",
    "ConsumerStats",
    "DeadLetter",
    "NatsConnectError",
    "NatsConsumer",
    "NatsMessage",
    "NatsPublisher",
    "RetryPolicy",
    "publish",
    "shard_of",
    "shard_subject",
]

log = logging.getLogger("keyedpool.contrib.nats")
# Where nats-py logs the errors it reports when no error_cb is given.
nats_log = logging.getLogger("nats.aio.client")

#: The header :func:`publish` puts the key in, and where :class:`NatsConsumer` looks by default.
KEY_HEADER = "Keyedpool-Key"

T = TypeVar("T")


def shard_subject(subject: str, shard: int) -> str:
    """The subject of one shard: ``f"{subject}.{shard}"``."""
    return f"{subject}.{shard}"


def _key_text(key: Key) -> str:
    if isinstance(key, bytes):
        return key.decode()
    return str(key)


async def publish(
    js: JetStreamContext,
    subject: str,
    key: Key,
    data: bytes,
    *,
    shards: int,
    headers: Mapping[str, str] | None = None,
) -> Any:
    """Publish *data* to the shard subject of *key* (async); return JetStream's PubAck.

    The key goes in the ``Keyedpool-Key`` header (``bytes`` keys must be UTF-8).
    """
    if not isinstance(data, bytes):
        raise TypeError(f"data must be bytes, not {type(data).__name__}")
    all_headers = dict(headers or {})
    all_headers[KEY_HEADER] = _key_text(key)
    return await js.publish(
        shard_subject(subject, shard_of(key, shards)), data, headers=all_headers
    )


class NatsConnectError(nats.errors.NoServersError):
    """No NATS server could be reached when connecting; the message names the addresses tried.

    A ``nats.errors.NoServersError``, which is what nats-py raises itself.
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else super().__str__()


# The most times the first connect tries each server, as nats-py's
# max_reconnect_attempts: it bounds the first connect as well as reconnects,
# and its default (60 tries, reconnect_time_wait = 2 s apart) makes a wrong
# address take two minutes to fail. 1 is the fewest it takes (0 means no
# limit): each server is tried twice.
_FIRST_CONNECT_ATTEMPTS = 1


async def _connect_nats(servers: str | list[str], options: Mapping[str, Any]) -> Client:
    """``nats.connect(servers, **options)``, failing within seconds if no server can be reached.

    Raises :class:`NatsConnectError` once each server was tried twice. After
    that first connect, the ``max_reconnect_attempts`` asked for (or nats-py's
    default) applies again, so a running client reconnects as long as before.
    The failed tries of the first connect are logged at debug level, not with
    a traceback each; an ``error_cb`` in *options* still hears all of them.
    """
    options = dict(options)
    reconnect_attempts = options.get("max_reconnect_attempts", DEFAULT_MAX_RECONNECT_ATTEMPTS)
    theirs = options.get("error_cb")
    connected = False
    last_error: BaseException | None = None

    async def on_error(error: Exception) -> None:
        nonlocal last_error
        if not connected:
            last_error = error
            log.debug("keyedpool: connecting to NATS failed: %r", error)
        if theirs is not None:
            await theirs(error)
        elif connected:
            nats_log.error("nats: encountered error", exc_info=error)  # as nats-py does

    options["error_cb"] = on_error
    options["max_reconnect_attempts"] = _FIRST_CONNECT_ATTEMPTS
    try:
        nc = await nats.connect(servers, **options)
    # (asyncio.TimeoutError is not the builtin TimeoutError on 3.10.)
    except (nats.errors.NoServersError, OSError, asyncio.TimeoutError) as exc:  # noqa: UP041
        cause = last_error or exc
        raise _cannot_connect(servers, _reason(cause)) from cause
    # nats-py reads its options at each reconnect, so this is what they use.
    nc.options["max_reconnect_attempts"] = reconnect_attempts
    connected = True
    return nc


def _addresses(servers: str | Sequence[str]) -> str:
    # The URLs nats-py tries (its default scheme and port filled in), without
    # the user name and password some of them carry.
    shown = []
    for url in [servers] if isinstance(servers, str) else servers:
        scheme, sep, rest = url.rpartition("://")
        if not sep:
            scheme = "nats"
        netloc = rest.split("/", 1)[0].rpartition("@")[2]
        if scheme not in ("ws", "wss") and not re.search(r":\d+$", netloc):
            netloc += ":4222"
        shown.append(f"{scheme}://{netloc}")
    return ", ".join(shown)


def _reason(error: BaseException) -> str:
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, asyncio.TimeoutError) and not str(error):  # noqa: UP041 - 3.10
        return "no answer within connect_timeout"
    return str(error) or type(error).__name__


def _cannot_connect(servers: str | Sequence[str], reason: str) -> NatsConnectError:
    return NatsConnectError(
        f"keyedpool: could not connect to NATS at {_addresses(servers)} ({reason}). "
        "Check that a NATS server is running at that address and port and can be "
        "reached from this host, and that the URL's scheme (nats://, tls://, ws://) "
        "and credentials are right."
    )


class _Loop:
    """An asyncio event loop running in a daemon thread, for blocking callers.

    A daemon: its owner closes it (the consumer's thread, which is not a daemon
    and is stopped at interpreter exit, does so when it stops).
    """

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        future = self.submit(coro)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()  # so that a retry never runs beside it
            raise

    def close(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


async def _ensure_stream(js: JetStreamContext, stream: str, subject: str) -> None:
    try:
        await js.stream_info(stream)
    except nats.js.errors.NotFoundError:
        try:
            await js.add_stream(name=stream, subjects=[f"{subject}.*"])
        except nats.js.errors.BadRequestError:
            await js.stream_info(stream)  # made by another process meanwhile


class _NatsLeases:
    """Members and shard leases in a JetStream key-value bucket (see ``_shards.py``).

    The bucket (``f"KP_{durable}"``, one per stream and durable) keeps one
    revision per key and expires entries ``lease_ttl`` seconds after their
    last write: ``members.<token>`` is a member's heartbeat, ``lease.<shard>``
    holds the token of the shard's owner, renewed by an update that names the
    revision it last wrote (so a lease taken over by another member fails to
    renew instead of being overwritten).
    """

    def __init__(self, loop: _Loop, kv: KeyValue, timeout: float) -> None:
        self._loop = loop
        self._kv = kv
        self._timeout = timeout
        self._revisions: dict[int, int] = {}

    def heartbeat(
        self, token: str, ttl: float, held: Sequence[int]
    ) -> tuple[list[str], list[bool]]:
        return self._loop.call(self._heartbeat(token, held), self._timeout)

    async def _heartbeat(self, token: str, held: Sequence[int]) -> tuple[list[str], list[bool]]:
        kv = self._kv
        await kv.put(f"members.{token}", b"")
        mine = []
        for shard in held:
            try:
                self._revisions[shard] = await kv.update(
                    f"lease.{shard}", token.encode(), last=self._revisions.get(shard, 0)
                )
                mine.append(True)
            except nats.js.errors.KeyWrongLastSequenceError:
                mine.append(False)
        try:
            keys = await kv.keys()
        except nats.js.errors.NoKeysError:
            keys = []
        members = [k[len("members."):] for k in keys if k.startswith("members.")]
        return members, mine

    def acquire(self, shard: int, token: str, ttl: float) -> bool:
        return self._loop.call(self._acquire(shard, token), self._timeout)

    async def _acquire(self, shard: int, token: str) -> bool:
        try:
            self._revisions[shard] = await self._kv.create(f"lease.{shard}", token.encode())
        except nats.js.errors.KeyWrongLastSequenceError:
            return False
        return True

    def release(self, shard: int, token: str) -> None:
        revision = self._revisions.get(shard)
        if revision is not None:
            try:
                # Only if it is still ours (our last revision).
                self._loop.call(self._kv.delete(f"lease.{shard}", last=revision), self._timeout)
            except (nats.js.errors.KeyWrongLastSequenceError, nats.js.errors.BadRequestError):
                pass  # not ours any more (wrong last sequence): nothing to release
        self._revisions.pop(shard, None)

    def leave(self, token: str) -> None:
        self._loop.call(self._kv.delete(f"members.{token}"), self._timeout)


async def _lease_bucket(js: JetStreamContext, bucket: str, ttl: float) -> KeyValue:
    try:
        return await js.create_key_value(bucket=bucket, ttl=ttl, history=1)
    except nats.js.errors.BadRequestError:
        kv = await js.key_value(bucket)
        status = await kv.status()
        if status.ttl is not None and abs(status.ttl - ttl) > 1e-3:
            raise ValueError(
                f"keyedpool: the lease bucket {bucket} has a TTL of {status.ttl} s, "
                f"but lease_ttl is {ttl} s: every process of a stream and durable "
                "must use the same lease_ttl (stop them all and delete the bucket "
                "to change it)"
            ) from None
        return kv


class NatsPublisher:
    """Publish keyed messages to a sharded JetStream stream from blocking code.

    Creates the stream (capturing ``f"{subject}.*"``) if it does not exist.
    Each :meth:`publish` waits for JetStream's acknowledgement. Use it as a
    context manager, or call :meth:`close`. If no server can be reached, it
    raises :class:`NatsConnectError`, naming the addresses, once each server
    was tried twice (or after *timeout*).
    """

    def __init__(
        self,
        servers: str | list[str],
        stream: str,
        *,
        shards: int,
        subject: str | None = None,
        timeout: float = 10.0,
        connect_options: Mapping[str, Any] | None = None,
    ) -> None:
        check_positive("shards", shards)
        check_seconds("timeout", timeout)
        self.stream = stream
        self.subject = subject or stream
        self.shards = shards
        self._timeout = timeout
        self._loop = _Loop(f"keyedpool-nats-publisher-{stream}")
        try:
            try:
                self._nc: Client = self._loop.call(
                    _connect_nats(servers, connect_options or {}), timeout
                )
            except concurrent.futures.TimeoutError:
                raise _cannot_connect(servers, f"no connection within {timeout} s") from None
            self._js = self._nc.jetstream()
            self._loop.call(_ensure_stream(self._js, stream, self.subject), timeout)
        except BaseException:
            self._loop.close()
            raise

    def publish(self, key: Key, data: bytes, headers: Mapping[str, str] | None = None) -> int:
        """Publish *data* with *key*; return its stream sequence number."""
        ack = self._loop.call(
            publish(self._js, self.subject, key, data, shards=self.shards, headers=headers),
            self._timeout,
        )
        return int(ack.seq)

    def close(self) -> None:
        """Flush and close the connection and the loop thread."""
        try:
            self._loop.call(self._nc.drain(), self._timeout)
        finally:
            self._loop.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class NatsMessage:
    """One JetStream message, as the handler gets it."""

    #: Its subject, e.g. ``"ORDERS.3"``.
    subject: str
    #: Its payload.
    data: bytes
    #: Its headers (``None`` if it has none).
    headers: Mapping[str, str] | None
    #: The key it is ordered by (``None``: no order kept for it).
    key: Key | None
    #: Its shard number.
    shard: int
    #: Its sequence number in the stream.
    stream_seq: int
    #: True if JetStream (or a crashed predecessor) delivered it before.
    redelivered: bool
    _msg: Any = field(repr=False, compare=False, default=None)


class _Shard:
    """One shard: its consumer, its subscription, what it has in flight."""

    def __init__(self, index: int, consumer: str, subject: str) -> None:
        self.index = index
        self.consumer = consumer
        self.subject = subject
        self.sub: Any = None
        #: Fetching from it: cleared to make its fetching task end (shard handed over).
        self.reading = False
        #: Its fetching task, while one runs.
        self.fetching: concurrent.futures.Future[None] | None = None
        #: Acks sent to the loop and not written yet.
        self.acks = 0
        #: The ack floor + 1 of a consumer deleted to be recreated there (until it is).
        self.restart_at: int | None = None
        #: Messages delivered before a restart have stream_seq <= this.
        self.delivered_before = 0
        #: stream_seq -> (message, time of the last sign of life sent).
        self.in_flight: dict[int, tuple[NatsMessage, float]] = {}
        #: Recently settled stream_seqs, to drop late redeliveries of them.
        self.settled: set[int] = set()
        self.settled_order: deque[int] = deque()


class NatsConsumer(_ConsumerBase):
    """Fetch from a sharded JetStream stream and run a handler per message on a pool.

    Args:
        servers: the NATS server URL(s), e.g. ``"nats://127.0.0.1:4222"``.
        stream: the JetStream stream (created, capturing ``f"{subject}.*"``, if missing).
        handler: a plain blocking function called with each :class:`NatsMessage`.
            Messages of one key run one at a time, in stream order. Raising
            means failure: the message is retried as *retry* says, then
            dead-lettered.
        shards: how many shard subjects there are (the same as when publishing).
        process_index, process_count: leave both out (the default) and the
            processes that run this consumer (same *stream* and *durable*)
            share the shards among themselves through leases in a JetStream
            key-value bucket (``f"KP_{durable}"``): one that starts gets its
            part, one that stops or dies has its shards taken over by the
            others. Give both to pin the shards instead: this process then
            always reads the shards ``s`` with ``s % process_count ==
            process_index``, and a dead process's shards wait for a process
            with its index.
        lease_ttl: seconds a shard lease and a member's heartbeat last
            (without pinned shards; the same in every process). A process
            that dies loses its shards after at most this long (plus up to a
            second: JetStream's expiry is that coarse); one cut off from NATS
            this long stops fetching. Keep it well above a handler's running time;
            at least ``3 * poll_timeout``.
        on_rebalance: called with the set of shard numbers this process
            reads, whenever it changes (on the consumer's thread).
        subject: the base subject; shard ``i`` is ``f"{subject}.{i}"``. Default: *stream*.
        durable: the base name of the shard consumers (``f"{durable}-{i}"``).
            Default: ``f"{stream}-keyedpool"``. Different durables read the
            stream independently (like consumer groups).
        key: where the key is: a header name (default ``"Keyedpool-Key"``; no
            such header: no order kept) or a function of the message returning
            ``str``, ``bytes``, ``int`` or ``None``. A message whose key cannot
            be read (the function raises or returns another type) is
            dead-lettered with that error.
        pool: the pool to run handlers on. Default: a pool of its own with
            *max_workers* workers, shut down by :meth:`stop`.
        max_workers: the size of that pool (ignored with *pool*).
        retry: the :class:`RetryPolicy` (default: 3 attempts, 0.1 s backoff doubling).
        dead_letter: the subject dead letters go to. Default ``f"{subject}.dead"``
            (kept in the same stream). ``None``: log and drop them.
        on_dead_letter: called (on a worker) with each dead-lettered message and
            its error. If it raises, the error is logged.
        on_redelivered: called with each redelivered or duplicate message.
        max_in_flight: the most messages fetched and not yet acked (backpressure).
            Default: half the pool's ``max_pending``.
        batch: the most messages one fetch asks for, per shard.
        poll_timeout: how long one fetch waits for messages, in seconds (also
            how quickly :meth:`stop` is noticed).
        ack_wait: the shard consumers' ack wait, in seconds (used when creating them).
        connect_options: more keyword arguments for ``nats.connect``. A
            ``reconnected_cb`` given here is still called (after the consumer's own),
            and an ``error_cb`` hears every failed try. ``max_reconnect_attempts``
            applies once connected: the first connect tries each server twice
            (``reconnect_time_wait`` apart), then :meth:`start` raises.
    """

    def __init__(
        self,
        servers: str | list[str],
        stream: str,
        handler: Callable[[NatsMessage], object],
        *,
        shards: int = 1,
        process_index: int | None = None,
        process_count: int | None = None,
        lease_ttl: float = 10.0,
        on_rebalance: Callable[[frozenset[int]], None] | None = None,
        subject: str | None = None,
        durable: str | None = None,
        key: str | Callable[[NatsMessage], Key | None] = KEY_HEADER,
        pool: KeyedPoolExecutor | None = None,
        max_workers: int | None = None,
        retry: RetryPolicy | None = None,
        dead_letter: str | None = "",
        on_dead_letter: Callable[[NatsMessage, BaseException], None] | None = None,
        on_redelivered: Callable[[NatsMessage], None] | None = None,
        max_in_flight: int | None = None,
        batch: int = 100,
        poll_timeout: float = 0.5,
        ack_wait: float = 30.0,
        connect_options: Mapping[str, Any] | None = None,
    ) -> None:
        if not isinstance(stream, str) or not stream or "." in stream:
            raise ValueError("stream must be a non-empty str without dots (a JetStream name)")
        check_handler(handler)
        pinned = check_sharding(
            shards, process_index, process_count,
            lease_ttl=lease_ttl, on_rebalance=on_rebalance,
        )
        if not (isinstance(key, str) or callable(key)):
            raise TypeError("key must be a header name (str) or a function of the message")
        if on_dead_letter is not None and not callable(on_dead_letter):
            raise TypeError("on_dead_letter must be callable or None")
        check_positive("batch", batch)
        check_seconds("poll_timeout", poll_timeout)
        if not pinned and lease_ttl < 3 * poll_timeout:
            # A fetch must end inside the lease, with a heartbeat (every ttl/3) in between.
            raise ValueError(
                f"lease_ttl ({lease_ttl}) must be at least 3 * poll_timeout ({poll_timeout})"
            )
        check_seconds("ack_wait", ack_wait)
        check_pool(pool)
        self._servers = servers
        self._stream = stream
        self._subject = subject or stream
        self._durable = durable or f"{stream}-keyedpool"
        self._key = key
        self._dead_subject = f"{self._subject}.dead" if dead_letter == "" else dead_letter
        self._on_dead_letter = on_dead_letter
        self._batch = batch
        self._fetch_timeout = poll_timeout
        self._ack_wait = ack_wait
        self._connect_options = dict(connect_options or {})
        self._shards = [
            _Shard(s, f"{self._durable}-{s}", shard_subject(self._subject, s))
            for s in range(shards)
        ]
        self._on_rebalance = on_rebalance
        self._lease_ttl = lease_ttl
        self._pinned: frozenset[int] | None = None
        if pinned:
            assert process_index is not None and process_count is not None
            self._pinned = frozenset(
                s for s in range(shards) if s % process_count == process_index
            )
        # Made at connect time (the lease store needs the connection).
        self._leases: ShardLeases | None = None
        self._fetch_error: BaseException | None = None
        # Set by nats-py's reconnected_cb; the shards read then are bound afresh.
        self._reconnected = threading.Event()
        self._rebind: set[int] = set()
        self._init_lifecycle(f"keyedpool-nats-{stream}", pool, max_workers)
        if max_in_flight is None:
            # Leave room in the pool for a fetch that overshoots (one batch per shard).
            max_in_flight = max(1, self._pool.max_pending // 2)
        self._handling: KeyedHandling[NatsMessage] = KeyedHandling(
            handler,
            pool=self._pool,
            ack=self._ack,
            dead_letter=self._write_dead_letter,
            retry=retry,
            max_in_flight=max_in_flight,
            on_redelivered=on_redelivered,
            on_room=self._wake_fetchers,
        )
        self._dead: set[int] = set()
        self._dead_lock = threading.Lock()
        self._loop: _Loop | None = None
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._room: asyncio.Event | None = None
        self._drain_timeout: float | None = None
        self._acks: set[concurrent.futures.Future[None]] = set()
        self._acks_lock = threading.Lock()

    # -- public -------------------------------------------------------------------

    @property
    def shards(self) -> frozenset[int]:
        """The shard numbers this process reads now (changes as processes come and go)."""
        if self._pinned is not None:
            return self._pinned
        return frozenset() if self._leases is None else self._leases.readable

    @property
    def shard_subjects(self) -> list[str]:
        """The shard subjects this process reads now."""
        return [self._shards[s].subject for s in sorted(self.shards)]

    def run(self) -> None:
        """Fetch and handle messages until :meth:`stop` is called, then stop gracefully.

        Blocks the calling thread (the NATS I/O runs on a loop thread of its own).
        An error that stops it (cannot connect, the connection closed for
        good) is raised after a graceful stop, kept in :attr:`error`, and
        raised again by :meth:`stop`.
        """
        super().run()

    def start(self) -> NatsConsumer:
        """Connect and bind the shard consumers, then run :meth:`run` in a background thread.

        Returns self. Connection and JetStream errors at setup raise here; if
        no server can be reached, :class:`NatsConnectError` (naming the
        addresses) once each server was tried twice, within seconds. The
        thread is not a daemon; the consumer is stopped gracefully (as by
        :meth:`stop`) when the interpreter exits.
        """
        return super().start()

    def stop(self, timeout: float | None = 30.0, *, wait: bool = True) -> bool:
        """Stop fetching, wait for the in-flight messages (at most *timeout* s), ack them, close.

        From another thread this blocks until the consumer has stopped and
        returns True if every in-flight message was settled. From the thread
        that runs :meth:`run` (a signal handler, say) it only asks :meth:`run`
        to return, and returns False; so does ``wait=False``, from anywhere.
        If the consumer stopped because of an error (see :attr:`error`), that
        error is raised here.
        """
        return super().stop(timeout, wait=wait)

    def stats(self) -> ConsumerStats:
        """Counters: handled, retries, dead-lettered, redelivered, duplicates, in flight..."""
        return self._handling.stats()

    def _open(self) -> None:
        loop = self._loop = _Loop(f"keyedpool-nats-{self._stream}-io")
        loop.call(self._connect())

    def _consume(self) -> None:
        if self._loop is None:
            self._open()
        loop = self._loop
        assert loop is not None
        if self._pinned is not None:
            for index in sorted(self._pinned):
                self._start_fetching(self._shards[index])
            if self._on_rebalance is not None:
                KeyedHandling._call_hook(self._on_rebalance, self._pinned)
        tick = min(self._fetch_timeout, self._ack_wait / 3)
        next_sign_of_life = monotonic() + self._ack_wait / 3
        while not self._stopping.is_set():
            self._rebalance()
            if monotonic() >= next_sign_of_life:
                loop.call(self._still_working())
                next_sign_of_life = monotonic() + self._ack_wait / 3
            self._stopping.wait(tick)
        if self._fetch_error is not None:
            raise self._fetch_error  # what stopped a shard's fetching

    def _start_fetching(self, shard: _Shard) -> None:
        assert self._loop is not None
        shard.reading = True
        shard.fetching = self._loop.submit(self._fetch_shard(shard))
        shard.fetching.add_done_callback(self._fetching_ended)

    def _fetching_ended(self, future: concurrent.futures.Future[None]) -> None:
        if not future.cancelled() and future.exception() is not None:
            if self._fetch_error is None:
                self._fetch_error = future.exception()
            self._stopping.set()  # an error that stops fetching stops the consumer

    def _busy(self, index: int) -> bool:
        # Messages of this shard are in flight here, or acks unsent, or a fetch runs.
        shard = self._shards[index]
        return self._busy_fetching(shard) or bool(shard.in_flight) or shard.acks > 0

    def _rebalance(self) -> None:
        # Bind the shards that need it, start and stop the shards' fetching tasks.
        assert self._loop is not None and self._js is not None
        leases = self._leases
        if leases is not None:
            leases.tick(self._busy)
            readable, gained = leases.readable, leases.gained
        else:
            readable, gained = self._pinned or frozenset(), set()
        if self._reconnected.is_set():
            self._reconnected.clear()
            # A fetch's messages may have been lost with the old connection:
            # JetStream would send them again only after ack_wait, after newer
            # ones. So each shard is drained, then bound afresh from its ack
            # floor (see _bind): the lost messages come first.
            self._rebind |= {
                s.index for s in self._shards if s.reading or self._busy_fetching(s)
            }
        self._rebind &= readable
        for index in sorted((gained | self._rebind) & readable):
            if self._busy(index):
                continue  # stop fetching (below) and drain first
            shard = self._shards[index]
            try:
                # Unacked messages (of a dead owner, or lost on the wire) come first.
                self._loop.call(self._bind(self._js, shard), self._lease_ttl)
            except Exception:
                log.warning("keyedpool: could not bind %s; trying again",
                            shard.subject, exc_info=True)
                continue
            gained.discard(index)
            self._rebind.discard(index)
        for shard in self._shards:
            wanted = (
                shard.index in readable
                and shard.index not in gained
                and shard.index not in self._rebind
            )
            if wanted and not shard.reading and not self._busy_fetching(shard):
                self._start_fetching(shard)
            elif not wanted and shard.reading:
                shard.reading = False  # its fetching ends after the current fetch

    @staticmethod
    def _busy_fetching(shard: _Shard) -> bool:
        return shard.fetching is not None and not shard.fetching.done()

    def _set_stop_timeout(self, timeout: float | None) -> None:
        self._drain_timeout = timeout

    def _finish_unstarted(self) -> None:
        self._stopping.set()
        self._finish()

    # -- on the loop thread -------------------------------------------------------

    async def _connect(self) -> None:
        self._room = asyncio.Event()
        options = dict(self._connect_options)
        theirs = options.get("reconnected_cb")

        async def reconnected() -> None:
            self._reconnected.set()
            if theirs is not None:
                await theirs()

        options["reconnected_cb"] = reconnected
        self._nc = await _connect_nats(self._servers, options)
        self._js = js = self._nc.jetstream()
        await _ensure_stream(js, self._stream, self._subject)
        if self._pinned is not None:
            for index in sorted(self._pinned):
                await self._bind(js, self._shards[index])
            return
        assert self._loop is not None
        bucket = "KP_" + re.sub(r"[^A-Za-z0-9_-]", "_", self._durable)
        kv = await _lease_bucket(js, bucket, self._lease_ttl)
        name = re.sub(r"[^-_=.A-Za-z0-9]", "_", f"{socket.gethostname()}-{os.getpid()}")
        self._leases = ShardLeases(
            _NatsLeases(self._loop, kv, timeout=self._lease_ttl),
            len(self._shards),
            self._lease_ttl,
            new_token(name),
            on_change=self._on_rebalance,
        )

    async def _bind(self, js: JetStreamContext, shard: _Shard) -> None:
        start: int | None = None
        try:
            info = await js.consumer_info(self._stream, shard.consumer)
        except nats.js.errors.NotFoundError:
            info = None
        if info is not None and info.num_ack_pending:
            # A predecessor died with messages unacked. JetStream would deliver
            # newer ones before those come back: start over from the ack floor.
            assert info.ack_floor is not None and info.delivered is not None
            start = info.ack_floor.stream_seq + 1
            shard.delivered_before = info.delivered.stream_seq
            # Kept until the new consumer exists: a retry after a failure in
            # between must not start from the beginning of the stream.
            shard.restart_at = start
            await js.delete_consumer(self._stream, shard.consumer)
            log.info(
                "keyedpool: shard %s had %d unacked messages; redelivering from seq %d",
                shard.subject, info.num_ack_pending, start,
            )
            info = None
        if info is None:
            start = start or shard.restart_at
            config = ConsumerConfig(
                durable_name=shard.consumer,
                filter_subject=shard.subject,
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=self._ack_wait,
                max_deliver=-1,
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE if start else DeliverPolicy.ALL,
                opt_start_seq=start,
            )
            await js.add_consumer(self._stream, config)
            shard.restart_at = None
        if shard.sub is not None:  # bound before, handed over since
            with contextlib.suppress(Exception):
                await shard.sub.unsubscribe()
        shard.sub = await js.pull_subscribe_bind(shard.consumer, self._stream)

    async def _fetch_shard(self, shard: _Shard) -> None:
        room_event = self._room
        assert room_event is not None
        per_shard = max(1, self._batch)
        while shard.reading and not self._stopping.is_set():
            leases = self._leases
            if leases is not None and monotonic() + self._fetch_timeout >= leases.valid_until:
                # The heartbeat is late: no fetch that could end after the lease may.
                await asyncio.sleep(self._fetch_timeout)
                continue
            room = self._handling.room()
            if room <= 0:
                room_event.clear()
                if self._handling.room() <= 0:
                    try:
                        await asyncio.wait_for(room_event.wait(), self._fetch_timeout)
                    except asyncio.TimeoutError:  # noqa: UP041 - not TimeoutError on 3.10
                        pass
                continue
            reading = sum(1 for s in self._shards if s.reading)
            count = max(1, min(per_shard, room // max(reading, 1)))
            try:
                msgs = await shard.sub.fetch(count, timeout=self._fetch_timeout)
            except asyncio.TimeoutError:  # noqa: UP041 - nats' too; not TimeoutError on 3.10
                continue
            except nats.errors.ConnectionClosedError:
                if self._stopping.is_set():
                    return
                raise
            except Exception:
                log.warning("keyedpool: fetch from %s failed; retrying", shard.subject,
                            exc_info=True)
                await asyncio.sleep(self._fetch_timeout)
                continue
            for msg in msgs:
                waiting = self._receive(shard, msg)
                if waiting is not None:
                    # A shared pool is full: wait for room in another thread, not
                    # on this event loop (which serves every shard, acks and
                    # heartbeats), and keep this shard's order: the next message
                    # is handed over only once this one is.
                    await asyncio.get_running_loop().run_in_executor(None, waiting)

    def _receive(self, shard: _Shard, msg: Msg) -> Callable[[], object] | None:
        """Hand one fetched message over; None, or a blocking call that must finish it."""
        meta = msg.metadata
        seq = meta.sequence.stream
        redelivered = meta.num_delivered > 1 or seq <= shard.delivered_before
        if seq in shard.in_flight or seq in shard.settled:
            # A copy of a message we hold (or just acked): JetStream redelivered it.
            held = shard.in_flight.get(seq)
            copy = held[0] if held else self._message(shard, msg, redelivered=True)
            self._handling.note_duplicate(copy)
            if held is None:
                self._submit_ack(shard, msg.ack())
            return None
        message = self._message(shard, msg, redelivered=redelivered)
        shard.in_flight[seq] = (message, monotonic())
        try:
            key = read_key(self._read_key, message)
        except Exception as exc:
            # Its key cannot be read: dead-letter it (with the error), go on. (Rare:
            # from a thread, since a full shared pool would make it wait.)
            return functools.partial(
                self._handling.dispatch_dead, message, exc, redelivered=redelivered
            )
        object.__setattr__(message, "key", key)
        if not self._handling.dispatch(key, message, redelivered=redelivered, wait=False):
            return functools.partial(
                self._handling.dispatch, key, message, redelivered=redelivered
            )
        return None

    def _message(self, shard: _Shard, msg: Msg, *, redelivered: bool) -> NatsMessage:
        headers = msg.headers
        return NatsMessage(
            subject=msg.subject,
            data=msg.data,
            headers=headers,
            key=None,
            shard=shard.index,
            stream_seq=msg.metadata.sequence.stream,
            redelivered=redelivered,
            _msg=msg,
        )

    def _read_key(self, message: NatsMessage) -> object:
        if callable(self._key):
            return self._key(message)
        return (message.headers or {}).get(self._key)

    async def _still_working(self) -> None:
        # +WPI for messages in flight for a while, so ack_wait never expires under them.
        now = monotonic()
        for shard in self._shards:
            for seq, (message, last) in list(shard.in_flight.items()):
                if now - last >= self._ack_wait / 3:
                    shard.in_flight[seq] = (message, now)
                    try:
                        await message._msg.in_progress()
                    except Exception:
                        log.debug("keyedpool: +WPI failed", exc_info=True)

    async def _settled(self, message: NatsMessage, dead: bool) -> None:
        shard = self._shards[message.shard]
        seq = message.stream_seq
        shard.in_flight.pop(seq, None)
        shard.settled.add(seq)
        shard.settled_order.append(seq)
        while len(shard.settled_order) > 2 * self._handling.max_in_flight + 1000:
            shard.settled.discard(shard.settled_order.popleft())
        if dead:
            await message._msg.term()
        else:
            await message._msg.ack()

    @staticmethod
    async def _close_connection(nc: Client) -> None:
        await nc.flush()  # the acks are written before the connection goes
        await nc.close()

    def _wake_fetchers(self) -> None:
        loop, room = self._loop, self._room
        if loop is not None and room is not None:
            loop.loop.call_soon_threadsafe(room.set)

    # -- on the workers -----------------------------------------------------------

    def _ack(self, message: NatsMessage) -> None:
        with self._dead_lock:
            dead = message.stream_seq in self._dead
            self._dead.discard(message.stream_seq)
        self._submit_ack(self._shards[message.shard], self._settled(message, dead))

    def _submit_ack(self, shard: _Shard, coro: Coroutine[Any, Any, None]) -> None:
        # Fire and forget: a worker never waits for the loop to ack.
        assert self._loop is not None
        with self._acks_lock:
            shard.acks += 1
        future = self._loop.submit(coro)
        with self._acks_lock:
            self._acks.add(future)
        future.add_done_callback(lambda done: self._ack_done(shard, done))

    def _ack_done(self, shard: _Shard, future: concurrent.futures.Future[None]) -> None:
        with self._acks_lock:
            self._acks.discard(future)
            shard.acks -= 1
        if not future.cancelled() and future.exception() is not None:
            log.warning("keyedpool: ack failed: %r (the message will come again)",
                        future.exception())

    def _write_dead_letter(self, message: NatsMessage, error: BaseException) -> None:
        if self._dead_subject is not None:
            assert self._loop is not None and self._js is not None
            headers = dict(message.headers or {})
            headers["Keyedpool-Error"] = repr(error)[:1000]
            headers["Keyedpool-Source-Subject"] = message.subject
            headers["Keyedpool-Source-Seq"] = str(message.stream_seq)
            self._loop.call(
                self._js.publish(self._dead_subject, message.data, headers=headers),
                timeout=10.0,
            )
        else:
            log.error("keyedpool: dropping message %d of %s (key %r) after: %r",
                      message.stream_seq, message.subject, message.key, error)
        with self._dead_lock:
            self._dead.add(message.stream_seq)
        if self._on_dead_letter is not None:
            try:
                self._on_dead_letter(message, error)
            except Exception:
                log.exception("keyedpool: on_dead_letter raised")

    # -- stopping -----------------------------------------------------------------

    def _finish(self) -> None:
        loop = self._loop
        try:
            leases = self._leases
            if leases is not None:
                leases.stop_taking()
            fetching = [s.fetching for s in self._shards if s.fetching is not None]
            concurrent.futures.wait(fetching, self._fetch_timeout * 4 + 10)
            # Meanwhile keep the leases of the shards still draining, hand over the rest.
            meanwhile = None if leases is None else functools.partial(leases.tick, self._busy)
            every = None if leases is None else self._fetch_timeout
            if not self._handling.drain(self._drain_timeout, every=every, meanwhile=meanwhile):
                log.warning(
                    "keyedpool: %d messages still in flight at stop; they will be "
                    "delivered again", self._handling.in_flight,
                )
            with self._acks_lock:
                pending = list(self._acks)
            concurrent.futures.wait(pending, timeout=10.0)
            if leases is not None:
                # Hand the drained shards to the others at once (the rest expire).
                leases.leave(self._busy)
            if loop is not None and self._nc is not None:
                try:
                    # Not drain(): it waits for pull subscriptions' queues to be
                    # marked done, which fetch() never does.
                    loop.call(self._close_connection(self._nc), timeout=10.0)
                except Exception:
                    log.warning("keyedpool: closing the NATS connection failed", exc_info=True)
        finally:
            self._handling.close()
            if self._own_pool:
                self._pool.shutdown(wait=True)
            if loop is not None:
                loop.close()
            self._stopped.set()
