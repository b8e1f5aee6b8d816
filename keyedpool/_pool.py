"""What the threads share: the inbox, the workers, the unkeyed queue and capacity.

The executor (``KeyedPoolExecutor``) owns one ``Pool``; the threads hold only
the ``Pool``, never the executor, so an executor that is dropped without
``shutdown()`` can still be collected, and its threads then stop.

Who owns what (every piece of shared state has one owner):

* ``lock``: the inbox, the tasks handed back to the dispatcher (``returns``),
  the pool's counters (accepted, rejected), ``closed``, ``closing``, ``halt``,
  the submits waiting for room, each key's latest ``replace=True`` task
  (``latest``), what the dispatcher holds (for stats()), and the threads: the dispatcher, which
  workers have started, and the list that ``join()`` waits for. Submit, the
  dispatcher and the workers each hold it for a few lines at a time, never
  while running a task. Threads start under it (a submit starts one for
  unkeyed work when no worker is free, as ThreadPoolExecutor does; the
  dispatcher starts the worker a key routes to).
* ``unkeyed_lock``: the unkeyed queue and the idle workers. A worker decides
  "help with unkeyed work, or sleep" under it, and the dispatcher hands out
  unkeyed work and wakes sleepers under it, so no wake-up is ever lost. Also
  ``balance_hint``: a worker that goes idle reads and clears it there, and
  then asks the dispatcher for a balance (``balance_wanted``, under ``lock``).
* Each worker's ``lock``: that worker's counters (routed, finished, completed,
  failed, cancelled) and its ``room_wanted`` flag. Pending = submitted - done,
  with done summed over the workers; submit adds them up only when a cheap
  lower bound says "maybe full".
* The dispatcher thread: routing (which worker stands in for one whose
  thread could not start), and the parked tasks and held keys (``_holds``).
* Each worker's thread: its running batch and task.
"""

from __future__ import annotations

import logging
import math
import sys
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from contextvars import Context
from time import monotonic
from typing import TYPE_CHECKING, Any, cast

from . import _process
from ._dispatcher import dispatch
from ._errors import BrokenKeyedPool, PoolFull
from ._local import current_worker
from ._routing import Key
from ._task import CANCELLED, Task
from ._worker import WAKE, Worker, work

if TYPE_CHECKING:
    import asyncio

__all__ = ["Pool", "RoomWaiter", "CANCELLING"]

#: ``Pool.halt`` while ``shutdown(cancel_futures=True)`` is cancelling.
CANCELLING = "cancelling"

# Threads start with an empty contextvars context on every Python. (Free-threaded
# 3.14 would otherwise copy the context of whoever starts the thread, and the
# submit that happened to start a worker would leak its context into every task
# that later runs there without a context of its own.)
_THREADS_TAKE_CONTEXT = sys.version_info >= (3, 14)


def _new_thread(
    name: str, target: Callable[..., object], args: tuple[Any, ...]
) -> threading.Thread:
    if _THREADS_TAKE_CONTEXT:
        return threading.Thread(  # type: ignore[call-arg,unused-ignore]
            name=name, target=target, args=args, context=Context()
        )
    return threading.Thread(name=name, target=target, args=args)


#: RoomWaiter.state: in ``Pool.room_waiters``; taken off it and woken; done with.
WAITING, WOKEN, SETTLED = 0, 1, 2


class RoomWaiter:
    """A submit waiting for room in a full pool (see ``Pool.admit``)."""

    __slots__ = ("wake", "state")

    def __init__(self) -> None:
        #: Held until a finished task (or shutdown) wakes the submit.
        self.wake = threading.Lock()
        self.wake.acquire()
        #: Owner: the pool's lock (``Pool.lock``).
        self.state = WAITING

    def wake_up(self) -> bool:
        """Wake the submit (with the pool's lock held); False if nobody can be woken."""
        self.wake.release()
        return True


class AsyncRoomWaiter(RoomWaiter):
    """A coroutine (``asubmit``) waiting for room: woken through its event loop."""

    __slots__ = ("loop", "woken")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.state = WAITING
        self.loop = loop
        #: Done when the coroutine is woken. Owner: the loop's thread.
        self.woken: asyncio.Future[None] = loop.create_future()

    def wake_up(self) -> bool:
        try:
            self.loop.call_soon_threadsafe(_set_done, self.woken)
        except RuntimeError:  # the loop is closed: nobody waits there any more
            return False
        return True


