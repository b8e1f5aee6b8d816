"""Run Flask background work on a keyed pool: in order per key, inside the right app.

>>> from flask import Flask
>>> from keyedpool.contrib.flask import KeyedPool
>>> pool = KeyedPool()
>>> app = Flask(__name__)
>>> app.config["KEYEDPOOL_MAX_WORKERS"] = 8
>>> pool.init_app(app)

In a view, CLI command or any other thread::

    pool.submit(user_id, update_ledger, user_id, amount)  # in order per user

What a task sees:

* a **fresh application context** of the app the pool belongs to, pushed for
  that task alone and popped after it (so ``current_app``, ``g`` and
  ``teardown_appcontext`` handlers work as in a request);
* a **detached request context**, but only when ``submit`` was called during a
  request of that app: a new request object of its own, made from the submitting
  request's WSGI environ **without the body**. ``request.path``, ``args``,
  ``headers``, ``cookies``, ``view_args`` and ``session`` (opened afresh from the
  request's cookie, as in any request; changes the view made to it are not seen,
  and changes the task makes are not saved) read as in the view;
  ``request.form``, ``files``, ``get_data()`` are empty and ``request.json``
  fails. **Pass body data (form fields, uploaded bytes, JSON) as arguments**:
  ``pool.submit(key, fn, request.get_json())``. The task never touches the
  view's own request object, which may be closed and gone by the time it runs.
  From CLI commands, app-context-only code, or threads with no context at all,
  the task has no request context;
* the submitter's :mod:`contextvars` (logging and tracing context), as with
  :class:`keyedpool.KeyedPoolExecutor`.

Each app's pool is made by ``init_app`` (which also checks the configuration);
its threads start with the first ``submit``, once per process (so with
``gunicorn --preload`` each worker process starts its own). At process exit the
pool stops taking tasks and finishes the ones it holds before the interpreter
goes away. :meth:`KeyedPool.shutdown` is final, as for the executor: later
``submit`` calls raise ``RuntimeError``.

Configuration (``app.config``, read by ``init_app``):

* ``KEYEDPOOL_MAX_WORKERS``: worker threads (default: 16 per CPU, at most 128);
* ``KEYEDPOOL_MAX_PENDING``: accepted-but-unfinished tasks at most (default: workers x 100);
* ``KEYEDPOOL_ON_FULL``: ``"block"`` (default) or ``"raise"``: what submit does when full;
* ``KEYEDPOOL_FULL_TIMEOUT``: with ``"block"``, seconds to wait for room before raising
  :class:`keyedpool.PoolFull` (default ``None``: wait as long as it takes);
* ``KEYEDPOOL_THREAD_NAME_PREFIX``: thread names (default ``"keyedpool-<app name>"``);
* ``KEYEDPOOL_ROUTING``: ``"affinity"`` (default) or ``"hash"`` (a fixed worker per key);
* ``KEYEDPOOL_SLOW_TASK_WARNING``: log a task running longer than this many seconds
  (default 60; ``None``: never);
* ``KEYEDPOOL_MAX_STORED_JOBS``: how many jobs ``submit_stored`` remembers (default 1000).
"""

from __future__ import annotations

import difflib
import functools
import io
import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Generic, ParamSpec, TypeVar, cast, overload

from keyedpool.contrib import _require

_require("flask", "flask", "keyedpool.contrib.flask")

import flask
from flask import Flask, current_app, has_app_context, has_request_context

from keyedpool import Key, KeyedPoolExecutor

# The configuration key behind each KeyedPoolExecutor argument, for error messages.
_CONFIG_KEYS = {
    "max_workers": "KEYEDPOOL_MAX_WORKERS",
    "max_pending": "KEYEDPOOL_MAX_PENDING",
    "on_full": "KEYEDPOOL_ON_FULL",
    "full_timeout": "KEYEDPOOL_FULL_TIMEOUT",
    "thread_name_prefix": "KEYEDPOOL_THREAD_NAME_PREFIX",
    "routing": "KEYEDPOOL_ROUTING",
    "slow_task_warning": "KEYEDPOOL_SLOW_TASK_WARNING",
}

__all__ = ["CONFIG_DEFAULTS", "Job", "KeyedPool", "StoredJobs", "job_status"]

P = ParamSpec("P")
T = TypeVar("T")

