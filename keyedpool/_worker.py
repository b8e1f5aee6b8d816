"""A worker: one OS thread, its own FIFO queue, and the counters for that queue.

A worker's queue holds only the tasks routed to it, so it runs each key's tasks
one at a time, in order. When its own queue is empty it helps with unkeyed
tasks, which wait in one queue shared by all workers: an unkeyed task is taken
by whichever worker is free first, so it never waits behind a slow task while
another worker is idle.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections import deque
from queue import SimpleQueue
from time import monotonic
from typing import TYPE_CHECKING

from ._local import set_current_worker
from ._stats import TIME_BUCKETS
from ._task import RETRYING, Task

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
        #: Batches of this worker's tasks, then WAKE or STOP items. Thread-safe
        #: by itself; the dispatcher puts (under ``pool.unkeyed_lock``, see
        #: ``Pool.give``), only this worker gets.
        self.queue: SimpleQueue[Item] = SimpleQueue()
        #: Batches routed here and not yet taken off the queue, for stats() and
        #: cancel_futures. A deque, whose append and popleft are atomic by
        #: themselves: the dispatcher appends, this worker pops (under ``lock``,
        #: so that ``Pool.take_back`` sees every task not started yet).
        self.batches: deque[list[Task]] = deque()
        # Owner: this worker's thread. Others only read them, for stats().
        #: The task being run (None between tasks).
        self.current: Task | None = None
        # Owner: this worker's thread, which changes it under ``lock`` (so the
        # dispatcher can read it there); stats() reads it without the lock.
        #: The batch being run.
        self.batch: list[Task] = []
        #: Owns the counters below. Each worker has its own, so counting a task
        #: never waits for another worker, nor for submit.
        self.lock = threading.Lock()
        # Owner: self.lock.
        #: Tasks routed here (by the dispatcher) and finished (by this worker).
        self.routed = 0
        self.finished = 0
        #: All tasks this worker ran or skipped, keyed or not, by how they
        #: ended: ``ended[COMPLETED]``, ``ended[FAILED]``, ``ended[CANCELLED]``;
        #: and ``ended[RETRYING]``, attempts that failed and are retried (the
        #: task did not end: it went back to the dispatcher).
        self.ended = [0, 0, 0, 0]
        #: With ``timing=True``: tasks by how long they waited for this worker
        #: and how long they ran here (a count per ``TIME_BUCKETS`` bucket),
        #: and the seconds added up.
        self.waits = [0] * len(TIME_BUCKETS)
        self.runs = [0] * len(TIME_BUCKETS)
        self.wait_sum = 0.0
        self.run_sum = 0.0
        #: True while a submit waits for room (set in every worker, under the
        #: pool's lock, before that submit reads the counts again: a task that
        #: ends after that read sees it here, and wakes the submit).
        self.room_wanted = False
        #: With routing="affinity", the dispatcher may take back tasks queued
        #: here that have not started (it puts None in their place in
        #: ``batch`` or ``batches``; see ``advance`` and ``Pool.take_back``).
        #: The task of our own queue that runs now (None between them), and
        #: where it is in ``batch``: what comes after it has not started.
        self.claimed: Task | None = None
        self.claimed_at = -1
        # Owner: pool.unkeyed_lock.
        #: True while it is in ``pool.idle`` (asleep on its empty queue, or
        #: about to be: see ``rest``).
        self.idle = False
        # Owner: this worker's thread (Pool.start_worker sets it before the
        # thread exists, and after a start that failed).
        #: True when this worker is in ``pool.idle`` and knows it (see ``rest``
        #: and ``Pool.start_worker``): it then goes straight to sleep on its
        #: queue, where any new work reaches it.
        self.resting = False
        # Owner: pool.lock (set by Pool.start_worker; read without it only for
        # reports such as ThreadPoolExecutor._threads).
        self.thread: threading.Thread | None = None

    def run(self, task: Task, unkeyed: bool = False) -> int:
        """Run one task (or skip it, if the pool is cancelling or broken); say how it ended."""
        # Read without the lock: halt only ever goes from None to a value, and
        # a task that starts just as it changes is a task that started before.
        halt = self.pool.halt
        try:
            if halt is None:
                self.current = task
                try:
                    outcome = task.run(self.rest if unkeyed else None)
                finally:
                    self.current = None
            else:
                outcome = task.abandon(halt if isinstance(halt, BaseException) else None)
        except BaseException:
            # Only a done-callback raising SystemExit or the like gets here (the
            # call's own exceptions go into its future): the task is resolved,
            # and the worker must live on to run the rest of its queue.
            self.pool.logger.critical("exception calling callback for %r", task, exc_info=True)
            outcome = task.outcome
        plan = task.plan
        if plan is not None and plan.retry is not None:
            # Its key is held until it is resolved: the dispatcher must hear
            # how this attempt ended (see _holds). (plan.due was set by
            # Task.run on this thread when the attempt failed.)
            self.pool.hand_back(task, plan.due if outcome == RETRYING else 0.0)
        # A failed call's traceback keeps Task.run's frame, and through it this
        # frame: without this, the task (and its result) would stay alive in
        # a reference cycle until the garbage collector runs.
        del task
        return outcome

    def timed_run(self, task: Task, unkeyed: bool = False) -> int:
        """``run``, and count how long the task waited and ran (pools with ``timing=True``)."""
        queued_at = task.queued_at
        started = monotonic()
        outcome = self.run(task, unkeyed)
        del task  # as in run()
        ran = monotonic() - started
        waited = started - queued_at if queued_at else 0.0
        lock = self.lock
        lock.acquire()
        try:
            self.waits[bisect_left(TIME_BUCKETS, waited)] += 1
            self.wait_sum += waited
            self.runs[bisect_left(TIME_BUCKETS, ran)] += 1
            self.run_sum += ran
        finally:
            lock.release()
        return outcome

    def rest(self) -> None:
        """An unkeyed call returned, its future not yet resolved: be idle now if nothing waits.

        So a caller who sees the result and submits again finds this worker
        free and reuses it, instead of starting another thread (as with
        ThreadPoolExecutor, whose worker is free again before the next submit).
        """
        self.resting = self.pool.rest(self)

    def next_batch(self, batch: list[Task]) -> None:
        """Start on *batch*, just taken off the queue."""
        lock = self.lock
        lock.acquire()
        try:
            self.batches.popleft()
            self.batch = batch
            self.claimed_at = -1
        finally:
            lock.release()

    def advance(self, outcome: int, position: int) -> int:
        """Count the task of ``batch`` that just ended, and start the next one.

        *outcome* is how the task ended (negative: no task ended, the batch
        starts). The next task is the first at or after *position* that the
        dispatcher did not take back; its position is returned, or
        ``len(batch)`` when the batch is done. One lock for both, per task.

        Under ``lock``, as ``Pool.take_back`` is: a task is either started
        here or taken back, never both, and a key's tasks are taken back
        only while none of them has started here. Called after the worker
        dropped its reference to the task that ended, so the caller's
        ``result()`` returning means the pool holds the task no more.
        """
        lock = self.lock
        lock.acquire()
        try:
            if outcome >= 0:
                self.ended[outcome] += 1
                self.finished += 1
            batch = self.batch
            end = len(batch)
            while position < end and batch[position] is None:
                position += 1  # taken back: it runs on another worker
            if position < end:
                self.claimed = batch[position]
                self.claimed_at = position
            else:
                self.claimed = None
                self.batch = []
            room_wanted = self.room_wanted
        finally:
            lock.release()
        if room_wanted and outcome >= 0:
            # Its room is free, and a submit waits for room.
            self.pool.room_freed()
        return position

    def count(self, outcome: int) -> None:
        """Count an unkeyed task that ended (``advance`` counts the worker's own).

        Called after the worker dropped its reference to the task, so the
        caller's ``result()`` returning means the pool holds the task no more.
        """
        # acquire/release rather than ``with``: cheaper, and no KeyboardInterrupt
        # lands in a worker thread.
        lock = self.lock
        lock.acquire()
        try:
            self.ended[outcome] += 1
            room_wanted = self.room_wanted
        finally:
            lock.release()
        if room_wanted:
            # Its room is free, and a submit waits for room.
            self.pool.room_freed()


def work(worker: Worker, pool: Pool) -> None:
    """The worker thread's loop."""
    with pool.lock:
        if worker.thread is not threading.current_thread():
            return  # its start() was interrupted, and the worker is still unstarted
    set_current_worker(worker)
    if pool.initializer is not None:
        try:
            pool.initializer(*pool.initargs)
        except BaseException:
            pool.logger.critical("Exception in initializer:", exc_info=True)
            pool.set_broken("a worker's initializer failed; the pool is not usable anymore")

    get = worker.queue.get
    queue_empty = worker.queue.empty
    take_unkeyed = pool.take_unkeyed
    # With timing=True each task's wait and run time is counted too.
    run = worker.timed_run if pool.timing else worker.run
    count = worker.count
    advance = worker.advance
    task: Task | None

    while True:
        if worker.resting:
            # Already idle (see Worker.rest): sleep until work comes.
            worker.resting = False
        elif queue_empty():
            # Nothing of our own: help with unkeyed work, one task at a time so
            # that our own queue gets the next turn as soon as something
            # arrives there (keyed tasks never wait behind an unkeyed flood).
            # With none, take_unkeyed marks us idle, and we sleep in get().
            task = take_unkeyed(worker)
            if task is not None:
                outcome = run(task, True)
                task = None
                count(outcome)
                continue
        item = get()
        if item is STOP:
            break
        if item is WAKE:
            # Woken for an unkeyed task: take it now, even if our own queue got
            # work meanwhile (that work came after the wake-up).
            task = take_unkeyed(None)
            if task is not None:
                outcome = run(task, True)
                task = None
                count(outcome)
        elif item:
            worker.next_batch(item)
            i = advance(-1, 0)
            while i < len(item):
                outcome = run(item[i])  # advance skips the taken-back (None) slots
                # Let go of the finished task before counting it (see advance).
                item[i] = None  # type: ignore[call-overload]
                i = advance(outcome, i + 1)
        # Drop our references before we sleep, so finished futures (and their
        # results) can be freed as soon as their callers let go of them.
        item = task = None

    # STOP came after everything routed to us; unkeyed tasks may be left.
    while (task := pool.take_unkeyed(None)) is not None:
        outcome = run(task)
        task = None
        count(outcome)
