"""The dispatcher: takes accepted tasks in submit order and puts each where it runs.

A keyed task goes on the queue of the worker its key routes to (see
``_routing``); an unkeyed task goes on the unkeyed queue, and a sleeping worker
is woken to take it. Nothing here ever blocks on a worker: worker queues have no
size limit (capacity is enforced once, in ``submit``), so one stuck key cannot
hold up tasks that do not share its worker. This is where the design note's
dispatcher, which blocks on a full worker channel, stops every key.
"""

from __future__ import annotations

from queue import Empty
from typing import TYPE_CHECKING

from ._routing import worker_index
from ._task import Task
from ._worker import STOP, WAKE, Worker

if TYPE_CHECKING:
    from ._pool import Pool

__all__ = ["dispatch", "place", "place_now"]

# Upper bound on the tasks routed per wake-up, so that workers get their first
# batch quickly even while a producer floods the inbox.
MAX_BATCH = 4096


def dispatch(pool: Pool) -> None:
    """The dispatcher thread's loop."""
    get = pool.inbox.get
    get_nowait = pool.inbox.get_nowait
    while True:
        batch = [get()]
        # Take everything already waiting: one wake-up routes many tasks, and
        # each worker then gets one put (one wake-up at most) per batch.
        try:
            while len(batch) < MAX_BATCH:
                batch.append(get_nowait())
        except Empty:
            pass
        stop = batch[-1] is STOP  # STOP is always the last item ever put
        if stop:
            batch.pop()
        place(pool, batch)  # type: ignore[arg-type]
        pool.placed(len(batch))
        if stop:
            for worker in pool.workers:
                worker.queue.put(STOP)
            return


def place(pool: Pool, tasks: list[Task]) -> None:
    """Put *tasks*, in order, on their workers' queues or on the unkeyed queue.

    Only one thread places at a time: the dispatcher, or ``submit`` itself while
    nothing is in transit (see ``Pool.admit``).
    """
    workers = pool.workers
    count = len(workers)
    own: dict[int, list[Task]] = {}
    loose: list[Task] = []
    for task in tasks:
        key = task.key
        if key is None:
            loose.append(task)
            continue
        index = worker_index(key, count)
        group = own.get(index)
        if group is None:
            own[index] = [task]
        else:
            group.append(task)
    for index, group in own.items():
        _give(pool, workers[index], group)
    if loose:
        pool.unkeyed.extend(loose)
        _wake(pool, len(loose))


def place_now(pool: Pool, task: Task) -> bool:
    """Place one task straight from ``submit``, if that beats the dispatcher.

    Only called while nothing is in transit, so it cannot overtake an earlier
    task. It saves a thread hop (lower latency) when a worker is free to take
    the task; when the workers are busy it declines, and the task goes through
    the dispatcher, which batches: a producer outrunning its workers then costs
    one queue put per batch, not per task.
    """
    key = task.key
    if key is None:
        if not (pool.idle or pool.unstarted):
            return False
        pool.unkeyed.append(task)
        _wake(pool, 1)
        return True
    worker = pool.workers[worker_index(key, len(pool.workers))]
    if not worker.waiting and worker.thread is not None:
        return False
    _give(pool, worker, [task])
    return True


def _give(pool: Pool, worker: Worker, group: list[Task]) -> None:
    worker.routed += len(group)
    worker.batches.append(group)
    if worker.thread is None:
        pool.start_worker(worker)
    elif worker.waiting:
        # It has work now: it is no longer a free worker for unkeyed tasks.
        with pool.idle_lock:
            if worker.waiting:
                worker.waiting = False
                pool.idle.remove(worker)
    worker.queue.put(group)


def _wake(pool: Pool, wanted: int) -> None:
    # Wake up to *wanted* idle workers, longest idle first (so unkeyed work
    # spreads over the free workers), then start new ones if more are wanted,
    # as ThreadPoolExecutor does. The unkeyed tasks were appended before this
    # looks at the idle workers; a worker looks at the unkeyed queue before it
    # joins them, under the same lock. So either it sees the task or we see it.
    if pool.idle:
        with pool.idle_lock:
            idle = pool.idle
            while wanted and idle:
                worker = idle.popleft()
                worker.waiting = False
                worker.queue.put(WAKE)
                wanted -= 1
    while wanted and pool.unstarted:
        # A new worker looks at the unkeyed queue as soon as it starts.
        pool.start_worker(pool.unstarted[-1])
        wanted -= 1
