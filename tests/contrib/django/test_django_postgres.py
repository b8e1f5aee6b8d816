"""Connection hygiene against a real PostgreSQL: the server's own count of connections.

``pg_stat_activity`` is read by the tasks themselves, so the count is sampled
all through the run, not only at the end.
"""

from __future__ import annotations

from collections.abc import Iterable

import pytest
from _util import wait_until
from django.conf import settings
from django.db import OperationalError, connections
from django.test import override_settings

from keyedpool.contrib.django import get_pool, shutdown, submit

pytestmark = pytest.mark.postgresql

WAIT = 30  # upper bound only: turns a hang into a failure
ALIAS = "pg"
COUNT = "SELECT count(*), pg_backend_pid() FROM pg_stat_activity WHERE datname = current_database()"


def _count_and_pid() -> tuple[int, int]:
    with connections[ALIAS].cursor() as cursor:
        cursor.execute(COUNT)
        count, pid = cursor.fetchone()
    return int(count), int(pid)


def _live_pids(pids: Iterable[int]) -> set[int]:
    with connections[ALIAS].cursor() as cursor:
        cursor.execute("SELECT pid FROM pg_stat_activity WHERE pid = ANY(%s)", [list(pids)])
        return {row[0] for row in cursor.fetchall()}


def _wait_until_gone(pids: set[int]) -> set[int]:
    """Backends exit a moment after their client hangs up, and PostgreSQL has no
    notification for it: wait (bounded) until the server no longer lists them."""
    wait_until(lambda: not _live_pids(pids))
    return _live_pids(pids)


def _wait_for_count(expected: int) -> None:
    wait_until(lambda: _count_and_pid()[0] == expected)


def _keys_one_per_worker() -> list[int]:
    pool = get_pool()
    keys: dict[int, int] = {}
    candidate = 0
    while len(keys) < pool.max_workers:
        keys.setdefault(pool.worker_index(candidate), candidate)
        candidate += 1
    return list(keys.values())


@pytest.mark.parametrize("conn_max_age", [(None, False)], indirect=True)
def test_5000_tasks_use_at_most_one_connection_per_worker(
    pg_ready: str, conn_max_age: None
) -> None:
    workers = get_pool().max_workers
    _wait_for_count(1)  # earlier tests' connections have gone: only the test's own is left
    own_pid = _count_and_pid()[1]
    futures = [submit(f"acct-{n % 97}", _count_and_pid) for n in range(5000)]
    samples = [f.result(WAIT) for f in futures]
    counts = [count for count, _ in samples]
    pids = {pid for _, pid in samples}
    assert max(counts) <= workers + 1  # + the test's own connection
    assert len(pids) <= workers
    assert own_pid not in pids
    shutdown(wait=True)
    # The stopped workers closed their connections: the server lets them go.
    assert _wait_until_gone(pids) == set()
    _wait_for_count(1)


@pytest.mark.parametrize("conn_max_age", [(0, False)], indirect=True)
def test_conn_max_age_0_closes_the_connection_after_each_task(
    pg_ready: str, conn_max_age: None
) -> None:
    key = "acct-1"
    samples = [submit(key, _count_and_pid).result(WAIT) for _ in range(20)]
    pids = [pid for _, pid in samples]
    assert len(set(pids)) == len(pids)  # a new connection (backend) every time
    assert _wait_until_gone(set(pids)) == set()  # and none left open


@pytest.mark.parametrize(
    "conn_max_age", [(None, True), (None, False)], indirect=True, ids=["health-checks", "no-checks"]
)
def test_broken_connections_are_replaced(pg_ready: str, conn_max_age: None) -> None:
    # Each key must come back to the worker whose connection was killed: a
    # fixed worker per key, routing="hash" (a new setting gives a new pool).
    with override_settings(KEYEDPOOL={**settings.KEYEDPOOL, "ROUTING": "hash"}):
        _broken_connections_are_replaced()


def _broken_connections_are_replaced() -> None:
    keys = _keys_one_per_worker()
    before = {key: submit(key, _count_and_pid).result(WAIT)[1] for key in keys}
    with connections[ALIAS].cursor() as cursor:
        for pid in before.values():
            cursor.execute("SELECT pg_terminate_backend(%s)", [pid])
    assert _wait_until_gone(set(before.values())) == set()

    health_checks = connections.settings[ALIAS]["CONN_HEALTH_CHECKS"]
    for key in keys:
        first = submit(key, _count_and_pid)
        if health_checks:
            # Django checks the connection before first use in each task: no error.
            assert first.result(WAIT)[1] != before[key]
        else:
            # The task that meets the dead connection fails, and the connection
            # is dropped after it, so the next task of that worker gets a new one.
            with pytest.raises(OperationalError):
                first.result(WAIT)
        second = submit(key, _count_and_pid).result(WAIT)
        assert second[1] != before[key]
