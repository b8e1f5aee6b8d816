"""keyedpool.contrib.django: submit, submit_on_commit, connection hygiene (SQLite, PostgreSQL)."""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.db import connections, transaction
from django.test import override_settings
from kp_project.ledger.models import Entry

from keyedpool.contrib.django import get_pool, shutdown, submit, submit_on_commit

WAIT = 30  # upper bound only: turns a hang into a failure


def _post(alias: str, account: str, seq: int) -> int:
    Entry.objects.using(alias).create(account=account, seq=seq)
    return seq


def _sequences(alias: str) -> dict[str, list[int]]:
    """Each account's seq values in the order their rows were written."""
    seen: dict[str, list[int]] = {}
    for account, seq in Entry.objects.using(alias).order_by("id").values_list("account", "seq"):
        seen.setdefault(account, []).append(seq)
    return seen


def test_order_per_key(db: str) -> None:
    """Each account's rows are written in submit order, accounts interleaved."""
    gate = threading.Event()
    accounts = [f"acct-{n}" for n in range(6)]
    # Hold the first task of every account, so that the rest pile up behind it.
    futures: list[Future[Any]] = [submit(a, gate.wait, WAIT) for a in accounts]
    for seq in range(40):
        for account in accounts:
            futures.append(submit(account, _post, db, account, seq))
    assert Entry.objects.using(db).count() == 0  # all held behind the gates
    gate.set()
    for future in futures:
        future.result(WAIT)
    assert _sequences(db) == {a: list(range(40)) for a in accounts}


def test_submit_on_commit_waits_for_commit(db: str) -> None:
    seen: list[bool] = []
    done = threading.Event()

    def check(order_id: int) -> None:
        # Runs after the commit: the row the transaction wrote is visible.
        seen.append(Entry.objects.using(db).filter(pk=order_id).exists())
        done.set()

    with transaction.atomic(using=db):
        order = Entry.objects.using(db).create(account="acct-1", seq=1)
        submit_on_commit("acct-1", check, order.pk, using=db)
        assert get_pool().stats().submitted == 0  # nothing handed to the pool yet
    assert done.wait(WAIT)
    assert seen == [True]
    assert get_pool().stats().submitted == 1


def test_rollback_runs_nothing(db: str) -> None:
    ran: list[str] = []

    class Boom(Exception):
        pass

    with pytest.raises(Boom), transaction.atomic(using=db):
        Entry.objects.using(db).create(account="acct-1", seq=1)
        submit_on_commit("acct-1", ran.append, "rolled back", using=db)
        raise Boom
    # A later task of the same key runs after anything submitted before it,
    # so once it is done, the rolled-back task would have run too.
    submit("acct-1", ran.append, "later").result(WAIT)
    assert ran == ["later"]
    assert get_pool().stats().submitted == 1
    assert Entry.objects.using(db).count() == 0


def test_savepoint_rollback_drops_only_its_tasks(db: str) -> None:
    ran: list[str] = []
    with transaction.atomic(using=db):
        submit_on_commit("k", ran.append, "outer", using=db)
        try:
            with transaction.atomic(using=db):
                submit_on_commit("k", ran.append, "inner", using=db)
                raise RuntimeError("roll back the savepoint")
        except RuntimeError:
            pass
        submit_on_commit("k", ran.append, "after", using=db)
    submit("k", ran.append, "marker").result(WAIT)
    assert ran == ["outer", "after", "marker"]


def test_on_commit_keeps_order_within_and_across_transactions(db: str) -> None:
    for batch in range(5):
        with transaction.atomic(using=db):
            for seq in range(batch * 10, batch * 10 + 10):
                submit_on_commit("acct-7", _post, db, "acct-7", seq, using=db)
    submit("acct-7", lambda: None).result(WAIT)
    assert _sequences(db) == {"acct-7": list(range(50))}


def test_submit_on_commit_outside_a_transaction_submits_at_once(db: str) -> None:
    submit_on_commit("acct-1", _post, db, "acct-1", 1, using=db)
    assert get_pool().stats().submitted == 1
    submit("acct-1", lambda: None).result(WAIT)
    assert _sequences(db) == {"acct-1": [1]}


def test_submit_on_commit_from_a_plain_thread_opens_no_connection(db: str) -> None:
    """A producer thread that never touched the database must not be left holding a
    connection just because it asked whether it is in a transaction."""
    ran: list[str] = []
    left_open: list[bool] = []

    def producer() -> None:
        try:
            submit_on_commit("k", ran.append, "from a thread", using=db)
            left_open.append(connections[db].connection is not None)
        finally:
            connections.close_all()

    thread = threading.Thread(target=producer)
    thread.start()
    thread.join(WAIT)
    assert left_open == [False]
    submit("k", lambda: None).result(WAIT)
    assert ran == ["from a thread"]  # outside a transaction: submitted at once


def test_submit_on_commit_from_async_code(db: str) -> None:
    """In an event loop Django refuses to connect (SynchronousOnlyOperation): asking
    about the transaction must not try, with or without an open connection."""
    ran: list[str] = []

    async def handler(n: int) -> None:
        submit_on_commit("k", ran.append, f"async {n}", using=db)

    errors: list[BaseException] = []

    def in_a_fresh_thread() -> None:
        try:
            asyncio.run(handler(1))  # this thread has no connection
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)
        finally:
            connections.close_all()

    thread = threading.Thread(target=in_a_fresh_thread)
    thread.start()
    thread.join(WAIT)
    assert errors == []
    connections[db].ensure_connection()  # this thread has an open connection
    asyncio.run(handler(2))
    submit("k", lambda: None).result(WAIT)
    assert ran == ["async 1", "async 2"]