def _set_done(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class Entry:
    """One submit's way in through a full pool (see ``Pool.admit``)."""

    __slots__ = ("block", "timeout", "deadline", "waiting", "replaced")

    def __init__(self, block: bool, timeout: float | None) -> None:
        self.block = block
        self.timeout = timeout
        self.deadline: float | None = None
        self.waiting: RoomWaiter | None = None
        #: The task the accepted one replaces (``replace=True``).
        self.replaced: Task | None = None


class Pool:
    """The state shared by ``submit``, the dispatcher and the workers."""

    def __init__(
        self,
        max_workers: int,
        max_pending: int,
        thread_name_prefix: str,
        initializer: Callable[..., object] | None,
        initargs: tuple[Any, ...],
        routing: str = "hash",
        slow_task_warning: float | None = None,
        timing: bool = False,
    ) -> None:
        self.max_workers = max_workers
        #: Count how long each task waited and ran (Worker.timed_run).
        self.timing = timing
        #: Seconds after which a running task is logged (see _watch); None: never.
        self.slow_task_warning = slow_task_warning
        #: "affinity" or "hash" (see _dispatcher).
        self.routing_mode = routing
        self.max_pending = max_pending
        self.thread_name_prefix = thread_name_prefix
        self.initializer = initializer
        self.initargs = initargs
        #: Where a failing initializer, or a thread that cannot start, is logged.
        self.logger = logging.getLogger("keyedpool")
        # Owner: lock. True once shutdown() was called: submit refuses new tasks.
        # (Kept across a fork: a pool shut down in the parent stays shut down.)
        self.closed = False
        self._fresh()
        # Registered before any thread exists, so a fork at any moment (even
        # while the first submit starts the dispatcher) gives the child a fresh pool.
        _process.register(self)

    def _fresh(self) -> None:
        # Everything a forked child must make anew: locks and queues may have
        # been copied mid-use, and the threads do not exist in the child.
        self.lock = threading.Lock()
        #: One per worker; the list never changes (each Worker says who owns what).
        self.workers = [Worker(i, self) for i in range(self.max_workers)]
        #: The dispatcher waits on it for tasks; submit and stop notify it.
        self.inbox_ready = threading.Condition(self.lock)
        # -- owner: lock ---------------------------------------------------------
        #: Accepted tasks the dispatcher has not taken yet, in submit order.
        #: Appending to it is how submit accepts a task (one step, so that an
        #: exception such as KeyboardInterrupt leaves the task either accepted
        #: and counted, or not accepted at all).
        self.inbox: list[Task] = []
        #: Tasks the dispatcher took and has not routed yet.
        self.routing = 0
        #: Tasks handed back to the dispatcher (see ``hand_back``), in order.
        self.returns: list[Task] = []
        #: What the dispatcher last said it holds (see ``routed``): tasks
        #: parked for a delay or a retry, keys held, and tasks held behind them.
        self.parked = 0
        self.held_keys = 0
        self.held_tasks = 0
        #: Set by stop(): ``"drop"`` at interpreter exit (parked tasks are
        #: cancelled, see _holds.Holds.close), ``"cancel"`` for
        #: ``shutdown(cancel_futures=True)``; None otherwise.
        self.closing: str | None = None
        #: Set by the dispatcher once it has seen ``closing == "cancel"`` and
        #: routed what it had (or once it exited); ``cancel_routed_now`` is its
        #: condition. shutdown(cancel_futures=True) waits for it, then cancels
        #: what is queued: the dispatcher itself may go on for as long as a
        #: task with retries runs, and shutdown(wait=False) must not.
        self.cancel_routed = False
        self.cancel_routed_now = threading.Condition(self.lock)
        #: key -> its latest task submitted with ``replace=True`` that has not
        #: ended (each one cancels the one before it).
        self.latest: dict[Key, Task] = {}
        #: Tasks the dispatcher took. Submitted = accepted + len(inbox).
        self.accepted = 0
        #: Tasks done (over all workers) when we last added them up: a lower
        #: bound, so that submit rarely needs to add them up.
        self.done_seen = 0
        #: Submits refused with PoolFull.
        self.rejected = 0
        #: With routing="affinity": how many times a key went to another worker
        #: than its last one (the dispatcher adds to it as it routes).
        self.key_moves = 0
        #: Submits waiting for room, longest waiting first (see admit and
        #: Worker.room_wanted).
        self.room_waiters: deque[RoomWaiter] = deque()
        #: Set by a worker that ran out of work while ``balance_hint`` was set:
        #: the dispatcher is to look for queued tasks to move to the idle
        #: workers (``_dispatcher.Affinity.balance``). ``take_inbox`` returns for it.
        self.balance_wanted = False
        #: True while the dispatcher waits on ``inbox_ready``, and until when
        #: (``time.monotonic()``; ``inf`` without a timeout).
        self.dispatcher_waiting = False
        self.dispatcher_wakes_at = math.inf
        #: None while running; CANCELLING, or a BrokenKeyedPool, when tasks must
        #: not start. Only ever goes from None to a value.
        self.halt: None | str | BaseException = None
        #: The dispatcher thread, once the first submit started it.
        self.dispatcher: threading.Thread | None = None
        #: Every worker thread started, for join().
        self.threads: list[threading.Thread] = []
        #: Workers whose thread has not started yet (threads start on demand,
        #: as in ThreadPoolExecutor); the last one starts first.
        self.unstarted = self.workers[::-1]
        #: Workers whose thread has started, in the order they started.
        self.started: list[Worker] = []
        #: Unkeyed tasks in the inbox (so a submit knows whether the idle
        #: workers are already spoken for).
        self.unkeyed_in_inbox = 0
        #: Tasks with a plan (submit_with's delay, retry, replace) in the inbox:
        #: while there are none and nothing is held, the dispatcher routes a
        #: batch as it is, without looking at each task's plan.
        self.planned_in_inbox = 0
        # -- owner: unkeyed_lock -------------------------------------------------
        self.unkeyed_lock = threading.Lock()
        self.unkeyed: deque[Task] = deque()
        #: Workers asleep on their empty queue, longest asleep first (a dict
        #: used as an ordered set). A worker is in it exactly when its ``idle``
        #: flag is set.
        self.idle: dict[Worker, None] = {}
        #: Set by the dispatcher (routing="affinity") when it queued tasks
        #: behind others; the first worker to run out of work after that clears
        #: it and wakes the dispatcher (``balance_wanted``): one wake-up per
        #: hint, not one per worker that goes idle.
        self.balance_hint = False
        # -- owner: the dispatcher thread ----------------------------------------
        #: Workers whose thread could not start, and the running worker that
        #: takes their tasks instead (for the life of the pool).
        self.stand_in: dict[int, int] = {}

    # -- submit side -----------------------------------------------------------

    def admit(self, task: Task, block: bool, timeout: float | None) -> Task | None:
        """Accept *task* or raise; on success it is on its way to a worker.

        Returns the task that *task* replaces (``replace=True``), for the
        caller to cancel outside the lock, or None.

        When the pool is full this waits for room outside the pool's lock,
        and takes the lock again only with ``with``: a KeyboardInterrupt can
        land anywhere in here (submit runs on the main thread), and a lock
        re-acquired by hand (as ``threading.Condition.wait`` does) can be
        left released, or released twice, by one.
        """
        with self.lock:
            if self.closed or self.halt is not None or _process.exiting:
                self._check_open()
            if (
                self.accepted + len(self.inbox) - self.done_seen < self.max_pending
                or not self._full()
            ):
                return self._accept(task)  # the common case: room
        entry = Entry(block, timeout)
        try:
            while not self._try_admit(task, entry, RoomWaiter):
                # Full, and registered in room_waiters: sleep until a task ends.
                waiting = cast(RoomWaiter, entry.waiting)
                if entry.deadline is None:
                    waiting.wake.acquire()
                else:
                    waiting.wake.acquire(True, max(0.0, entry.deadline - monotonic()))
            return entry.replaced
        finally:
            self._leave(entry)

    async def admit_async(self, task: Task, block: bool, timeout: float | None) -> Task | None:
        """``admit`` for a coroutine: await room in a full pool without blocking the loop."""
        import asyncio  # here: most programs never need it, and it is slow to import

        loop = asyncio.get_running_loop()
        entry = Entry(block, timeout)
        try:
            while not self._try_admit(task, entry, lambda: AsyncRoomWaiter(loop)):
                woken = cast(AsyncRoomWaiter, entry.waiting).woken
                if entry.deadline is None:
                    await woken
                else:
                    # asyncio.wait, unlike wait_for, leaves *woken* alone on a timeout.
                    await asyncio.wait((woken,), timeout=max(0.0, entry.deadline - monotonic()))
            return entry.replaced
        finally:
            # On cancellation too: a wake-up meant for us goes to the next in line.
            self._leave(entry)

    def _try_admit(self, task: Task, entry: Entry, waiter: Callable[[], RoomWaiter]) -> bool:
        # One look under the lock: accept *task* (True), or, the pool being
        # full, make sure *entry* is registered to be woken (False). Raises
        # PoolFull when it must not wait, or waited its full_timeout.
        with self.lock:
            if self.closed or self.halt is not None or _process.exiting:
                self._check_open()
            while (
                self.accepted + len(self.inbox) - self.done_seen >= self.max_pending
                and self._full()
            ):
                waiting = entry.waiting
                if waiting is None or waiting.state == WOKEN:
                    # Full: wait for room (or refuse), and say so before
                    # reading the counts again, so that a task that ends
                    # after that read wakes us.
                    if waiting is None:
                        self._may_wait(entry.block)
                        if entry.timeout is not None:
                            entry.deadline = monotonic() + entry.timeout
                    entry.waiting = waiter()
                    self._want_room(entry.waiting)
                    continue
                if entry.deadline is not None and entry.deadline - monotonic() <= 0:
                    self.rejected += 1
                    raise PoolFull(self._full_message(f" (waited {entry.timeout:g} s)"))
                return False
            if entry.waiting is not None:
                self._stopped_waiting(entry.waiting, accepted=True)
            entry.replaced = self._accept(task)
            return True

    def _leave(self, entry: Entry) -> None:
        # Not SETTLED: we leave without the room (an error, an interrupt).
        # Only the submitting thread settles it, so this read needs no lock.
        waiting = entry.waiting
        if waiting is not None and waiting.state != SETTLED:
            self._give_up_room(waiting)

    def _accept(self, task: Task) -> Task | None:
        # With self.lock held and room for the task; returns the task it replaces.
        if self.dispatcher is None:
            self._start_dispatcher()
        if task.key is None and self.unstarted:
            self._maybe_start_for_unkeyed()
        if self.dispatcher_waiting:
            # Notify first, then clear the flag: if anything interrupts us
            # in between, the flag stays set and the next submit notifies.
            self.inbox_ready.notify()
            self.dispatcher_waiting = False
        if task.key is None:
            # Counted before it is accepted: if we are interrupted in
            # between, the count is one high until the dispatcher takes the
            # inbox, which can only start a worker a little early.
            self.unkeyed_in_inbox += 1
        plan = task.plan
        replaced = None
        if plan is not None:
            # Counted before the task is accepted, as unkeyed_in_inbox is: a
            # count one too high only sends a batch down the slower path.
            self.planned_in_inbox += 1
        if plan is not None and plan.replace:
            # Before the task is accepted, so that it is in ``latest`` by the
            # time anything can end it (its done-callback forgets it).
            key = cast(Key, task.key)
            replaced = self.latest.get(key)
            self.latest[key] = task
        self.inbox.append(task)  # accepted
        return replaced

    def forget_latest(self, task: Future[Any]) -> None:
        """A task submitted with ``replace=True`` ended: it replaces nothing any more."""
        with self.lock:
            key = cast(Task, task).key
            if self.latest.get(key) is task:  # type: ignore[arg-type]
                del self.latest[key]  # type: ignore[arg-type]

    def _check_open(self) -> None:
        # With self.lock held.
        if isinstance(self.halt, BrokenKeyedPool):
            # A fresh instance per call: one shared instance would collect
            # the tracebacks of every caller.
            raise BrokenKeyedPool(str(self.halt))
        if _process.exiting:
            raise RuntimeError("cannot schedule new futures after interpreter shutdown")
        if self.closed:
            raise RuntimeError("cannot schedule new futures after shutdown")

    def _may_wait(self, block: bool) -> None:
        # With self.lock held and the pool full: raise PoolFull if this submit
        # must not wait for room.
        if not block:
            self.rejected += 1
            raise PoolFull(self._full_message(""))
        me = current_worker()
        if me is not None and me.pool is self:
            # Only this pool's workers make room, and one of them would be
            # waiting for it: if all of them did, the pool would stop for good.
            self.rejected += 1
            raise PoolFull(
                self._full_message(
                    "",
                    "This submit comes from a task running on the same pool, and "
                    "waiting for room there could stop the pool for good (only its "
                    "workers make room, and this one would be waiting); so keyedpool "
                    "raises instead of waiting. Submit follow-up work to another pool, "
                    "or raise max_pending",
                )
            )

    def _want_room(self, waiting: RoomWaiter) -> None:
        # With self.lock held. Workers look at their own room_wanted flag (under
        # their own lock) after each task: all flags are set while anyone waits.
        if not self.room_waiters:
            for worker in self.workers:
                with worker.lock:
                    worker.room_wanted = True
        self.room_waiters.append(waiting)

    def _wake_one(self) -> None:
        # With self.lock held: room was freed; the longest waiting submit looks.
        while self.room_waiters:
            waiting = self.room_waiters.popleft()
            waiting.state = WOKEN
            if waiting.wake_up():
                return
        for worker in self.workers:
            with worker.lock:
                worker.room_wanted = False

    def _wake_all(self) -> None:
        # With self.lock held: the pool closed or broke; every waiting submit
        # must look (and raise).
        while self.room_waiters:
            self._wake_one()

    def _stopped_waiting(self, waiting: RoomWaiter, accepted: bool) -> None:
        # With self.lock held: *waiting* leaves, with the room or without it.
        if waiting.state == WAITING:
            try:
                self.room_waiters.remove(waiting)
            except ValueError:  # interrupted before _want_room added it
                pass
        elif waiting.state == WOKEN and not accepted:
            # It was woken for room it will not take: pass the wake-up on.
            self._wake_one()
        waiting.state = SETTLED

    def _give_up_room(self, waiting: RoomWaiter) -> None:
        # A submit that waited leaves without its task accepted. This must
        # happen even if another interrupt lands here, or a wake-up meant
        # for it would be lost, and another waiting submit might sleep for good.
        interrupted: BaseException | None = None
        while waiting.state != SETTLED:
            try:
                with self.lock:
                    if waiting.state != SETTLED:
                        self._stopped_waiting(waiting, accepted=False)
            except BaseException as exc:  # an interrupt while taking the lock
                interrupted = exc
        if interrupted is not None:
            raise interrupted

    def done(self) -> int:
        """Tasks finished, failed or cancelled, over all workers (each read under its lock)."""
        total = 0
        for worker in self.workers:
            with worker.lock:
                ended = worker.ended
                total += ended[0] + ended[1] + ended[2]  # not ended[RETRYING]
        return total

    def pending(self) -> int:
        """Tasks accepted and not finished (queued, running, or not routed yet)."""
        with self.lock:
            return self.accepted + len(self.inbox) - self.done()

    def _full(self) -> bool:
        # With self.lock held; the cheap bound said full: add up the counts to be sure.
        self.done_seen = self.done()
        return self.accepted + len(self.inbox) - self.done_seen >= self.max_pending

    def room_freed(self) -> None:
        """A task ended while a submit may wait for room: wake one up."""
        with self.lock:
            self._wake_one()

    def _full_message(self, waited: str, advice: str = "") -> str:
        # *waited*: "" for a submit that did not wait (on_full="raise"), else
        # how long it waited (full_timeout): the advice differs. *advice*
        # replaces it where neither applies.
        if not advice:
            wait = (
                "Wait longer (a larger full_timeout, or None to wait as long as it takes)"
                if waited
                else "Let submit wait for room (on_full='block')"
            )
            advice = (
                f"{wait}, raise max_pending, or add workers if the handlers are the bottleneck"
            )
        return (
            f"keyedpool: the pool is full{waited}: "
            f"{self.accepted + len(self.inbox) - self.done_seen} tasks "
            f"are pending and max_pending is {self.max_pending}. {advice}"
        )

    def _maybe_start_for_unkeyed(self) -> None:
        # With self.lock held. As ThreadPoolExecutor does, start a worker unless
        # one is free for this task: free means idle and not already wanted by
        # an earlier unkeyed task. (A new worker is idle from the start, see
        # start_worker.)
        with self.unkeyed_lock:
            free = len(self.idle) - len(self.unkeyed)
        if free > self.unkeyed_in_inbox:
            return
        if not self.start_worker(self.unstarted[-1], idle=True) and not self.started:
            raise RuntimeError(
                "keyedpool: can't start a worker thread (the system refused a new "
                "thread, see the 'keyedpool' log), and no worker is running to take "
                "this task; it was not accepted"
            )

    def _start_dispatcher(self) -> None:
        # With self.lock held, on the first submit. If starting fails, nothing
        # is accepted and the next submit tries again. The thread checks, under
        # the lock, that it is still the pool's dispatcher: if start() was
        # interrupted after the thread began (KeyboardInterrupt), it is not, and
        # it exits without touching anything.
        thread = _new_thread(f"{self.thread_name_prefix}_dispatcher", _dispatch, (self,))
        self.dispatcher = thread
        try:
            thread.start()
        except BaseException:
            self.dispatcher = None
            raise

    # -- dispatcher side ----------------------------------------------------------

    def take_inbox(
        self, timeout: float | None = None, busy: bool = False, closing: str | None = None
    ) -> tuple[list[Task], bool, list[Task], bool, str | None, bool]:
        """Wait for accepted or handed-back tasks and take them all; say whether to stop.

        With a *timeout*, the lists are empty if nothing came within it.
        *busy*: the dispatcher still holds tasks (see ``_holds``), so it waits
        for them even once the pool is closed. *closing*: how the dispatcher
        last saw the pool closing; a change wakes it too. Returns the tasks,
        whether any of them has a plan (``submit_with``'s delay, retry or
        replace), the tasks handed back, whether the pool is closed (then
        nothing new comes after these), how it closes, and whether a worker
        that ran out of work asked for a balance (see ``balance_hint``).
        """
        with self.lock:
            while (
                not self.inbox
                and not self.returns
                and (busy or not self.closed)
                and self.closing == closing
                and not self.balance_wanted
            ):
                self.dispatcher_waiting = True
                self.dispatcher_wakes_at = math.inf if timeout is None else monotonic() + timeout
                if not self.inbox_ready.wait(timeout) and timeout is not None:
                    break
            self.dispatcher_waiting = False
            tasks, self.inbox = self.inbox, []
            returns, self.returns = self.returns, []
            self.accepted += len(tasks)
            self.routing = len(tasks)
            self.unkeyed_in_inbox = 0
            planned, self.planned_in_inbox = self.planned_in_inbox > 0, 0
            balance, self.balance_wanted = self.balance_wanted, False
            # Submit refuses new tasks once closed: nothing can come after these.
            return tasks, planned, returns, self.closed, self.closing, balance

    def hand_back(self, task: Task, retry_at: float = 0.0) -> None:
        """Give the dispatcher back a task it holds the key of (see ``_holds``).

        By its worker when an attempt of a task with retries ended, and by
        ``Task.cancel`` when a parked task was cancelled. *retry_at*: the
        attempt failed, and the task is to run again then (``monotonic()``).
        """
        with self.lock:
            self.returns.append(task)
            # A retry due after the dispatcher wakes anyway need not wake it
            # now (in a storm of retries, most do not: fewer thread switches).
            if self.dispatcher_waiting and retry_at < self.dispatcher_wakes_at:
                self.inbox_ready.notify()
                self.dispatcher_waiting = False

    def end_cancelled(self, task: Task) -> None:
        """A task the dispatcher held was cancelled: it ends there, and counts as cancelled."""
        task.abandon(None)
        self.workers[0].count(CANCELLED)

    def routed(self, moves: int) -> None:
        """The tasks the dispatcher took are on queues (or held); *moves* keys changed worker."""
        with self.lock:
            self.routing = 0
            self.key_moves += moves

    def moved(self, moves: int) -> None:
        """The dispatcher moved *moves* keys' queued tasks to another worker (for stats())."""
        with self.lock:
            self.key_moves += moves

    def held(self, parked: int, held: dict[Key, Any]) -> None:
        """What the dispatcher holds now (see ``_holds``), for stats()."""
        waiting = sum(len(tasks) for tasks in held.values())
        with self.lock:
            self.parked = parked
            self.held_keys = len(held)
            self.held_tasks = waiting

    def finished_count(self, index: int) -> int:
        """How many of the tasks routed to worker *index* it has finished."""
        worker = self.workers[index]
        with worker.lock:
            return worker.finished

    def take_back(self, worker: Worker, want: int = 0) -> list[Task]:
        """Take back what *worker* has queued and not started, except its running key's tasks.

        For the dispatcher (routing="affinity"), when the worker seems stuck on
        one task: the tasks of other keys can run elsewhere. All of a key's
        tasks on the worker are taken, in their order, so the key keeps its
        order wherever it goes next. Under the worker's lock, where it claims
        each task before it starts it (``Worker.advance``).

        With *want*, only some keys: those whose last task is queued last
        (they would wait longest), until at least *want* tasks are taken.
        """
        with worker.lock:
            claimed = worker.claimed
            keep = claimed.key if claimed is not None else None
            start = worker.claimed_at + 1
            slots = [
                (batch, i)
                for batch, first in [(worker.batch, start), *((b, 0) for b in worker.batches)]
                for i in range(first, len(batch))
                if batch[i] is not None and (keep is None or batch[i].key != keep)
            ]
            if want and len(slots) > want:
                slots = _keys_queued_last(slots, want)
            taken: list[Task] = []
            for batch, i in slots:
                task = batch[i]
                # Not started, and the worker starts only what it finds here
                # under this lock: it will skip the slot.
                batch[i] = None  # type: ignore[call-overload]
                task.worker = None
                taken.append(task)
            worker.routed -= len(taken)
        return taken

    def idle_workers(self) -> list[int]:
        """The started workers asleep on an empty queue, longest asleep first.

        Under the pool's lock too: a worker being started for an unkeyed task
        is in the idle set while ``start_worker`` (under that lock) starts its
        thread, and leaves it if the start fails; work moved to it then would
        never run.
        """
        with self.lock, self.unkeyed_lock:
            return [worker.index for worker in self.idle]

    def hint_balance(self) -> None:
        """Have the next worker that runs out of work wake the dispatcher (see ``balance_hint``)."""
        with self.unkeyed_lock:
            self.balance_hint = True

    def free_workers(self) -> list[int]:
        """Workers free for a key, in pop() order: idle ones (latest first), then unstarted.

        Read by the dispatcher. (Whether a worker started is read without the
        pool's lock; ``start_for_keyed`` checks again under it. The idle set is
        read under it, as in ``idle_workers``.)
        """
        with self.lock, self.unkeyed_lock:
            idle = [worker.index for worker in self.idle]
        unstarted = [w.index for w in self.workers if w.thread is None]
        # The worker that became idle last is taken first: its thread is the
        # likeliest to wake quickly (about 5 us less submit-to-start, measured).
        return unstarted[::-1] + idle

    def give(self, worker: Worker, group: list[Task]) -> None:
        """Put *group* on *worker*'s queue; a worker with work is not idle."""
        with worker.lock:
            # Counted before the worker can see them, so backlog >= 0.
            worker.routed += len(group)
        worker.batches.append(group)
        # Under unkeyed_lock, so that a worker deciding whether to sleep sees
        # either this batch on its queue or its idle flag cleared.
        with self.unkeyed_lock:
            if worker.idle:
                worker.idle = False
                del self.idle[worker]
            worker.queue.put(group)

    def add_unkeyed(self, tasks: list[Task]) -> int:
        """Queue unkeyed tasks and wake idle workers for them; return how many more are wanted."""
        wanted = len(tasks)
        with self.unkeyed_lock:
            self.unkeyed.extend(tasks)
            idle = self.idle
            while wanted and idle:
                worker = next(iter(idle))  # the longest asleep: work spreads over the workers
                del idle[worker]
                worker.idle = False
                worker.queue.put(WAKE)
                wanted -= 1
        return wanted

    def start_worker(self, worker: Worker, idle: bool = False) -> bool:
        """Start *worker*'s thread; ``False`` if the system refused. With ``lock`` held.

        *idle*: the worker is started for an unkeyed task that a submit is
        about to accept, and counts as idle from now on (see below). Otherwise
        it is started for work that is already queued, which it finds itself.

        The thread checks, under the lock, that it is still *worker*'s thread
        before it does anything: if ``start()`` was interrupted after the thread
        began (KeyboardInterrupt), the worker stays unstarted and that thread exits.
        """
        thread = _new_thread(f"{self.thread_name_prefix}_{worker.index}", work, (worker, self))
        worker.thread = thread
        if idle:
            # Idle from the start: the dispatcher may hand out the task it is
            # started for before the thread runs, and must not start yet
            # another worker for it. The thread then goes straight to sleep on
            # its queue (resting), where the task's wake-up waits.
            worker.resting = True
            with self.unkeyed_lock:
                worker.idle = True
                self.idle[worker] = None
        try:
            thread.start()
        except RuntimeError:
            self._not_idle(worker)
            worker.thread = None
            # "can't start new thread": a pid or memory limit. The pool carries
            # on with the workers it has (see _dispatcher._start_or_stand_in).
            self.logger.error(
                "keyedpool: could not start worker thread %s", thread.name, exc_info=True
            )
            return False
        except BaseException:
            self._not_idle(worker)
            worker.thread = None
            raise
        self.unstarted.remove(worker)
        self.started.append(worker)
        self.threads.append(thread)
        return True

    def _not_idle(self, worker: Worker) -> None:
        # Its thread did not start: take it out of the idle set. If the
        # dispatcher already woke it for an unkeyed task, wake another in its place.
        worker.resting = False
        with self.unkeyed_lock:
            if worker.idle:
                worker.idle = False
                del self.idle[worker]
            elif self.unkeyed and self.idle:
                other = next(iter(self.idle))
                del self.idle[other]
                other.idle = False
                other.queue.put(WAKE)

    def start_for_keyed(self, worker: Worker) -> Worker | None:
        """Start *worker* (by the dispatcher), or name a running worker to stand in.

        ``None`` when no worker thread runs at all: the tasks cannot run.
        """
        with self.lock:
            if worker.thread is not None or self.start_worker(worker):
                return worker
            if not self.started:
                return None
            self.unstarted.remove(worker)  # it never starts: its keys go elsewhere
            return self.started[worker.index % len(self.started)]

    def start_for_unkeyed(self, wanted: int) -> None:
        """Start up to *wanted* workers for unkeyed tasks that no idle worker took (dispatcher).

        A worker that a submit started for an unkeyed task may have been given
        keyed work since; then the unkeyed task needs another one.
        """
        with self.lock:
            while wanted and self.unstarted and self.start_worker(self.unstarted[-1]):
                wanted -= 1

    def started_workers(self) -> list[Worker]:
        with self.lock:
            return list(self.started)

    def fail_unrunnable(self, tasks: list[Task], reason: BaseException) -> None:
        """Fail tasks that no thread can run (no worker thread could start)."""
        for task in tasks:
            self.workers[0].count(task.abandon(reason))
            plan = task.plan
            if plan is not None and plan.retry is not None:
                self.hand_back(task)  # as a worker would: its key is let go

    # -- worker side ----------------------------------------------------------------

    def take_unkeyed(self, worker: Worker | None) -> Task | None:
        """An unkeyed task to run, or ``None``: then *worker* is idle (unless work came)."""
        try:
            # A deque's popleft is atomic by itself; the lock is for deciding to sleep.
            return self.unkeyed.popleft()
        except IndexError:
            pass
        with self.unkeyed_lock:
            # Not "if self.unkeyed: popleft()": another worker may pop in
            # between, on the lock-free path above (seen on free-threaded 3.14t).
            try:
                return self.unkeyed.popleft()
            except IndexError:
                pass
            if worker is None or not worker.queue.empty():
                return None
            ask = self._go_idle(worker)
        if ask:
            self._ask_balance()
        return None

    def rest(self, worker: Worker) -> bool:
        """Put *worker* in the idle set now if it has nothing to do; say whether it did.

        Called by the worker between the return of an unkeyed call and the
        resolution of its future (not when a done-callback will run on it).
        Work that comes later finds it idle and wakes it (``give`` and
        ``add_unkeyed`` run under the same lock).
        """
        with self.unkeyed_lock:
            if self.unkeyed or not worker.queue.empty():
                return False
            ask = self._go_idle(worker)
        if ask:
            self._ask_balance()
        return True

    def _go_idle(self, worker: Worker) -> bool:
        # With unkeyed_lock held: *worker* has nothing to do and sleeps next.
        # Whether it is to ask for a balance (see balance_hint) once it lets go
        # of the lock.
        worker.idle = True
        self.idle[worker] = None
        ask, self.balance_hint = self.balance_hint, False
        return ask

    def _ask_balance(self) -> None:
        # A worker ran out of work while others had tasks queued behind
        # others: the dispatcher may move some of them to it (and to any other
        # idle worker). Outside unkeyed_lock: the pool's lock comes first.
        with self.lock:
            self.balance_wanted = True
            if self.dispatcher_waiting:
                self.inbox_ready.notify()
                self.dispatcher_waiting = False

    def set_broken(self, reason: str) -> None:
        with self.lock:
            if not isinstance(self.halt, BaseException):
                self.halt = BrokenKeyedPool(reason)
            self._wake_all()

    # -- lifecycle ----------------------------------------------------------------

    def stop(self, cancel_futures: bool, at_exit: bool = False) -> None:
        """Refuse new tasks; let the threads finish what was accepted, then exit.

        *at_exit*: the interpreter is exiting; tasks parked for a delay or a
        retry are cancelled rather than waited for.
        """
        with self.lock:
            self.closed = True
            if at_exit and self.closing is None:
                self.closing = "drop"
            # The dispatcher routes what is left, then stops the workers.
            self.inbox_ready.notify()
            self._wake_all()
            dispatcher = self.dispatcher
        if cancel_futures:
            self._cancel_queued(dispatcher)

    def _cancel_queued(self, dispatcher: threading.Thread | None) -> None:
        # Cancel at once, so futures show it when shutdown() returns. First let
        # the dispatcher route what is left and cancel what it holds (it never
        # blocks); then every queued task is reachable. Tasks that a worker starts
        # meanwhile were started before shutdown() returned, as in the
        # standard library.
        with self.lock:
            # The dispatcher cancels the tasks it holds (see _holds.Holds.close).
            self.closing = "cancel"
            self.inbox_ready.notify()
        if dispatcher is not None and dispatcher is not threading.current_thread():
            with self.lock:
                while not self.cancel_routed:
                    self.cancel_routed_now.wait()
        with self.unkeyed_lock:
            reachable: list[Task] = list(self.unkeyed)
        for worker in self.workers:
            reachable.extend(worker.batch)
            for batch in list(worker.batches):
                reachable.extend(batch)
        for task in reachable:
            if task is not None:  # a finished or taken-back task's slot
                task.cancel()
        # A task a worker took off a queue while we looked was missed above:
        # from now on, workers skip what has not started instead of running it.
        with self.lock:
            if self.halt is None:
                self.halt = CANCELLING

    def cancel_was_routed(self) -> None:
        """By the dispatcher: it has routed what it had since ``closing`` became "cancel"."""
        with self.lock:
            self.cancel_routed = True
            self.cancel_routed_now.notify_all()

    def join(self) -> None:
        """Wait for every thread of the pool to exit (except the caller's own)."""
        me = threading.current_thread()
        with self.lock:
            dispatcher = self.dispatcher
        # Only the dispatcher starts workers: once it has exited, the list of
        # threads is complete.
        if dispatcher is not None and dispatcher is not me:
            dispatcher.join()
        with self.lock:
            threads = list(self.threads)
        for thread in threads:
            if thread is not me:
                thread.join()

    def after_fork_in_child(self) -> None:
        """In a forked child: the parent's tasks are the parent's; start afresh."""
        self._fresh()


def _keys_queued_last(
    slots: list[tuple[list[Task], int]], want: int
) -> list[tuple[list[Task], int]]:
    # The slots of the keys whose last task is queued last, until at least
    # *want*: all of each chosen key's tasks, in their order.
    count: dict[Key | None, int] = {}
    for batch, i in reversed(slots):
        key = batch[i].key
        count[key] = count.get(key, 0) + 1  # (inserted in the order we want)
    chosen: set[Key | None] = set()
    total = 0
    for key, tasks in count.items():
        chosen.add(key)
        total += tasks
        if total >= want:
            break
    return [(batch, i) for batch, i in slots if batch[i].key in chosen]


def _dispatch(pool: Pool) -> None:
    with pool.lock:
        mine = pool.dispatcher is threading.current_thread()
    if mine:
        try:
            dispatch(pool)
        finally:
            pool.cancel_was_routed()  # nothing more will be routed