#: The configuration keys this extension reads, with their defaults.
CONFIG_DEFAULTS: dict[str, Any] = {
    "KEYEDPOOL_MAX_WORKERS": None,
    "KEYEDPOOL_MAX_PENDING": None,
    "KEYEDPOOL_ON_FULL": "block",
    "KEYEDPOOL_FULL_TIMEOUT": None,
    "KEYEDPOOL_THREAD_NAME_PREFIX": None,
    "KEYEDPOOL_ROUTING": "affinity",
    "KEYEDPOOL_SLOW_TASK_WARNING": 60.0,
    "KEYEDPOOL_MAX_STORED_JOBS": 1000,
}

_EXTENSION = "keyedpool"


def job_status(future: Future[Any]) -> str:
    """What a job's future says about it, as one word for a status page.

    ``"pending"`` (waiting for its worker), ``"running"``, ``"finished"``
    (returned), ``"failed"`` (raised) or ``"cancelled"``.
    """
    if future.cancelled():
        return "cancelled"
    if future.done():
        return "failed" if future.exception() is not None else "finished"
    if future.running():
        return "running"
    return "pending"


class StoredJobs:
    """The futures of jobs submitted with ``submit_stored``, by job id, for status pages.

    It remembers at most ``max_jobs`` jobs (``KEYEDPOOL_MAX_STORED_JOBS``). Adding one
    more forgets the oldest job that has finished; if none has finished, it forgets
    the oldest job of all (that job still runs: only its status can no longer be
    looked up). :meth:`pop` forgets a job at once, e.g. when its result has been
    delivered. The jobs live in the memory of one process: with several server
    processes, a later request may land on a process that does not know the job.
    """

    def __init__(self, max_jobs: int) -> None:
        if isinstance(max_jobs, bool) or not isinstance(max_jobs, int):
            raise TypeError(
                f"max_jobs (KEYEDPOOL_MAX_STORED_JOBS) must be an int, not {max_jobs!r}"
            )
        if max_jobs <= 0:
            raise ValueError(
                f"max_jobs (KEYEDPOOL_MAX_STORED_JOBS) must be greater than 0, not {max_jobs}"
            )
        self.max_jobs = max_jobs
        self._jobs: OrderedDict[str, Future[Any]] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, job_id: str, future: Future[Any]) -> None:
        """Remember *future* as *job_id*; a finished job with that id is replaced.

        Raises ``ValueError`` if a job with that id is still pending or running.
        """
        self._fill(job_id, self._reserve(job_id), future)

    def _reserve(self, job_id: object) -> Future[Any]:
        # Hold the id with a placeholder (status "pending") while the job is
        # submitted, so that two requests cannot both take one id.
        placeholder: Future[Any] = Future()
        with self._lock:
            self._check_free(job_id)
            key = cast(str, job_id)
            self._jobs.pop(key, None)
            while len(self._jobs) >= self.max_jobs:
                self._forget_one()
            self._jobs[key] = placeholder
        return placeholder

    def _fill(self, job_id: str, placeholder: Future[Any], future: Future[Any] | None) -> None:
        # Put the job's future in the placeholder's place (or drop it if submit failed).
        with self._lock:
            if self._jobs.get(job_id) is placeholder:
                if future is None:
                    del self._jobs[job_id]
                else:
                    self._jobs[job_id] = future

    def _check_free(self, job_id: object) -> None:
        if not isinstance(job_id, str) or not job_id:
            raise TypeError(f"job_id must be a non-empty str, not {job_id!r}")
        old = self._jobs.get(job_id)
        if old is not None and not old.done():
            raise ValueError(
                f"keyedpool: a job with id {job_id!r} is still pending or running; "
                "use a new id (e.g. uuid.uuid4().hex) or pop the old one first"
            )

    def _forget_one(self) -> None:
        # With the lock held and the registry full.
        for old_id, old in self._jobs.items():
            if old.done():
                del self._jobs[old_id]
                return
        self._jobs.popitem(last=False)

    def get(self, job_id: str) -> Future[Any] | None:
        """The future of *job_id*, or ``None`` if it is unknown or was forgotten."""
        with self._lock:
            return self._jobs.get(job_id)

    def status(self, job_id: str) -> str | None:
        """:func:`job_status` of *job_id*, or ``None`` if it is unknown or was forgotten."""
        future = self.get(job_id)
        return None if future is None else job_status(future)

    def pop(self, job_id: str) -> Future[Any] | None:
        """Forget *job_id* and return its future (``None`` if unknown)."""
        with self._lock:
            return self._jobs.pop(job_id, None)

    def clear(self) -> None:
        """Forget every job."""
        with self._lock:
            self._jobs.clear()

    def __len__(self) -> int:
        return len(self._jobs)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._jobs

    def _after_fork_in_child(self) -> None:
        # The parent's jobs never run here (the core leaves them to the parent).
        self._lock = threading.Lock()
        self._jobs = OrderedDict()


