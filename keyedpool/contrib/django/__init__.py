"""Run Django background work on one keyed pool per process, with clean DB connections.

Add ``"keyedpool.contrib.django"`` to ``INSTALLED_APPS`` and, optionally, configure
the pool in settings (every key is optional)::

    KEYEDPOOL = {
        "MAX_WORKERS": 32,          # default: 16 per CPU, at most 128
        "MAX_PENDING": 3200,        # default: MAX_WORKERS x 100
        "ON_FULL": "block",         # or "raise" (keyedpool.PoolFull)
        "FULL_TIMEOUT": None,       # seconds a full pool makes submit wait, then PoolFull
        "THREAD_NAME_PREFIX": "keyedpool-django",
        "ROUTING": "affinity",      # or "hash": a fixed worker per key
        "SLOW_TASK_WARNING": 60,    # log a task running longer (seconds); None: never
    }

Then, in a view::

    from keyedpool.contrib.django import submit_on_commit

    with transaction.atomic():
        order = Order.objects.create(user=request.user, ...)
        submit_on_commit(request.user.pk, send_receipt, order.pk)   # after COMMIT only

The app makes the process's pool when Django starts (a bad ``KEYEDPOOL`` setting
is reported then); its threads start with the first submit, in each process (so
each gunicorn or uWSGI worker process starts its own, after the fork), and at
process exit it finishes the tasks it holds. :func:`shutdown` is final, as for
the executor: later submits raise ``RuntimeError`` (changing the ``KEYEDPOOL``
setting, as ``override_settings`` does in tests, replaces the pool).
:func:`get_pool` returns the :class:`keyedpool.KeyedPoolExecutor` (in the Flask
adapter: ``pool.executor``). Each task is wrapped like a request: ``close_old_connections()``
runs before and after it, so a connection that broke or outlived ``CONN_MAX_AGE``
is replaced, and with the default ``CONN_MAX_AGE = 0`` the connection is closed
after each task. When the pool stops, the connections its worker threads opened
are closed. A task that needs a transaction opens one itself (``transaction.atomic``).

For Django's Tasks framework, see :mod:`keyedpool.contrib.django.tasks`.
"""

from __future__ import annotations

from keyedpool.contrib import _require

_require("django", "django", "keyedpool.contrib.django")

from ._pool import get_pool, shutdown, submit, submit_on_commit

__all__ = ["get_pool", "shutdown", "submit", "submit_on_commit"]
