"""The dispatcher: takes accepted tasks in submit order and puts each where it runs.

A keyed task goes on the queue of a worker. With ``routing="affinity"`` (the
default, the ``Affinity`` class below): the worker its key already has tasks
on, else a free or lightly loaded one; and now and then the dispatcher takes
back tasks that have not started from a worker that seems stuck, or has far
more queued than the others, and routes them again, or moves some to a worker
that ran out of work. With ``routing="hash"``:
always the worker its key hashes to (see ``_routing``). An unkeyed task goes on
the unkeyed queue, and a sleeping worker is woken to take it (submit starts a
new worker when none is free, as ThreadPoolExecutor does).

Nothing here ever blocks on a worker: worker queues have no size limit
(capacity is enforced once, in ``submit``), so one stuck key cannot hold up
the dispatcher. (A dispatcher that blocks on a full worker queue stops every
key instead.)

The dispatcher thread is the only one that routes, so routing state (such as
which worker stands in for one whose thread could not start) needs no lock.
"""
from __future__ import annotations

from time import monotonic
from typing import TYPE_CHECKING

from ._holds import Holds
from ._routing import SEED, Key, key_bytes, mmh3_hash, two_choices
from ._task import Task
from ._watch import Watch
from ._worker import STOP

if TYPE_CHECKING:
    from ._pool import Pool

#: Seconds without a finished task after which a worker with work seems stuck.
#: A worker that only waits for a CPU (or for the GIL, with dozens of busy
#: threads taking turns) can look stuck too: in a flood of 100,000 no-op tasks
#: on 2 cores, about 8% of them were moved for that reason, at no measurable
#: cost in throughput. Waiting longer would leave the tasks queued behind a
#: really stuck task waiting longer.
STALLED = 0.1

#: Parked tasks due within this many seconds of each other are let go together
#: (one wake-up of the dispatcher for them all, not one each).
TIMER_SLACK = 0.001

#: A worker is overloaded when it has more tasks queued than both of these:
#: a floor, and a multiple of what the other running workers have on average.
OVERLOADED = (16, 4.0)

#: A worker that ran out of work asks the dispatcher to move to it some of the
#: tasks that wait on the busiest workers (``Affinity.balance``): at most once
#: per this many seconds, so that a flood of short tasks pays for few of them.
BALANCE_EVERY = 0.002
#: ...and only from a worker with at most this many tasks waiting: taking some
#: of a long queue apart costs more than it saves when the tasks are short, and
#: a worker with far more queued than the others is relieved anyway (OVERLOADED).
BALANCE_MAX = 128

__all__ = ["Affinity", "dispatch", "place"]


def dispatch(pool: Pool) -> None:
    """The dispatcher thread's loop: route every accepted task, then stop the workers."""
    affinity = Affinity(pool) if pool.routing_mode == "affinity" else None
    holds = Holds(pool)
    slow = pool.slow_task_warning
    watch = Watch(pool, slow) if slow is not None else None
    closing: str | None = None
    holding = False  # whether stats() was last told that something is held
    while True:
        # With affinity, look again now and then while workers have work, for
        # one that is stuck with tasks queued behind it; with warnings, for
        # slow tasks; with parked tasks, when the next one is due.
        timeout = None if affinity is None else affinity.next_look()
        if watch is not None:
            timeout = watch.timeout(timeout)
        due = holds.next_due()
        if due is not None:
            due += TIMER_SLACK
            if timeout is None or due < timeout:
                timeout = due
        tasks, planned, returns, closed, closing_now, balance = pool.take_inbox(
            timeout, holds.busy(), closing
        )
        try:
            if affinity is not None:
                # First, so that tasks taken back go before newer ones of their key.
                affinity.rescue()
                if balance or affinity.asked:
                    if closing_now == "cancel":
                        # What waits is being cancelled: nothing to spread.
                        affinity.asked = False
                    else:
                        affinity.balance()
            if not (planned or returns or holds.busy()):
                ready = tasks  # the common case: nothing held, nothing planned
            else:
                ready = []
                # Tasks handed back, then tasks whose time has come, let go
                # of their keys before newer tasks of those keys are sorted.
                holds.back(returns, ready)
                holds.due(ready)
                holds.sort(tasks, ready)
            cancelling = closing_now == "cancel" and closing != "cancel"
            if closing_now is not None and closing_now != closing:
                closing = closing_now
                ended = holds.close(closing, ready)
                if ended and closing == "drop":
                    pool.logger.warning(
                        "keyedpool: the interpreter is exiting: %d task(s) waiting "
                        "for a delay or a retry were cancelled",
                        ended,
                    )
            if tasks or ready:
                if affinity is None:
                    place(pool, ready)
                else:
                    affinity.place(ready)
            if cancelling:
                pool.cancel_was_routed()  # shutdown(cancel_futures=True) waits for this
            if holds.busy() or holding:
                pool.held(holds.parked, holds.held)  # for stats()
                holding = holds.busy()
            if watch is not None:
                watch.look(bool(tasks))
        except BaseException:  # pragma: no cover - a bug: keep the pool alive
            pool.logger.critical("keyedpool: error in the dispatcher", exc_info=True)
        # Drop our references before we wait: the futures (and their results)
        # must be freed when their callers let go of them, not at the next batch.
        tasks = returns = ready = []
        if closed and not holds.busy():
            for worker in pool.started_workers():
                worker.queue.put(STOP)  # after everything routed to it
            return


