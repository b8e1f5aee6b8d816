"""``keyedpool.ThreadPoolExecutor``: a drop-in for ``concurrent.futures.ThreadPoolExecutor``.

Same constructor, same behaviour; it runs on a :class:`KeyedPoolExecutor`, so it
also takes keyed tasks (``submit_keyed``) on the same threads.
"""

from __future__ import annotations

import itertools
import logging
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import ThreadPoolExecutor as StdlibThreadPoolExecutor
from typing import Any, ParamSpec, TypeVar

from ._executor import KeyedPoolExecutor, cpu_count
from ._routing import Key

__all__ = ["ThreadPoolExecutor"]

P = ParamSpec("P")
T = TypeVar("T")

_numbers = itertools.count()


class ThreadPoolExecutor(StdlibThreadPoolExecutor):
    """A drop-in replacement for :class:`concurrent.futures.ThreadPoolExecutor`.

    It is a subclass of the standard class (so ``isinstance`` checks pass, and
    asyncio's ``loop.set_default_executor`` accepts it), but none of the
    standard machinery runs: every method is keyedpool's.

    ``from keyedpool import ThreadPoolExecutor`` instead of the standard one, and
    existing code keeps working: the same constructor (``max_workers`` defaults
    to ``min(32, cpus + 4)``), ``submit``, ``map`` (with ``timeout`` and
    ``chunksize``), ``shutdown(wait, cancel_futures)``, context-manager use,
    ``initializer``/``initargs`` (a failing initializer breaks the pool with
    ``BrokenThreadPool``), no limit on queued tasks, and queued work finishing at
    interpreter exit. The differences are listed in the guide ("Migrating from
    ThreadPoolExecutor").

    Keyed work on the same threads: ``submit_keyed(key, fn, ...)``, or the
    underlying pool, ``.pool``, for everything a :class:`KeyedPoolExecutor` does.

    Two keyword-only extras, both off as in the standard pool: ``copy_context``
    (run tasks in a copy of the submitter's contextvars context) and
    ``log_unretrieved`` (log exceptions that nobody retrieved).
    """

    def __init__(
        self,
        max_workers: int | None = None,
        thread_name_prefix: str = "",
        initializer: Callable[..., object] | None = None,
        initargs: tuple[Any, ...] = (),
        *,
        copy_context: bool = False,
        log_unretrieved: bool = False,
    ) -> None:
        if max_workers is None:
            # The standard library's default, for I/O-bound work.
            max_workers = min(32, cpu_count() + 4)
        # KeyedPoolExecutor checks max_workers and initializer with the
        # standard pool's messages ("max_workers must be greater than 0"...).
        self._pool = KeyedPoolExecutor(
            max_workers,
            max_pending=sys.maxsize,  # the standard pool never refuses a task
            thread_name_prefix=thread_name_prefix or f"ThreadPoolExecutor-{next(_numbers)}",
            initializer=initializer,
            initargs=initargs,
            copy_context=copy_context,
            log_unretrieved=log_unretrieved,
            routing="hash",  # no keys here: nothing to route, nothing to watch
            slow_task_warning=None,  # the standard pool warns about nothing
        )
        # (StdlibThreadPoolExecutor.__init__ is not called: its queue and
        # threads would never be used.)
        # Initializer failures go where the standard pool logs them.
        self._pool._pool.logger = logging.getLogger("concurrent.futures")
        # Read by code that sizes things after the pool; same meaning as in the stdlib.
        self._max_workers = max_workers

    @property
    def pool(self) -> KeyedPoolExecutor:
        """The :class:`KeyedPoolExecutor` underneath: keyed tasks, ``stats()``, views."""
        return self._pool

    @property
    def _threads(self) -> set[threading.Thread]:  # type: ignore[override]
        # The standard pool's set of worker threads; code that joins or counts
        # them keeps working. (The dispatcher thread is not in it.)
        return {w.thread for w in self._pool._pool.workers if w.thread is not None}

    @property
    def _broken(self) -> str | bool:  # type: ignore[override]
        # The standard pool's flag (a message once broken); some code polls it.
        halt = self._pool._pool.halt
        return str(halt) if isinstance(halt, BaseException) else False

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        """Schedule ``fn(*args, **kwargs)`` on any free worker and return its future."""
        return self._pool.submit(None, fn, *args, **kwargs)

    def submit_keyed(
        self, key: Key | None, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs
    ) -> Future[T]:
        """Schedule ``fn(*args, **kwargs)`` under *key*: in order with the key's other tasks."""
        return self._pool.submit(key, fn, *args, **kwargs)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """As ``ThreadPoolExecutor.shutdown``: stop accepting; drain or cancel; join."""
        self._pool.shutdown(wait, cancel_futures=cancel_futures)

    def __repr__(self) -> str:
        return f"<keyedpool.ThreadPoolExecutor on {self._pool!r}>"
