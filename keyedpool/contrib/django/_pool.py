"""The process's pool, the per-task connection hygiene, and submit/submit_on_commit.

Why connections are closed the way they are: the core has an ``initializer``
but no per-thread finalizer, so a worker cannot run code as its thread ends.
A closing task per worker at shutdown does not work either: a worker also runs
unkeyed tasks, and one of those may run after the closing task and open a new
connection. Instead, every task records the connection objects of its thread
(Django keeps one per thread and alias). When the pool stops, its threads are
joined first, then the recorded connections are closed from the stopping
thread; their threads have ended, so nothing can use them any more. At process
exit the pool finishes its tasks first (the core's exit hook), and an
``atexit`` hook, which runs after the threads have been joined, closes them.
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, ParamSpec, TypeVar, cast

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.signals import setting_changed
from django.db import DEFAULT_DB_ALIAS, close_old_connections, connections, transaction
from django.db.backends.base.base import BaseDatabaseWrapper

from keyedpool import Key, KeyedPoolExecutor
from keyedpool._routing import check_key

__all__ = ["get_pool", "shutdown", "submit", "submit_on_commit"]

log = logging.getLogger("keyedpool.django")

P = ParamSpec("P")
T = TypeVar("T")

_OPTIONS = {
    "MAX_WORKERS": "max_workers",
    "MAX_PENDING": "max_pending",
    "ON_FULL": "on_full",
    "FULL_TIMEOUT": "full_timeout",
    "THREAD_NAME_PREFIX": "thread_name_prefix",
    "ROUTING": "routing",
    "SLOW_TASK_WARNING": "slow_task_warning",
}


def _make_executor() -> KeyedPoolExecutor:
    """A ``KeyedPoolExecutor`` from ``settings.KEYEDPOOL``; it starts no threads yet.

    The core checks the values; its ``TypeError``/``ValueError`` becomes
    ``ImproperlyConfigured`` naming the setting.
    """
    config = getattr(settings, "KEYEDPOOL", None) or {}
    if not isinstance(config, dict):
        raise ImproperlyConfigured(f"KEYEDPOOL must be a dict, not {type(config).__name__}")
    unknown = sorted(set(config) - set(_OPTIONS))
    if unknown:
        raise ImproperlyConfigured(
            f"KEYEDPOOL has unknown keys {unknown}; the keys are {sorted(_OPTIONS)}"
        )
    options: dict[str, Any] = {"thread_name_prefix": "keyedpool-django"}
    options.update({_OPTIONS[name]: value for name, value in config.items()})
    options["copy_context"] = True  # the submitter's contextvars must reach the task
    try:
        return KeyedPoolExecutor(**options)
    except (TypeError, ValueError) as exc:
        message = str(exc)
        names = [f"KEYEDPOOL[{name!r}]" for name, arg in _OPTIONS.items() if arg in message]
        raise ImproperlyConfigured(f"{', '.join(names) or 'KEYEDPOOL'}: {message}") from exc


class _PoolState:
    """One pool and the DB connection objects its worker threads made."""

    def __init__(self) -> None:
        self.executor = _make_executor()
        self.lock = threading.Lock()
        #: worker thread id -> {alias: connection object}
        self.connections: dict[int, dict[str, BaseDatabaseWrapper]] = {}

    def record_connections(self) -> None:
        """In a worker thread, after a task: remember this thread's connection objects."""
        ident = threading.get_ident()
        for conn in connections.all(initialized_only=True):
            known = self.connections.get(ident)
            if known is None or known.get(conn.alias) is not conn:
                with self.lock:
                    self.connections.setdefault(ident, {})[conn.alias] = conn

    def close_connections(self) -> None:
        """Close what the (finished) worker threads left open. Call after joining them."""
        with self.lock:
            recorded = [c for per_thread in self.connections.values() for c in per_thread.values()]
            self.connections.clear()
        for conn in recorded:
            conn.inc_thread_sharing()  # its thread has ended: closing it here is safe
            try:
                conn.close()
            except Exception:
                log.debug("keyedpool: error closing connection %r", conn.alias, exc_info=True)
            finally:
                conn.dec_thread_sharing()

    def stop(self, wait: bool, cancel_futures: bool) -> None:
        self.executor.shutdown(wait=wait, cancel_futures=cancel_futures)
        if wait:
            self.close_connections()


_lock = threading.Lock()
_state: _PoolState | None = None


def _get_state() -> _PoolState:
    global _state
    state = _state
    if state is None:
        with _lock:
            state = _state
            if state is None:
                state = _state = _PoolState()
    return state


def get_pool() -> KeyedPoolExecutor:
    """The process's :class:`keyedpool.KeyedPoolExecutor`, e.g. for ``stats()``.

    Made from ``settings.KEYEDPOOL`` when Django starts (the app's ``ready()``),
    or here if the app is not installed; its threads start with the first
    submit. (The Flask adapter's ``pool.executor`` is the same thing.) Submit
    through :func:`submit`, which adds the connection hygiene; tasks submitted
    to the executor directly do without it.
    """
    return _get_state().executor


def shutdown(wait: bool = True, *, cancel_futures: bool = False) -> None:
    """Stop the process's pool for good: later submits raise ``RuntimeError``.

    As ``KeyedPoolExecutor.shutdown``: accepted tasks still run (unless
    *cancel_futures*). With *wait*, returns once the worker threads have ended
    and their database connections are closed. There is no restart, except
    that changing the ``KEYEDPOOL`` setting (``override_settings`` in tests)
    replaces the pool. Not needed at process exit, where the pool finishes its
    tasks and closes its connections by itself.
    """
    _get_state().stop(wait, cancel_futures)


