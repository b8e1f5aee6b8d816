"""Held keys: tasks that wait for a time (a delay, or a retry's backoff) without a worker.

A task submitted with ``delay`` or ``retry`` (``KeyedPoolExecutor.submit_with``)
carries a ``Plan``. While such a task waits for its time it is *parked* here,
in the dispatcher, not on a worker's queue: no worker waits with it. Its key
is *held* meanwhile: the key's later tasks wait here too, in submit order, and
are routed once the key is let go. So order per key is kept, and every worker
runs other keys in the meantime.

* A delayed task holds its key until its time comes; then it is routed like
  any task, and the key's later tasks follow it to the same worker.
* A task with a ``RetryPolicy`` holds its key from the moment it is routed
  until it is resolved: if it fails and may retry, its worker hands it back
  (``Pool.hand_back``) instead of resolving it, and it is parked until its
  backoff has passed. Later tasks of the key could not be queued behind it on
  its worker: they would run before its retry.

Everything here is owned by the dispatcher thread, except ``Plan.parked``
(see there). Cancelling a parked task (``Task.cancel``) hands it back too, so
its key is let go at once rather than when its time would have come.
"""

from __future__ import annotations

import heapq
from collections import deque
from itertools import count
from time import monotonic
from typing import TYPE_CHECKING

from ._retry import RetryPolicy
from ._routing import Key

if TYPE_CHECKING:
    from ._pool import Pool
    from ._task import Task

__all__ = ["Holds", "Plan"]

#: Plan.state: not seen by the dispatcher yet, or waiting behind its key's
#: holder; parked until its time; on a worker (a task with retries); done with.
NEW, PARKED, OUT, DONE = 0, 1, 2, 3


class Plan:
    """When a task may run, and what happens when it fails (``submit_with``)."""

    __slots__ = ("due", "retry", "failures", "replace", "parked", "state")

    def __init__(self, due: float, retry: RetryPolicy | None, replace: bool) -> None:
        #: ``time.monotonic()`` before which the task must not start (0.0: now).
        #: Set by submit, then by the worker that hands the task back for a
        #: retry (under the task's lock, before the dispatcher sees it again).
        self.due = due
        self.retry = retry
        #: Attempts that failed and were retried. Owner: the worker running the task.
        self.failures = 0
        #: Submitted with ``replace=True`` (see ``Pool.latest``).
        self.replace = replace
        #: True while the task is parked in the dispatcher, or handed back to
        #: it by a worker for a retry: then nobody but the dispatcher will
        #: count its end, and ``Task.cancel`` must tell it. Owner: the task's lock.
        self.parked = False
        #: Where the dispatcher has it (NEW, PARKED, OUT, DONE). Owner: the dispatcher.
        self.state = NEW


