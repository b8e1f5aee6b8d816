"""``pool.executor(key)``: a standard ``Executor`` whose tasks all carry one key.

Libraries that take a :class:`concurrent.futures.Executor` (asyncio's
``run_in_executor``, anything typed ``Executor``) can then run on the shared
threads of a :class:`KeyedPoolExecutor`, in order for that key.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from concurrent.futures import wait as concurrent_wait
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from ._routing import Key

if TYPE_CHECKING:
    from ._executor import KeyedPoolExecutor

__all__ = ["KeyExecutor"]

P = ParamSpec("P")
T = TypeVar("T")


class KeyExecutor(Executor):
    """An ``Executor`` on a shared pool; every task it takes carries the same key.

    With a key, its tasks run one at a time in submit order; with ``None`` they
    go to any free worker. ``shutdown()`` affects only this view: it stops
    accepting tasks and, with ``wait=True``, waits for the tasks *it* submitted
    (with ``cancel_futures=True`` it cancels those that have not started). The
    shared pool keeps running; shut it down with the pool's own ``shutdown()``.
    """

    def __init__(self, pool: KeyedPoolExecutor, key: Key | None) -> None:
        self._pool = pool
        self._key = key
        self._lock = threading.Lock()
        # Signalled when the last in-progress submit has recorded its future.
        self._submits_done = threading.Condition(self._lock)
        self._submitting = 0
        self._closed = False
        self._pending: set[Future[Any]] = set()

    @property
    def key(self) -> Key | None:
        """The key every task of this view carries (``None``: no key)."""
        return self._key

    @property
    def pool(self) -> KeyedPoolExecutor:
        """The shared pool this view submits to."""
        return self._pool

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        """Schedule ``fn(*args, **kwargs)`` under this view's key and return its future."""
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._submitting += 1
        # Not under the lock: submit may wait for room, and the workers that
        # make room call _forget, which takes the lock.
        future = None
        try:
            future = self._pool.submit(self._key, fn, *args, **kwargs)
        finally:
            with self._lock:
                if future is not None:
                    self._pending.add(future)
                self._submitting -= 1
                if not self._submitting:
                    self._submits_done.notify_all()
        future.add_done_callback(self._forget)
        return future

    def _forget(self, future: Future[Any]) -> None:
        with self._lock:
            self._pending.discard(future)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop this view; the shared pool keeps running (see the class docstring)."""
        with self._lock:
            self._closed = True
            # A submit that got past the check above must record its future first.
            while self._submitting:
                self._submits_done.wait()
            pending = list(self._pending)
        if cancel_futures:
            for future in pending:
                future.cancel()
        if wait:
            concurrent_wait(pending)

    def __repr__(self) -> str:
        state = "shut down" if self._closed else "open"
        return f"<KeyExecutor key={self._key!r} {state} on {self._pool!r}>"