def _replace_pool() -> None:
    # Stop the pool (waiting for its tasks, closing its connections); the
    # next use makes a new one from the current settings.
    global _state
    with _lock:
        state, _state = _state, None
    if state is not None:
        state.stop(True, False)


def _run_task(
    state: _PoolState,
    fn: Callable[..., T],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> T:
    # In a worker thread: treat the task like a request.
    close_old_connections()
    try:
        return fn(*args, **kwargs)
    finally:
        close_old_connections()
        state.record_connections()


def _check_call(state: _PoolState, key: object, fn: object) -> None:
    # Before fn is wrapped (or its submit deferred to the commit): the core
    # says what is wrong with a bad fn or key. It refuses before accepting.
    if not callable(fn):
        state.executor.submit(cast(Key, key), cast(Callable[..., object], fn))
    check_key(key)


def submit(key: Key | None, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
    """Run ``fn(*args, **kwargs)`` on the process's pool and return its future.

    Tasks with the same *key* run one at a time in the order their ``submit``
    calls returned; ``None`` means no key. ``close_old_connections()`` runs
    around the task. The pool's backpressure applies (``KEYEDPOOL["ON_FULL"]``).

    This dispatches at once, even inside ``transaction.atomic()``: the task may
    run before the transaction commits (and not see its rows), or after a
    rollback. Use :func:`submit_on_commit` for work that depends on the transaction.
    """
    state = _get_state()
    _check_call(state, key, fn)
    return cast("Future[T]", state.executor.submit(key, _run_task, state, fn, args, kwargs))


def _submit_after(
    delay: float | None, key: Key | None, fn: Callable[..., T], /, *args: Any
) -> Future[T]:
    """``submit``, to run no earlier than *delay* seconds from now (for ``run_after``).

    The task holds its key while it waits (later tasks of the key wait
    behind it), and no worker waits: see ``KeyedPoolExecutor.submit_with``.
    """
    state = _get_state()
    _check_call(state, key, fn)
    return cast(
        "Future[T]",
        state.executor.submit_with(key, _run_task, (state, fn, args, {}), delay=delay),
    )


def submit_on_commit(
    key: Key | None,
    fn: Callable[..., object],
    /,
    *args: Any,
    using: str | None = None,
    **kwargs: Any,
) -> None:
    """Submit ``fn(*args, **kwargs)`` with *key* once the current transaction commits.

    Uses ``transaction.on_commit`` on the database *using* (default: the default
    database). If the transaction rolls back, nothing runs. Outside a
    transaction it submits at once, and errors (``PoolFull``) are raised here.
    Tasks submitted in one transaction keep their order per key, and run after
    those of transactions that committed earlier.

    Returns nothing, like ``on_commit``: the future exists only after the commit.
    An error while submitting after the commit (a full pool with
    ``ON_FULL="raise"``, a pool shut down) is logged on the ``keyedpool.django``
    logger and does not stop the other ``on_commit`` callbacks. (``using`` is
    taken by this function; pass a keyword argument named ``using`` to *fn*
    with ``functools.partial``.)
    """
    _check_call(_get_state(), key, fn)
    alias = DEFAULT_DB_ALIAS if using is None else using
    if not _in_transaction(alias):
        submit(key, fn, *args, **kwargs)
        return
    # In atomic(): run after the commit. (In manual transaction management
    # Django's on_commit raises TransactionManagementError, as it should.)
    transaction.on_commit(functools.partial(_submit_committed, key, fn, args, kwargs), using=alias)


def _in_transaction(alias: str) -> bool:
    """Whether the caller's thread is in a transaction on *alias*, without connecting.

    ``get_autocommit()`` would open a connection in the caller's thread (left
    open in a plain thread; ``SynchronousOnlyOperation`` in async code), so it
    is read only from a connection that is already open.
    """
    conn = connections[alias]
    if conn.in_atomic_block:
        return True
    if conn.connection is None:
        return False  # no connection: no transaction can be open on it
    return not conn.autocommit


def _submit_committed(
    key: Key | None,
    fn: Callable[..., object],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> None:
    try:
        submit(key, fn, *args, **kwargs)
    except Exception:
        log.exception("keyedpool: could not submit %r (key=%r) after commit", fn, key)


def _settings_changed(*, setting: str, **kwargs: Any) -> None:
    # override_settings(KEYEDPOOL=...) in tests: the next submit makes a new pool.
    if setting == "KEYEDPOOL":
        _replace_pool()


setting_changed.connect(_settings_changed, dispatch_uid="keyedpool.contrib.django")


def _at_exit() -> None:
    # Runs after the interpreter joined the pool's threads (the core's exit hook
    # let them finish their tasks first): close what they left open.
    state = _state
    if state is not None:
        state.close_connections()


atexit.register(_at_exit)


def _after_fork_in_child() -> None:
    # The parent's connection objects share sockets with the parent: never close
    # them here, just forget them. The core restarts the pool's threads afresh.
    global _lock
    _lock = threading.Lock()
    state = _state
    if state is not None:
        state.lock = threading.Lock()
        state.connections = {}


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
