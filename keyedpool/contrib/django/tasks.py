"""A backend for Django's Tasks framework that runs tasks on the keyed pool.

It plugs into ``django.tasks`` on Django 6.0 and later, and into the
``django-tasks`` backport (``pip install django-tasks``) on Django 4.2 to 5.2::

    TASKS = {
        "default": {
            "BACKEND": "keyedpool.contrib.django.tasks.KeyedPoolBackend",
            "OPTIONS": {
                "ENQUEUE_ON_COMMIT": True,   # default: wait for the transaction to commit
                "DATABASE": "default",       # whose transaction enqueue waits for
                "MAX_RESULTS": 10000,        # results kept for get_result()
            },
        }
    }

**How a task gets its key.** Name the argument that holds the key with the
``key_arg`` task option; or give a fixed key with ``key``; with neither, the
task has no key and runs on any free worker::

    from keyedpool.contrib.django.tasks import keyed_task

    @keyed_task(key_arg="account_id")
    def post_entry(account_id: int, amount: str) -> int: ...

    post_entry.enqueue(42, "9.99")                 # key 42: in order with account 42's tasks
    post_entry.using(key="audit").enqueue(7, "1")  # a fixed key for this call

The framework's own ``@task(key_arg="account_id")`` works as well on Django
6.1+ and with the backport; Django 6.0's ``@task`` takes no extra options, so
there only :func:`keyed_task` can set them.

Tasks of one key run one at a time, in the order they were enqueued (for
enqueues inside transactions: in commit order). ``enqueue()`` inside
``transaction.atomic()`` hands the task to the pool only after the commit; on
rollback it never runs (its result stays ``READY``).

**Results** are kept in the memory of the process that enqueued the task (at
most ``MAX_RESULTS`` of them; past that the oldest finished results are
forgotten first). ``result.refresh()``, ``backend.get_result(id)`` and
``my_task.get_result(id)`` work from any thread of that process; another process
(another gunicorn worker) does not know the result. Return values must be JSON
serialisable, as the framework requires. ``priority`` is not supported: order
comes from the key.

**Deferred tasks** (``my_task.using(run_after=when).enqueue(...)``) run no
earlier than ``when``. Order per key still holds: while a deferred task
waits, the later tasks of its key wait behind it (other keys run; no worker
waits). Its result stays ``READY`` until it runs. Deferred tasks live in the
memory of the process that enqueued them: if that process exits first, they
are cancelled (and logged), never run.

Tasks run with the same connection hygiene as
:func:`keyedpool.contrib.django.submit`, on the process's one pool
(``settings.KEYEDPOOL``).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import inspect
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from datetime import datetime
from datetime import timezone as dt_timezone
from traceback import format_exception
from typing import TYPE_CHECKING, Any, overload

from django.db import DEFAULT_DB_ALIAS, transaction
from django.utils import timezone
from django.utils.crypto import get_random_string

from keyedpool import Key
from keyedpool._routing import check_key

from ._pool import _in_transaction, _submit_after

if TYPE_CHECKING:
    # The two frameworks (django.tasks, django_tasks) have the same API and
    # different types; this module is typed against either as Any.
    Task: Any
    TaskContext: Any
    TaskResult: Any
    TaskResultStatus: Any
    BaseTaskBackend: Any
    TaskError: Any
    InvalidTask: Any
    InvalidTaskBackend: Any
    TaskResultDoesNotExist: Any
    task_enqueued: Any
    task_finished: Any
    task_started: Any
    normalize_json: Any
    _FRAMEWORK: str
else:
    try:  # Django 6.0+
        from django.tasks import Task, TaskContext, TaskResult, TaskResultStatus
        from django.tasks.backends.base import BaseTaskBackend
        from django.tasks.base import TaskError
        from django.tasks.exceptions import (
            InvalidTask,
            InvalidTaskBackend,
            TaskResultDoesNotExist,
        )
        from django.tasks.signals import task_enqueued, task_finished, task_started
        from django.utils.json import normalize_json

        _FRAMEWORK = "django.tasks"
    except ImportError:  # the django-tasks backport
        if importlib.util.find_spec("django_tasks") is None:  # pragma: no cover
            raise ImportError(
                "keyedpool.contrib.django.tasks needs Django 6.0+ (django.tasks) or, "
                "on older Django, the backport: pip install django-tasks"
            ) from None
        from django_tasks.backends.base import BaseTaskBackend
        from django_tasks.base import (
            Task,
            TaskContext,
            TaskError,
            TaskResult,
            TaskResultStatus,
        )
        from django_tasks.exceptions import (
            InvalidTaskBackendError as InvalidTaskBackend,
        )
        from django_tasks.exceptions import InvalidTaskError as InvalidTask
        from django_tasks.exceptions import TaskResultDoesNotExist
        from django_tasks.signals import task_enqueued, task_finished, task_started
        from django_tasks.utils import normalize_json

        _FRAMEWORK = "django_tasks"

__all__ = ["KeyedPoolBackend", "KeyedTask", "keyed_task"]

log = logging.getLogger("keyedpool.django")

_UNSET: Any = object()


@dataclasses.dataclass(frozen=True, kw_only=True)
class KeyedTask(Task):  # type: ignore[misc]
    """The framework's ``Task``, plus where its key comes from.

    ``key_arg``: the name of the task function's argument that holds the key.
    ``key``: a fixed key for every call. Set at most one; with neither, the
    task has no key.
    """

    key_arg: str | None = None
    key: Key | None = None

    def using(
        self,
        *,
        priority: int | None = None,
        queue_name: str | None = None,
        run_after: Any = None,
        backend: str | None = None,
        key: Key | None = _UNSET,
        key_arg: str | None = _UNSET,
        **options: Any,
    ) -> KeyedTask:
        """The framework's ``using()``, which can also set ``key`` or ``key_arg``.

        Setting one of them clears the other. Any other option is passed on to
        the framework's ``using()`` as it is (a newer Django may have more).
        """
        task = Task.using(
            self,
            priority=priority,
            queue_name=queue_name,
            run_after=run_after,
            backend=backend,
            **options,
        )
        if key is not _UNSET and key_arg is not _UNSET:
            raise TypeError("keyedpool: pass key or key_arg, not both")
        if key is not _UNSET:
            return dataclasses.replace(task, key=key, key_arg=None)  # type: ignore[no-any-return]
        if key_arg is not _UNSET:
            return dataclasses.replace(task, key=None, key_arg=key_arg)  # type: ignore[no-any-return]
        return task  # type: ignore[no-any-return]


@overload
def keyed_task(function: Callable[..., Any], /) -> KeyedTask: ...


@overload
def keyed_task(
    *,
    key_arg: str | None = None,
    key: Key | None = None,
    priority: int = 0,
    queue_name: str = "default",
    backend: str = "default",
    takes_context: bool = False,
) -> Callable[[Callable[..., Any]], KeyedTask]: ...


def keyed_task(
    function: Callable[..., Any] | None = None,
    /,
    *,
    key_arg: str | None = None,
    key: Key | None = None,
    priority: int = 0,
    queue_name: str = "default",
    backend: str = "default",
    takes_context: bool = False,
) -> KeyedTask | Callable[[Callable[..., Any]], KeyedTask]:
    """The framework's ``@task`` with the key options spelled out: works on every Django.

    The framework's own ``@task(key_arg="account_id")`` works too on Django 6.1+
    and with the ``django-tasks`` backport, but not on Django 6.0, whose ``@task``
    takes no extra options; and the type stubs of ``django.tasks`` (django-stubs)
    do not accept extra options, so mypy users may prefer
    ``@keyed_task(key_arg="account_id")`` anyway. It also works with other
    backends (e.g. the ``ImmediateBackend`` in a test settings file): they run
    tasks in their own way, so the key options are left out there.
    """
    from_framework = _framework_task()

    def decorate(func: Callable[..., Any]) -> KeyedTask:
        # Django 6.0's @task takes no options beyond its own (6.1 and the backport
        # pass the rest on to the task class): make the task with those, then set the key.
        made: KeyedTask = from_framework(
            func,
            priority=priority,
            queue_name=queue_name,
            backend=backend,
            takes_context=takes_context,
        )
        if isinstance(made, KeyedTask) and (key_arg is not None or key is not None):
            # replace() makes a new task, which the backend checks again, key included.
            made = dataclasses.replace(made, key_arg=key_arg, key=key)
        return made

    if function is not None:
        return decorate(function)
    return decorate


def _framework_task() -> Any:
    return importlib.import_module(_FRAMEWORK).task


class _Results:
    """The results of one backend alias in this process, bounded, shared by all threads."""

    def __init__(self, max_results: int) -> None:
        self.max_results = max_results
        self.lock = threading.Lock()
        self.results: OrderedDict[str, TaskResult] = OrderedDict()

    def add(self, result: TaskResult) -> None:
        with self.lock:
            while len(self.results) >= self.max_results:
                for old_id, old in self.results.items():
                    if old.is_finished:
                        del self.results[old_id]
                        break
                else:
                    self.results.popitem(last=False)
            self.results[result.id] = result

    def snapshot(self, result: TaskResult) -> TaskResult:
        """A copy that later changes do not touch (take it with the lock held)."""
        copy = dataclasses.replace(
            result, errors=list(result.errors), worker_ids=list(result.worker_ids)
        )
        object.__setattr__(copy, "_return_value", result._return_value)
        return copy

    def get(self, result_id: str) -> TaskResult:
        with self.lock:
            result = self.results.get(result_id)
            if result is None:
                raise TaskResultDoesNotExist(result_id)
            return self.snapshot(result)

    def update(self, result: TaskResult, **changes: Any) -> None:
        with self.lock:
            for name, value in changes.items():
                object.__setattr__(result, name, value)


_results_lock = threading.Lock()
_results: dict[tuple[str, int], _Results] = {}


def _results_for(alias: str, max_results: int) -> _Results:
    # Backend objects are per thread (the framework keeps them in a Local), so
    # the results live here, per alias, for every thread of the process.
    with _results_lock:
        store = _results.get((alias, max_results))
        if store is None:
            store = _results[(alias, max_results)] = _Results(max_results)
        return store


def _seconds_until(when: datetime | None) -> float | None:
    # How long a task deferred to *when* (``run_after``) waits from now; None: it does not.
    if when is None:
        return None
    now = datetime.now(dt_timezone.utc) if timezone.is_aware(when) else timezone.now()
    return max(0.0, (when - now).total_seconds())


class KeyedPoolBackend(BaseTaskBackend):  # type: ignore[misc]
    """Runs enqueued tasks on keyedpool's process-wide pool, in order per key."""

    task_class = KeyedTask
    supports_defer = True
    supports_async_task = True
    supports_get_result = True
    supports_priority = False

    def __init__(self, alias: str, params: dict[str, Any]) -> None:
        super().__init__(alias, params)
        options = dict(self.options)
        unknown = sorted(set(options) - {"ENQUEUE_ON_COMMIT", "DATABASE", "MAX_RESULTS"})
        if unknown:
            raise InvalidTaskBackend(
                f"TASKS[{alias!r}]['OPTIONS'] has unknown keys {unknown}; "
                "the keys are ['DATABASE', 'ENQUEUE_ON_COMMIT', 'MAX_RESULTS']"
            )
        self.enqueue_on_commit = bool(options.get("ENQUEUE_ON_COMMIT", True))
        self.database = options.get("DATABASE", DEFAULT_DB_ALIAS)
        if not isinstance(self.database, str):
            raise InvalidTaskBackend(
                f"TASKS[{alias!r}]['OPTIONS']['DATABASE'] must be a database alias (str)"
            )
        max_results = options.get("MAX_RESULTS", 10_000)
        if isinstance(max_results, bool) or not isinstance(max_results, int) or max_results <= 0:
            raise InvalidTaskBackend(
                f"TASKS[{alias!r}]['OPTIONS']['MAX_RESULTS'] must be an int greater than 0, "
                f"not {max_results!r}"
            )
        self._results = _results_for(alias, max_results)

    def validate_task(self, task: Task) -> None:
        """The framework's checks, plus: ``key_arg`` names an argument, ``key`` is a key."""
        super().validate_task(task)
        key = getattr(task, "key", None)
        key_arg = getattr(task, "key_arg", None)
        if key is not None and key_arg is not None:
            raise InvalidTask("keyedpool: a task takes key or key_arg, not both.")
        try:
            check_key(key)
        except TypeError as exc:
            raise InvalidTask(str(exc)) from None
        if key_arg is not None:
            if not isinstance(key_arg, str):
                raise InvalidTask("keyedpool: key_arg must be the name of an argument (a str).")
            parameters = inspect.signature(task.func).parameters
            named = key_arg in parameters and parameters[key_arg].kind not in (
                inspect.Parameter.VAR_POSITIONAL,
                inspect.Parameter.VAR_KEYWORD,
            )
            takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
            if not named and not takes_any:
                raise InvalidTask(
                    f"keyedpool: key_arg={key_arg!r} is not an argument of {task.module_path}."
                )

    def enqueue(self, task: Task, args: Any, kwargs: Any) -> TaskResult:
        """Record a READY result and hand the task to the pool (after commit, in a transaction)."""
        self.validate_task(task)
        result = TaskResult(
            task=task,
            id=get_random_string(32),
            status=TaskResultStatus.READY,
            enqueued_at=None,
            started_at=None,
            last_attempted_at=None,
            finished_at=None,
            args=args,
            kwargs=kwargs,
            backend=self.alias,
            errors=[],
            worker_ids=[],
        )
        key = _task_key(task, result.args, result.kwargs)
        self._results.add(result)
        if self.enqueue_on_commit and _in_transaction(self.database):
            transaction.on_commit(
                functools.partial(self._dispatch, result, key, True), using=self.database
            )
        else:
            self._dispatch(result, key, False)
        with self._results.lock:
            return self._results.snapshot(result)

    def _dispatch(self, result: TaskResult, key: Key | None, committed: bool) -> None:
        self._results.update(result, enqueued_at=timezone.now())
        task_enqueued.send(type(self), task_result=result)
        try:
            _submit_after(_seconds_until(result.task.run_after), key, self._execute, result)
        except Exception as exc:
            self._fail(result, exc)
            task_finished.send(type(self), task_result=result)
            if not committed:
                raise
            log.exception(
                "keyedpool: could not enqueue task %s (id=%s) after commit",
                result.task.module_path,
                result.id,
            )

    def _fail(self, result: TaskResult, exc: BaseException) -> None:
        error = TaskError(
            exception_class_path=f"{type(exc).__module__}.{type(exc).__qualname__}",
            traceback="".join(format_exception(exc)),
        )
        with self._results.lock:
            result.errors.append(error)
            object.__setattr__(result, "finished_at", timezone.now())
            object.__setattr__(result, "status", TaskResultStatus.FAILED)

    def _execute(self, result: TaskResult) -> None:
        # In a worker thread, inside the connection hygiene of submit().
        task = result.task
        now = timezone.now()
        with self._results.lock:
            object.__setattr__(result, "status", TaskResultStatus.RUNNING)
            object.__setattr__(result, "started_at", now)
            object.__setattr__(result, "last_attempted_at", now)
            result.worker_ids.append(threading.current_thread().name)
        task_started.send(type(self), task_result=result)
        try:
            if task.takes_context:
                value = task.call(TaskContext(task_result=result), *result.args, **result.kwargs)
            else:
                value = task.call(*result.args, **result.kwargs)
            value = normalize_json(value)
        except BaseException as exc:  # noqa: BLE001 - recorded in the result, like the framework
            self._fail(result, exc)
            task_finished.send(type(self), task_result=result)
            return
        with self._results.lock:
            object.__setattr__(result, "_return_value", value)
            object.__setattr__(result, "finished_at", timezone.now())
            object.__setattr__(result, "status", TaskResultStatus.SUCCESSFUL)
        task_finished.send(type(self), task_result=result)

    def get_result(self, result_id: str) -> TaskResult:
        """The result *result_id* as it is now (a copy): from any thread of this process."""
        return self._results.get(result_id)


