"""The Django app: add ``"keyedpool.contrib.django"`` to ``INSTALLED_APPS``."""

from __future__ import annotations

from django.apps import AppConfig


class KeyedPoolConfig(AppConfig):
    """Makes the process's pool from the ``KEYEDPOOL`` setting at startup (so a bad
    setting is reported then); its threads start with the first submit."""

    name = "keyedpool.contrib.django"
    label = "keyedpool"
    verbose_name = "keyedpool"

    def ready(self) -> None:
        from ._pool import get_pool

        get_pool()  # raises ImproperlyConfigured for a bad KEYEDPOOL setting
