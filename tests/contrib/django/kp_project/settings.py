"""Settings of the test project.

``default`` is SQLite (a file in a temporary directory: worker threads need a
real file, not an in-memory database). ``pg`` is PostgreSQL: the test fixture
starts a throwaway server and fills in its port before anything connects.
"""

from __future__ import annotations

import os
import tempfile

import django

SECRET_KEY = "keyedpool-tests-only"
DEBUG = False
USE_TZ = True
ALLOWED_HOSTS = ["testserver", "127.0.0.1"]
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "keyedpool.contrib.django",
    "kp_project.ledger",
]
if django.VERSION < (6, 0):
    INSTALLED_APPS.append("django_tasks")

_DB_DIR = tempfile.mkdtemp(prefix="keyedpool-django-")

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.path.join(_DB_DIR, "ledger.sqlite3"),
        # Several worker threads write at once: wait for the lock, do not fail.
        "OPTIONS": {"timeout": 30},
        "TEST": {"NAME": os.path.join(_DB_DIR, "ledger.sqlite3")},
    },
    "pg": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": "keyedpool_test",
        "USER": "postgres",
        "HOST": "127.0.0.1",
        "PORT": "",  # set by the postgres fixture
        "CONN_MAX_AGE": 0,
        "TEST": {"NAME": "keyedpool_test"},
    },
}

KEYEDPOOL = {"MAX_WORKERS": 4, "THREAD_NAME_PREFIX": "kp-test"}

TASKS = {
    "default": {
        "BACKEND": "keyedpool.contrib.django.tasks.KeyedPoolBackend",
    },
    "pg": {
        "BACKEND": "keyedpool.contrib.django.tasks.KeyedPoolBackend",
        "OPTIONS": {"DATABASE": "pg"},
    },
    "small": {
        "BACKEND": "keyedpool.contrib.django.tasks.KeyedPoolBackend",
        "OPTIONS": {"MAX_RESULTS": 3},
    },
    # Another backend, as a test settings file might use: keyed_task still works.
    "immediate": {
        "BACKEND": (
            "django.tasks.backends.immediate.ImmediateBackend"
            if django.VERSION >= (6, 0)
            else "django_tasks.backends.immediate.ImmediateBackend"
        ),
    },
}

LOGGING_CONFIG = None
