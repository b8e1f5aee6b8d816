"""``KeyedPoolExecutor``: the public executor. Checks input, then hands tasks to the pool."""

from __future__ import annotations

import itertools
import math
import os
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from contextvars import copy_context
from time import monotonic
from types import TracebackType
from typing import Any, Literal, ParamSpec, TypeVar, cast

from ._holds import Plan
from ._pool import Pool
from ._retry import RetryPolicy
from ._routing import KEY_TYPES, Key, check_key, worker_index
from ._stats import PoolStats, snapshot
from ._task import Task
from ._views import KeyExecutor

__all__ = ["KeyedPoolExecutor", "default_max_workers"]

P = ParamSpec("P")
T = TypeVar("T")
Self = TypeVar("Self", bound="KeyedPoolExecutor")

OnFull = Literal["block", "raise"]
Routing = Literal["affinity", "hash"]

_pool_numbers = itertools.count()

#: The keyword arguments of every task called without any (never changed).
_NO_KWARGS: dict[str, Any] = {}


def cpu_count() -> int:
    """CPUs this process may use (``os.process_cpu_count`` where Python has it)."""
    return getattr(os, "process_cpu_count", os.cpu_count)() or 1


def default_max_workers() -> int:
    """The default worker count: 16 per CPU (for I/O-bound handlers), at most 128."""
    return min(cpu_count() * 16, 128)


