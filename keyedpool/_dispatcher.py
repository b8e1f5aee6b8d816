"""The dispatcher: takes accepted tasks in submit order and puts each where it runs.

A keyed task goes on the queue of the worker its key routes to (see
``_routing``); an unkeyed task goes on the unkeyed queue, and a sleeping worker
is woken to take it (submit starts a new worker when none is free, as
ThreadPoolExecutor does).
Nothing here ever blocks on a worker: worker queues have no size limit
(capacity is enforced once, in ``submit``), so one stuck key cannot hold up
tasks that do not share its worker. This is where the design note's
dispatcher, which blocks on a full worker channel, stops every key.

The dispatcher thread is the only one that routes, so routing state (such as
which worker stands in for one whose thread could not start) needs no lock.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._routing import SEED, key_bytes, mmh3_hash
from ._task import Task
from ._worker import STOP

if TYPE_CHECKING:
    from ._pool import Pool

__all__ = ["dispatch", "place"]


def dispatch(pool: Pool) -> None:
    """The dispatcher thread's loop: route every accepted task, then stop the workers."""
    while True:
        tasks, last = pool.take_inbox()
        if tasks:
            try:
                place(pool, tasks)
            except BaseException:  # pragma: no cover - a bug: keep the pool alive
                pool.logger.critical("keyedpool: error in the dispatcher", exc_info=True)
        # Drop our references before we wait: the futures (and their results)
        # must be freed when their callers let go of them, not at the next batch.
        tasks = []
        if last:
            for worker in pool.started_workers():
                worker.queue.put(STOP)  # after everything routed to it
            return


def place(pool: Pool, tasks: list[Task]) -> None:
    """Put *tasks*, in order, on their workers' queues or on the unkeyed queue."""
    workers = pool.workers
    count = len(workers)
    stand_in = pool.stand_in
    own: dict[int, list[Task]] = {}
    loose: list[Task] = []
    for task in tasks:
        key = task.key
        if key is None:
            loose.append(task)
            continue
        # worker_index(key, count), inlined for the common str key: this runs per task.
        data = key.encode("utf-8", "surrogatepass") if type(key) is str else key_bytes(key)
        index = mmh3_hash(data, SEED, False) % count
        if stand_in:
            index = stand_in.get(index, index)
        group = own.get(index)
        if group is None:
            own[index] = [task]
        else:
            group.append(task)
    for index in [i for i in own if workers[i].thread is None]:
        taker = pool.start_for_keyed(workers[index])
        if taker is None:
            _fail(pool, own.pop(index))
        elif taker is not workers[index]:
            # Its thread cannot start: a running worker takes its keys for the
            # life of the pool. None of them ran anywhere yet, so they keep
            # their order there.
            stand_in[index] = taker.index
            own.setdefault(taker.index, []).extend(own.pop(index))
    for index, group in own.items():
        for task in group:
            task.worker = index
        pool.give(workers[index], group)
    if loose:
        wanted = pool.add_unkeyed(loose)
        if wanted:
            pool.start_for_unkeyed(wanted)
    pool.routed()


def _fail(pool: Pool, tasks: list[Task]) -> None:
    if tasks:
        pool.fail_unrunnable(
            tasks,
            RuntimeError(
                "keyedpool: the task did not run: no worker thread could be started "
                "(the system refused a new thread; see the 'keyedpool' log)"
            ),
        )
