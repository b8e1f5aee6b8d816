"""The consumer every broker adapter is: options, lifecycle, keys, dead letters, graceful stop.

A broker adapter subclasses :class:`Consumer` (or :class:`ShardedConsumer`,
for brokers whose processes share shards through leases) and only talks to its
broker: it fetches messages and hands each to :meth:`Consumer._receive`, sends
batches of acks in :meth:`Consumer._send_acks` when it calls
:meth:`Consumer._flush_acks`, writes dead letters in
:meth:`Consumer._write_dead_letter`, and keeps its leases. The handling in
between (order per key, retries, dead letters, backpressure, draining) is the
engine's: :class:`~keyedpool.contrib.consumer.KeyedHandling`; the acks wait in
:class:`~keyedpool.contrib.consumer._acks.Acks`, counted per shard.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable, Mapping
from time import monotonic
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from keyedpool import Key, KeyedPoolExecutor

from ._acks import Acks
from ._handling import ConsumerStats, KeyedHandling, call_hook
from ._options import ConsumerOptions, Default, check_key, check_positive, check_seconds
from ._shards import LeaseStore, ShardLeases, new_token

if TYPE_CHECKING:
    from typing_extensions import Self  # noqa: UP035 - typing.Self is 3.11+

__all__ = ["Consumer", "ShardedConsumer"]

log = logging.getLogger("keyedpool.contrib")

M = TypeVar("M")


class Consumer(Generic[M]):
    """A running consumer: fetches from its broker and runs the handler per message on a pool.

    Messages of one key are handled one at a time, in the order the broker
    delivered them, and acked (committed) only once their handler returned
    or they were written to the dead-letter destination. Messages of
    different keys run concurrently on the pool's workers. A failed handler
    is retried as ``retry`` says, holding only its own key. Delivery is at
    least once: after a crash a message may be handled again, so make
    handlers idempotent.

    The options every consumer takes are :class:`ConsumerOptions`.
    """

    def __init__(
        self,
        handler: Callable[[Any], object],
        *,
        key: object,
        key_kind: str,
        thread_name: str,
        options: ConsumerOptions | None,
        args: Mapping[str, object],
        shards: int = 1,
    ) -> None:
        if not callable(handler):
            raise TypeError(f"handler must be callable, not {type(handler).__name__}")
        if not (isinstance(key, str) or callable(key)):
            raise TypeError(
                f"key must be a {key_kind} name (str) or a function of the message, "
                f"not {type(key).__name__}"
            )
        self.options = opts = ConsumerOptions.of(options, args)
        self._handler = handler
        self._key: str | Callable[[Any], object] = key
        self._own_pool = opts.pool is None
        self._pool = (
            opts.pool
            if opts.pool is not None
            else KeyedPoolExecutor(opts.max_workers, thread_name_prefix=thread_name)
        )
        on_redelivered = opts.on_redelivered
        self._handling: KeyedHandling[M] = KeyedHandling(
            self._handle,
            pool=self._pool,
            ack=self._settled,
            dead_letter=self._dead_letter,
            retry=opts.retry,
            max_in_flight=opts.max_in_flight,
            on_redelivered=(
                None if on_redelivered is None else lambda m: on_redelivered(self._public(m))
            ),
            on_room=self._room_freed,
        )
        #: Acks of settled messages until the adapter sends them, and per shard
        #: (see _shard) the messages received and not acked (thread-safe).
        self._acks: Acks[M] = Acks(shards, self._acks_waiting)
        self._thread_name = thread_name
        # Set once each; Events carry their own locks.
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        # Owner: _start_lock (written once, before the thread that reads them starts).
        self._start_lock = threading.Lock()
        self._started = False
        self._runner: threading.Thread | None = None
        #: When stop() gives up waiting (monotonic), or None: no limit. Written
        #: by stop() before it sets _stopping; read after seeing _stopping.
        self._deadline: float | None = None
        #: The first error; written by whichever thread runs _open/_run/_finish
        #: (one at a time), before _stopped is set; read after _stopped.
        self._error: BaseException | None = None
        #: Owner: _start_lock until the consumer's thread starts, then that thread.
        self._opened = False

    # -- what users call -----------------------------------------------------------

    def run(self) -> None:
        """Fetch and handle messages until :meth:`stop` is called, then stop gracefully.

        Blocks the calling thread; a consumer runs once. An error that stops
        it (a broker error it cannot retry, say) is raised after a graceful
        stop, kept in :attr:`error`, and raised again by :meth:`stop`.
        """
        with self._start_lock:
            self._check_not_started()
            self._runner = threading.current_thread()
        self._run()

    def start(self) -> Self:
        """Connect in the calling thread, then run :meth:`run` in a background thread.

        Returns the consumer. What is wrong at setup (no broker at the
        address, a bad configuration) raises here, naming what was tried. The
        thread is not a daemon; the consumer is stopped gracefully (as by
        :meth:`stop`) when the interpreter exits.
        """
        with self._start_lock:
            self._check_not_started()
            try:
                self._open()
                self._opened = True
            except BaseException as exc:
                self._error = exc
                self._finish_unstarted()
                raise
            self._runner = run_in_background(self._run, self._thread_name, self._stop_at_exit)
        return self

    def stop(self, timeout: float | None = 30.0, *, wait: bool = True) -> bool:
        """Stop fetching, wait (at most *timeout* s) for the messages in flight, ack them, close.

        From another thread this blocks until the consumer has stopped and
        returns True if every message in flight was settled. From the thread
        that runs :meth:`run` (a signal handler, say), or with ``wait=False``,
        it only asks :meth:`run` to return, and returns False. Messages not
        settled in time stay unacked: the broker delivers them again (to this
        group's next reader). If the consumer stopped because of an error
        (see :attr:`error`), that error is raised here.
        """
        if timeout is not None:
            check_seconds("timeout", timeout, allow_zero=True)
            self._deadline = monotonic() + timeout
        self._stopping.set()
        self._wake()
        with self._start_lock:
            runner = self._runner
            if runner is None and not self._started:
                self._started = True  # never runs now
                self._finish_unstarted()
        if not wait or runner is None or runner is threading.current_thread():
            return False
        self._stopped.wait()
        if self._error is not None:
            raise self._error
        return self._handling.in_flight == 0

    def stats(self) -> ConsumerStats:
        """Counters: received, handled, retries, dead-lettered, redelivered, in flight..."""
        return self._handling.stats()

    @property
    def pool(self) -> KeyedPoolExecutor:
        """The pool the handlers run on."""
        return self._pool

    @property
    def error(self) -> BaseException | None:
        """The exception that stopped the consumer, if one did (:meth:`stop` raises it too)."""
        return self._error

    @property
    def stopping(self) -> bool:
        """True once :meth:`stop` was called (or an error stopped the consumer)."""
        return self._stopping.is_set()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what a broker adapter provides ----------------------------------------------

    def _open(self) -> None:
        """Connect and set up, in the calling thread; raise what is wrong."""
        raise NotImplementedError

    def _consume(self) -> None:
        """Fetch until ``_stopping`` is set, handing each message to :meth:`_receive`."""
        raise NotImplementedError

    def _send_acks(self, batch: list[tuple[M, bool]]) -> None:
        """Ack each settled ``(message, dead)`` (``dead``: it was dead-lettered), in order.

        Called by :meth:`_flush_acks`, on the consumer's thread. If it raises
        one of :attr:`_transient_ack_errors`, the whole batch is sent again at
        the next flush; another error stops the consumer.
        """
        raise NotImplementedError

    def _shard(self, message: M) -> int:
        """The shard *message* came from (its acks are counted per shard)."""
        return 0

    def _acks_waiting(self) -> None:
        """A message was settled and no ack was waiting before it (on a worker, mostly)."""

    #: The errors of :meth:`_send_acks` after which the batch is sent again at the
    #: next flush (a broker briefly away). Any other error stops the consumer.
    _transient_ack_errors: tuple[type[Exception], ...] = (OSError,)

    def _write_dead_letter(self, message: M, error: BaseException, destination: str) -> None:
        """On a worker: write *message* to *destination*; raising makes it try again later."""
        raise NotImplementedError

    def _default_dead_letter(self, message: M) -> str:
        """Where *message* goes when ``dead_letter`` was left out."""
        raise NotImplementedError

    def _named_key(self, message: M, name: str) -> object:
        """The key in the field or header *name* of *message* (``None`` if it has none)."""
        raise NotImplementedError

    def _describe(self, message: M) -> str:
        """*message* in a log line: where it came from."""
        return repr(message)

    def _public(self, message: M) -> Any:
        """What the handler and the hooks are called with (the message, by default)."""
        return message

    def _set_key(self, message: M, key: Key | None) -> None:
        """Note the key read from *message* on it, if it has room for one."""

    def _stop_fetching(self) -> None:
        """Stopping: fetch nothing more (the stop's first step, on the consumer's thread)."""

    def _while_draining(self) -> None:
        """Called every ``poll_timeout`` while the stop waits for the messages in flight."""
        self._flush_acks()

    def _after_drain(self) -> None:
        """Stopping: everything in flight is settled (or the stop timed out); send the acks."""
        self._flush_acks()

    def _close(self) -> None:
        """Stopping, last: close the connection. Called even if an earlier step raised."""

    def _wake(self) -> None:
        """Wake the fetching loop up after ``_stopping`` was set (from any thread)."""

    def _room_freed(self) -> None:
        """On a worker: the consumer was full and has room again."""

    # -- the engine ------------------------------------------------------------------

    def _receive(self, message: M, *, redelivered: bool = False, wait: bool = True) -> bool:
        """Hand a fetched message to the pool, after the earlier messages of its key.

        A message whose key cannot be read is dead-lettered with that error.
        With ``wait=False`` a full shared pool makes this return False with
        nothing taken (the caller tries again with ``wait=True``, from a thread
        that may wait); else True.
        """
        shard = self._shard(message)
        self._acks.received(shard)  # before a worker can settle it
        taken = False
        try:
            try:
                key = read_key(self._key, self._public(message), self._named_key, message)
            except Exception as exc:
                taken = self._handling.dispatch_dead(
                    message, exc, redelivered=redelivered, wait=wait
                )
            else:
                self._set_key(message, key)
                taken = self._handling.dispatch(key, message, redelivered=redelivered, wait=wait)
        finally:
            if not taken:
                self._acks.forget(shard)
        return taken

    def _settled(self, message: M, dead: bool) -> None:
        # On a worker: the consumer's thread sends the ack with the next batch.
        self._acks.add(message, dead, self._shard(message))

    def _flush_acks(self) -> None:
        """Send the acks gathered since the last call as one batch.

        Called by the adapter from its consumer's thread (never from two
        threads at once: a failed batch goes back first).
        """
        batch = self._acks.take()
        if not batch:
            return
        try:
            self._send_acks([(message, dead) for message, dead, _ in batch])
        except self._transient_ack_errors:
            log.warning("keyedpool: could not ack %d messages; trying again", len(batch),
                        exc_info=True)
            self._handling.note_ack_errors(len(batch))
            self._acks.failed(batch)
        except BaseException:
            self._handling.note_ack_errors(len(batch))
            self._acks.failed(batch)
            raise
        else:
            self._acks.sent(batch)

    def _handle(self, message: M) -> object:
        return self._handler(self._public(message))

    def _dead_letter(self, message: M, error: BaseException) -> None:
        # On a worker, when the message's attempts ran out.
        destination = self.options.dead_letter
        if isinstance(destination, Default):
            destination = self._default_dead_letter(message)
        if destination is None:
            log.error("keyedpool: %s failed and is dropped (dead_letter=None): %r",
                      self._describe(message), error)
        else:
            self._write_dead_letter(message, error, destination)
            log.warning("keyedpool: %s failed (%r); sent to %s",
                        self._describe(message), error, destination)
        hook = self.options.on_dead_letter
        if hook is not None:
            # The dead letter is stored: a raising hook must not make it count as failed.
            call_hook(hook, self._public(message), error)

    def _check_not_started(self) -> None:
        # With _start_lock held.
        if self._started:
            raise RuntimeError("keyedpool: this consumer was already started")
        self._started = True

    def _run(self) -> None:
        try:
            if not self._opened:  # run(), not start()
                self._opened = True
                self._open()
            self._consume()
        except BaseException as exc:
            self._error = exc
            raise
        finally:
            # Fetching ends only on stop or on an error: either way, stopping.
            self._stopping.set()
            self._finish()

    def _stop_at_exit(self) -> None:
        if not self._stopped.is_set():
            self.stop()

    def _finish_unstarted(self) -> None:
        # A consumer that will never run (a failed start, or stop before start).
        self._stopping.set()
        self._finish()

    def _finish(self) -> None:
        drained = False
        try:
            try:
                self._stop_fetching()
                deadline = self._deadline
                timeout = None if deadline is None else max(0.0, deadline - monotonic())
                every = self.options.poll_timeout
                drained = self._handling.drain(
                    timeout, every=every, meanwhile=self._while_draining
                )
                if not drained:
                    log.warning(
                        "keyedpool: %d messages still in flight at stop; they stay unacked "
                        "and the broker delivers them again",
                        self._handling.in_flight,
                    )
                self._after_drain()
            finally:
                try:
                    self._handling.close()
                    self._close()
                finally:
                    if self._own_pool:
                        # After a stop timeout the messages not started yet are not
                        # handled here (they were not acked: the broker has them),
                        # and stop() does not wait for the handlers still running:
                        # their acks go nowhere, so the broker has those too.
                        self._pool.shutdown(wait=drained, cancel_futures=True)
        except BaseException as exc:
            # So that stop() raises it too (a final commit that failed, say),
            # unless an earlier error stopped the consumer.
            if self._error is None:
                self._error = exc
            raise
        finally:
            self._stopped.set()


class ShardedConsumer(Consumer[M]):
    """A consumer of a stream split into shards, which its processes share through leases.

    Leave out ``process_index`` and ``process_count`` and the processes that
    run this consumer share the shards among themselves through leases kept in
    the broker: one that starts gets its part, one that stops or dies has its
    shards taken over by the others (after ``lease_ttl`` at most), unacked
    messages first. Give both to pin the shards instead: this process then
    always reads the shards ``s`` with ``s % process_count == process_index``.

    Args (besides :class:`ConsumerOptions`):
        shards: how many shards there are (the same when publishing).
        process_index, process_count: pin the shards (see above).
        lease_ttl: seconds a shard lease and a member's heartbeat last. A
            process cut off from the broker this long stops fetching. Keep it
            well above a handler's running time.
        on_rebalance: called with the set of shards this process reads,
            whenever it changes (on the consumer's thread).
    """

    def __init__(
        self, handler: Callable[[Any], object], *, args: Mapping[str, object], **base: Any
    ) -> None:
        # *base*: Consumer's other arguments (key, key_kind, thread_name, options).
        args = dict(args)
        shards = args.pop("shards", 1)
        index, count = args.pop("process_index", None), args.pop("process_count", None)
        self._lease_ttl: float = args.pop("lease_ttl", 10.0)  # type: ignore[assignment]
        on_rebalance: Any = args.pop("on_rebalance", None)
        self._pinned = check_sharding(shards, index, count, self._lease_ttl, on_rebalance)
        self._shard_count: int = shards  # type: ignore[assignment]
        self._on_rebalance = on_rebalance
        #: Owner: the consumer's thread (set by _share_shards, once connected).
        self._leases: ShardLeases | None = None
        #: Owner: the consumer's thread. Whether _tick reported the pinned shards.
        self._pinned_told = False
        super().__init__(handler, args=args, shards=self._shard_count, **base)

    @property
    def shards(self) -> frozenset[int]:
        """The shard numbers this process reads now (changes as processes come and go)."""
        if self._pinned is not None:
            return self._pinned
        leases = self._leases
        return frozenset() if leases is None else leases.readable

    def _busy(self, shard: int) -> bool:
        """Whether messages of *shard* are in flight here, or their acks not written yet."""
        return self._acks.busy(shard)

    def _share_shards(self, store: LeaseStore, name: str) -> None:
        """Without pinned shards: take part in sharing them, through *store*."""
        if self._pinned is None:
            self._leases = ShardLeases(store, self._shard_count, self._lease_ttl,
                                       new_token(name), on_change=self._on_rebalance)

    def _tick(self) -> tuple[frozenset[int], set[int]]:
        """Renew the leases when due; return (shards to read, shards newly gained).

        With pinned shards, the first call reports them all as gained (their
        earlier reader may have left messages unacked) and calls ``on_rebalance``.
        """
        leases = self._leases
        if leases is not None:
            leases.tick(self._busy)
            return leases.readable, leases.gained
        assert self._pinned is not None
        if not self._pinned_told:
            self._pinned_told = True
            if self._on_rebalance is not None:
                call_hook(self._on_rebalance, self._pinned)
            return self._pinned, set(self._pinned)
        return self._pinned, set()

    def _stop_fetching(self) -> None:
        if self._leases is not None:
            self._leases.stop_taking()

    def _while_draining(self) -> None:
        # Keep the leases of the shards still draining; hand the others over.
        super()._while_draining()
        if self._leases is not None:
            self._leases.tick(self._busy)

    def _after_drain(self) -> None:
        super()._after_drain()
        if self._leases is not None:
            # Hand the drained shards to the others at once (the rest expire).
            self._leases.leave(self._busy)


def check_sharding(
    shards: object,
    process_index: object,
    process_count: object,
    lease_ttl: object,
    on_rebalance: object,
) -> frozenset[int] | None:
    """Check the sharding arguments; return the pinned shards, or None (leases)."""
    check_positive("shards", shards)
    check_seconds("lease_ttl", lease_ttl)
    if on_rebalance is not None and not callable(on_rebalance):
        raise TypeError("on_rebalance must be callable or None")
    if process_index is None and process_count is None:
        return None
    if process_index is None or process_count is None:
        raise TypeError(
            "give both process_index and process_count (fixed shards), or neither "
            "(the processes share the shards and take over from each other)"
        )
    check_positive("process_count", process_count)
    if isinstance(process_index, bool) or not isinstance(process_index, int):
        raise TypeError("process_index must be an int")
    assert isinstance(shards, int) and isinstance(process_count, int)
    if not 0 <= process_index < process_count:
        raise ValueError(
            f"process_index must be in 0..{process_count - 1} (process_count={process_count})"
        )
    if process_count > shards:
        raise ValueError(
            f"process_count ({process_count}) is more than shards ({shards}): "
            "some processes would read nothing; use more shards"
        )
    return frozenset(s for s in range(shards) if s % process_count == process_index)


def read_key(
    key: str | Callable[[Any], object],
    public: object,
    named_key: Callable[[Any, str], object],
    message: object,
) -> Key | None:
    """The key of *message*: ``key(public)``, or ``named_key(message, key)`` for a name.

    Raises what a key function raises, or TypeError for something that is not a key.
    """
    value = named_key(message, key) if isinstance(key, str) else key(public)
    return check_key(value)


def stop_at_exit(stop: Callable[[], object]) -> None:
    """Call the bound method *stop* when the interpreter exits, before threads are joined.

    The consumers' background threads are not daemons, so a program that
    returns from its main thread without stopping them would wait forever; this
    hook (``threading._register_atexit``, the one ``concurrent.futures`` uses)
    stops them gracefully first. It holds the consumer only weakly.
    """
    ref = weakref.WeakMethod(stop)

    def at_exit() -> None:
        method: Any = ref()
        if method is not None:
            try:
                method()
            except Exception:
                log.exception("keyedpool: a consumer stopped with an error at exit")

    register: Any = getattr(threading, "_register_atexit", None)
    if register is None:  # pragma: no cover - CPython 3.9+ has it
        return
    try:
        register(at_exit)
    except RuntimeError:  # the interpreter is already shutting down
        pass


def run_in_background(
    run: Callable[[], None], name: str, stop: Callable[[], object]
) -> threading.Thread:
    """Start a non-daemon thread running *run*; the consumer stops at interpreter exit.

    *run* must store its own error (``stop()`` re-raises it); here it is only
    logged, so that it does not go to ``threading.excepthook`` as well.
    """

    def target() -> None:
        try:
            run()
        except BaseException:
            log.exception("keyedpool: consumer thread %s stopped with an error", name)

    thread = threading.Thread(target=target, name=name, daemon=False)
    stop_at_exit(stop)
    thread.start()
    return thread