class Holds:
    """The dispatcher's parked tasks and held keys (owned by the dispatcher thread)."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        #: key -> its later tasks, waiting (in submit order) for the key to be let go.
        self.held: dict[Key, deque[Task]] = {}
        #: Parked tasks by due time: (due, tie-breaker, task). A task cancelled
        #: while parked stays in the heap, as DONE, until its time comes.
        self.timers: list[tuple[float, int, Task]] = []
        self.ties = count()
        #: Tasks parked now (the heap less the DONE ones).
        self.parked = 0
        #: Tasks with retries on a worker now (they come back to us, see Pool.hand_back).
        self.out: set[Task] = set()
        #: None while the pool is open; then how it closes (see ``close``).
        self.closing: str | None = None

    def busy(self) -> bool:
        """Whether anything is parked, held, or out on a worker and due back here."""
        return bool(self.parked or self.held or self.out)

    def next_due(self) -> float | None:
        """Seconds until the next parked task is due (None: none is parked)."""
        timers = self.timers
        while timers and timers[0][2].plan.state != PARKED:  # type: ignore[union-attr]
            heapq.heappop(timers)  # cancelled meanwhile: forget it
        if not timers:
            return None
        return max(0.0, timers[0][0] - monotonic())

    def sort(self, tasks: list[Task], ready: list[Task]) -> None:
        """New tasks: append to *ready* those to route now, in order; hold or park the rest."""
        now = monotonic()
        held = self.held
        for task in tasks:
            key = task.key
            if key is not None and key in held:
                held[key].append(task)  # behind its key's holder
            elif task.plan is None:
                ready.append(task)
            else:
                self._start(task, now, ready)

    def _start(self, task: Task, now: float, ready: list[Task]) -> None:
        # A task with a plan whose key is free (or that has no key).
        plan = task.plan
        assert plan is not None
        if plan.due > now:
            if not self._park(task):
                self._drop(task)  # cancelled before it was parked
                return
            if task.key is not None:
                self.held[task.key] = deque()
        elif plan.retry is not None:
            plan.state = OUT
            self.out.add(task)
            if task.key is not None:
                self.held[task.key] = deque()
            ready.append(task)
        else:
            plan.state = DONE  # a delay that has passed already: route it as it is
            ready.append(task)

    def _park(self, task: Task) -> bool:
        # Park *task* until plan.due; False if it was cancelled (it is not parked).
        plan = task.plan
        assert plan is not None
        if self.closing is not None:
            task.cancel()  # the pool is closing: nothing waits for its time any more
        with task:  # the future's lock: Task.cancel reads ``parked`` under it
            if task.done():
                return False
            plan.parked = True
        plan.state = PARKED
        self.parked += 1
        heapq.heappush(self.timers, (plan.due, next(self.ties), task))
        return True

    def _compact(self) -> None:
        # Tasks cancelled while parked stay in the heap until their time would
        # have come. Many of them (a burst of replace=True with a long delay)
        # would hold memory for that long: drop them once they are most of it.
        timers = self.timers
        if len(timers) > 64 and len(timers) > 2 * self.parked:
            self.timers = [t for t in timers if t[2].plan.state == PARKED]  # type: ignore[union-attr]
            heapq.heapify(self.timers)

    def due(self, ready: list[Task]) -> None:
        """Tasks whose time has come: append them to *ready*, and let go of their keys."""
        timers = self.timers
        now = monotonic()
        while timers and timers[0][0] <= now:
            task = heapq.heappop(timers)[2]
            plan = task.plan
            assert plan is not None
            if plan.state != PARKED:
                continue  # cancelled while parked: dealt with in back()
            self.parked -= 1
            with task:
                cancelled = task.done()
                plan.parked = False
            if cancelled:
                # Cancelled while parked, and not handed back yet: it ends here.
                self._end_here(task, ready)
            elif plan.retry is not None:
                plan.state = OUT  # its key stays held until it is resolved
                self.out.add(task)
                ready.append(task)
            else:
                plan.state = DONE
                ready.append(task)
                self._let_go(task.key, ready)

    def back(self, tasks: list[Task], ready: list[Task]) -> None:
        """Tasks handed back: by a worker (an attempt ended), or by ``Task.cancel``."""
        for task in tasks:
            plan = task.plan
            assert plan is not None
            state = plan.state
            if state == PARKED:
                # Cancelled while parked (else it would not be handed back).
                with task:
                    cancelled = task.done()
                    plan.parked = False
                if cancelled:
                    self.parked -= 1
                    self._end_here(task, ready)
                    self._compact()
                else:  # pragma: no cover - cancel() only hands back what it cancelled
                    with task:
                        plan.parked = True
            elif state == OUT:
                self.out.discard(task)
                with task:
                    handed_back = plan.parked
                    plan.parked = False
                if not handed_back:
                    # Its worker resolved it (or skipped it, cancelled): the
                    # worker counted its end.
                    plan.state = DONE
                    self._let_go(task.key, ready)
                elif not self._park(task):
                    # Handed back for a retry, then cancelled (or the pool is
                    # closing, and _park cancelled it): it ends here.
                    self._end_here(task, ready)
                # Else parked until its backoff has passed.
            # NEW or DONE: cancelled in the inbox or behind its holder (a
            # worker skips it), or told twice: nothing to do.

    def close(self, how: str, ready: list[Task]) -> int:
        """The pool is closing: *how* is ``"drop"`` or ``"cancel"``; say how many tasks ended.

        ``"drop"`` (at interpreter exit): cancel the parked tasks, and any task
        that would be parked from now on (a delayed task, a retry), so that
        exit does not wait for their time; the keys they held go on (into
        *ready*). ``"cancel"`` (``shutdown(cancel_futures=True)``): also cancel
        every task held behind a key, and the tasks with retries on a worker
        (one that has started finishes its attempt, and is not retried).
        """
        self.closing = how
        ended = 0
        timers, self.timers = self.timers, []
        self.parked = 0
        for _, _, task in timers:
            plan = task.plan
            assert plan is not None
            if plan.state == PARKED:
                task.cancel()
                with task:
                    plan.parked = False
                self._drop(task)
                ended += 1
                if how == "drop":
                    self._let_go(task.key, ready)
        if how == "cancel":
            held = [task for waiting in self.held.values() for task in waiting]
            self.held.clear()
            for task in held:
                task.cancel()  # never routed: it ends here
                self._drop(task)
            for task in list(self.out):
                task.cancel()  # skipped by its worker, unless it started
            ended += len(held)
        return ended

    def _let_go(self, key: Key | None, ready: list[Task]) -> None:
        # *key*'s holder is done with (routed for good, or resolved): its later
        # tasks go, in order, until one of them holds the key again.
        if key is None:
            return
        waiting = self.held.pop(key, None)
        if not waiting:
            return
        now = monotonic()
        while waiting:
            task = waiting.popleft()
            if task.plan is None:
                ready.append(task)
                continue
            self._start(task, now, ready)
            if key in self.held:
                # It holds the key again: the rest wait behind it.
                self.held[key].extend(waiting)
                return

    def _end_here(self, task: Task, ready: list[Task]) -> None:
        # A cancelled task that held its key ends here; the key goes on.
        self._drop(task)
        self._let_go(task.key, ready)

    def _drop(self, task: Task) -> None:
        # A cancelled task that no worker will see: it ends here, counted as cancelled.
        if task.plan is not None:
            task.plan.state = DONE
        self.pool.end_cancelled(task)
