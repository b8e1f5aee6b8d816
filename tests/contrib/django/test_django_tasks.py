"""The Tasks framework backend: django.tasks on Django 6.0+, the django-tasks backport before."""

from __future__ import annotations

import threading
import time
import uuid
from datetime import datetime, timedelta
from typing import Any

import django
import pytest
from django.db import transaction
from django.utils import timezone
from kp_project.ledger import tasks
from kp_project.ledger.models import Entry

from keyedpool.contrib.django import get_pool, shutdown
from keyedpool.contrib.django.tasks import KeyedPoolBackend, KeyedTask, keyed_task

if django.VERSION >= (6, 0):
    from django.tasks import Task, TaskResultStatus, task, task_backends
    from django.tasks.exceptions import InvalidTask, InvalidTaskBackend, TaskResultDoesNotExist
else:  # the django-tasks backport; one import per line, for the type checker
    from django_tasks import TaskResultStatus, task, task_backends  # type: ignore[assignment,no-redef,import-not-found]
    from django_tasks.base import Task  # type: ignore[assignment,no-redef,import-not-found]
    from django_tasks.exceptions import InvalidTaskBackendError as InvalidTaskBackend  # type: ignore[assignment,no-redef,import-not-found]
    from django_tasks.exceptions import InvalidTaskError as InvalidTask  # type: ignore[assignment,no-redef,import-not-found]
    from django_tasks.exceptions import TaskResultDoesNotExist  # type: ignore[assignment,no-redef,import-not-found]

WAIT = 30


def _gate() -> str:
    name = uuid.uuid4().hex
    tasks.GATES[name].clear()
    return name


def test_backend_is_in_use() -> None:
    assert isinstance(task_backends["default"], KeyedPoolBackend)
    assert isinstance(tasks.post_entry, KeyedTask)
    assert tasks.post_entry.key_arg == "account"


def test_the_readme_status_view_pattern(db: str) -> None:
    # The Django guide's views (docs/django.md): enqueue, answer with the id; a later request looks
    # the result up by id and reads return_value only once it succeeded.
    gate = _gate()
    backend_alias = "pg" if db == "pg" else "default"
    tasks.gated_entry.using(backend=backend_alias).enqueue("r", -1, gate, database=db)
    post = tasks.post_entry.using(backend=backend_alias)
    result_id = post.enqueue("r", 7, database=db).id
    waiting = post.get_result(result_id)
    assert waiting.status == TaskResultStatus.READY  # behind the gated task of its key
    with pytest.raises(ValueError):
        waiting.return_value  # noqa: B018
    tasks.GATES[gate].set()
    shutdown(wait=True)
    done = post.get_result(result_id)
    assert done.status == TaskResultStatus.SUCCESSFUL and done.return_value == 7


def test_order_per_key_and_results(db: str) -> None:
    gate = _gate()
    backend_alias = "pg" if db == "pg" else "default"
    accounts = ["a", "b", "c"]
    held = [
        tasks.gated_entry.using(backend=backend_alias).enqueue(a, -1, gate, database=db)
        for a in accounts
    ]
    results = []
    for seq in range(30):
        for account in accounts:
            post = tasks.post_entry.using(backend=backend_alias)
            results.append(post.enqueue(account, seq, database=db))
    assert Entry.objects.using(db).count() == 0  # everything waits behind the gates
    held[0].refresh()
    assert not held[0].is_finished
    tasks.GATES[gate].set()
    shutdown(wait=True)  # waits for every task

    rows = Entry.objects.using(db).order_by("id").values_list("account", "seq")
    per_account: dict[str, list[int]] = {}
    for account, seq in rows:
        per_account.setdefault(account, []).append(seq)
    assert per_account == {a: [-1, *range(30)] for a in accounts}
    for result in results:
        result.refresh()
        assert result.status == TaskResultStatus.SUCCESSFUL
        assert result.return_value == result.args[1]
        assert result.enqueued_at is not None and result.finished_at is not None
        assert result.worker_ids and result.worker_ids[0].startswith("kp-test_")


def test_enqueue_in_a_transaction_waits_for_commit(sqlite_db: str) -> None:
    pool = get_pool()
    with transaction.atomic():
        result = tasks.post_entry.enqueue("acct-1", 1)
        result.refresh()
        assert result.status == TaskResultStatus.READY
        assert result.enqueued_at is None  # not handed to the pool before the commit
        assert pool.stats().submitted == 0
    shutdown(wait=True)
    assert pool.stats().submitted == 1
    result.refresh()
    assert result.status == TaskResultStatus.SUCCESSFUL
    assert list(Entry.objects.values_list("account", "seq")) == [("acct-1", 1)]


