"""A submitted call and its future, in one object.

``Task`` *is* a :class:`concurrent.futures.Future`, and every method of
``Future`` runs unchanged on it: ``wait``, ``as_completed``,
``add_done_callback`` and asyncio's ``wrap_future`` work as on any future. It
has the attributes ``Future.__init__`` makes, each its own: a condition, a
``_waiters`` list and a ``_done_callbacks`` list. Nothing is shared with another
future (``wait()`` locks several futures' conditions at once, in ``id()`` order,
which is only deadlock-free when no two futures share a lock). It also carries
the call (function, arguments, context) until a worker runs it, so there is no
separate work item.

Why not call ``Future.__init__``? Its ``threading.Condition()`` and two lists
cost more than the rest of a task's trip through the pool: to make, and for
the garbage collector to walk each time it runs while the task is alive (a
caller often holds thousands of futures). So a task is its own condition: it
is also a C ``RLock`` (the lock a ``Future``'s condition wraps), its
``_condition`` is the task itself, and it adds the condition's ``wait`` and
``notify_all``. That is one object per task where ``Future.__init__`` makes
seven. The two lists are made on first use. ``tests/test_futures.py`` checks
that ``Task`` provides exactly the attributes ``Future.__init__`` sets, so a
Python that adds one fails a test instead of breaking quietly.

What ``Task`` adds to ``Future``:

* ``result()`` and ``exception()`` raise :class:`DeadlockError` instead of
  waiting for ever when a task waits for a task queued behind itself;
* with ``log_unretrieved``, the exception of a failed task whose future is
  dropped unread is logged (fire-and-forget work must not fail silently).
"""

from __future__ import annotations

import logging
from _thread import RLock, allocate_lock
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from concurrent.futures._base import CANCELLED as CANCELLED_STATE
from concurrent.futures._base import CANCELLED_AND_NOTIFIED, FINISHED, PENDING, RUNNING
from contextvars import Context
from time import monotonic
from typing import TYPE_CHECKING, Any

from ._errors import DeadlockError
from ._local import current_worker
from ._routing import Key, worker_index

if TYPE_CHECKING:
    from ._holds import Plan
    from ._pool import Pool

__all__ = ["Task", "COMPLETED", "FAILED", "CANCELLED", "RETRYING"]

log = logging.getLogger("keyedpool")

_DONE = (CANCELLED_STATE, CANCELLED_AND_NOTIFIED, FINISHED)

#: How a task ended, as the worker counts it. RETRYING: it did not end, an
#: attempt failed and it goes back to the dispatcher to wait for its retry.
COMPLETED, FAILED, CANCELLED, RETRYING = 0, 1, 2, 3


class _Unretrieved:
    """Logs a task's exception if the task's future is dropped before anyone looked.

    asyncio logs "Task exception was never retrieved" for the same reason. It
    exists only on failed tasks, so it costs nothing on the common path;
    ``result()``, ``exception()`` (and asyncio's ``wrap_future``) disarm it.
    """

    __slots__ = ("exc", "what")

    def __init__(self, exc: BaseException, what: str) -> None:
        self.exc: BaseException | None = exc
        self.what = what

    def __del__(self) -> None:
        exc = self.exc
        if exc is None:
            return
        try:
            log.error(
                "keyedpool: exception in %s was never retrieved",
                self.what,
                exc_info=(type(exc), exc, exc.__traceback__),
            )
        except Exception:  # pragma: no cover - logging torn down at exit
            pass


def _describe(fn: object) -> str:
    name = getattr(fn, "__qualname__", None)
    module = getattr(fn, "__module__", None)
    if isinstance(name, str):
        return f"{module}.{name}" if isinstance(module, str) else name
    return repr(fn)


