"""Which worker, if any, the calling thread is: how keyedpool spots waits that cannot end."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._worker import Worker

__all__ = ["current_worker", "set_current_worker"]

# Owner: each thread sees only its own attribute (threading.local).
_local = threading.local()


def set_current_worker(worker: Worker) -> None:
    """Mark the calling thread as *worker*'s thread (called once, as the thread starts)."""
    _local.worker = worker


def current_worker() -> Worker | None:
    """The worker whose thread is calling, or ``None`` for any other thread."""
    return getattr(_local, "worker", None)
