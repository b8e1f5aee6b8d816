"""The heart of the consumer engine: each message through the pool, in order per key.

The consumers (:class:`~keyedpool.contrib.consumer.Consumer` and the broker
adapters built on it) fetch messages and settle them with their broker;
everything in between lives here, in :class:`KeyedHandling`, which knows nothing
of brokers (it can be used on its own, e.g. for a broker keyedpool has no
adapter for):

* **Per-key order that survives failures, and retries that block only their
  own key.** Each message is submitted with ``submit_with(key, ..., retry=...)``:
  a failed attempt does *not* sleep on a worker; the pool parks the message for
  its backoff and holds its key meanwhile, so the key's later messages wait
  behind it while every worker runs other keys. The next message of a key
  never overtakes a failed one.
* **Retry policy and dead letters.** :class:`RetryPolicy` says how many times a
  handler is called for one message and how long to wait in between. When the
  attempts run out, or the handler raises :class:`DeadLetter`, the adapter's
  ``dead_letter`` callback gets the message (it publishes it to the broker's
  dead-letter destination), then the message is acked and its key moves on.
* **Ack after success.** The adapter's ``ack`` callback runs on the worker right
  after the handler returned (or after the dead letter was written), never
  before; its second argument says which (``True``: dead-lettered).
* **Backpressure.** At most ``max_in_flight`` messages are dispatched and not
  yet settled. Adapters ask :meth:`KeyedHandling.wait_for_room` (or
  :meth:`~KeyedHandling.room`) before fetching, so they stop fetching while the
  consumer is full. ``max_in_flight`` defaults to the pool's ``max_pending``, so
  the pool itself never fills up because of this consumer.
* **Graceful stop.** Adapters stop fetching, call :meth:`~KeyedHandling.drain`
  (waits until every in-flight message is acked or dead-lettered, retries
  included), then :meth:`~KeyedHandling.close`.
* **Duplicate counting.** Adapters pass ``redelivered=True`` for a message the
  broker says it delivered before, and call
  :meth:`~KeyedHandling.note_duplicate` when they drop a copy of a message they
  already hold; both are counted in :meth:`~KeyedHandling.stats` and reported to
  the optional ``on_redelivered`` hook. Delivery is at least once: after a crash
  a message may be handled again, so handlers should be idempotent.

API::

    handling = KeyedHandling(handler, pool=pool, ack=ack, dead_letter=dead_letter,
                             retry=RetryPolicy(), max_in_flight=None,
                             on_redelivered=None, on_room=None)
    handling.wait_for_room(timeout=None) -> int   # free slots, 0 on timeout / stop
    handling.room() -> int
    handling.dispatch(key, message, redelivered=False, wait=True) -> bool  # see its docstring
    handling.dispatch_dead(message, error, redelivered=False, wait=True) -> bool
    handling.note_duplicate(message)
    handling.drain(timeout=None) -> bool                 # True once nothing is in flight
    handling.close()
    handling.stats() -> ConsumerStats
    handling.in_flight, handling.max_in_flight

Threading: ``dispatch`` may be called from any thread; ``handler``, ``ack`` and
``dead_letter`` run on pool workers (and must not wait for the thread that
calls ``dispatch``); ``on_room`` runs on a worker whenever the consumer goes from
full to not full.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from time import monotonic
from typing import TYPE_CHECKING, Generic, TypeVar

import mmh3

from keyedpool import Key, KeyedPoolExecutor, PoolFull, RetryPolicy, key_bytes

from ._options import check_key, check_positive

if TYPE_CHECKING:
    pass  # noqa: UP035 - typing.Self is 3.11+

__all__ = [
    "ConsumerStats",
    "DeadLetter",
    "KeyedHandling",
    "RetryPolicy",
    "shard_of",
]

log = logging.getLogger("keyedpool.contrib")

M = TypeVar("M")


class DeadLetter(Exception):
    """Raise this from a handler to send the message to the dead-letter destination at once.

    Use it for messages that can never succeed (bad payload, unknown type): they
    skip the remaining retries. The message's key then moves on to its next message.
    """


@dataclass(frozen=True)
class ConsumerStats:
    """Counters of a consumer, from ``consumer.stats()``."""

    #: Messages handed to the pool (redeliveries included).
    received: int
    #: Messages whose handler succeeded (and that were then acked).
    handled: int
    #: Handler calls that were retries of a failed call.
    retries: int
    #: Messages sent to the dead-letter destination.
    dead_lettered: int
    #: Messages the broker delivered again (after a crash or a lost ack): at-least-once.
    redelivered: int
    #: Copies of a message the consumer still held or had just settled, dropped unhandled.
    duplicates: int
    #: Dispatched and not settled yet (this is what ``max_in_flight`` bounds).
    in_flight: int
    #: In flight and waiting behind a failed message of their key.
    parked: int
    #: Acks that could not be written (each failed try counts; they are tried
    #: again, and a message whose ack never gets through is delivered again).
    ack_errors: int


class _Again(Exception):
    """Raised by a message's task to have the pool run it again after the backoff."""


