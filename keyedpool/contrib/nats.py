"""Consume NATS JetStream on a keyed pool: in order per key, acked after success, scaled out.

``pip install keyedpool[nats]`` (nats-py; nats-server 2.9+ with ``-js``). What every
consumer guarantees is in :mod:`keyedpool.contrib.consumer`; here, what NATS adds (an
example: docs/consumers.md). One asyncio loop in a background thread does all NATS
I/O; the handler stays a plain blocking function.

* **A subject per shard.** Key ``k`` goes to ``f"{subject}.{shard_of(k, shards)}"``,
  with the key in the ``Keyedpool-Key`` header (:func:`publish`, :class:`NatsPublisher`);
  shard ``i`` has the durable pull consumer ``f"{durable}-{i}"``. The processes share
  the shards through leases in the key-value bucket ``f"KP_{durable}"`` (not NATS
  2.11's ``pinned_client``: the docs say why); pinned shards: one live process per index.
* **Takeover from the ack floor.** A shard consumer found with unacked messages (its
  reader died) is recreated from its ack floor: they come again first, in stream order.
  So is each shard after a reconnect, once drained: messages lost on the wire would
  otherwise come back only after ``ack_wait``, after newer ones.
* **+WPI** keeps ``ack_wait`` from expiring under a message in flight; a copy of a
  message held or just settled is dropped (``stats().duplicates``).
* **Dead letters** go to ``f"{subject}.dead"`` (same stream) with ``Keyedpool-Error``,
  ``Keyedpool-Source-Subject`` and ``Keyedpool-Source-Seq`` headers, then ``AckTerm``.
* **Fail-fast connect.** ``start()`` and :class:`NatsPublisher` try each server twice,
  then raise :class:`NatsConnectError` naming the addresses.
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

from keyedpool import Key

from .consumer import ConsumerOptions, ConsumerStats, DeadLetter, RetryPolicy, ShardedConsumer
from .consumer._handling import shard_of
from .consumer._options import check_positive, check_seconds

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.aio.msg import Msg
    from nats.js import JetStreamContext
    from nats.js.kv import KeyValue
    from typing_extensions import Self, Unpack  # noqa: UP035 - typing.Self is 3.11+

    from .consumer import ShardedConsumerArgs

__all__ = ["KEY_HEADER", "ConsumerOptions", "ConsumerStats", "DeadLetter", "NatsConnectError",
           "NatsConsumer", "NatsMessage", "NatsPublisher", "RetryPolicy", "publish", "shard_of",
           "shard_subject"]

log = logging.getLogger("keyedpool.contrib.nats")
# Where nats-py logs the errors it reports when no error_cb is given.
nats_log = logging.getLogger("nats.aio.client")

#: The header :func:`publish` puts the key in, and where :class:`NatsConsumer` looks by default.
KEY_HEADER = "Keyedpool-Key"

T = TypeVar("T")


def shard_subject(subject: str, shard: int) -> str:
    """The subject of one shard: ``f"{subject}.{shard}"``."""
    return f"{subject}.{shard}"


async def publish(js: JetStreamContext, subject: str, key: Key, data: bytes, *, shards: int,
                  headers: Mapping[str, str] | None = None) -> Any:
    """Publish *data* to the shard subject of *key* (async); return JetStream's PubAck.

    The key goes in the ``Keyedpool-Key`` header (``bytes`` keys must be UTF-8).
    """
    if not isinstance(data, bytes):
        raise TypeError(f"data must be bytes, not {type(data).__name__}")
    text = key.decode() if isinstance(key, bytes) else str(key)
    return await js.publish(shard_subject(subject, shard_of(key, shards)), data,
                            headers={**(headers or {}), KEY_HEADER: text})


class NatsConnectError(nats.errors.NoServersError):
    """No NATS server could be reached (names the addresses); a ``nats.errors.NoServersError``."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else super().__str__()


