"""One table: the entries tasks write, in the order they ran."""

from __future__ import annotations

from django.db import models


class Entry(models.Model):
    """A ledger line: *account* (the key) and its sequence number *seq*."""

    account = models.CharField(max_length=50)  # type: ignore[var-annotated]
    seq = models.IntegerField()  # type: ignore[var-annotated]
    note = models.CharField(max_length=200, blank=True, default="")  # type: ignore[var-annotated]

    class Meta:
        app_label = "ledger"
        ordering = ["id"]

    def __str__(self) -> str:
        return f"{self.account}#{self.seq}"
