"""App config of the test app."""

from __future__ import annotations

from django.apps import AppConfig


class LedgerConfig(AppConfig):
    name = "kp_project.ledger"
    label = "ledger"
    default_auto_field = "django.db.models.BigAutoField"