def place(pool: Pool, tasks: list[Task]) -> None:
    """``routing="hash"``: put *tasks*, in order, on their workers' queues or the unkeyed queue."""
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
    _give_all(pool, own, loose, 0)


def _give_all(pool: Pool, own: dict[int, list[Task]], loose: list[Task], moves: int) -> None:
    workers = pool.workers
    for index, group in own.items():
        for task in group:
            task.worker = index
        pool.give(workers[index], group)
    if loose:
        wanted = pool.add_unkeyed(loose)
        if wanted:
            pool.start_for_unkeyed(wanted)
    pool.routed(moves)


class Affinity:
    """``routing="affinity"``: a key stays on a worker only while it has tasks there.

    Owned by the dispatcher thread (made by it, used only by it), so none of
    this needs a lock. Each worker counts the tasks routed to it (``sent``
    here) and the tasks it finished (``Worker.finished``, read under the
    worker's lock). A key remembers its worker and that worker's ``sent``
    count just after the key's last task; once the worker's ``finished`` count
    reaches it, nothing of the key is left there and its next task may go
    anywhere. Order per key holds because a key moves only then. A stale
    ``finished`` is lower than the truth, which only keeps a key where it is.
    """

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        count = len(pool.workers)
        #: Tasks routed to each worker (the dispatcher's own copy of Worker.routed).
        self.sent = [0] * count
        #: key -> where its last task went: ``mark * workers + index``, for the
        #: worker's index and its ``sent`` count just after that task (one int
        #: rather than a pair: no object for the garbage collector per key).
        #: Once a balance took tasks of other keys back from that worker, a
        #: mark may be past its ``sent``: it then stands for all of ``sent``.
        self.bound: dict[Key, int] = {}
        #: Workers whose thread could not start: never chosen again.
        self.dead: set[int] = set()
        #: Sweep ``bound`` of free keys when it grows past this.
        self.sweep_at = 1024
        # Per batch: each worker's finished count (-1: not read yet), and the
        # free workers not handed a key yet (None: not read yet).
        self.finished = [-1] * count
        self.free: list[int] | None = None
        self.now = 0.0
        #: Per worker: its finished count when we last saw it change, and when.
        #: A worker with work that finished nothing for STALLED seconds is
        #: probably stuck on one task: a key with a choice goes elsewhere.
        self.seen = [0] * count
        self.progress = [0.0] * count
        #: When ``rescue`` last looked for stuck workers.
        self.looked = 0.0
        #: Whether we set the pool's ``balance_hint`` since a worker last
        #: cleared it (by asking for a balance); whether a balance was asked
        #: for and is not due yet (see BALANCE_EVERY), and when the last one ran.
        self.hinted = False
        self.asked = False
        self.balanced = 0.0
        #: Per worker: its ``sent`` count when a balance found only its running
        #: key's tasks waiting there (-1: never). Until more is routed there,
        #: nothing on it can move, so a balance does not look again.
        self.unmovable = [-1] * count

    def next_look(self) -> float | None:
        """How long the dispatcher may wait for tasks before it looks for stuck workers."""
        timeout = None
        if any(sent > seen for sent, seen in zip(self.sent, self.seen, strict=True)):
            timeout = STALLED / 2  # some worker has (or had, when last seen) work
        if self.asked:
            due = max(0.0, self.balanced + BALANCE_EVERY - monotonic())
            timeout = due if timeout is None else min(timeout, due)
        return timeout

    def balance(self) -> None:
        """A worker ran out of work: move to it some of what waits on the busiest workers.

        The end of a burst: each key's tasks stay on one worker, and keys have
        more or fewer tasks, so some workers run out of work while others still
        have a queue. Each idle worker takes about half of what waits on one
        of the busiest workers (whole keys, those queued last; never the
        running task's key), so every worker finishes at about the same time.
        At most once per ``BALANCE_EVERY`` seconds: a balance asked for sooner
        waits until then.
        """
        self.hinted = False  # the worker that asked cleared the pool's hint
        now = monotonic()
        if now - self.balanced < BALANCE_EVERY:
            self.asked = True  # next_look wakes the dispatcher when it is due
            return
        self.asked = False
        self.balanced = self.now = now
        self.finished = [-1] * len(self.sent)
        pool = self.pool
        sent = self.sent
        # Tasks waiting behind the running one, on the workers where some of
        # them may be of another key (see ``unmovable``).
        waiting = {
            w.index: sent[w.index] - self._finished(w.index) - 1
            for w in pool.started_workers()
            if self.unmovable[w.index] != sent[w.index]
        }
        sources = sorted((i for i, n in waiting.items() if n > 0), key=waiting.__getitem__)
        if not sources:
            return
        # Before looking for idle workers: one that runs out of work from now
        # on asks again (at worst once for nothing).
        self._hint()
        idle = pool.idle_workers()
        count = len(sent)
        bound = self.bound
        moved = 0
        while idle and sources:
            source = sources.pop()  # the busiest left
            if source in idle or waiting[source] > BALANCE_MAX:
                continue
            back = pool.take_back(pool.workers[source], max(1, waiting[source] // 2))
            if not back:
                self.unmovable[source] = sent[source]  # all of the running key
                continue
            target = idle.pop(0)
            sent[source] -= len(back)
            moved += len({task.key for task in back})
            for task in back:
                mark = sent[target] = sent[target] + 1
                bound[task.key] = mark * count + target  # type: ignore[index]
                task.worker = target
            self.progress[target] = now  # it had nothing to do until now
            pool.give(pool.workers[target], back)
        if moved:
            # (The keys left on a source keep their marks, which may now be
            # past what is routed there: place() reads them as "all of it".)
            pool.moved(moved)

    def _hint(self) -> None:
        if not self.hinted:
            self.hinted = True
            self.pool.hint_balance()

    def rescue(self) -> None:
        """Move the keys queued behind a stuck task, or on an overloaded worker, elsewhere.

        A worker that has work and finished nothing for ``STALLED`` seconds
        seems stuck on one task; a worker with far more queued than the
        others (``OVERLOADED``) got several busy keys that keep it busy.
        The tasks queued there that are not of the running task's key can
        run elsewhere: take them back and route them again, as if they were
        new (each key's tasks keep their order, and come before anything
        newer of the key).
        """
        now = monotonic()
        if now - self.looked < STALLED / 2 or len(self.sent) == 1:
            return  # (with one worker, there is nowhere else to go)
        self.looked = self.now = now
        self.finished = [-1] * len(self.sent)
        workers = self.pool.started_workers()
        backlog = {w.index: self.sent[w.index] - self._finished(w.index) for w in workers}
        stuck = {i for i, queued in backlog.items() if queued > 0 and self._load(i)[0]}
        if len(stuck) == len(workers) and len(self.dead) + len(workers) == len(self.sent):
            return  # every worker seems stuck, and none can start: nowhere better to go
        total = sum(backlog.values())
        others = max(1, len(workers) - 1)
        floor, ratio = OVERLOADED
        taken: list[Task] = []
        for worker in workers:
            index = worker.index
            queued = backlog[index]
            crowded = queued > floor and queued > ratio * (total - queued) / others
            if crowded or index in stuck:
                back = self.pool.take_back(worker)
                if back:
                    self.sent[index] -= len(back)
                    taken.extend(back)
        if not taken:
            return
        bound = self.bound
        keys: set[Key] = {task.key for task in taken if task.key is not None}
        for key in keys:
            bound.pop(key, None)
        # Only the running task's key is left on those workers: each such
        # key is free once its worker has finished everything routed to it.
        count = len(self.sent)
        for key, entry in bound.items():
            mark, index = divmod(entry, count)
            if mark > self.sent[index]:
                bound[key] = self.sent[index] * count + index
        self.place(taken, len(keys))

    def place(self, tasks: list[Task], moved: int = 0) -> None:
        """Put *tasks*, in order, on their workers' queues or on the unkeyed queue.

        *moved*: keys that were taken back from a stuck worker (for ``key_moves``).
        """
        pool = self.pool
        sent = self.sent
        bound = self.bound
        # What each worker finished, and which workers are free, are read at
        # most once per batch, and only when needed (each under its owner's lock).
        self.finished = [-1] * len(sent)
        self.free = None
        self.now = monotonic()
        own: dict[int, list[Task]] = {}
        loose: list[Task] = []
        moves = moved
        count = len(sent)
        finished = self.finished
        behind = False  # whether some task was queued behind another
        for task in tasks:
            key = task.key
            if key is None:
                loose.append(task)
                continue
            entry = bound.get(key)
            busy = False
            if entry is not None:
                index = entry % count
                done = finished[index]
                if done < 0:
                    done = self._finished(index)
                # done < the key's mark (see bound): it still has tasks there, so
                # this one goes after them (the common case in a flood). A mark
                # past what is routed there now (a balance took tasks back since)
                # stands for all of it.
                busy = done * count + index < min(entry, sent[index] * count + index)
                if not busy and sent[index] != done:
                    # Nothing of the key is left there: it may go anywhere. (If
                    # that worker has nothing left at all, it is as free as any
                    # other, and the key stays.)
                    last, index = index, self._choose(key)
                    if index != last and index >= 0:
                        moves += 1
            else:
                index = self._choose(key)
            if busy:
                behind = True
            else:
                if index < 0:
                    _fail(pool, [task])
                    continue
                done = finished[index]
                if done < 0:
                    done = self._finished(index)
                if sent[index] == done:
                    self.progress[index] = self.now  # it had nothing to do until now
                else:
                    behind = True
            mark = sent[index] = sent[index] + 1
            bound[key] = mark * count + index
            group = own.get(index)
            if group is None:
                own[index] = [task]
            else:
                group.append(task)
        if len(bound) > self.sweep_at:
            self._sweep()
        _give_all(pool, own, loose, moves)
        if behind:
            self._hint()  # a worker that runs out of work may take some of it

    def _finished(self, index: int) -> int:
        done = self.finished[index]
        if done < 0:
            done = self.finished[index] = self.pool.finished_count(index)
            if done != self.seen[index]:
                self.seen[index] = done
                self.progress[index] = self.now
        return done

    def _load(self, index: int) -> tuple[bool, float, int]:
        """How busy a worker is, smaller is better: (seems stuck, for how long, backlog)."""
        backlog = self.sent[index] - self._finished(index)
        stalled = self.now - self.progress[index] if backlog > 0 else 0.0
        if stalled > STALLED:
            return True, stalled, backlog
        return False, 0.0, backlog

    def _choose(self, key: Key) -> int:
        """A worker for a key with nothing queued: a free one, else the less busy of two."""
        free = self.free
        if free is None:
            free = self.free = self.pool.free_workers()
        while free:
            index = free.pop()
            if self._startable(index):
                return index
        data = key.encode("utf-8", "surrogatepass") if type(key) is str else key_bytes(key)
        first, second = two_choices(data, len(self.sent))
        # The common case first, without _load's tuples: neither seems stuck,
        # so the one with less work queued wins.
        sent, finished, progress, now = self.sent, self.finished, self.progress, self.now
        done = finished[first]
        one = sent[first] - (done if done >= 0 else self._finished(first))
        done = finished[second]
        two = sent[second] - (done if done >= 0 else self._finished(second))
        if (one <= 0 or now - progress[first] <= STALLED) and (
            two <= 0 or now - progress[second] <= STALLED
        ):
            if two < one:
                first, second = second, first
            if self.pool.workers[first].thread is not None:
                return first
        elif self._load(second) < self._load(first):
            first, second = second, first
        if self._load(first)[0]:
            # Both seem stuck: the least busy worker that does not, if any.
            alive = [w.index for w in self.pool.started_workers()]
            best = min(alive, key=self._load, default=first)
            if not self._load(best)[0]:
                first, second = best, first
        for index in (first, second):
            if self._startable(index):
                return index
        # Neither candidate's thread could start: the least busy running worker.
        alive = [w.index for w in self.pool.started_workers()]
        return min(alive, key=self._load) if alive else -1

    def _startable(self, index: int) -> bool:
        # Start the worker's thread if it has none; remember it if that fails.
        worker = self.pool.workers[index]
        if worker.thread is not None:
            return True
        if index in self.dead:
            return False
        if self.pool.start_for_keyed(worker) is worker:
            return True
        self.dead.add(index)
        return False

    def _sweep(self) -> None:
        # Forget the keys with nothing left on their worker, so the table holds
        # about as many keys as have tasks queued (amortised: it runs when the
        # table has doubled since the last sweep).
        self.finished = [-1] * len(self.sent)
        bound = self.bound
        count = len(self.sent)
        sent = self.sent
        free = [
            k
            for k, entry in bound.items()
            if self._finished(entry % count) >= min(entry // count, sent[entry % count])
        ]
        for key in free:
            del bound[key]
        self.sweep_at = max(1024, 2 * len(bound))


def _fail(pool: Pool, tasks: list[Task]) -> None:
    if tasks:
        pool.fail_unrunnable(
            tasks,
            RuntimeError(
                "keyedpool: the task did not run: no worker thread could be started "
                "(the system refused a new thread; see the 'keyedpool' log)"
            ),
        )
