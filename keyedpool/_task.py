"""A submitted call and its future, in one object.

``Task`` *is* a :class:`concurrent.futures.Future`: ``wait``, ``as_completed``,
``add_done_callback`` and asyncio's ``wrap_future`` work on it as on any future.
It also carries the call (function, arguments, context) until a worker runs it.

Why not the standard ``Future()`` plus a work item, as ``ThreadPoolExecutor``
does? Every object made per task costs throughput twice: once to allocate it and
again each time the garbage collector walks it while the task is pending. The
stock ``Future.__init__`` makes a ``Condition`` (with its lock, deque and bound
methods) and two lists. Here the condition comes from a small set shared by the
pool, the lists are made only when someone needs them, and the work item is the
future itself.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import CancelledError, Future
from concurrent.futures import TimeoutError as FuturesTimeoutError
from concurrent.futures._base import (
    CANCELLED,
    CANCELLED_AND_NOTIFIED,
    FINISHED,
    PENDING,
    RUNNING,
)
from contextvars import Context
from time import monotonic
from typing import Any

from ._routing import Key

__all__ = ["Task"]

log = logging.getLogger("keyedpool")

_DONE = (CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED)
_CANCELLED = (CANCELLED, CANCELLED_AND_NOTIFIED)


class _Unretrieved:
    """Logs a task's exception if the task's future is dropped before anyone looked.

    Fire-and-forget work must not fail silently (asyncio logs "Task exception was
    never retrieved" for the same reason). It lives only on failed tasks, so it
    costs nothing on the common path; ``result()`` and ``exception()`` disarm it.
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


class Task(Future):  # type: ignore[type-arg]
    """The future returned by ``submit``; it carries the call until a worker runs it."""

    # Made on first use (see the module docstring); reads of the stock names go
    # through the properties below, so the standard library's code still works.
    _w: list[Any] | None = None
    _callbacks: list[Callable[[Future[Any]], object]] | None = None
    _unretrieved: _Unretrieved | None = None

    def __init__(
        self,
        condition: threading.Condition,
        key: Key | None,
        fn: Callable[..., Any] | None,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        context: Context | None,
        log_unretrieved: bool,
    ) -> None:
        # Future.__init__ is skipped on purpose: it would allocate a Condition.
        # The condition is shared with other tasks of the pool, which is why
        # result() and exception() below wait in a loop.
        self._condition = condition
        self._state = PENDING
        self._result: Any = None
        self._exception: BaseException | None = None
        self.key = key
        self._fn = fn
        self._args = args
        self._kwargs = kwargs
        self._context = context
        self._log = log_unretrieved

    # -- the stock attributes, made lazily ------------------------------------

    @property
    def _waiters(self) -> list[Any]:
        # Only wait()/as_completed() use this, always holding self._condition,
        # so two threads never both create the list.
        w = self._w
        if w is None:
            w = self._w = []
        return w

    @_waiters.setter
    def _waiters(self, value: list[Any]) -> None:
        self._w = value

    @property
    def _done_callbacks(self) -> list[Callable[[Future[Any]], object]]:
        return self._callbacks if self._callbacks is not None else []

    @_done_callbacks.setter
    def _done_callbacks(self, value: list[Callable[[Future[Any]], object]]) -> None:
        self._callbacks = value

    def add_done_callback(self, fn: Callable[[Future[Any]], object]) -> None:
        """Call *fn(future)* when the task finishes or is cancelled (at once if it has)."""
        with self._condition:
            if self._state not in _DONE:
                if self._callbacks is None:
                    self._callbacks = [fn]
                else:
                    self._callbacks.append(fn)
                return
        try:
            fn(self)
        except Exception:
            log.exception("exception calling callback for %r", self)

    # -- waiting: a loop, because the condition may be shared -----------------

    def _wait_done(self, timeout: float | None) -> None:
        # Called with self._condition held.
        if self._state not in _DONE:
            if timeout is None:
                while self._state not in _DONE:
                    self._condition.wait()
            else:
                deadline = monotonic() + timeout
                while self._state not in _DONE:
                    remaining = deadline - monotonic()
                    if remaining <= 0:
                        raise FuturesTimeoutError()
                    self._condition.wait(remaining)
        if self._state in _CANCELLED:
            raise CancelledError()

    def result(self, timeout: float | None = None) -> Any:
        """Wait up to *timeout* seconds and return the call's result, or raise its exception."""
        try:
            with self._condition:
                self._wait_done(timeout)
                self._retrieved()
                if self._exception is not None:
                    raise self._exception
                return self._result
        finally:
            # Break the cycle exception -> traceback -> this frame -> self.
            self = None  # type: ignore[assignment]

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """Wait up to *timeout* seconds and return the call's exception, or ``None``."""
        with self._condition:
            self._wait_done(timeout)
            self._retrieved()
            return self._exception

    def _retrieved(self) -> None:
        # Someone looked at the outcome: disarm the unretrieved-exception log.
        unretrieved = self._unretrieved
        if unretrieved is not None:
            unretrieved.exc = None
            self._unretrieved = None

    # -- running: called by the worker that owns the task ---------------------

    def run(self) -> bool | None:
        """Run the call: ``True`` if it returned, ``False`` if it raised, ``None`` if cancelled."""
        with self._condition:
            if self._state != PENDING:
                self._notify_cancelled()
                return None
            self._state = RUNNING
        fn, args, kwargs, context = self._fn, self._args, self._kwargs, self._context
        # Drop the call at once, so its arguments can be freed while the
        # future is still held by the caller (ThreadPoolExecutor does the same).
        # (_drop_call, inlined: this is the per-task path.)
        self._fn = self._args = self._kwargs = self._context = None  # type: ignore[assignment]
        try:
            if context is None:
                result = fn(*args, **kwargs)  # type: ignore[misc]
            else:
                result = context.run(fn, *args, **kwargs)  # type: ignore[arg-type]
        except BaseException as exc:
            what = f"task {_describe(fn)} (key={self.key!r})" if self._log else ""
            # The traceback keeps this frame alive: drop the call from it too.
            del fn, args, kwargs, context
            self._finish(None, exc, what)
            self = None  # type: ignore[assignment]  # break exc -> frame -> self
            return False
        self._finish(result, None, "")
        return True

    def abandon(self, exc: BaseException | None) -> None:
        """Never run the call: cancel the task (*exc* is None) or fail it with *exc*."""
        if exc is None:
            self.cancel()
        with self._condition:
            if self._state == PENDING:
                self._state = RUNNING  # so nobody can cancel it half-way
            else:
                self._notify_cancelled()
                return
        self._drop_call()
        self._finish(None, exc, "")

    def _drop_call(self) -> None:
        # The call is never needed again (it ran, or never will): let its
        # function and arguments be freed while the caller holds the future.
        self._fn = self._args = self._kwargs = self._context = None  # type: ignore[assignment]

    def _notify_cancelled(self) -> None:
        # With self._condition held: tell wait()/as_completed() a cancel happened.
        self._drop_call()
        if self._state == CANCELLED:
            self._state = CANCELLED_AND_NOTIFIED
            if self._w:
                for waiter in self._w:
                    waiter.add_cancelled(self)

    def _finish(self, result: Any, exc: BaseException | None, what: str) -> None:
        with self._condition:
            self._result = result
            self._exception = exc
            if exc is not None and what:
                self._unretrieved = _Unretrieved(exc, what)
            self._state = FINISHED
            if self._w:
                if exc is None:
                    for waiter in self._w:
                        waiter.add_result(self)
                else:
                    for waiter in self._w:
                        waiter.add_exception(self)
            # Nobody waiting is the common case; skip the Python-level notify.
            if self._condition._waiters:  # type: ignore[attr-defined]
                self._condition.notify_all()
        if self._callbacks:
            self._invoke_callbacks()

    def _invoke_callbacks(self) -> None:
        for callback in self._callbacks or ():
            try:
                callback(self)
            except Exception:
                log.exception("exception calling callback for %r", self)