def test_enqueue_in_a_rolled_back_transaction_never_runs(sqlite_db: str) -> None:
    pool = get_pool()
    with pytest.raises(ZeroDivisionError), transaction.atomic():
        result = tasks.post_entry.enqueue("acct-1", 1)
        1 / 0  # noqa: B018
    shutdown(wait=True)
    result.refresh()
    assert result.status == TaskResultStatus.READY
    assert pool.stats().submitted == 0
    assert not Entry.objects.exists()


def test_failure_is_recorded(sqlite_db: str) -> None:
    result = tasks.fail.enqueue("acct-9")
    shutdown(wait=True)
    result.refresh()
    assert result.status == TaskResultStatus.FAILED
    assert result.errors[0].exception_class is ValueError
    assert "no ledger for acct-9" in result.errors[0].traceback
    with pytest.raises(ValueError, match="failed"):
        result.return_value  # noqa: B018


def test_a_deferred_task_runs_after_run_after_and_holds_its_key(sqlite_db: str) -> None:
    # run_after: the task waits (without a worker); its key's later task waits
    # behind it, and another key runs meanwhile.
    assert task_backends["default"].supports_defer
    when = timezone.now() + timedelta(seconds=0.3)
    deferred = tasks.post_entry.using(run_after=when).enqueue("deferred", 1)
    behind = tasks.post_entry.enqueue("deferred", 2)
    other = tasks.post_entry.enqueue("other", 3)
    deadline = time.monotonic() + WAIT
    while True:
        other.refresh()
        if other.is_finished or time.monotonic() > deadline:
            break
        time.sleep(0.005)
    assert other.status == TaskResultStatus.SUCCESSFUL
    deferred.refresh()
    behind.refresh()
    if timezone.now() < when:  # (on a loaded machine the time may have come already)
        assert (deferred.status, behind.status) == (TaskResultStatus.READY,) * 2
    shutdown(wait=True)  # waits for the deferred task: it was accepted
    for result in (deferred, behind):
        result.refresh()
        assert result.status == TaskResultStatus.SUCCESSFUL, result.errors
    assert deferred.started_at is not None and deferred.started_at >= when
    assert list(
        Entry.objects.filter(account="deferred").order_by("id").values_list("seq", flat=True)
    ) == [1, 2]


def test_run_after_must_be_aware(sqlite_db: str) -> None:
    with pytest.raises(InvalidTask, match="aware"):
        tasks.post_entry.using(run_after=datetime.now()).enqueue("acct", 1)  # noqa: DTZ005


def test_context_fixed_key_async_and_kwargs_tasks(sqlite_db: str) -> None:
    ctx = tasks.with_context.enqueue("acct-2")
    audits = [tasks.audit.enqueue(n) for n in range(5)]
    doubled = tasks.async_entry.enqueue("acct-3", 21)
    kw = tasks.by_kwargs.enqueue(account="acct-4", other=1)
    fixed = tasks.post_entry.using(key="one-line").enqueue("acct-5", 5)
    assert fixed.task.key == "one-line" and fixed.task.key_arg is None
    shutdown(wait=True)
    for result in (ctx, *audits, doubled, kw, fixed):
        result.refresh()
        assert result.status == TaskResultStatus.SUCCESSFUL, result.errors
    assert ctx.return_value == {"id": ctx.id, "attempt": 1, "account": "acct-2"}
    # key="audit": all five ran on one worker, in order.
    assert len({r.return_value for r in audits}) == 1
    assert list(Entry.objects.filter(account="audit").values_list("seq", flat=True)) == [
        0,
        1,
        2,
        3,
        4,
    ]
    assert doubled.return_value == 42
    assert kw.return_value == "acct-4"


def test_results_are_readable_from_any_thread(sqlite_db: str) -> None:
    result = tasks.post_entry.enqueue("acct-1", 7)
    shutdown(wait=True)
    seen: list[object] = []
    reader = threading.Thread(
        target=lambda: seen.append(tasks.post_entry.get_result(result.id).return_value)
    )
    reader.start()
    reader.join(WAIT)
    assert seen == [7]
    assert task_backends["default"].get_result(result.id).status == TaskResultStatus.SUCCESSFUL
    with pytest.raises(TaskResultDoesNotExist):
        task_backends["default"].get_result("no-such-id")


def test_results_are_bounded(sqlite_db: str) -> None:
    results = [tasks.small.enqueue("acct-1", n) for n in range(5)]
    shutdown(wait=True)
    for gone in results[:2]:
        with pytest.raises(TaskResultDoesNotExist):
            gone.refresh()
    for kept in results[2:]:
        kept.refresh()
        assert kept.return_value == kept.args[1]


