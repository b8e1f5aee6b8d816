"""Set up the test project (kp_project) and its databases: SQLite, and PostgreSQL if present.

Background tasks run in other threads with their own connections, so these
tests use real, committed transactions (never a test-wide transaction that is
rolled back): each test starts from empty tables and ends with the pool
replaced (see ``restart_pool``), which waits for every task and closes the
workers' connections.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("django", reason="Django is not installed: pip install keyedpool[django]")

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "kp_project.settings")

import django  # noqa: E402

if django.VERSION < (6, 0):
    pytest.importorskip(
        "django_tasks", reason="on Django < 6.0 the Tasks backend needs: pip install django-tasks"
    )

django.setup()

from django.conf import settings  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.db import connections  # noqa: E402
from django.test import override_settings  # noqa: E402

if settings.SETTINGS_MODULE != "kp_project.settings":  # pragma: no cover
    pytest.skip(
        f"Django is already configured with {settings.SETTINGS_MODULE}, not the test project",
        allow_module_level=True,
    )


def restart_pool() -> None:
    """Stop the process's pool (waiting for its tasks, closing its connections), and
    let the next submit make a new one.

    ``shutdown()`` is final; changing the ``KEYEDPOOL`` setting replaces the pool,
    as documented, so "change" it to its own value.
    """
    with override_settings(KEYEDPOOL=settings.KEYEDPOOL):
        pass


@pytest.fixture(autouse=True)
def _database_access(request: pytest.FixtureRequest) -> Iterator[None]:
    with _unblocked(request):
        yield


@pytest.fixture(scope="session")
def sqlite_ready(request: pytest.FixtureRequest) -> Iterator[str]:
    with _unblocked(request):
        call_command("migrate", database="default", verbosity=0)
    yield "default"
    connections.close_all()


def pytest_sessionfinish(session: pytest.Session) -> None:
    shutil.rmtree(os.path.dirname(settings.DATABASES["default"]["NAME"]), ignore_errors=True)


@pytest.fixture(scope="session")
def pg_ready(request: pytest.FixtureRequest, postgres_server: Any) -> Iterator[str]:
    psycopg = pytest.importorskip("psycopg", reason="psycopg is not installed: pip install psycopg")
    server = postgres_server
    with psycopg.connect(server.dsn(), autocommit=True) as conn:
        conn.execute("CREATE DATABASE keyedpool_test")
    settings.DATABASES["pg"]["PORT"] = str(server.port)
    assert connections.settings["pg"]["PORT"] == str(server.port)
    with _unblocked(request):
        call_command("migrate", database="pg", verbosity=0)
    yield "pg"
    connections.close_all()


@contextlib.contextmanager
def _unblocked(request: pytest.FixtureRequest) -> Iterator[None]:
    # If pytest-django is installed it blocks database access outside its own
    # fixtures; these tests manage their databases themselves.
    if request.config.pluginmanager.hasplugin("django"):
        with request.getfixturevalue("django_db_blocker").unblock():
            yield
    else:
        yield


@pytest.fixture(
    params=["default", pytest.param("pg", marks=pytest.mark.postgresql)],
    ids=["sqlite", "postgresql"],
)
def db(request: pytest.FixtureRequest) -> Iterator[str]:
    """The alias of a migrated, empty database: SQLite, then PostgreSQL."""
    alias = request.getfixturevalue("sqlite_ready" if request.param == "default" else "pg_ready")
    from kp_project.ledger.models import Entry

    Entry.objects.using(alias).all().delete()
    yield alias
    restart_pool()
    connections.close_all()


@pytest.fixture
def sqlite_db(sqlite_ready: str) -> Iterator[str]:
    """Only SQLite: for tests about the framework rather than the database."""
    from kp_project.ledger.models import Entry

    Entry.objects.all().delete()
    yield sqlite_ready
    restart_pool()
    connections.close_all()


@pytest.fixture
def conn_max_age(request: pytest.FixtureRequest) -> Iterator[None]:
    """Set CONN_MAX_AGE (and CONN_HEALTH_CHECKS) of every alias for one test.

    Use with ``@pytest.mark.parametrize("conn_max_age", [...], indirect=True)``;
    the value is ``(max_age, health_checks)``.
    """
    max_age, health = request.param
    saved = {
        alias: (conf.get("CONN_MAX_AGE", 0), conf.get("CONN_HEALTH_CHECKS", False))
        for alias, conf in settings.DATABASES.items()
    }
    restart_pool()  # new worker threads pick up the new settings
    for conf in settings.DATABASES.values():
        conf["CONN_MAX_AGE"] = max_age
        conf["CONN_HEALTH_CHECKS"] = health
    yield
    restart_pool()
    for alias, (age, checks) in saved.items():
        settings.DATABASES[alias]["CONN_MAX_AGE"] = age
        settings.DATABASES[alias]["CONN_HEALTH_CHECKS"] = checks