# nats-py's max_reconnect_attempts bounds the first connect too, and its default
# (60 tries, 2 s apart) makes a wrong address take two minutes to fail. The first
# connect uses 1, the fewest (0 means no limit): each server is tried twice.
_FIRST_CONNECT_ATTEMPTS = 1


async def _connect_nats(servers: str | list[str], options: Mapping[str, Any]) -> Client:
    """``nats.connect(servers, **options)``; NatsConnectError once each server was tried twice.

    Then the ``max_reconnect_attempts`` asked for applies. Failed tries are logged at
    debug level, not with a traceback each; an ``error_cb`` in *options* hears them all.
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

    options.update(error_cb=on_error, max_reconnect_attempts=_FIRST_CONNECT_ATTEMPTS)
    try:
        nc = await nats.connect(servers, **options)
    # (asyncio.TimeoutError is not the builtin TimeoutError on 3.10.)
    except (nats.errors.NoServersError, OSError, asyncio.TimeoutError) as exc:  # noqa: UP041
        cause = last_error or exc
        raise _cannot_connect(servers, cause) from cause
    nc.options["max_reconnect_attempts"] = reconnect_attempts  # read at each reconnect
    connected = True
    return nc


def _cannot_connect(servers: str | Sequence[str], why: BaseException | str) -> NatsConnectError:
    if isinstance(why, ConnectionRefusedError):
        why = "connection refused"
    elif isinstance(why, asyncio.TimeoutError) and not str(why):  # noqa: UP041 - 3.10
        why = "no answer within connect_timeout"
    elif isinstance(why, BaseException):
        why = str(why) or type(why).__name__
    # The URLs nats-py tries (its default scheme and port filled in), without the
    # user name and password some of them carry.
    shown = []
    for url in [servers] if isinstance(servers, str) else servers:
        scheme, sep, rest = url.rpartition("://")
        netloc = rest.split("/", 1)[0].rpartition("@")[2]
        if scheme not in ("ws", "wss") and not re.search(r":\d+$", netloc):
            netloc += ":4222"
        shown.append(f"{scheme if sep else 'nats'}://{netloc}")
    return NatsConnectError(
        f"keyedpool: could not connect to NATS at {', '.join(shown)} ({why}). "
        "Check that a NATS server is running at that address and port and can be "
        "reached from this host, and that the URL's scheme (nats://, tls://, ws://) "
        "and credentials are right."
    )


class _Loop:
    """An asyncio event loop in a daemon thread, for blocking callers (its owner closes it)."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        try:
            return asyncio.run_coroutine_threadsafe(coro, self.loop)
        except RuntimeError:  # closed (a handler that outlived a stop's timeout acks)
            coro.close()
            raise

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        future = self.submit(coro)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()  # so that a retry never runs beside it
            raise

    def close(self) -> None:
        if not self.loop.is_closed():
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
    """Members and shard leases (a ``LeaseStore``) in a JetStream key-value bucket.

    The bucket keeps one revision per key and expires entries ``lease_ttl`` after
    their last write: ``members.<token>`` is a member's heartbeat, ``lease.<shard>``
    holds its owner's token, renewed by an update naming the revision it last wrote
    (so a lease another member took fails to renew instead of being overwritten).
    """

    def __init__(self, loop: _Loop, kv: KeyValue, timeout: float) -> None:
        self._loop, self._kv, self._timeout = loop, kv, timeout
        #: Owner: the consumer's thread (ShardLeases calls the store only from there).
        self._revisions: dict[int, int] = {}

    def heartbeat(self, token: str, ttl: float, held: Sequence[int]
                  ) -> tuple[list[str], list[bool]]:
        return self._loop.call(self._heartbeat(token, held), self._timeout)

    async def _heartbeat(self, token: str, held: Sequence[int]) -> tuple[list[str], list[bool]]:
        await self._kv.put(f"members.{token}", b"")
        mine = []
        for shard in held:
            try:
                self._revisions[shard] = await self._kv.update(
                    f"lease.{shard}", token.encode(), last=self._revisions.get(shard, 0))
                mine.append(True)
            except nats.js.errors.KeyWrongLastSequenceError:
                mine.append(False)
        try:
            keys = await self._kv.keys()
        except nats.js.errors.NoKeysError:
            keys = []
        return [k[len("members."):] for k in keys if k.startswith("members.")], mine

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
        # Only if it is still ours (our last revision): else there is nothing to release.
        # (Another error leaves the revision here, for ShardLeases to try again.)
        with contextlib.suppress(nats.js.errors.KeyWrongLastSequenceError,
                                 nats.js.errors.BadRequestError):
            if revision is not None:
                self._loop.call(self._kv.delete(f"lease.{shard}", last=revision), self._timeout)
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
    """Publish keyed messages to a sharded JetStream stream from blocking code (or ``with``).

    Creates the stream (capturing ``f"{subject}.*"``) if missing; :meth:`publish` waits
    for JetStream's ack. No server reached: :class:`NatsConnectError` (or after *timeout*).
    """

    def __init__(self, servers: str | list[str], stream: str, *, shards: int,
                 subject: str | None = None, timeout: float = 10.0,
                 connect_options: Mapping[str, Any] | None = None) -> None:
        check_positive("shards", shards)
        check_seconds("timeout", timeout)
        self.stream, self.subject, self.shards = stream, subject or stream, shards
        self._timeout = timeout
        self._loop = _Loop(f"keyedpool-nats-publisher-{stream}")
        try:
            try:
                self._nc: Client = self._loop.call(
                    _connect_nats(servers, connect_options or {}), timeout)
            except concurrent.futures.TimeoutError:
                raise _cannot_connect(servers, f"no connection within {timeout} s") from None
            self._js = self._nc.jetstream()
            self._loop.call(_ensure_stream(self._js, stream, self.subject), timeout)
        except BaseException:
            self._loop.close()
            raise

    def publish(self, key: Key, data: bytes, headers: Mapping[str, str] | None = None) -> int:
        """Publish *data* with *key*; return its stream sequence number."""
        coro = publish(self._js, self.subject, key, data, shards=self.shards, headers=headers)
        return int(self._loop.call(coro, self._timeout).seq)

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

    subject: str  #: e.g. ``"ORDERS.3"``
    data: bytes
    headers: Mapping[str, str] | None
    key: Key | None  #: the key it is ordered by (``None``: no order kept for it)
    shard: int
    stream_seq: int  #: its sequence number in the stream
    redelivered: bool  #: True if JetStream (or a crashed predecessor) delivered it before
    _msg: Any = field(repr=False, compare=False, default=None)