class Task(Future, RLock):  # type: ignore[type-arg,misc]
    """The future returned by ``submit``; it carries the call until a worker runs it.

    Its lock (``acquire``, ``release``, ``wait``, ``notify_all``) is the
    future's condition, used as ``Future`` uses ``self._condition``: it guards
    the future's state, result and lists. It is not meant for anything else.
    """

    # Every attribute is a slot: no per-task __dict__ (with a C base class
    # such as RLock, it would be one more object per task).
    __slots__ = (
        "_state",
        "_result",
        "_exception",
        "key",
        "_pool",
        "_fn",
        "_args",
        "_kwargs",
        "_context",
        "_log",
        "worker",
        "outcome",
        "_unretrieved",
        "_waiter_list",
        "_callback_list",
        "_sleepers",
        "queued_at",
        "plan",
    )

    #: The index of the worker it was placed on (``None`` until then, or if
    #: unkeyed). Owner: the dispatcher, which sets it before the worker can see
    #: the task, and resets it to ``None`` under that worker's lock when it
    #: takes the task back (``Pool.take_back``) to place it again. Read without
    #: a lock by ``_check_wait``, where a stale value gives the same answer.
    worker: int | None
    #: How the worker counted it (COMPLETED, FAILED, CANCELLED); set before the
    #: future is resolved, by the one thread that resolves it.
    outcome: int
    # Set (before the exception is) by the resolving thread; cleared by
    # whoever retrieves the exception after seeing the future done.
    _unretrieved: _Unretrieved | None
    # The lists behind _waiters and _done_callbacks; owner: this task's lock.
    _waiter_list: list[Any] | None
    _callback_list: list[Callable[[Future[Any]], object]] | None
    #: Locks of the threads waiting in ``wait``, each held until notified.
    #: Owner: this task's lock. Made on the first wait.
    _sleepers: list[Any] | None
    #: With ``timing=True``: ``time.monotonic()`` when submit accepted it (0.0
    #: otherwise). Set by submit before the task is shared, then only read.
    queued_at: float
    #: With ``submit_with(delay=, retry=, replace=)``: when it may run and what
    #: happens when it fails (see ``_holds``); None for every other task. Set
    #: by submit before the task is shared.
    plan: Plan | None

    # -- the condition ------------------------------------------------------------
    # threading.Condition's wait and notify_all on the task's own lock. Future
    # waits with its condition held once, which is all ``wait`` supports
    # (threading.Condition also handles a lock held several times by a thread).

    @property
    def _condition(self) -> Task:  # type: ignore[override]
        # A property, not an attribute: a task that referred to itself would be
        # a reference cycle, freed only by the garbage collector.
        return self

    def wait(self, timeout: float | None = None) -> bool:
        """The condition's wait: for ``Future``'s own use, with the task's lock held."""
        sleeper = allocate_lock()
        sleeper.acquire()
        sleepers = self._sleepers
        if sleepers is None:
            sleepers = self._sleepers = []
        sleepers.append(sleeper)
        self.release()
        got = False
        try:
            if timeout is None:
                got = sleeper.acquire()
            elif timeout > 0:
                got = sleeper.acquire(True, timeout)
            else:
                got = sleeper.acquire(False)
            return got
        finally:
            self.acquire()
            if not got:
                try:
                    sleepers.remove(sleeper)
                except ValueError:  # notified just as the wait timed out
                    pass

    def notify(self, n: int = 1) -> None:
        """The condition's notify, with the task's lock held."""
        sleepers = self._sleepers
        while sleepers and n > 0:
            sleepers.pop(0).release()
            n -= 1

    def notify_all(self) -> None:
        """The condition's notify_all, with the task's lock held."""
        sleepers = self._sleepers
        if sleepers:
            for sleeper in sleepers:
                sleeper.release()
            # Not clear(): a waiter that timed out meanwhile removes itself
            # from this list. Dropped, so a finished task keeps no list.
            self._sleepers = None

    # -- Future's lists, made on first use -------------------------------------
    # Most tasks never have a waiter or a callback, and every object made per
    # task costs throughput twice: to allocate it, and each time the garbage
    # collector walks it while the task is pending. Made under the future's
    # condition (reentrant, as Future's is), so code holding it, like wait(),
    # and code that does not both get the one list that is kept.

    @property
    def _waiters(self) -> list[Any]:
        with self._condition:
            waiters = self._waiter_list
            if waiters is None:
                waiters = self._waiter_list = []
            return waiters

    @_waiters.setter
    def _waiters(self, value: list[Any]) -> None:
        with self._condition:
            self._waiter_list = value

    @property
    def _done_callbacks(self) -> list[Callable[[Future[Any]], object]]:
        with self._condition:
            callbacks = self._callback_list
            if callbacks is None:
                callbacks = self._callback_list = []
            return callbacks

    @_done_callbacks.setter
    def _done_callbacks(self, value: list[Callable[[Future[Any]], object]]) -> None:
        with self._condition:
            self._callback_list = value

    def set_result(self, result: Any) -> None:
        """As ``Future.set_result``; skips the lists that were never made."""
        self._finish(result, None)

    def set_exception(self, exception: BaseException | None) -> None:
        """As ``Future.set_exception``; skips the lists that were never made."""
        self._finish(None, exception)

    def _finish(
        self,
        result: Any,
        exception: BaseException | None,
        returned: Callable[[], object] | None = None,
    ) -> None:
        # Future.set_result / set_exception, line for line, but reading the
        # lists only if they exist. *returned* (see run) is called before
        # anyone can see the outcome, and only if no done-callback will run
        # here: a callback may block, so this thread is not free until it ends.
        self.acquire()
        try:
            if self._state in _DONE:
                raise InvalidStateError(f"{self._state}: {self!r}")
            if returned is not None and not self._callback_list:
                returned()
            self._result = result
            self._exception = exception
            self._state = FINISHED
            waiters = self._waiter_list
            if waiters:
                if exception is None:
                    for waiter in waiters:
                        waiter.add_result(self)
                else:
                    for waiter in waiters:
                        waiter.add_exception(self)
            if self._sleepers:  # nobody waits, usually
                self.notify_all()
        finally:
            self.release()
        if self._callback_list:
            self._invoke_callbacks()  # type: ignore[attr-defined]

    def __init__(
        self,
        pool: Pool,
        key: Key | None,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        context: Context | None,
        log_unretrieved: bool,
    ) -> None:
        # What Future.__init__ sets (see the module docstring), each its own:
        # _condition is the task itself, and _waiters and _done_callbacks are
        # made on first use (properties above).
        self._state = PENDING
        self._result = None
        self._exception = None
        self.key = key
        self._pool = pool
        self._fn: Callable[..., Any] | None = fn
        self._args = args
        self._kwargs = kwargs
        self._context = context
        self._log = log_unretrieved
        self.worker = None
        self.outcome = CANCELLED
        self._unretrieved = None
        self._waiter_list = None
        self._callback_list = None
        self._sleepers = None
        self.queued_at = 0.0
        self.plan = None

    # -- the outcome, with the self-deadlock check ----------------------------

    def result(self, timeout: float | None = None) -> Any:
        """Wait up to *timeout* seconds and return the call's result, or raise its exception.

        Inside a task of the same pool, raises :class:`DeadlockError` at once if
        this task is queued behind the caller on its own worker (it could never start).
        """
        # A finished task first, in one step: callers that collect many
        # results call this once per task.
        with self:  # the future's condition (see _condition)
            if self._state == FINISHED:
                exc = self._exception
                if exc is None:
                    return self._result
                self._retrieved()
                try:
                    raise exc
                finally:
                    # Break the cycle exception -> traceback -> this frame -> exc.
                    exc = self = None  # type: ignore[assignment]
        self._check_wait()
        try:
            return super().result(timeout)
        finally:
            if self.done():
                self._retrieved()
            # Break the cycle exception -> traceback -> this frame -> self.
            self = None  # type: ignore[assignment]

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """Wait up to *timeout* seconds and return the call's exception, or ``None``."""
        self._check_wait()
        exc = super().exception(timeout)
        self._retrieved()
        return exc

    if hasattr(Future, "_get_snapshot"):
        # CPython 3.15 added Future._get_snapshot(), which asyncio's wrap_future
        # uses in place of result()/exception(): it delivers the exception, so
        # it counts as retrieving it. (tests/test_futures.py checks that asyncio
        # disarms the log on every Python, so a change here fails a test.)
        def _get_snapshot(self) -> Any:
            snapshot = super()._get_snapshot()  # type: ignore[misc]
            if snapshot[0]:
                self._retrieved()
            return snapshot

    def _retrieved(self) -> None:
        # Someone looked at the outcome: disarm the unretrieved-exception log.
        unretrieved = self._unretrieved
        if unretrieved is not None:
            unretrieved.exc = None
            self._unretrieved = None

    def _check_wait(self) -> None:
        """Raise DeadlockError if the calling worker thread waits for a task queued behind it."""
        me = current_worker()
        if me is None or me.pool is not self._pool:
            return
        running = me.current
        if running is None or running is self or self.running() or self.done():
            return
        # Pending: it starts only when some worker takes it. Does that have to be us?
        pool = self._pool
        if self.key is None:
            if pool.max_workers > 1:
                return  # any other worker can run it
            where = "no other worker can run it (max_workers is 1)"
        else:
            placed = self.worker
            if placed is None:
                if pool.routing_mode == "hash":
                    placed = worker_index(self.key, pool.max_workers)
                elif self.key == running.key:
                    # Affinity: the key stays on our worker while its task
                    # (the caller) runs, so this one will be queued behind it.
                    placed = me.index
            if placed != me.index:
                return
            same = self.key == running.key
            where = f"it is queued behind the calling task on worker {me.index} " + (
                "(same key)" if same else f"(key {self.key!r} shares that worker)"
            )
        raise DeadlockError(
            f"keyedpool: a task (key={running.key!r}) waits for another task "
            f"(key={self.key!r}) that cannot start until the waiting task returns: "
            f"{where}. Don't wait inside a task for a later task that runs on its "
            "worker; chain the follow-up with add_done_callback, or wait from outside "
            "the pool"
        )

    # -- running: called by the worker that owns the task ---------------------

    def run(self, returned: Callable[[], object] | None = None) -> int:
        """Run the call and resolve the future; return how it ended (COMPLETED...).

        *returned*, if given, is called after the call returned (or raised) and
        before the future resolves, unless a done-callback is waiting to run.
        A done-callback that raises ``SystemExit`` or the like propagates from
        here; ``outcome`` is set before any callback runs.
        """
        # Future.set_running_or_notify_cancel, for the common case (pending),
        # without the method call; anything else goes through it. (acquire and
        # release rather than ``with``: cheaper, and this runs on a worker
        # thread, where no KeyboardInterrupt can land in between.)
        self.acquire()
        try:
            pending = self._state == PENDING
            if pending:
                self._state = RUNNING
        finally:
            self.release()
        if not pending and not self.set_running_or_notify_cancel():
            self._drop_call()
            self.outcome = CANCELLED
            return CANCELLED
        fn, args, kwargs, context = self._fn, self._args, self._kwargs, self._context
        plan = self.plan
        if plan is None:
            # Drop the call at once, so its arguments can be freed while the
            # future is still held by the caller (ThreadPoolExecutor does the
            # same). (_drop_call, inlined: this is the per-task path.) A task
            # that may be retried keeps its call until it is resolved.
            self._fn = self._args = self._kwargs = self._context = None  # type: ignore[assignment]
        try:
            if context is None:
                result = fn(*args, **kwargs)  # type: ignore[misc]
            else:
                result = context.run(fn, *args, **kwargs)  # type: ignore[arg-type]
        except BaseException as exc:
            if plan is not None:
                if plan.retry is not None and self._retry_later(plan, exc):
                    del fn, args, kwargs, context, exc
                    return RETRYING
                self._drop_call()
            if self._log:
                self._unretrieved = _Unretrieved(exc, f"task {_describe(fn)} (key={self.key!r})")
            # The traceback keeps this frame alive: drop the call from it too.
            del fn, args, kwargs, context
            self.outcome = FAILED
            self._finish(None, exc, returned)
            self = None  # type: ignore[assignment]  # break exc -> frame -> self
            return FAILED
        if plan is not None:
            self._drop_call()
        self.outcome = COMPLETED
        self._finish(result, None, returned)  # set_result, one call fewer
        return COMPLETED

    def _retry_later(self, plan: Plan, exc: BaseException) -> bool:
        """After a failed attempt: make the task pending again if it is to be retried.

        Then its worker hands it back to the dispatcher, which parks it for
        the backoff (``_holds``); ``plan.parked`` tells ``cancel`` so.
        """
        retry = plan.retry
        assert retry is not None
        # pool.halt is read without the pool's lock, as Worker.run reads it: it
        # only ever goes from None to a value, and a retry decided just as it
        # changes is cancelled by the dispatcher when it would park the task.
        if (
            plan.failures + 1 >= retry.attempts
            or not retry.retries(exc)
            or self._pool.halt is not None
        ):
            return False
        wait = retry.wait(plan.failures + 1)
        self.acquire()
        try:
            if self._state != RUNNING:  # pragma: no cover - only its worker changes it now
                return False
            plan.failures += 1
            plan.due = monotonic() + wait
            plan.parked = True
            self._state = PENDING
        finally:
            self.release()
        return True

    def cancel(self) -> bool:
        """As ``Future.cancel``: a task that has not started never runs (``True``).

        A task that waits for its delay or for a retry is let go at once, and
        its key's later tasks go on.
        """
        if not super().cancel():
            return False
        plan = self.plan
        if plan is not None:
            self.acquire()
            try:
                parked = plan.parked
            finally:
                self.release()
            if parked:
                # In the dispatcher's hands: tell it, so the key goes on now.
                self._pool.hand_back(self)
        return True

    def abandon(self, exc: BaseException | None) -> int:
        """Never run the call: cancel the task (*exc* is None) or fail it with *exc*."""
        self._drop_call()
        if exc is None:
            self.cancel()
        if not self.set_running_or_notify_cancel():
            self.outcome = CANCELLED
            return CANCELLED
        self.outcome = FAILED
        self.set_exception(exc)
        return FAILED

    def _drop_call(self) -> None:
        # The call is never needed again (it ran, or never will): let its
        # function and arguments be freed while the caller holds the future.
        self._fn = self._args = self._kwargs = self._context = None  # type: ignore[assignment]