#: Calls of one message's task, at most: the handler's attempts, then the dead
#: letter's, which are retried until they succeed (nothing is lost).
_FOREVER = 2**62


class _Item(Generic[M]):
    """One message on its way through the pool.

    Its fields are used by one thread at a time: the task's attempts run one
    after another (the pool holds the key in between).
    """

    __slots__ = ("attempt", "dead", "failure", "future", "key", "message", "settled")

    def __init__(self, key: Key | None, message: M) -> None:
        self.key = key
        self.message = message
        #: Handler calls made so far.
        self.attempt = 0
        self.failure: BaseException | None = None
        #: Set once the message is due for the dead-letter destination.
        self.dead = False
        #: Owner: KeyedHandling._lock. The task that runs it, and whether it
        #: was settled (acked) or abandoned (left for the broker to deliver again).
        self.future: Future[None] | None = None
        self.settled = False


class KeyedHandling(Generic[M]):
    """Run a handler for each message on a pool: in order per key, retried, acked, bounded.

    Args:
        handler: called with each message on a pool worker. Returning means
            success; raising means failure (retried as *retry* says; raise
            :class:`DeadLetter` to skip the retries).
        pool: the :class:`~keyedpool.KeyedPoolExecutor` that runs the handlers.
        ack: called with a message on the worker once it is settled, and
            ``False`` after its handler succeeded, ``True`` after
            ``dead_letter`` returned. If it raises,
            the error is logged and counted (the broker will deliver the message
            again later).
        dead_letter: called with the message and the last exception when the
            retries ran out. It should write the message to the dead-letter
            destination; if it raises, it is called again after the backoff
            (which grows to ``retry.max_backoff``; the key waits: nothing is lost).
        retry: the :class:`RetryPolicy`.
        max_in_flight: the most messages dispatched and not settled. Default:
            the pool's ``max_pending``.
        on_redelivered: called (on the dispatching thread) with each message
            dispatched with ``redelivered=True`` and each message passed to
            :meth:`note_duplicate`.
        on_room: called (on a worker) whenever the number of in-flight messages
            drops below ``max_in_flight`` after having reached it.
    """

    def __init__(
        self,
        handler: Callable[[M], object],
        *,
        pool: KeyedPoolExecutor,
        ack: Callable[[M, bool], None],
        dead_letter: Callable[[M, BaseException], None],
        retry: RetryPolicy | None = None,
        max_in_flight: int | None = None,
        on_redelivered: Callable[[M], object] | None = None,
        on_room: Callable[[], None] | None = None,
    ) -> None:
        for name, fn in (
            ("handler", handler),
            ("ack", ack),
            ("dead_letter", dead_letter),
        ):
            if not callable(fn):
                raise TypeError(f"{name} must be callable, not {type(fn).__name__}")
        for name, hook in (("on_redelivered", on_redelivered), ("on_room", on_room)):
            if hook is not None and not callable(hook):
                raise TypeError(
                    f"{name} must be callable or None, not {type(hook).__name__}"
                )
        if not isinstance(pool, KeyedPoolExecutor):
            raise TypeError(
                f"pool must be a KeyedPoolExecutor, not {type(pool).__name__}"
            )
        if retry is None:
            retry = RetryPolicy()
        elif not isinstance(retry, RetryPolicy):
            raise TypeError(f"retry must be a RetryPolicy, not {type(retry).__name__}")
        if max_in_flight is None:
            max_in_flight = pool.max_pending
        check_positive("max_in_flight", max_in_flight)
        self._handler = handler
        self._pool = pool
        self._ack = ack
        self._dead_letter = dead_letter
        self._retry = retry
        self._max = max_in_flight
        self._on_redelivered = on_redelivered
        self._on_room = on_room
        #: What the pool does with a message's task: run it again after the
        #: policy's backoff whenever it raises _Again (see _run), holding its key.
        self._again = RetryPolicy(
            attempts=_FOREVER,
            backoff=retry.backoff,
            multiplier=retry.multiplier,
            max_backoff=retry.max_backoff,
            jitter=retry.jitter,
            retry_on=(_Again,),
        )
        # Owner of everything below: _lock (_changed is its condition).
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        #: Messages dispatched and not settled or abandoned.
        self._items: set[_Item[M]] = set()
        #: Keys with a message waiting for a retry, and how many messages of
        #: each key are in flight (for stats().parked).
        self._failing: set[Key] = set()
        self._per_key: dict[Key, int] = {}
        self._in_flight = 0
        self._closed = False
        self._received = self._handled = self._retries = self._dead = 0
        self._redelivered = self._duplicates = self._ack_errors = 0

    # -- what adapters call -------------------------------------------------------

    @property
    def max_in_flight(self) -> int:
        """The most messages dispatched and not settled."""
        return self._max

    @property
    def in_flight(self) -> int:
        """Messages dispatched and not settled yet."""
        return self._in_flight

    def room(self) -> int:
        """How many more messages may be dispatched now (0 when full or closed)."""
        if self._closed:
            return 0
        return max(self._max - self._in_flight, 0)

    def wait_for_room(self, timeout: float | None = None) -> int:
        """Wait until a message may be dispatched; return how many may be, now.

        Returns 0 if *timeout* seconds passed first, or once :meth:`close` was called.
        """
        deadline = None if timeout is None else monotonic() + timeout
        with self._changed:
            while not self._closed and self._in_flight >= self._max:
                left = None if deadline is None else deadline - monotonic()
                if left is not None and left <= 0:
                    return 0
                self._changed.wait(left)
            return 0 if self._closed else self._max - self._in_flight

    def dispatch(
        self, key: Key | None, message: M, *, redelivered: bool = False, wait: bool = True
    ) -> bool:
        """Hand *message* to the pool: its handler runs after the earlier messages of *key*.

        ``None`` as the key means no order is kept for this message. This never
        waits for :meth:`room` (call :meth:`wait_for_room` before fetching); if a
        shared pool is full it waits for room there, or, with ``wait=False``,
        returns ``False`` at once with nothing dispatched (an event loop then
        dispatches the message from another thread). Returns ``True`` once the
        message is dispatched. Raises ``RuntimeError`` after :meth:`close`, and
        ``TypeError`` for a key that is not ``str``, ``bytes``, ``int`` or ``None``.
        """
        check_key(key)
        item = _Item(key, message)
        self._accept(item, redelivered)
        if not self._submit(item, wait):
            self._unaccept(item, redelivered)
            return False
        if redelivered and self._on_redelivered is not None:
            call_hook(self._on_redelivered, message)
        return True

    def dispatch_dead(
        self, message: M, error: BaseException, *, redelivered: bool = False, wait: bool = True
    ) -> bool:
        """Send *message* to ``dead_letter`` with *error* without calling the handler.

        For a message that cannot be handled at all, e.g. because its key could
        not be read. It runs on a worker like any message (no order kept), and
        is acked once the dead letter is written. *wait* and the result are as
        in :meth:`dispatch`.
        """
        item = _Item(None, message)
        item.dead = True
        item.failure = error
        self._accept(item, redelivered)
        if not self._submit(item, wait):
            self._unaccept(item, redelivered)
            return False
        return True

    def note_ack_errors(self, count: int) -> None:
        """Count *count* acks that could not be written (for :meth:`stats`)."""
        with self._lock:
            self._ack_errors += count

    def note_duplicate(self, message: M) -> None:
        """Count a copy of a message the adapter dropped because it already has it."""
        with self._lock:
            self._duplicates += 1
        if self._on_redelivered is not None:
            call_hook(self._on_redelivered, message)

    def drain(
        self,
        timeout: float | None = None,
        *,
        every: float | None = None,
        meanwhile: Callable[[], None] | None = None,
    ) -> bool:
        """Wait until every dispatched message is settled; False if *timeout* passed first.

        With *every* and *meanwhile*, ``meanwhile()`` is called every *every*
        seconds while waiting (the consumers send acks and keep their shard
        leases alive that way during a long drain).
        """
        deadline = None if timeout is None else monotonic() + timeout
        next_call = None if every is None else monotonic() + every
        while True:
            with self._changed:
                while self._in_flight:
                    now = monotonic()
                    left = None if deadline is None else deadline - now
                    if left is not None and left <= 0:
                        return False
                    if next_call is not None and now >= next_call:
                        break
                    waits = [] if left is None else [left]
                    if next_call is not None:
                        waits.append(next_call - now)
                    self._changed.wait(min(waits) if waits else None)
                else:
                    return True
            assert meanwhile is not None and every is not None
            meanwhile()
            next_call = monotonic() + every

    def close(self) -> None:
        """Refuse further dispatches. Safe to call more than once.

        Call :meth:`drain` first: messages still waiting (for a retry, or
        behind one) are cancelled and left unacked, and the broker delivers
        them again later. A handler that is running finishes.
        """
        with self._changed:
            self._closed = True
            self._changed.notify_all()
            futures = [item.future for item in self._items if item.future is not None]
        for future in futures:
            future.cancel()  # (its done-callback abandons the message)

    def stats(self) -> ConsumerStats:
        """A snapshot of the counters."""
        with self._lock:
            parked = sum(self._per_key.get(key, 1) - 1 for key in self._failing)
            return ConsumerStats(
                received=self._received,
                handled=self._handled,
                retries=self._retries,
                dead_lettered=self._dead,
                redelivered=self._redelivered,
                duplicates=self._duplicates,
                in_flight=self._in_flight,
                parked=parked,
                ack_errors=self._ack_errors,
            )

    # -- on the dispatching thread -----------------------------------------------

    def _accept(self, item: _Item[M], redelivered: bool) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError("keyedpool: this consumer is closed")
            self._items.add(item)
            self._in_flight += 1
            self._received += 1
            if redelivered:
                self._redelivered += 1
            if item.key is not None:
                self._per_key[item.key] = self._per_key.get(item.key, 0) + 1

    def _submit(self, item: _Item[M], wait: bool) -> bool:
        # A consumer cannot drop a message, so it waits for room in a full shared
        # pool (whatever that pool's on_full says), unless told not to wait: then
        # False. max_in_flight keeps its own pool from filling up.
        try:
            future = self._pool.submit_with(
                item.key, self._run, (item,), retry=self._again,
                on_full="block" if wait else "raise",
            )
        except PoolFull:
            if wait:
                self._abandon(item)
                raise
            return False
        except BaseException:
            self._abandon(item)
            raise
        with self._lock:
            item.future = future
        future.add_done_callback(lambda f: self._ended(item, f))
        return True

    def _unaccept(self, item: _Item[M], redelivered: bool) -> None:
        # dispatch(wait=False) found the pool full: as if it had never been called.
        with self._changed:
            self._received -= 1
            if redelivered:
                self._redelivered -= 1
        self._abandon(item)

    # -- on the workers ---------------------------------------------------------

    def _run(self, item: _Item[M]) -> None:
        # The message's task. It raises _Again to be run again after the
        # backoff: the pool holds the key meanwhile, and no worker waits.
        key = item.key
        if not item.dead:
            item.attempt += 1
            if item.attempt > 1:
                with self._lock:
                    self._retries += 1
            try:
                self._handler(item.message)
            except BaseException as exc:
                item.failure = exc
                if (
                    isinstance(exc, DeadLetter)
                    or not self._retry.retries(exc)
                    or item.attempt >= self._retry.attempts
                ):
                    item.dead = True
                else:
                    log.info(
                        "keyedpool: handler failed for key %r (attempt %d of %d), retrying",
                        key,
                        item.attempt,
                        self._retry.attempts,
                        exc_info=True,
                    )
                    self._mark_failing(key)
                    raise _Again from None
            else:
                self._settle(item, handled=True)
                return
        failure = item.failure
        assert failure is not None
        try:
            self._dead_letter(item.message, failure)
        except Exception:
            log.exception(
                "keyedpool: could not dead-letter a message of key %r; trying again later",
                key,
            )
            self._mark_failing(key)
            raise _Again from None
        self._settle(item, handled=False)

    def _mark_failing(self, key: Key | None) -> None:
        # For stats().parked: the key's later messages wait behind this one
        # (_let_go clears the mark once a message of the key is settled).
        if key is not None:
            with self._lock:
                self._failing.add(key)

    def _ended(self, item: _Item[M], future: Future[None]) -> None:
        # The message's task is done. Settled, normally; else it was cancelled
        # (close(), or the pool shut down) or the pool would not retry it (a
        # pool shutting down): leave it unacked, for the broker to deliver again.
        if future.cancelled() or future.exception() is not None:
            with self._lock:
                settled = item.settled
            if not settled:
                if not future.cancelled():
                    log.warning(
                        "keyedpool: the pool is shutting down; a message of key %r "
                        "stays unacked and will be delivered again",
                        item.key,
                    )
                self._abandon(item)

    def _settle(self, item: _Item[M], *, handled: bool) -> None:
        # Ack, let the key's next message run, free the slot.
        try:
            self._ack(item.message, not handled)
        except Exception:
            log.exception("keyedpool: ack failed for a message of key %r", item.key)
            ack_failed = True
        else:
            ack_failed = False
        with self._changed:
            if ack_failed:
                self._ack_errors += 1
            if handled:
                self._handled += 1
            elif item.dead:
                self._dead += 1
            was_full = self._let_go(item)
        if was_full and self._on_room is not None:
            call_hook(self._on_room)

    def _let_go(self, item: _Item[M]) -> bool:
        # With _lock held: *item* is no longer in flight. Returns whether the
        # consumer was full.
        item.settled = True
        self._items.discard(item)
        key = item.key
        if key is not None:
            left = self._per_key.pop(key) - 1
            if left:
                self._per_key[key] = left
            self._failing.discard(key)
        was_full = self._in_flight >= self._max
        self._in_flight -= 1
        self._changed.notify_all()
        return was_full

    def _abandon(self, item: _Item[M]) -> None:
        # The pool refused or dropped the message: leave it unacked (the broker
        # delivers it again) and free its slot.
        with self._changed:
            if item.settled:
                return
            was_full = self._let_go(item)
        if was_full and self._on_room is not None:
            call_hook(self._on_room)


def call_hook(hook: Callable[..., object], *args: object) -> None:
    """``hook(*args)``; an error it raises is logged."""
    try:
        hook(*args)
    except Exception:
        log.exception("keyedpool: a consumer hook raised")


def shard_of(key: Key, shards: int) -> int:
    """The shard (0 to ``shards - 1``) a key's messages are published to.

    ``(mmh3_32(key_bytes, seed=0, unsigned) * shards) >> 32``: the *high* bits of
    the same mmh3 hash keyedpool routes with, over the same bytes
    (:func:`keyedpool.key_bytes`: the UTF-8 of a ``str``, lone
    surrogates kept, a ``bytes`` key as it is, or the decimal digits of an ``int``).
    Easy to compute in any language. Not ``hash % shards``: the pool picks a
    worker with ``hash % max_workers``, and if both used the low bits, the keys
    of one process (a subset of shards) would land on a subset of its workers
    (with 8 shards over 2 processes, only half of a 32-worker pool).
    """
    if key is None:
        raise ValueError("keyedpool: a message needs a key (str, bytes or int) to be sharded")
    check_key(key)
    check_positive("shards", shards)
    return (mmh3.hash(key_bytes(key), 0, False) * shards) >> 32
