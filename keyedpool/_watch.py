"""Warnings about slow tasks and keys whose backlog keeps growing.

With ``slow_task_warning=seconds`` the dispatcher looks at the workers now and
then, while the pool has work (never per task, so a task costs nothing more):

* a task that has been running longer than that is logged once, on the
  ``"keyedpool"`` logger, with its key, function, worker and where it is now
  (its thread's stack);
* a key with many tasks waiting whose backlog grew at each of the last few
  looks is logged once, until its backlog falls back.

Owned by the dispatcher thread (made by it, used only by it). It reads the
workers' running task without a lock (a stale read only delays a warning by
one look) and everything else through ``stats()``'s snapshot.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
import weakref
from time import monotonic
from types import FrameType
from typing import TYPE_CHECKING

from ._routing import Key
from ._stats import snapshot

if TYPE_CHECKING:
    from ._pool import Pool
    from ._task import Task

__all__ = ["Watch", "GROWING_FLOOR", "GROWING_LOOKS"]

#: A key is reported once it has at least this many tasks queued or running...
GROWING_FLOOR = 100
#: ... and its backlog grew at each of this many looks in a row.
GROWING_LOOKS = 3
#: How many of the largest backlogs each look considers.
_TOP = 10
#: This package's directory: its frames are left out of a task's stack.
_HERE = os.path.dirname(os.path.abspath(__file__)) + os.sep


class Watch:
    """The dispatcher's periodic look for slow tasks and growing keys."""

    def __init__(self, pool: Pool, slow: float) -> None:
        self.pool = pool
        self.slow = slow
        #: Seconds between looks: often enough that a warning comes at most
        #: half of ``slow`` late, and at least every 5 s for growing keys.
        self.every = min(slow / 2, 5.0)
        self.logger = logging.getLogger("keyedpool")
        #: Whether the pool may have work (looks stop while it has none).
        self.active = False
        self.next_at = 0.0
        #: Per worker index: the task it ran at the last look (a weak reference:
        #: a finished task and its result must not stay alive for us), and
        #: since when, and whether it was reported.
        self.running: dict[int, tuple[weakref.ref[Task], float, bool]] = {}
        #: Per key: its backlog at the last look, and how many looks in a row it grew.
        self.backlogs: dict[Key, tuple[int, int]] = {}
        #: Keys reported as growing, until their backlog falls back.
        self.growing: set[Key] = set()

    def timeout(self, other: float | None) -> float | None:
        """How long the dispatcher may wait for tasks: *other*, or less if a look is due."""
        if not self.active:
            return other
        wait = max(0.0, self.next_at - monotonic())
        return wait if other is None or wait < other else other

    def look(self, new_tasks: bool) -> None:
        """Called by the dispatcher after each wait: look if it is time."""
        now = monotonic()
        if new_tasks and not self.active:
            self.active = True
            self.next_at = now + self.every
            return
        if not self.active or now < self.next_at:
            return
        self.next_at = now + self.every
        self._slow_tasks(now)
        self._growing_keys()
        if not new_tasks and self.pool.pending() == 0:
            # Nothing queued or running: stop looking until tasks come.
            self.active = False
            self.running.clear()
            self.backlogs.clear()
            self.growing.clear()

    def _slow_tasks(self, now: float) -> None:
        running: dict[int, tuple[weakref.ref[Task], float, bool]] = {}
        for worker in self.pool.started_workers():
            task = worker.current
            if task is None:
                continue
            seen = self.running.get(worker.index)
            if seen is not None and seen[0]() is task:
                ref, since, reported = seen
            else:
                ref, since, reported = weakref.ref(task), now, False
            if not reported and now - since >= self.slow:
                reported = True
                self._report_slow(task, worker.index, now - since, worker.thread)
            running[worker.index] = (ref, since, reported)
        task = None  # hold no task while the dispatcher waits
        self.running = running

    def _report_slow(self, task: Task, index: int, seconds: float, thread: object) -> None:
        ident = getattr(thread, "ident", None)
        # sys._current_frames() is documented, for debugging tools such as this one.
        frame = sys._current_frames().get(ident) if ident is not None else None
        stack = _task_stack(frame) if frame is not None else []
        function = stack[0].name if stack else "?"
        where = "".join(traceback.format_list(stack)) or "  (its stack was not available)\n"
        self.logger.warning(
            "keyedpool: a task has been running for more than %.1f s (key=%r, function %s, "
            "worker %d); later tasks of its key wait behind it (slow_task_warning=%g s). "
            "It is at:\n%s",
            seconds,
            task.key,
            function,
            index,
            self.slow,
            where.rstrip("\n"),
        )

    def _growing_keys(self) -> None:
        top = snapshot(self.pool, _TOP).top_keys
        backlogs: dict[Key, tuple[int, int]] = {}
        for entry in top:
            last = self.backlogs.get(entry.key)
            grew = 0
            if last is not None:
                grew = last[1] + 1 if entry.backlog > last[0] else 0
            backlogs[entry.key] = (entry.backlog, grew)
            if (
                grew >= GROWING_LOOKS
                and entry.backlog >= GROWING_FLOOR
                and entry.key not in self.growing
            ):
                self.growing.add(entry.key)
                self.logger.warning(
                    "keyedpool: key %r has %d tasks queued or running on worker %d, and its "
                    "backlog grew at each of the last %d looks (%.0f s): its tasks come faster "
                    "than they run one at a time. Make them faster, or split the key",
                    entry.key,
                    entry.backlog,
                    entry.worker,
                    grew,
                    grew * self.every,
                )
        # A key reported as growing may be reported again once it fell back.
        self.growing = {
            key for key in self.growing if backlogs.get(key, (0, 0))[0] >= GROWING_FLOOR
        }
        self.backlogs = backlogs


def _task_stack(frame: FrameType) -> list[traceback.FrameSummary]:
    """A worker thread's stack from the task's own function on (the pool's frames dropped)."""
    stack = traceback.extract_stack(frame)
    start = 0
    for i, entry in enumerate(stack):
        # (The framework adapters' wrappers too: they live under the package.)
        if entry.filename.startswith(_HERE):
            start = i + 1
    return list(stack[start:])
