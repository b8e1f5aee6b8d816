"""What pools do when the interpreter exits or the process forks.

At exit, like ``ThreadPoolExecutor``: new submits raise ``RuntimeError``, queued
tasks finish, and the threads are joined before the interpreter goes away.
Tasks still waiting for a delay or a retry's backoff are cancelled (and
logged), so that exit never waits for a timer.

After ``os.fork()``, the child has copies of the pools but none of their
threads (gunicorn ``--preload`` creates module-level pools this way). Each pool
starts afresh in the child: new locks and queues, threads started on the first
submit. The tasks the parent had queued stay the parent's: they never run in
the child, so nothing runs twice.
"""

from __future__ import annotations

import os
import threading
import weakref
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._pool import Pool

__all__ = ["exiting", "register"]

#: Set when the interpreter starts to exit; submit refuses new tasks from then on.
exiting = False

_pools: weakref.WeakSet[Pool] = weakref.WeakSet()
_lock = threading.Lock()


def register(pool: Pool) -> None:
    """Track a pool from the moment it is made (before any of its threads exist)."""
    with _lock:
        _pools.add(pool)


def _at_exit() -> None:
    global exiting
    with _lock:
        exiting = True
        pools = list(_pools)
    for pool in pools:
        pool.stop(cancel_futures=False, at_exit=True)
    for pool in pools:
        pool.join()


def _after_fork_in_child() -> None:
    global _lock
    _lock = threading.Lock()
    # The pools stay registered: the child may use them, and at its exit their
    # threads must be stopped and joined as in the parent.
    for pool in list(_pools):
        pool.after_fork_in_child()


# threading._register_atexit runs before the interpreter joins non-daemon
# threads, which is what lets queued tasks finish at exit; ThreadPoolExecutor
# relies on the same hook. (atexit.register would run too late.)
threading._register_atexit(_at_exit)  # type: ignore[attr-defined]
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