def test_shutdown_is_final_until_the_setting_changes(sqlite_db: str) -> None:
    pool = get_pool()
    shutdown()
    assert get_pool() is pool  # no new pool behind the caller's back
    with pytest.raises(RuntimeError, match="shutdown"):
        submit("k", print)
    with pytest.raises(RuntimeError, match="shutdown"):
        submit_on_commit("k", print)  # outside a transaction: at once, so raised here
    with override_settings(KEYEDPOOL={"MAX_WORKERS": 2}):  # a new setting: a new pool
        assert get_pool() is not pool
        assert submit("k", int, "7").result(WAIT) == 7


def test_bad_key_is_refused_before_the_commit(sqlite_db: str) -> None:
    with transaction.atomic():
        with pytest.raises(TypeError, match="a key must be"):
            submit_on_commit(1.5, print)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="fn must be callable"):
            submit_on_commit("k", "print")  # type: ignore[arg-type]
    assert get_pool().stats().submitted == 0


def _raw_connection(alias: str) -> Any:
    conn = connections[alias]
    conn.ensure_connection()
    return conn.connection


@pytest.mark.parametrize("conn_max_age", [(0, False)], indirect=True)
def test_each_task_gets_a_fresh_connection_with_conn_max_age_0(db: str, conn_max_age: None) -> None:
    """close_old_connections() after each task: like a request, CONN_MAX_AGE=0 closes it."""
    raws = [submit("same-key", _raw_connection, db).result(WAIT) for _ in range(3)]
    assert raws[0] is not raws[1] and raws[1] is not raws[2]


@pytest.mark.parametrize("conn_max_age", [(None, False)], indirect=True)
def test_persistent_connection_is_reused_then_closed_at_shutdown(
    db: str, conn_max_age: None
) -> None:
    raws = [submit("same-key", _raw_connection, db).result(WAIT) for _ in range(3)]
    assert raws[0] is raws[1] is raws[2]  # one worker, one persistent connection
    shutdown(wait=True)
    # The worker thread has ended and its connection was closed for it.
    assert _is_closed(db, raws[0])


def _is_closed(alias: str, raw: Any) -> bool:
    if connections[alias].vendor == "sqlite":
        import sqlite3

        try:
            raw.execute("SELECT 1")
        except sqlite3.ProgrammingError:
            return True
        return False
    return bool(raw.closed)


def test_contextvars_reach_the_task(sqlite_db: str) -> None:
    request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id")
    request_id.set("req-42")
    assert submit(None, request_id.get).result(WAIT) == "req-42"


def test_pool_is_created_lazily_once_and_follows_the_setting(sqlite_db: str) -> None:
    shutdown()
    with override_settings(KEYEDPOOL={"MAX_WORKERS": 3, "THREAD_NAME_PREFIX": "kp-three"}):
        pool = get_pool()
        assert get_pool() is pool  # once per process
        assert pool.max_workers == 3
        assert not [t for t in threading.enumerate() if t.name.startswith("kp-three")]
        name = submit("k", lambda: threading.current_thread().name).result(WAIT)
        assert name.startswith("kp-three_")
    assert get_pool().max_workers == 4  # back to the project's setting


def test_routing_follows_the_setting(sqlite_db: str) -> None:
    assert get_pool().routing == "affinity"  # the default
    with override_settings(KEYEDPOOL={"MAX_WORKERS": 2, "ROUTING": "hash"}):
        assert get_pool().routing == "hash"
        assert get_pool().worker_index("k") in (0, 1)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"MAX_WORKERS": 0}, "MAX_WORKERS"),
        ({"MAX_WORKERS": "8"}, "MAX_WORKERS"),
        ({"ON_FULL": "drop"}, "ON_FULL"),
        ({"FULL_TIMEOUT": -1}, "FULL_TIMEOUT"),
        ({"ROUTING": "fast"}, "ROUTING"),
        ({"SLOW_TASK_WARNING": -1}, "SLOW_TASK_WARNING"),
        ({"WORKERS": 8}, "unknown keys"),
        (["MAX_WORKERS", 8], "must be a dict"),
    ],
)
def test_bad_setting_is_reported(sqlite_db: str, setting: object, message: str) -> None:
    with override_settings(KEYEDPOOL=setting), pytest.raises(ImproperlyConfigured, match=message):
        get_pool()


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: submit(1.5, print), "a key must be"),  # type: ignore[arg-type]
        (lambda: submit("k", "print"), "fn must be callable"),  # type: ignore[arg-type]
        (lambda: submit(print, "k"), "key"),  # type: ignore[arg-type]
        (lambda: submit_on_commit("k", None), "fn must be callable"),  # type: ignore[arg-type]
    ],
)
def test_bad_input_is_a_type_error(
    sqlite_db: str, call: Callable[[], object], message: str
) -> None:
    with pytest.raises(TypeError, match=message):
        call()


def test_failed_submit_after_commit_is_logged_and_other_callbacks_run(
    sqlite_db: str, caplog: pytest.LogCaptureFixture
) -> None:
    ran: list[str] = []
    with override_settings(KEYEDPOOL={"MAX_WORKERS": 1, "MAX_PENDING": 1, "ON_FULL": "raise"}):
        gate = threading.Event()
        blocker = submit("k", gate.wait, WAIT)  # the pool is now full
        with transaction.atomic():
            submit_on_commit("k", ran.append, "refused")
            transaction.on_commit(lambda: ran.append("other callback"))
        gate.set()
        blocker.result(WAIT)
    assert ran == ["other callback"]
    assert "could not submit" in caplog.text