class KeyedPoolExecutor:
    """Run blocking calls on a fixed set of threads: in order per key, concurrently across keys.

    Each of ``max_workers`` OS threads has its own FIFO queue. A dispatcher
    thread puts each task on a worker's queue: a key's tasks run one at a
    time, in submit order; different keys run concurrently. Tasks with
    ``key=None`` go to whichever worker is free.

    Args:
        max_workers: the number of worker threads. Default: 16 per CPU, at most 128.
        max_pending: how many accepted-but-unfinished tasks the pool holds at
            most. Default: ``max_workers * 100``.
        on_full: what ``submit`` does when ``max_pending`` tasks are pending:
            ``"block"`` (wait for room, the default) or ``"raise"`` (raise
            :class:`PoolFull` at once).
        full_timeout: with ``on_full="block"``, wait at most this many seconds,
            then raise :class:`PoolFull`. ``None`` waits as long as it takes.
        thread_name_prefix: thread names are ``f"{prefix}_{index}"`` and
            ``f"{prefix}_dispatcher"``.
        initializer: ``initializer(*initargs)`` runs at the start of each
            worker thread. If it raises, the pool is broken: tasks that have not
            started fail with :class:`BrokenKeyedPool`, and so does submit.
        initargs: the arguments for ``initializer``.
        copy_context: run each task in a copy of the submitter's
            :mod:`contextvars` context (so logging context and tracing spans
            follow the task). ``False`` saves a little time per task.
        log_unretrieved: log (on the ``"keyedpool"`` logger) the exception of a
            failed task whose future is dropped without ``result()`` or
            ``exception()`` having been called, so fire-and-forget work never
            fails silently.
        routing: how keyed tasks find a worker. ``"affinity"`` (the
            default): a key stays on one worker only while it has tasks queued
            or running there; its next task after that goes to a free worker,
            or the less busy of two, and tasks queued behind a task that seems
            stuck are moved to other workers, so a slow, hot or stuck key
            holds up only itself. ``"hash"``: a key always runs on the worker
            its mmh3 hash picks (:meth:`worker_index`), the same in every
            process and run. Order per key is the same in both.
        slow_task_warning: log a warning (on the ``"keyedpool"`` logger) about
            a task that has been running longer than this many seconds, once
            per task, with its key, function, worker and stack; and about a
            key with 100 or more tasks waiting whose backlog keeps growing.
            Checked every few seconds while the pool has work, never per
            task. Default: 60 s. ``None`` turns it off.
        timing: count how long each task waited (from submit to its start)
            and ran, in ``stats().wait_seconds`` and ``run_seconds`` (and the
            ``keyedpool_task_seconds`` Prometheus histogram). Costs two clock
            reads and a lock per task, so it is off by default.
    """

    def __init__(
        self,
        max_workers: int | None = None,
        *,
        max_pending: int | None = None,
        on_full: OnFull = "block",
        full_timeout: float | None = None,
        thread_name_prefix: str = "",
        initializer: Callable[..., object] | None = None,
        initargs: tuple[Any, ...] = (),
        copy_context: bool = True,
        log_unretrieved: bool = True,
        routing: Routing = "affinity",
        slow_task_warning: float | None = 60.0,
        timing: bool = False,
    ) -> None:
        if max_workers is None:
            max_workers = default_max_workers()
        _check_count("max_workers", max_workers)
        if max_pending is None:
            max_pending = max_workers * 100
        _check_count("max_pending", max_pending)
        _check_on_full(on_full, full_timeout)
        if initializer is not None and not callable(initializer):
            raise TypeError(f"initializer must be a callable, not {type(initializer).__name__}")
        if not isinstance(thread_name_prefix, str):
            raise TypeError("thread_name_prefix must be a str")
        if routing not in ("affinity", "hash"):
            raise ValueError(
                f"keyedpool: routing must be 'affinity' or 'hash', not {routing!r}"
            )
        if slow_task_warning is not None:
            if isinstance(slow_task_warning, bool) or not isinstance(
                slow_task_warning, (int, float)
            ):
                raise TypeError(
                    "slow_task_warning must be a number of seconds or None, "
                    f"not {slow_task_warning!r}"
                )
            if not (math.isfinite(slow_task_warning) and slow_task_warning > 0):
                raise ValueError(
                    "slow_task_warning must be a finite number of seconds > 0, "
                    f"not {slow_task_warning!r} (None turns the warning off)"
                )
        self._routing = routing
        self._block = on_full == "block"
        self._full_timeout = full_timeout
        self._copy_context = bool(copy_context)
        self._log_unretrieved = bool(log_unretrieved)
        self._pool = Pool(
            max_workers,
            max_pending,
            thread_name_prefix or f"KeyedPool-{next(_pool_numbers)}",
            initializer,
            tuple(initargs),
            routing,
            None if slow_task_warning is None else float(slow_task_warning),
            bool(timing),
        )
        self._timing = bool(timing)
        # If the executor is dropped without shutdown(), its threads still stop
        # (after finishing what they hold): they hold the Pool, not the executor.
        weakref.finalize(self, self._pool.stop, False)

    # -- submitting -------------------------------------------------------------

    def submit(
        self, key: Key | None, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs
    ) -> Future[T]:
        """Schedule ``fn(*args, **kwargs)`` and return its future.

        Tasks with the same *key* run one at a time, in the order their submit
        calls returned; tasks with different keys run concurrently. ``None``
        means no key: the task goes to whichever worker is free. An empty
        string or ``b""`` is a key like any other.

        When ``max_pending`` tasks are pending this waits for room or raises
        :class:`PoolFull`, as ``on_full`` and ``full_timeout`` say. Raises
        ``RuntimeError`` after ``shutdown()``.
        """
        return self._submit(key, fn, args, kwargs, self._block, self._full_timeout)

    def submit_with(
        self,
        key: Key | None,
        fn: Callable[..., T],
        /,
        args: Iterable[Any] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        on_full: OnFull | None = None,
        full_timeout: float | None = None,
        delay: float | None = None,
        retry: RetryPolicy | None = None,
        replace: bool = False,
    ) -> Future[T]:
        """Like ``submit``, with options for this one task.

        Args:
            on_full, full_timeout: this call's own backpressure (``None``: the
                pool's setting). For example, a web view that must not wait:
                ``pool.submit_with(user_id, send, (msg,), on_full="raise")``.
            delay: run no earlier than this many seconds from now. The task
                waits without a worker; later tasks of its key wait behind it
                (order per key is kept), while other keys run.
            retry: a :class:`RetryPolicy`. If the call raises one of its
                ``retry_on`` exceptions, it runs again after the backoff, up to
                ``retry.attempts`` calls in all; the future gets the first
                success or the last failure. Between attempts the task holds its
                key (its later tasks wait) and no worker waits.
            replace: latest wins: tasks of this key that were also submitted
                with ``replace=True`` and have not started yet (waiting in a
                queue, for their delay, or for a retry) are cancelled, so that
                a burst of updates runs once, with the newest arguments. A task
                that runs now is never interrupted, and tasks submitted without
                ``replace`` are never dropped. Needs a key.

        Raises ``ValueError`` for a negative or non-finite ``delay``, or
        ``replace=True`` without a key; ``TypeError`` for a ``retry`` that is
        not a :class:`RetryPolicy`.
        """
        if on_full is None and full_timeout is None:
            block, timeout = self._block, self._full_timeout
        else:
            if on_full is None:
                block = self._block
                timeout = self._full_timeout if full_timeout is None else full_timeout
            else:
                block = on_full == "block"
                timeout = full_timeout
            _check_on_full(on_full or ("block" if self._block else "raise"), full_timeout)
        if delay is None and retry is None and replace is False:
            plan = None
        else:
            plan = _plan(key, delay, retry, replace)
        return self._submit(
            key,
            fn,
            args if type(args) is tuple else tuple(args),
            dict(kwargs) if kwargs else _NO_KWARGS,  # a copy: the caller may reuse theirs
            block,
            timeout,
            plan,
        )

    async def asubmit(
        self, key: Key | None, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """``submit`` for asyncio code: await the call's result without blocking the loop.

        While the pool is full this awaits room (or raises :class:`PoolFull`,
        as ``on_full`` and ``full_timeout`` say) without blocking the event
        loop. If the awaiting coroutine is cancelled, the task is cancelled
        too, unless it has started (a running call is never interrupted).
        """
        import asyncio  # here: most programs never need it, and it is slow to import

        task = self._make(key, fn, args, kwargs, None)
        replaced = await self._pool.admit_async(task, self._block, self._full_timeout)
        if replaced is not None:
            replaced.cancel()
        return await asyncio.wrap_future(task)

    def _submit(
        self,
        key: Key | None,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        block: bool,
        timeout: float | None,
        plan: Plan | None = None,
    ) -> Task:
        task = self._make(key, fn, args, kwargs, plan)
        replaced = self._pool.admit(task, block, timeout)
        if replaced is not None:
            replaced.cancel()  # latest wins (replace=True)
        return task

    def _make(
        self,
        key: Key | None,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        plan: Plan | None,
    ) -> Task:
        # Check the call and make its task (not accepted yet).
        if key is not None and type(key) not in KEY_TYPES:
            if callable(cast(object, key)) and not callable(fn):
                raise TypeError(
                    "keyedpool: submit takes the key first: submit(key, fn, *args); "
                    "use None as the key for a task without one"
                )
            check_key(key)
        if not callable(fn):
            raise TypeError(
                f"keyedpool: fn must be callable, not {type(fn).__name__}; pass the "
                "function and its arguments, e.g. submit(key, fn, arg), not submit(key, fn(arg))"
            )
        pool = self._pool
        task = Task(
            pool,
            key,
            fn,
            args,
            # The call's own empty dict would be kept (and, on some Pythons,
            # walked by the garbage collector) until the task runs.
            kwargs if kwargs else _NO_KWARGS,
            copy_context() if self._copy_context else None,
            self._log_unretrieved,
        )
        if self._timing:
            task.queued_at = monotonic()
        if plan is not None:
            task.plan = plan
            if plan.replace:
                # Forget it as the key's latest once it ended (see Pool.latest).
                task.add_done_callback(pool.forget_latest)
        return task

    def map(
        self,
        fn: Callable[..., T],
        *iterables: Iterable[Any],
        key: None | Key | Callable[..., Key | None] = None,
        timeout: float | None = None,
        chunksize: int = 1,
        buffersize: int | None = None,
    ) -> Iterator[T]:
        """Like ``Executor.map``: ``fn`` over the items, results in input order.

        *key* is one key for every item, ``None`` for none, or a function called
        with the same arguments as *fn* that returns each item's key, so that
        items with the same key run in order. *timeout* counts from this call.
        All items are submitted before this returns (as the standard library
        does), unless *buffersize* is given: then at most that many are
        submitted ahead of the results read so far (as ``Executor.map`` does
        from Python 3.14), so an endless iterable works. *chunksize* is
        accepted for compatibility and ignored, as in ``ThreadPoolExecutor``.
        """
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        if buffersize is not None:
            if isinstance(buffersize, bool) or not isinstance(buffersize, int):
                raise TypeError("buffersize must be an integer or None")
            if buffersize < 1:
                raise ValueError("buffersize must be None or > 0")
        deadline = None if timeout is None else monotonic() + timeout
        items = zip(*iterables, strict=False)  # stops at the shortest, as map() does
        if callable(key):
            keyof = key

            def submit(args: tuple[Any, ...]) -> Future[Any]:
                return self.submit(keyof(*args), fn, *args)
        else:
            check_key(key)

            def submit(args: tuple[Any, ...]) -> Future[Any]:
                return self.submit(key, fn, *args)

        if buffersize is None:
            return _results(deque(map(submit, items)), deadline)
        first = deque(map(submit, itertools.islice(items, buffersize)))

        def more() -> Future[Any] | None:
            args = next(items, None)
            return None if args is None else submit(args)

        return _results(first, deadline, more)

    def executor(self, key: Key | None = None) -> KeyExecutor:
        """A :class:`concurrent.futures.Executor` on this pool whose tasks all carry *key*.

        ``pool.executor("user-42")`` runs its tasks in order on the shared threads;
        ``pool.executor()`` runs unkeyed tasks. Pass it to anything that takes an
        ``Executor``, e.g. ``loop.run_in_executor(pool.executor(user_id), fn)``.
        Its ``shutdown()`` stops and waits for the view only; the pool keeps running.
        """
        check_key(key)
        return KeyExecutor(self, key)

    # -- inspecting -------------------------------------------------------------

    @property
    def max_workers(self) -> int:
        """The number of worker threads."""
        return self._pool.max_workers

    @property
    def max_pending(self) -> int:
        """The most accepted-but-unfinished tasks the pool holds."""
        return self._pool.max_pending

    @property
    def routing(self) -> Routing:
        """How keyed tasks find a worker: ``"hash"`` or ``"affinity"``."""
        return self._routing

    def worker_index(self, key: Key) -> int:
        """The index of the worker that runs *key*'s tasks: the same in every process and run.

        Only with ``routing="hash"``. With ``routing="affinity"`` a key has no
        fixed worker, and this raises ``RuntimeError`` (``stats().top_keys``
        says where the busiest keys are now).
        """
        if self._routing != "hash":
            raise RuntimeError(
                "keyedpool: worker_index() needs routing='hash'. This pool uses "
                "routing='affinity', where a key runs on the worker it was given "
                "when it last had nothing queued, so it has no fixed worker "
                "(stats().top_keys shows where the busiest keys are now)"
            )
        if key is None:
            raise ValueError(
                "keyedpool: None means no key; such tasks go to any free worker, "
                "so they have no worker index"
            )
        check_key(key)
        return worker_index(key, self._pool.max_workers)

    def stats(self, top_keys: int = 10) -> PoolStats:
        """A snapshot of queues and counters, cheap enough to take every second.

        Includes the *top_keys* keys with the largest backlog (0 skips that part).
        """
        return snapshot(self._pool, top_keys)

    # -- stopping ---------------------------------------------------------------

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting tasks; with *wait*, return once every thread of the pool has exited.

        Accepted tasks still run, unless *cancel_futures* is true: then tasks that
        have not started are cancelled (their futures say so) and never run.
        Safe to call more than once.
        """
        self._pool.stop(cancel_futures)
        if wait:
            self._pool.join()

    def __enter__(self: Self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.shutdown(wait=True)

    def __repr__(self) -> str:
        pool = self._pool
        done = pool.done()
        with pool.lock:
            state = "shut down" if pool.closed else "running" if pool.dispatcher else "idle"
            pending = pool.accepted + len(pool.inbox) - done
        return (
            f"<KeyedPoolExecutor {state} max_workers={pool.max_workers} "
            f"pending={pending}/{pool.max_pending}>"
        )


def _results(
    futures: deque[Future[Any]],
    deadline: float | None,
    more: Callable[[], Future[Any] | None] | None = None,
) -> Iterator[Any]:
    # As in concurrent.futures: yield in order; on early exit cancel the rest.
    # *more* submits the next item (None when there is none) as each result
    # is taken, to keep a bounded number ahead (map's buffersize).
    try:
        while futures:
            future = futures.popleft()
            if more is not None and (extra := more()) is not None:
                futures.append(extra)
            try:
                if deadline is None:
                    yield future.result()
                else:
                    yield future.result(deadline - monotonic())
            finally:
                future.cancel()
                del future
    finally:
        for future in futures:
            future.cancel()


def _plan(
    key: Key | None, delay: float | None, retry: RetryPolicy | None, replace: bool
) -> Plan | None:
    # The plan for submit_with's scheduling options (None: a plain task).
    if delay is not None:
        if isinstance(delay, bool) or not isinstance(delay, (int, float)):
            raise TypeError(f"delay must be a number of seconds or None, not {delay!r}")
        if not math.isfinite(delay) or delay < 0:
            raise ValueError(
                f"delay must be a finite number of seconds >= 0, not {delay!r}"
            )
    if retry is not None and not isinstance(retry, RetryPolicy):
        raise TypeError(
            f"retry must be a keyedpool.RetryPolicy or None, not {type(retry).__name__}"
        )
    if not isinstance(replace, bool):
        raise TypeError(f"replace must be True or False, not {replace!r}")
    if replace and key is None:
        raise ValueError(
            "keyedpool: replace=True needs a key: it cancels the earlier tasks of the "
            "same key that have not started, and a task without a key has none"
        )
    if not delay and retry is None and not replace:
        return None
    return Plan(monotonic() + delay if delay else 0.0, retry, replace)


def _check_count(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be greater than 0")


def _check_on_full(on_full: object, full_timeout: object) -> None:
    if on_full not in ("block", "raise"):
        raise ValueError(f"on_full must be 'block' or 'raise', not {on_full!r}")
    if full_timeout is not None:
        if isinstance(full_timeout, bool) or not isinstance(full_timeout, (int, float)):
            raise TypeError(
                f"full_timeout must be a number of seconds or None, not {full_timeout!r}"
            )
        if not math.isfinite(full_timeout) or full_timeout < 0:
            raise ValueError(
                f"full_timeout must be a finite number of seconds >= 0, not {full_timeout!r} "
                "(None waits as long as it takes)"
            )
        if on_full == "raise":
            # A submit that raises at once never waits: a timeout would be ignored.
            raise ValueError(
                "full_timeout only applies with on_full='block' (how long submit waits "
                "for room); with on_full='raise' submit never waits"
            )