class _Shard:
    """One shard: its JetStream consumer and subscription, and what it has in flight."""

    def __init__(self, index: int, consumer: str, subject: str) -> None:
        self.index, self.consumer, self.subject = index, consumer, subject
        #: Owner: the loop thread (_bind; the consumer's thread waits for it). The
        #: ack floor + 1 of a consumer deleted to be recreated there, until it is;
        #: the messages delivered before that have stream_seq <= delivered_before.
        self.sub: Any = None
        self.restart_at: int | None = None
        self.delivered_before = 0
        #: Owner: the consumer's thread. Cleared to end the fetching task after its
        #: current fetch (the task only reads it); the task, while one runs.
        self.reading = False
        self.fetching: concurrent.futures.Future[None] | None = None
        #: Owner: the loop thread. stream_seq -> (message, when its last sign of
        #: life was sent), until its ack is sent; and recently acked stream_seqs,
        #: oldest first, to drop late copies of them.
        self.in_flight: dict[int, tuple[NatsMessage, float]] = {}
        self.settled: dict[int, None] = {}

    def busy_fetching(self) -> bool:
        return self.fetching is not None and not self.fetching.done()


class NatsConsumer(ShardedConsumer[NatsMessage]):
    """Fetch from a sharded JetStream stream and run a handler per message on a pool.

    Args:
        servers: the NATS server URL(s), e.g. ``"nats://127.0.0.1:4222"``.
        stream: the JetStream stream (created, capturing ``f"{subject}.*"``, if missing).
        handler: a plain blocking function called with each :class:`NatsMessage`.
        subject: the base subject; shard ``i`` is ``f"{subject}.{i}"``. Default: *stream*.
            The default ``dead_letter`` is ``f"{subject}.dead"``.
        durable: the base name of the shard consumers (``f"{durable}-{i}"``) and of the
            lease bucket (``f"KP_{durable}"``). Default: ``f"{stream}-keyedpool"``.
            Different durables read the stream independently (like consumer groups).
        key: the header the key is in (default ``"Keyedpool-Key"``; none: no order
            kept), or a function of the message returning the key.
        ack_wait: the shard consumers' ack wait, in seconds (used when creating them).
        connect_options: more keyword arguments for ``nats.connect``. A
            ``reconnected_cb`` given here is still called (after the consumer's own),
            an ``error_cb`` hears every failed try, and ``max_reconnect_attempts``
            applies once connected.
        options: :class:`~keyedpool.contrib.consumer.ConsumerOptions`; its fields, and
            :class:`~keyedpool.contrib.consumer.ShardedConsumer`'s ``shards``,
            ``process_index``, ``process_count``, ``lease_ttl`` and ``on_rebalance``,
            may also be given as keyword arguments. ``lease_ttl`` is the lease
            bucket's TTL: the same in every process of a stream and durable, and at
            least ``3 * poll_timeout``.
    """

    def __init__(
        self, servers: str | list[str], stream: str, handler: Callable[[NatsMessage], object],
        *, subject: str | None = None, durable: str | None = None,
        key: str | Callable[[NatsMessage], Key | None] = KEY_HEADER, ack_wait: float = 30.0,
        connect_options: Mapping[str, Any] | None = None,
        options: ConsumerOptions | None = None, **args: Unpack[ShardedConsumerArgs],
    ) -> None:
        if not isinstance(stream, str) or not stream or "." in stream:
            raise ValueError("stream must be a non-empty str without dots (a JetStream name)")
        check_seconds("ack_wait", ack_wait)
        super().__init__(handler, key=key, key_kind="header", options=options, args=args,
                         thread_name=f"keyedpool-nats-{stream}")
        poll = self.options.poll_timeout
        if self._pinned is None and self._lease_ttl < 3 * poll:
            # A fetch must end inside the lease, with a heartbeat (every ttl/3) in
            # between. (The engine's pool starts no thread before its first task.)
            raise ValueError(
                f"lease_ttl ({self._lease_ttl}) must be at least 3 * poll_timeout ({poll})")
        self._servers, self._stream, self._ack_wait = servers, stream, ack_wait
        self._subject = subject or stream
        self._durable = durable or f"{stream}-keyedpool"
        self._connect_options = dict(connect_options or {})
        self._shards = [_Shard(s, f"{self._durable}-{s}", shard_subject(self._subject, s))
                        for s in range(self._shard_count)]
        #: Written by _open (before the consumer's thread starts), then only read.
        self._loop: _Loop | None = None
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        #: Owner: the loop thread (others set it with call_soon_threadsafe): there
        #: may be room to fetch again, or the consumer is stopping.
        self._room: asyncio.Event | None = None
        #: Owner: the loop thread. Messages asked for by fetches and not handed
        #: over yet: the shards fetch concurrently, and without this they would
        #: together fetch more than there is room for (filling the pool).
        self._asked = 0
        #: Written once, on the loop thread, by the first fetching task that fails;
        #: read by the consumer's thread after that task set _stopping.
        self._fetch_error: BaseException | None = None
        #: Set by nats-py's reconnected_cb; the shards read then are bound afresh.
        self._reconnected = threading.Event()
        #: Owner: the consumer's thread. Shards to bind (from the ack floor) before
        #: they are read: just gained, or read when the connection dropped; and
        #: when the next +WPI is due (monotonic).
        self._rebind: set[int] = set()
        self._next_sign_of_life = 0.0

    @property
    def shard_subjects(self) -> list[str]:
        """The shard subjects this process reads now."""
        return [self._shards[s].subject for s in sorted(self.shards)]

    # -- the consumer's thread ------------------------------------------------------

    def _open(self) -> None:
        self._loop = loop = _Loop(f"keyedpool-nats-{self._stream}-io")
        kv = loop.call(self._connect())
        if kv is not None:
            name = re.sub(r"[^-_=.A-Za-z0-9]", "_", f"{socket.gethostname()}-{os.getpid()}")
            self._share_shards(_NatsLeases(loop, kv, timeout=self._lease_ttl), name)

    def _consume(self) -> None:
        tick = min(self.options.poll_timeout, self._ack_wait / 3)
        while not self._stopping.is_set():
            self._flush_acks()
            self._rebalance()
            self._sign_of_life()
            self._stopping.wait(tick)
        if self._fetch_error is not None:
            raise self._fetch_error  # what stopped a shard's fetching

    def _rebalance(self) -> None:
        # Bind the shards that need it; start and end the shards' fetching tasks.
        assert self._loop is not None and self._js is not None
        readable, gained = self._tick()
        if self._leases is not None:  # (pinned shards were bound by _open)
            self._rebind |= gained  # a predecessor may have left messages unacked
            gained.clear()  # (taken over here, through _rebind)
        if self._reconnected.is_set():
            self._reconnected.clear()
            self._rebind |= {s.index for s in self._shards if s.reading or s.busy_fetching()}
        for index in sorted(self._rebind & readable):
            if self._busy(index):
                continue  # stop fetching (below) and drain first
            shard = self._shards[index]
            try:
                self._loop.call(self._bind(self._js, shard), self._lease_ttl)
            except Exception:
                log.warning("keyedpool: could not bind %s; trying again", shard.subject,
                            exc_info=True)
                continue
            self._rebind.discard(index)
        for shard in self._shards:
            wanted = shard.index in readable and shard.index not in self._rebind
            if wanted and not shard.reading and not shard.busy_fetching():
                shard.reading = True
                shard.fetching = self._loop.submit(self._fetch_shard(shard))
                shard.fetching.add_done_callback(self._fetching_ended)
            elif not wanted:
                shard.reading = False  # its fetching ends after the current fetch

    def _fetching_ended(self, future: concurrent.futures.Future[None]) -> None:
        if not future.cancelled() and future.exception() is not None:
            if self._fetch_error is None:
                self._fetch_error = future.exception()
            self._stopping.set()  # an error that stops fetching stops the consumer

    def _busy(self, shard: int) -> bool:
        # A fetch running, or messages of the shard received and not acked. In
        # this order: a fetched message is counted (by _receive, or by _take for
        # a copy to ack) before its fetching task ends, so none slips between.
        return self._shards[shard].busy_fetching() or super()._busy(shard)

    def _sign_of_life(self) -> None:
        if monotonic() >= self._next_sign_of_life:
            assert self._loop is not None
            self._loop.call(self._still_working())
            self._next_sign_of_life = monotonic() + self._ack_wait / 3

    def _stop_fetching(self) -> None:
        super()._stop_fetching()
        # A fetching task sees _stopping within a poll (_wake wakes one that waits
        # for room): nothing is dispatched after this.
        fetching = [s.fetching for s in self._shards if s.fetching is not None]
        concurrent.futures.wait(fetching, self.options.poll_timeout * 4 + 10)

    def _while_draining(self) -> None:
        self._sign_of_life()  # a long drain must not let ack_wait expire either
        super()._while_draining()

    def _close(self) -> None:
        if self._loop is None:
            return
        try:
            if self._nc is not None:
                self._loop.call(self._close_connection(self._nc), timeout=10.0)
        except Exception:
            log.warning("keyedpool: closing the NATS connection failed", exc_info=True)
        finally:
            self._loop.close()

    def _wake(self) -> None:
        # Any thread: wake the fetching tasks waiting for room (or to see _stopping).
        loop, room = self._loop, self._room
        if loop is not None and room is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.loop.call_soon_threadsafe(room.set)

    _room_freed = _wake  # on a worker: the consumer has room again

    # -- on the loop thread -------------------------------------------------------

    async def _connect(self) -> KeyValue | None:
        # The lease bucket; None with pinned shards, which are bound here instead
        # (so that start() raises what is wrong with them).
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
        if self._pinned is None:
            bucket = "KP_" + re.sub(r"[^A-Za-z0-9_-]", "_", self._durable)
            return await _lease_bucket(js, bucket, self._lease_ttl)
        for index in sorted(self._pinned):
            await self._bind(js, self._shards[index])
        return None

    async def _bind(self, js: JetStreamContext, shard: _Shard) -> None:
        start = None
        try:
            info = await js.consumer_info(self._stream, shard.consumer)
        except nats.js.errors.NotFoundError:
            info = None
        if info is not None and info.num_ack_pending:
            # A predecessor left messages unacked (it died, or they were lost on the
            # wire). JetStream would deliver newer ones before those come back:
            # start over from the ack floor.
            assert info.ack_floor is not None and info.delivered is not None
            start = shard.restart_at = info.ack_floor.stream_seq + 1
            shard.delivered_before = info.delivered.stream_seq
            await js.delete_consumer(self._stream, shard.consumer)
            log.info("keyedpool: shard %s had %d unacked messages; redelivering from seq %d",
                     shard.subject, info.num_ack_pending, start)
            info = None
        if info is None:
            # restart_at: a retry after a failure in between starts there, not at seq 1.
            start = start or shard.restart_at
            await js.add_consumer(self._stream, ConsumerConfig(
                durable_name=shard.consumer, filter_subject=shard.subject,
                ack_policy=AckPolicy.EXPLICIT, ack_wait=self._ack_wait, max_deliver=-1,
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE if start else DeliverPolicy.ALL,
                opt_start_seq=start))
            shard.restart_at = None
        if shard.sub is not None:  # bound before, handed over since
            with contextlib.suppress(Exception):
                await shard.sub.unsubscribe()
        shard.sub = await js.pull_subscribe_bind(shard.consumer, self._stream)

    async def _fetch_shard(self, shard: _Shard) -> None:
        room_event = self._room
        assert room_event is not None
        poll, batch = self.options.poll_timeout, self.options.batch
        while shard.reading and not self._stopping.is_set():
            leases = self._leases
            if leases is not None and monotonic() + poll >= leases.valid_until:
                await asyncio.sleep(poll)  # the heartbeat is late: no fetch past the lease
                continue
            room = self._handling.room() - self._asked
            if room <= 0:
                room_event.clear()
                if self._handling.room() <= self._asked and not self._stopping.is_set():
                    with contextlib.suppress(asyncio.TimeoutError):  # noqa: UP041 - 3.10
                        await asyncio.wait_for(room_event.wait(), poll)
                continue
            reading = sum(1 for s in self._shards if s.reading)
            count = max(1, min(batch, room // max(reading, 1)))
            self._asked += count
            try:
                msgs = await shard.sub.fetch(count, timeout=poll)
            except asyncio.TimeoutError:  # noqa: UP041 - nats' too; not TimeoutError on 3.10
                continue
            except nats.errors.ConnectionClosedError:
                if self._stopping.is_set():
                    return
                raise
            except Exception:
                log.warning("keyedpool: fetch from %s failed; retrying", shard.subject,
                            exc_info=True)
                await asyncio.sleep(poll)
                continue
            finally:
                self._asked -= count
            left = len(msgs)
            self._asked += left  # until each is handed over
            try:
                for msg in msgs:
                    waiting = self._take(shard, msg)
                    if waiting is not None:
                        # A shared pool is full: wait for room in another thread, not
                        # on this loop (it serves every shard, the acks and the
                        # heartbeats), and keep the shard's order: the next message
                        # waits for this one.
                        await asyncio.get_running_loop().run_in_executor(None, waiting)
                    left -= 1
                    self._asked -= 1
            finally:
                self._asked -= left  # (an error: what is left is not handed over)

    def _take(self, shard: _Shard, msg: Msg) -> Callable[[], object] | None:
        """Hand one fetched message over; None, or a blocking call that must finish it."""
        seq = msg.metadata.sequence.stream
        redelivered = msg.metadata.num_delivered > 1 or seq <= shard.delivered_before
        if seq in shard.in_flight or seq in shard.settled:
            # A copy of a message we hold (or just acked): JetStream redelivered it.
            held = shard.in_flight.get(seq)
            copy = self._message(shard, msg, redelivered=True)
            self._handling.note_duplicate(held[0] if held else copy)
            if held is None:  # acked already: ack the copy too, with the next batch
                self._acks.received(shard.index)
                self._acks.add(copy, False, shard.index)
            return None
        message = self._message(shard, msg, redelivered=redelivered)
        shard.in_flight[seq] = (message, monotonic())
        if self._receive(message, redelivered=redelivered, wait=False):
            return None
        return functools.partial(self._receive, message, redelivered=redelivered, wait=True)

    @staticmethod
    def _message(shard: _Shard, msg: Msg, *, redelivered: bool) -> NatsMessage:
        return NatsMessage(msg.subject, msg.data, msg.headers, None, shard.index,
                           msg.metadata.sequence.stream, redelivered, _msg=msg)

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

    async def _ack_all(self, batch: list[tuple[NatsMessage, bool]]) -> None:
        failed = 0
        for message, dead in batch:
            shard = self._shards[message.shard]
            shard.in_flight.pop(message.stream_seq, None)
            shard.settled[message.stream_seq] = None
            while len(shard.settled) > 2 * self._handling.max_in_flight + 1000:
                del shard.settled[next(iter(shard.settled))]  # the oldest
            try:
                await (message._msg.term() if dead else message._msg.ack())  # term: never again
            except nats.errors.MsgAlreadyAckdError:
                pass  # by an earlier try of this batch that timed out
            except Exception as exc:  # not sent again: JetStream delivers it again
                failed += 1
                log.warning("keyedpool: ack of %s failed: %r (it will come again)",
                            self._describe(message), exc)
        if failed:
            self._handling.note_ack_errors(failed)

    @staticmethod
    async def _close_connection(nc: Client) -> None:
        # Not drain(): it waits for pull subscriptions' queues to be marked done,
        # which fetch() never does.
        with contextlib.suppress(Exception):
            await nc.flush()  # the acks are written before the connection goes
        await nc.close()

    # (A loop that does not answer in time: concurrent.futures.TimeoutError, which
    # is not OSError's TimeoutError on 3.10.)
    _transient_ack_errors = (OSError, concurrent.futures.TimeoutError)

    def _send_acks(self, batch: list[tuple[NatsMessage, bool]]) -> None:
        # On the consumer's thread, every tick and while stopping.
        assert self._loop is not None
        self._loop.call(self._ack_all(batch), 10.0)

    def _shard(self, message: NatsMessage) -> int:
        return message.shard

    # -- on the workers -----------------------------------------------------------

    def _write_dead_letter(self, message: NatsMessage, error: BaseException,
                           destination: str) -> None:
        assert self._loop is not None and self._js is not None
        headers = {**(message.headers or {}), "Keyedpool-Error": repr(error)[:1000],
                   "Keyedpool-Source-Subject": message.subject,
                   "Keyedpool-Source-Seq": str(message.stream_seq)}
        self._loop.call(self._js.publish(destination, message.data, headers=headers), 10.0)

    def _default_dead_letter(self, message: NatsMessage) -> str:
        return f"{self._subject}.dead"

    def _named_key(self, message: NatsMessage, name: str) -> object:
        return (message.headers or {}).get(name)

    def _set_key(self, message: NatsMessage, key: Key | None) -> None:
        object.__setattr__(message, "key", key)

    def _describe(self, message: NatsMessage) -> str:
        return f"message {message.stream_seq} of {message.subject} (key {message.key!r})"