class _AppState:
    """One app's pool (threads start on first submit) and its stored jobs."""

    def __init__(self, owner: KeyedPool, app: Flask) -> None:
        config = app.config
        for name, default in CONFIG_DEFAULTS.items():
            config.setdefault(name, default)
        self.owner = owner
        self.app_ref = weakref.ref(app)
        # Made now, so that the core checks the configuration at init_app (it
        # starts no threads before the first submit).
        self.executor = _make_executor(config, app.name)
        self.jobs = StoredJobs(config["KEYEDPOOL_MAX_STORED_JOBS"])
        _states.add(self)

    def _after_fork_in_child(self) -> None:
        self.jobs._after_fork_in_child()


_states: weakref.WeakSet[_AppState] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for state in list(_states):
        state._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class KeyedPool:
    """The Flask extension: a keyed thread pool per app, in ``app.extensions["keyedpool"]``.

    Use ``KeyedPool(app)`` for one app, or ``pool = KeyedPool()`` and later
    ``pool.init_app(app)`` with an app factory (one extension object may serve
    several apps; each app gets its own pool, configured from its own config).

    ``submit`` works in a request, in a CLI command, in app-context-only code and
    in threads with no Flask context at all. It picks the app like this: the
    current app if this extension is registered on it; otherwise the app given
    to the constructor; otherwise the only app it was registered on. With several
    apps and no app context, push one (``with app.app_context():``).
    """

    def __init__(self, app: Flask | None = None) -> None:
        self.app = app
        self._states: list[_AppState] = []
        self._states_lock = threading.Lock()
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Register on *app*: read its ``KEYEDPOOL_*`` config (no threads start yet).

        Raises ``TypeError``/``ValueError`` for bad config values, naming the key,
        and ``RuntimeError`` if a keyedpool extension is already registered on *app*.
        """
        if not isinstance(app, Flask):
            raise TypeError(f"init_app takes a Flask app, not {type(app).__name__}")
        if _EXTENSION in app.extensions:
            raise RuntimeError(
                "keyedpool: a KeyedPool is already registered on this app; "
                "use that one (app.extensions['keyedpool'].owner)"
            )
        _check_config_keys(app.config)
        state = _AppState(self, app)
        app.extensions[_EXTENSION] = state
        with self._states_lock:
            self._states.append(state)

    # -- choosing the app ---------------------------------------------------------

    def _state(self) -> _AppState:
        if has_app_context():
            state = current_app.extensions.get(_EXTENSION)
            if isinstance(state, _AppState) and state.owner is self:
                return state
        if self.app is not None:
            return cast(_AppState, self.app.extensions[_EXTENSION])
        with self._states_lock:
            live = [s for s in self._states if s.app_ref() is not None]
        if len(live) == 1:
            return live[0]
        if not live:
            raise RuntimeError(
                "keyedpool: this KeyedPool is not registered on any app; "
                "call KeyedPool(app) or pool.init_app(app) first"
            )
        raise RuntimeError(
            "keyedpool: this KeyedPool serves several apps and there is no app context "
            "to choose one; wrap the call in `with app.app_context():`"
        )

    @property
    def executor(self) -> KeyedPoolExecutor:
        """The current app's :class:`keyedpool.KeyedPoolExecutor`, e.g. for ``stats()``.

        (The Django adapter's ``get_pool()`` is the same thing.) Submit through
        :meth:`submit`, which adds the app context; tasks submitted to the
        executor directly run without it.
        """
        return self._state().executor

    @property
    def jobs(self) -> StoredJobs:
        """The current app's stored jobs (see ``submit_stored``)."""
        return self._state().jobs

    # -- submitting ---------------------------------------------------------------

    def submit(
        self, key: Key | None, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs
    ) -> Future[T]:
        """Run ``fn(*args, **kwargs)`` in the background and return its future.

        Tasks with the same *key* (``str``, ``bytes`` or ``int``) run one at a
        time in the order their ``submit`` calls returned, even when submitted by
        different requests; ``None`` means no key. The task runs in a fresh app
        context (and, if called during a request, a detached request context:
        the request without its body, so pass form, file or JSON data as
        arguments; see the module documentation).

        The pool's backpressure applies: when it is full this waits for room or
        raises :class:`keyedpool.PoolFull`, as ``KEYEDPOOL_ON_FULL`` and
        ``KEYEDPOOL_FULL_TIMEOUT`` say. Raises ``RuntimeError`` after shutdown,
        and ``TypeError`` for a bad key or a *fn* that is not callable.
        """
        state = self._state()
        if not callable(cast(object, fn)):
            # Let the core say what is wrong: it refuses this before accepting anything.
            state.executor.submit(key, fn, *args, **kwargs)
        call = _bind_to_app(state, fn, args, kwargs)
        return cast("Future[T]", state.executor.submit(key, call))

    def submit_stored(
        self,
        job_id: str,
        key: Key | None,
        fn: Callable[P, T],
        /,
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> Future[T]:
        """Like :meth:`submit`, and remember the future as *job_id* in :attr:`jobs`.

        A later request (to the same process) can then look the job up:
        ``pool.jobs.status(job_id)`` or ``pool.jobs.get(job_id)``. See
        :class:`StoredJobs` for how many jobs are kept and which are forgotten.
        Raises ``ValueError`` if a job with that id is still pending or running.
        """
        state = self._state()
        placeholder = state.jobs._reserve(job_id)  # refuses a taken id before anything runs
        future: Future[T] | None = None
        try:
            future = self.submit(key, fn, *args, **kwargs)
        finally:
            state.jobs._fill(job_id, placeholder, future)
        return future

    @overload
    def job(self, fn: Callable[P, T], /) -> Job[P, T]: ...

    @overload
    def job(self, fn: None = None, /) -> Callable[[Callable[P, T]], Job[P, T]]: ...

    def job(
        self, fn: Callable[P, T] | None = None, /
    ) -> Job[P, T] | Callable[[Callable[P, T]], Job[P, T]]:
        """Decorator: ``@pool.job`` makes *fn* submittable with ``fn.submit(key, ...)``.

        The decorated function can still be called directly, synchronously.
        """
        if fn is None:
            return functools.partial(Job, self)
        return Job(self, fn)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Shut down the pool of every app this extension serves, for good.

        As ``KeyedPoolExecutor.shutdown``: accepted tasks still run (unless
        *cancel_futures*), and with *wait* this returns once they have. Later
        ``submit`` calls raise ``RuntimeError``; there is no restart (make a new
        app, or a new ``KeyedPool``, for a new pool). Not needed at process exit:
        the pools then finish their tasks by themselves. Useful in tests and for
        an orderly stop of a long-lived worker.
        """
        with self._states_lock:
            states = list(self._states)
        for state in states:
            state.executor.shutdown(wait=wait, cancel_futures=cancel_futures)


class Job(Generic[P, T]):
    """A function made by ``@pool.job``: call it directly, or ``.submit(key, ...)`` it."""

    __name__: str
    __qualname__: str

    def __init__(self, pool: KeyedPool, fn: Callable[P, T]) -> None:
        if not callable(fn):
            raise TypeError(f"@pool.job decorates a function, not {type(fn).__name__}")
        self.pool = pool
        self.fn = fn
        functools.update_wrapper(self, fn)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> T:
        return self.fn(*args, **kwargs)

    def submit(self, key: Key | None, /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        """Run the function in the background with *key*: see :meth:`KeyedPool.submit`."""
        return self.pool.submit(key, self.fn, *args, **kwargs)

    def submit_stored(
        self, job_id: str, key: Key | None, /, *args: P.args, **kwargs: P.kwargs
    ) -> Future[T]:
        """Like :meth:`submit`, remembered as *job_id*: see :meth:`KeyedPool.submit_stored`."""
        return self.pool.submit_stored(job_id, key, self.fn, *args, **kwargs)

    def __repr__(self) -> str:
        return f"<keyedpool job {getattr(self.fn, '__qualname__', self.fn)!r}>"


# -- the context a task runs in -------------------------------------------------


def _bind_to_app(
    state: _AppState,
    fn: Callable[..., T],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Callable[[], T]:
    """Wrap the call so it runs in a fresh app context (and detached request) of the app.

    Called in the submitting thread. The task gets a copy of the request's WSGI
    environ without the body, and builds its own request object from it in its
    own thread. It must not share the view's request: Flask closes a request
    (and its uploaded files) when its context is popped, and request objects
    are not safe to use from several threads. Each task pushes and pops its own
    contexts in its own thread ("Token was created in a different Context" is
    what sharing one copy between tasks gives, as in flask-executor).
    """
    app = state.app_ref()
    if app is None:  # pragma: no cover - the app was garbage collected
        raise RuntimeError("keyedpool: the Flask app of this pool no longer exists")
    environ = None
    hide_request = False
    if has_request_context():
        ctx = flask.globals.request_ctx._get_current_object()  # type: ignore[attr-defined]
        if ctx.app is app:
            environ = _detached_environ(ctx.request.environ)
        else:
            hide_request = True

    @functools.wraps(fn)  # so that the core's log of an unretrieved failure names fn
    def call() -> T:
        # Runs in a copy of the submitter's contextvars: the submitter's own
        # app and request contexts are visible there until we push fresh ones.
        with app.app_context():
            if environ is not None:
                with app.request_context(environ):
                    return fn(*args, **kwargs)
            if hide_request:
                _hide_request_context()
            return fn(*args, **kwargs)

    return call


def _detached_environ(environ: dict[str, Any]) -> dict[str, Any]:
    """A copy of a request's WSGI environ with an empty body, for a task's own request."""
    copy = dict(environ)
    copy.pop("werkzeug.request", None)  # the view's request object
    for name in ("CONTENT_TYPE", "HTTP_TRANSFER_ENCODING", "HTTP_CONTENT_ENCODING"):
        copy.pop(name, None)
    copy.pop("wsgi.input_terminated", None)
    copy["CONTENT_LENGTH"] = "0"
    copy["wsgi.input"] = io.BytesIO()
    return copy


def _hide_request_context() -> None:
    # The submitter had a request of another app: do not let the task see it.
    var = getattr(flask.globals, "_cv_request", None)
    if var is not None:
        var.set(None)


# -- configuration ----------------------------------------------------------------


def _check_config_keys(config: Any) -> None:
    """A misspelt ``KEYEDPOOL_*`` key would silently leave its setting at the default."""
    unknown = sorted(
        k
        for k in config
        if isinstance(k, str) and k.startswith("KEYEDPOOL_") and k not in CONFIG_DEFAULTS
    )
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, list(CONFIG_DEFAULTS), n=1)
            hints.append(f"{key} (did you mean {close[0]}?)" if close else key)
        raise ValueError(
            f"keyedpool: unknown config keys: {', '.join(hints)}; "
            f"the keys are {', '.join(CONFIG_DEFAULTS)}"
        )


def _make_executor(config: Any, app_name: str) -> KeyedPoolExecutor:
    """The app's executor; the core checks the values, and errors name the config key."""
    prefix = config["KEYEDPOOL_THREAD_NAME_PREFIX"]
    try:
        return KeyedPoolExecutor(
            config["KEYEDPOOL_MAX_WORKERS"],
            max_pending=config["KEYEDPOOL_MAX_PENDING"],
            on_full=config["KEYEDPOOL_ON_FULL"],
            full_timeout=config["KEYEDPOOL_FULL_TIMEOUT"],
            thread_name_prefix=f"keyedpool-{app_name}" if prefix is None else prefix,
            routing=config["KEYEDPOOL_ROUTING"],
            slow_task_warning=config["KEYEDPOOL_SLOW_TASK_WARNING"],
            copy_context=True,  # the submitter's contextvars must reach the task
        )
    except (TypeError, ValueError) as exc:
        message = str(exc)
        names = [key for param, key in _CONFIG_KEYS.items() if param in message]
        where = ", ".join(names) or "KEYEDPOOL_*"
        error = TypeError if isinstance(exc, TypeError) else ValueError
        raise error(f"{where}: {message}") from exc
