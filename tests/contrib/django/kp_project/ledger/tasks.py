"""Tasks for Django's Tasks framework, run by keyedpool's backend in the tests.

The framework wants module-level functions. ``GATES`` lets a test hold a task
until it says so.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from typing import Any

import django

from keyedpool.contrib.django.tasks import keyed_task

if django.VERSION >= (6, 0):
    from django.tasks import task
else:
    from django_tasks import task  # type: ignore[no-redef,import-not-found]

from .models import Entry

#: name -> Event; gated() waits on GATES[name] (at most 30 s, then fails).
GATES: defaultdict[str, threading.Event] = defaultdict(threading.Event)

#: Whether the framework's own @task takes key_arg: not on Django 6.0, whose @task takes
#: no options beyond its own (6.1 and the backport pass them on to the task class).
FRAMEWORK_TASK_TAKES_KEY = not (6, 0) <= django.VERSION < (6, 1)
# post_entry is made by the framework's own @task wherever it can be.
task_with_key: Any = task if FRAMEWORK_TASK_TAKES_KEY else keyed_task


@task_with_key(key_arg="account")
def post_entry(account: str, seq: int, database: str = "default") -> int:
    """Write one ledger line; the account is the key."""
    Entry.objects.using(database).create(account=account, seq=seq)
    return seq


@keyed_task(key_arg="account")
def gated_entry(account: str, seq: int, gate: str, database: str = "default") -> int:
    """Wait for the test to open GATES[gate], then write one ledger line."""
    if not GATES[gate].wait(30):
        raise TimeoutError(f"gate {gate!r} was never opened")
    Entry.objects.using(database).create(account=account, seq=seq)
    return seq


@keyed_task(key="audit")
def audit(seq: int) -> str:
    """A task with a fixed key: every call is in one line."""
    Entry.objects.create(account="audit", seq=seq)
    return threading.current_thread().name


@keyed_task(takes_context=True, key_arg="account")
def with_context(context: Any, account: str) -> dict[str, Any]:
    """Return what the framework's context says about this run."""
    return {"id": context.task_result.id, "attempt": context.attempt, "account": account}


@keyed_task(key_arg="account")
def fail(account: str) -> None:
    """Always raises."""
    raise ValueError(f"no ledger for {account}")


@keyed_task(key_arg="account")
async def async_entry(account: str, seq: int) -> int:
    """A coroutine task: the framework runs it with async_to_sync."""
    return seq * 2


@keyed_task(key_arg="account", backend="small")
def small(account: str, seq: int) -> int:
    """On the backend that keeps 3 results."""
    return seq


@keyed_task(key_arg="account")
def by_kwargs(**fields: Any) -> str:
    """key_arg may name a keyword collected by **kwargs."""
    return str(fields["account"])


def plain(account: str) -> None:
    """Not a task: tests decorate it with bad options."""


def echo(account: str) -> str:
    """Not a task: a test decorates it for another backend."""
    return account
