"""A worker: one OS thread, its own FIFO queue, and the counters for that queue.

A worker's queue holds only the tasks whose key routes to it, so it runs each
key's tasks one at a time, in order. When its own queue is empty it helps with
unkeyed tasks, which wait in one queue shared by all workers: an unkeyed task is
taken by whichever worker is free first, so it never waits behind a slow task
while another worker is idle.
"""

from __future__ import annotations

import threading
from collections import deque
from queue import SimpleQueue
from typing import TYPE_CHECKING

from ._task import Task

if TYPE_CHECKING:
    from ._pool import Pool

__all__ = ["Worker", "WAKE", "STOP", "work"]

#: Put on a worker's queue to make it look at the unkeyed queue.
WAKE: tuple[()] = ()
#: Put on a worker's queue, after everything routed to it, to end its thread.
STOP = None

Item = list[Task] | tuple[()] | None


class Worker:
    """One worker thread's queue and counters (the metrics live beside the queue)."""

    def __init__(self, index: int, pool: Pool) -> None:
        self.index = index
        self.pool = pool
        #: Batches of this worker's own (keyed) tasks, then WAKE or STOP items.
        self.queue: SimpleQueue[Item] = SimpleQueue()
        #: Batches routed here but not yet taken off the queue, for stats().
        self.batches: deque[list[Task]] = deque()
        #: The batch being run, and the task being run (None between tasks).
        self.batch: list[Task] = []
        self.current: Task | None = None
        #: Own tasks routed here (written by whoever routes) and finished (by this worker).
        self.routed = 0
        self.finished = 0
        #: All tasks this worker ran or skipped, keyed or not.
        self.completed = 0
        self.failed = 0
        self.cancelled = 0
        #: True while it is in the pool's idle workers (asleep on its empty queue).
        self.waiting = False
        self.thread: threading.Thread | None = None

    @property
    def backlog(self) -> int:
        """Own tasks routed here and not finished yet, the running one included."""
        return self.routed - self.finished

    @property
    def done(self) -> int:
        """Tasks this worker ran or skipped: the pool's capacity counts these as free."""
        return self.completed + self.failed + self.cancelled

    def run(self, task: Task) -> None:
        """Run one task (or skip it, if the pool is cancelling or broken) and count it."""
        pool = self.pool
        halt = pool.halt
        if halt is None:
            self.current = task
            try:
                outcome = task.run()
            except BaseException:
                # Only a done-callback raising SystemExit or the like gets here
                # (the call's own exceptions go into its future): the task is
                # finished, and the worker must live on.
                pool.logger.critical("exception calling callback for %r", task, exc_info=True)
                outcome = task._exception is None
            self.current = None
        elif isinstance(halt, BaseException):  # broken: fail it without running it
            task.abandon(halt)
            outcome = False
        else:  # shutdown(cancel_futures=True): never start it
            task.abandon(None)
            outcome = None
        if outcome:
            self.completed += 1
        elif outcome is None:
            self.cancelled += 1
        else:
            self.failed += 1
        # Counting it above freed its room; a submit may be waiting for room.
        if pool.space_wanted:
            pool.room_freed()


def work(worker: Worker, pool: Pool) -> None:
    """The worker thread's loop."""
    if pool.initializer is not None:
        try:
            pool.initializer(*pool.initargs)
        except BaseException:
            pool.logger.critical("Exception in initializer:", exc_info=True)
            pool.set_broken("a worker's initializer failed; the pool is not usable anymore")

    get = worker.queue.get
    queue_empty = worker.queue.empty
    unkeyed = pool.unkeyed
    run = worker.run

    while True:
        if not queue_empty() or pool.ready_to_sleep(worker):
            item: Item = get()
        else:
            item = WAKE  # an unkeyed task arrived as we were about to sleep
        if item is STOP:
            break
        if item:
            worker.batches.popleft()
            worker.batch = item
            for task in item:
                run(task)
                worker.finished += 1
            worker.batch = []
        # Help with unkeyed work, but give our own queue the next turn as soon
        # as something arrives there: keyed tasks must not wait behind a flood.
        while unkeyed:
            try:
                task = unkeyed.popleft()
            except IndexError:
                break
            run(task)
            if not queue_empty():
                break
        # Drop our references before we sleep, so finished futures (and their
        # results) can be freed as soon as their callers let go of them.
        item = task = None  # type: ignore[assignment]

    # Every task was placed before STOP was sent: finish the unkeyed leftovers.
    while True:
        try:
            task = unkeyed.popleft()
        except IndexError:
            break
        run(task)
