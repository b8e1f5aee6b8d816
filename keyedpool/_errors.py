"""The errors keyedpool raises besides the standard ones."""

from __future__ import annotations

from concurrent.futures.thread import BrokenThreadPool

__all__ = ["BrokenKeyedPool", "DeadlockError", "PoolFull"]


class PoolFull(Exception):
    """``submit`` could not accept a task because ``max_pending`` tasks are already pending.

    Raised at once when the pool (or the call) uses ``on_full="raise"``, and after
    ``full_timeout`` seconds when it blocks with a timeout. Nothing was accepted: the
    task did not run and will not run.
    """


class BrokenKeyedPool(BrokenThreadPool):
    """A worker's ``initializer`` failed, so the pool can no longer run tasks.

    It is a :class:`concurrent.futures.thread.BrokenThreadPool` (and so a
    :class:`concurrent.futures.BrokenExecutor`): code written for the standard
    library's thread pool catches it unchanged. Every task that had not started
    gets it as its exception, and every later ``submit`` raises it.
    """


class DeadlockError(RuntimeError):
    """A task waited for something that could never happen, so keyedpool raised instead.

    Raised inside a task, by ``result()`` or ``exception()`` of a future that is
    queued behind the calling task on its own worker (a later task of the same
    key, or of a key that shares the worker): that future cannot start until
    the calling task returns, so the wait would never end. Chain the follow-up
    work with ``add_done_callback``, or wait for it from outside the pool.
    """