def _task_key(task: Task, args: list[Any], kwargs: dict[str, Any]) -> Key | None:
    """The key of one enqueue: the fixed ``key``, or the value of the ``key_arg`` argument."""
    key = getattr(task, "key", None)
    key_arg = getattr(task, "key_arg", None)
    if key_arg is not None:
        signature = inspect.signature(task.func)
        call_args = [None, *args] if task.takes_context else args
        try:
            bound = signature.bind(*call_args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"{task.module_path}: {exc}") from None
        bound.apply_defaults()
        if key_arg in bound.arguments:
            key = bound.arguments[key_arg]
        else:  # taken by **kwargs
            extra: dict[str, Any] = next(
                (
                    bound.arguments[p.name]
                    for p in signature.parameters.values()
                    if p.kind is inspect.Parameter.VAR_KEYWORD
                ),
                {},
            )
            if key_arg not in extra:
                raise TypeError(
                    f"{task.module_path}: the key argument {key_arg!r} (key_arg) is missing"
                )
            key = extra[key_arg]
    try:
        check_key(key)
    except TypeError as exc:
        where = f" (argument {key_arg!r})" if key_arg is not None else ""
        raise TypeError(f"{task.module_path}: the key{where}: {exc}") from None
    return key


def _after_fork_in_child() -> None:
    # The parent's tasks never run in a forked child: forget their results.
    global _results_lock
    _results_lock = threading.Lock()
    for store in _results.values():
        store.lock = threading.Lock()
        store.results = OrderedDict()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
