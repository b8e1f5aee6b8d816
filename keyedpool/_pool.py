"""What the threads share: the inbox, the workers, the unkeyed queue and capacity.

The executor (``KeyedPoolExecutor``) owns one ``Pool``; the threads hold only
the ``Pool``, never the executor, so an executor that is dropped without
``shutdown()`` can still be collected, and its threads then stop.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from queue import SimpleQueue
from time import monotonic
from typing import Any

from . import _process
from ._dispatcher import dispatch, place_now
from ._errors import BrokenKeyedPool, PoolFull
from ._task import Task
from ._worker import STOP, Worker, work

__all__ = ["Pool", "CANCELLING"]

#: ``Pool.halt`` while ``shutdown(cancel_futures=True)`` is cancelling.
CANCELLING = "cancelling"

# Tasks share this many conditions (see _task); a power of two.
_STRIPES = 64


class Pool:
    """The state shared by ``submit``, the dispatcher and the workers."""

    def __init__(
        self,
        max_workers: int,
        max_pending: int,
        thread_name_prefix: str,
        initializer: Callable[..., object] | None,
        initargs: tuple[Any, ...],
    ) -> None:
        self.max_workers = max_workers
        self.max_pending = max_pending
        self.thread_name_prefix = thread_name_prefix
        self.initializer = initializer
        self.initargs = initargs
        #: True once shutdown() was called: submit refuses new tasks.
        self.closed = False
        #: Where a failing initializer is logged.
        self.logger = logging.getLogger("keyedpool")
        self._fresh()

    def _fresh(self) -> None:
        # Everything a forked child must make anew: locks and queues may have
        # been copied mid-use, and the threads do not exist in the child.
        self.lock = threading.Lock()
        self.space = threading.Condition(self.lock)
        self.inbox: SimpleQueue[Task | None] = SimpleQueue()
        self.unkeyed: deque[Task] = deque()
        self.workers = [Worker(i, self) for i in range(self.max_workers)]
        #: Workers whose thread has not started yet (threads start on demand,
        #: as in ThreadPoolExecutor); the last one starts first.
        self.unstarted = self.workers[::-1]
        #: Workers asleep on their empty queue, longest asleep first. A worker
        #: is in it exactly when its ``waiting`` flag is set; both change only
        #: under ``idle_lock``.
        self.idle: deque[Worker] = deque()
        self.idle_lock = threading.Lock()
        self.conditions = [threading.Condition() for _ in range(_STRIPES)]
        self.dispatcher: threading.Thread | None = None
        self.started = False
        self.stopped = False
        #: Accepted in all; refused with PoolFull. Pending = accepted - done,
        #: where each worker counts its own done tasks (no shared counter to
        #: lock per task). ``done_seen`` is the last sum we read: a lower bound.
        self.accepted = 0
        self.done_seen = 0
        self.rejected = 0
        #: Accepted, but not yet placed on a worker or the unkeyed queue.
        self.in_transit = 0
        #: Submitters waiting for room: workers wake them as tasks finish.
        self.space_wanted = 0
        #: None while running; CANCELLING, or a BrokenKeyedPool, when tasks must not start.
        self.halt: None | str | BaseException = None

    # -- submit side -----------------------------------------------------------

    def condition_for(self, serial: int) -> threading.Condition:
        return self.conditions[serial & (_STRIPES - 1)]

    def admit(self, task: Task, block: bool, timeout: float | None) -> None:
        """Accept *task* or raise; on success it is on its way to a worker."""
        with self.lock:
            self._check_open()
            if self.accepted - self.done_seen >= self.max_pending and self._full():
                self._wait_for_space(block, timeout)
            self.accepted += 1
            if not self.started:
                self._start()
            # While earlier tasks are in transit, go behind them, so that each
            # key keeps its submit order; with nothing in transit, submit may
            # place the task itself (see place_now).
            if self.in_transit or not place_now(self, task):
                self.in_transit += 1
                self.inbox.put(task)

    def _check_open(self) -> None:
        if isinstance(self.halt, BrokenKeyedPool):
            # A fresh instance per call: one shared instance would collect
            # the tracebacks of every caller.
            raise BrokenKeyedPool(str(self.halt))
        if _process.exiting:
            raise RuntimeError("cannot schedule new futures after interpreter shutdown")
        if self.closed:
            raise RuntimeError("cannot schedule new futures after shutdown")

    @property
    def done(self) -> int:
        """Tasks finished, failed or cancelled, over all workers."""
        return sum(worker.done for worker in self.workers)

    @property
    def pending(self) -> int:
        """Tasks accepted and not done: what ``max_pending`` bounds."""
        return self.accepted - self.done

    def _full(self) -> bool:
        # The cheap bound said full; read the workers' counts to be sure.
        self.done_seen = self.done
        return self.accepted - self.done_seen >= self.max_pending

    def _wait_for_space(self, block: bool, timeout: float | None) -> None:
        # Called with self.lock held and the pool full.
        if not block:
            self.rejected += 1
            raise PoolFull(self._full_message(""))
        deadline = None if timeout is None else monotonic() + timeout
        # Say we wait before reading the counts again: a worker counts a task
        # before it looks at space_wanted, so one of us sees the other.
        self.space_wanted += 1
        try:
            while self._full():
                if deadline is None:
                    self.space.wait()
                else:
                    remaining = deadline - monotonic()
                    if remaining <= 0:
                        self.rejected += 1
                        raise PoolFull(self._full_message(f" (waited {timeout:g} s)"))
                    self.space.wait(remaining)
                self._check_open()
        finally:
            self.space_wanted -= 1

    def _full_message(self, waited: str) -> str:
        return (
            f"keyedpool: the pool is full{waited}: {self.pending} tasks are pending "
            f"and max_pending is {self.max_pending}. Let submit wait for room "
            "(on_full='block'), raise max_pending, or add workers if the handlers "
            "are the bottleneck"
        )

    # -- dispatcher and worker side ---------------------------------------------

    def placed(self, count: int) -> None:
        """The dispatcher placed *count* tasks from the inbox."""
        with self.lock:
            self.in_transit -= count

    def room_freed(self) -> None:
        """A worker finished a task while a submit waits for room: wake one up."""
        with self.lock:
            self.space.notify()

    def set_broken(self, reason: str) -> None:
        with self.lock:
            if not isinstance(self.halt, BaseException):
                self.halt = BrokenKeyedPool(reason)
            self.space.notify_all()

    # -- lifecycle ----------------------------------------------------------------

    def _start(self) -> None:
        # With self.lock held, on the first submit. Workers start on demand.
        self.started = True
        self.dispatcher = threading.Thread(
            name=f"{self.thread_name_prefix}_dispatcher", target=dispatch, args=(self,)
        )
        self.dispatcher.start()
        _process.register(self)

    def start_worker(self, worker: Worker) -> None:
        """Start *worker*'s thread (by whoever places a task for it first)."""
        self.unstarted.remove(worker)
        worker.thread = threading.Thread(
            name=f"{self.thread_name_prefix}_{worker.index}", target=work, args=(worker, self)
        )
        worker.thread.start()

    def ready_to_sleep(self, worker: Worker) -> bool:
        """Join the idle workers, unless an unkeyed task is waiting (then help with it)."""
        with self.idle_lock:
            if self.unkeyed:
                return False
            worker.waiting = True
            self.idle.append(worker)
            return True

    def stop(self, cancel_futures: bool) -> None:
        """Refuse new tasks; let the threads finish what was accepted, then exit."""
        with self.lock:
            self.closed = True
            if cancel_futures and self.halt is None:
                self.halt = CANCELLING
            if self.started and not self.stopped:
                self.stopped = True
                self.inbox.put(STOP)  # behind every accepted task
            self.space.notify_all()
        if cancel_futures:
            self._cancel_queued()

    def _cancel_queued(self) -> None:
        # Cancel at once, so futures show it when shutdown() returns. First let
        # the dispatcher place what is in transit (it never blocks, and it
        # exits right after placing STOP); then every queued task is reachable.
        # Anything missed still never starts: workers check ``halt``.
        dispatcher = self.dispatcher
        if dispatcher is not None and dispatcher is not threading.current_thread():
            dispatcher.join()
        reachable: list[Task] = list(self.unkeyed)
        for worker in self.workers:
            reachable.extend(worker.batch)
            for batch in list(worker.batches):
                reachable.extend(batch)
        for task in reachable:
            task.cancel()

    def join(self) -> None:
        """Wait for every thread of the pool to exit (except the caller's own)."""
        me = threading.current_thread()
        threads = [self.dispatcher] + [w.thread for w in self.workers]
        for thread in threads:
            if thread is not None and thread is not me and thread.ident is not None:
                thread.join()

    def after_fork_in_child(self) -> None:
        """In a forked child: the parent's tasks are the parent's; start afresh."""
        self._fresh()