def test_bad_key_options_are_refused(sqlite_db: str) -> None:
    with pytest.raises(InvalidTask, match="not an argument"):
        keyed_task(key_arg="customer")(tasks.plain)
    with pytest.raises(InvalidTask, match="key or key_arg"):
        keyed_task(key_arg="account", key="x")(tasks.plain)
    with pytest.raises(InvalidTask, match="key must be"):
        keyed_task(key=1.5)(tasks.plain)  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="not both"):
        tasks.post_entry.using(key="x", key_arg="account")


@pytest.mark.skipif(
    not tasks.FRAMEWORK_TASK_TAKES_KEY, reason="Django 6.0's @task takes no extra options"
)
def test_the_frameworks_own_task_takes_the_key_options(sqlite_db: str) -> None:
    made = task(key="x")(tasks.plain)  # type: ignore[call-overload]
    assert isinstance(made, KeyedTask) and (made.key, made.key_arg) == ("x", None)
    with pytest.raises(InvalidTask, match="not an argument"):
        task(key_arg="customer")(tasks.plain)  # type: ignore[call-overload]
    with pytest.raises(InvalidTask, match="key or key_arg"):
        task(key_arg="account", key="x")(tasks.plain)  # type: ignore[call-overload]


@pytest.mark.skipif(tasks.FRAMEWORK_TASK_TAKES_KEY, reason="only Django 6.0's @task")
def test_django_6_0s_task_takes_no_key_options(sqlite_db: str) -> None:
    # As docs/django.md says: on Django 6.0 only keyed_task sets the key options.
    with pytest.raises(TypeError, match="unexpected keyword argument 'key_arg'"):
        task(key_arg="account")(tasks.plain)  # type: ignore[call-overload]


def test_bad_key_value_is_refused_at_enqueue(sqlite_db: str) -> None:
    with pytest.raises(TypeError, match="must be str, bytes, int or None, not float"):
        tasks.post_entry.enqueue(1.5, 1)
    with pytest.raises(TypeError, match="seq"):
        tasks.post_entry.enqueue("acct-1")  # missing argument, said at enqueue


def test_bad_backend_options_are_refused(sqlite_db: str) -> None:
    with pytest.raises(InvalidTaskBackend, match="unknown keys"):
        KeyedPoolBackend("x", {"OPTIONS": {"RESULTS": 1}})
    with pytest.raises(InvalidTaskBackend, match="MAX_RESULTS"):
        KeyedPoolBackend("x", {"OPTIONS": {"MAX_RESULTS": 0}})


def test_keyed_task_on_this_and_on_other_backends(sqlite_db: str) -> None:
    # On every Django, 6.0 included (whose @task takes no extra options).
    made = keyed_task(key_arg="account")(tasks.plain)
    assert isinstance(made, KeyedTask) and (made.key_arg, made.key) == ("account", None)
    fixed = keyed_task(key="audit", backend="small")(tasks.plain)
    assert (fixed.key, fixed.key_arg, fixed.backend) == ("audit", None, "small")
    bare = keyed_task(tasks.plain)
    assert isinstance(bare, KeyedTask) and (bare.key, bare.key_arg) == (None, None)
    # Another backend (as in a test settings file): the key options are left out.
    elsewhere = keyed_task(key_arg="account", backend="immediate")(tasks.echo)
    assert not isinstance(elsewhere, KeyedTask)
    assert elsewhere.enqueue("acct-1").return_value == "acct-1"  # ran immediately
    with pytest.raises(InvalidTaskBackend):
        keyed_task(backend="no-such-backend")(tasks.plain)


def test_using_passes_options_it_does_not_know_to_the_framework() -> None:
    # So a newer Django's extra using() options keep working: an option that
    # this Django does not have is refused by the framework's own using().
    with pytest.raises(TypeError, match=r"^Task\.using\(\) got an unexpected keyword argument"):
        tasks.gated_entry.using(not_an_option=1)
    moved = tasks.gated_entry.using(key="audit", queue_name="default")
    assert (moved.key, moved.key_arg, moved.queue_name) == ("audit", None, "default")


def test_using_passes_a_newer_djangos_options_on(monkeypatch: pytest.MonkeyPatch) -> None:
    # A newer Django's Task.using() may take more options (say, metadata=): KeyedTask.using()
    # gives them to it, and still sets the key.
    given: list[object] = []
    this_djangos_using = Task.using

    def newer_using(self: Any, *, metadata: object = None, **options: Any) -> Any:
        given.append(metadata)
        return this_djangos_using(self, **options)

    monkeypatch.setattr(Task, "using", newer_using)
    moved = tasks.post_entry.using(metadata={"source": "api"}, key="audit", backend="small")
    assert given == [{"source": "api"}]
    assert isinstance(moved, KeyedTask)
    assert (moved.key, moved.key_arg, moved.backend) == ("audit", None, "small")
