"""``stats()``: a cheap, typed snapshot of the pool's queues and counters."""

from __future__ import annotations

import itertools
import math
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ._routing import Key

if TYPE_CHECKING:
    from ._pool import Pool
    from ._task import Task
    from ._worker import Worker

__all__ = ["KeyBacklog", "PoolStats", "TaskSeconds", "WorkerStats", "TIME_BUCKETS", "snapshot"]

#: Upper bounds (seconds) of the buckets of ``TaskSeconds``, from 100 us to a
#: minute; a last bucket, ``inf``, takes the rest.
TIME_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, math.inf,
)  # fmt: skip


@dataclass(frozen=True)
class TaskSeconds:
    """How long tasks waited, or ran: a histogram (pools made with ``timing=True``)."""

    #: Upper bounds of the buckets, in seconds (the last is ``inf``).
    buckets: tuple[float, ...]
    #: Per bucket, the tasks that took at most its bound (cumulative, as in Prometheus).
    counts: tuple[int, ...]
    #: All tasks counted, and their seconds added up.
    count: int
    sum: float

    def quantile(self, q: float) -> float:
        """The bucket bound under which a share *q* (0 to 1) of the tasks fall.

        An upper estimate, as precise as the buckets; ``0.0`` when nothing was counted.
        """
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"q must be between 0 and 1, not {q!r}")
        if self.count == 0:
            return 0.0
        wanted = q * self.count
        for bound, count in zip(self.buckets, self.counts, strict=True):
            if count >= wanted:
                return bound
        return math.inf  # pragma: no cover - counts[-1] == count


def _seconds(per_worker: list[tuple[list[int], float]]) -> TaskSeconds:
    # Add up the workers' bucket counts (each a count per bucket, not cumulative).
    counts = [0] * len(TIME_BUCKETS)
    total = 0.0
    for buckets, seconds in per_worker:
        for i, n in enumerate(buckets):
            counts[i] += n
        total += seconds
    cumulative = list(itertools.accumulate(counts))
    return TaskSeconds(TIME_BUCKETS, tuple(cumulative), cumulative[-1], total)


@dataclass(frozen=True)
class WorkerStats:
    """One worker at the moment of the snapshot."""

    #: The worker's index (``pool.worker_index(key)`` gives it for a key).
    index: int
    #: Keyed tasks routed to this worker and not finished, the running one included.
    backlog: int
    #: Whether it is running a task right now.
    running: bool
    #: Tasks it ran that returned, that raised, and that it skipped as cancelled.
    completed: int
    failed: int
    cancelled: int


@dataclass(frozen=True)
class KeyBacklog:
    """A key with unfinished tasks."""

    key: Key
    #: Its tasks that are queued or running.
    backlog: int
    #: The worker that runs them.
    worker: int


@dataclass(frozen=True)
class PoolStats:
    """A snapshot of a pool, from ``KeyedPoolExecutor.stats()``."""

    max_workers: int
    max_pending: int
    #: Tasks accepted by submit since the pool was created.
    submitted: int
    #: Tasks that returned, raised, or were cancelled before they started.
    completed: int
    failed: int
    cancelled: int
    #: Submits refused with ``PoolFull``.
    rejected: int
    #: Accepted and not finished (this is what ``max_pending`` bounds).
    pending: int
    #: Unkeyed tasks waiting for a free worker.
    unkeyed_backlog: int
    #: Accepted tasks the dispatcher has not placed on a queue yet (usually few, briefly).
    in_transit: int
    workers: tuple[WorkerStats, ...]
    #: The keys with the largest backlog, largest first.
    top_keys: tuple[KeyBacklog, ...]
    #: Keys with tasks queued or running on a worker (with ``routing="affinity"``
    #: each stays on its worker until they are done).
    keys_bound: int = 0
    #: With ``routing="affinity"``: how many times a key's task went to another
    #: worker than the key's previous task (always 0 with ``routing="hash"``).
    key_moves: int = 0
    #: With ``timing=True``: how long tasks waited, from submit to their start,
    #: and how long they ran (``None`` otherwise).
    wait_seconds: TaskSeconds | None = None
    run_seconds: TaskSeconds | None = None
    #: Failed attempts that were run again (``submit_with(retry=...)``).
    retries: int = 0
    #: Tasks waiting, without a worker, for their delay or their next retry.
    parked: int = 0
    #: Keys held by such a task (or by a task with retries that runs now),
    #: and their later tasks waiting behind it.
    held_keys: int = 0
    held_tasks: int = 0

    def table(self) -> str:
        """The snapshot as a small text table, one row per worker."""
        lines = [
            f"submitted={self.submitted} completed={self.completed} failed={self.failed} "
            f"cancelled={self.cancelled} rejected={self.rejected} pending={self.pending}"
            f"/{self.max_pending} unkeyed_backlog={self.unkeyed_backlog}"
            + (
                f" retries={self.retries} parked={self.parked} held_keys={self.held_keys}"
                if self.retries or self.parked or self.held_keys
                else ""
            ),
            f"{'worker':>6} {'backlog':>7} {'running':>7} {'completed':>9} {'failed':>6}",
        ]
        for w in self.workers:
            lines.append(
                f"{w.index:>6} {w.backlog:>7} {'yes' if w.running else 'no':>7} "
                f"{w.completed:>9} {w.failed:>6}"
            )
        if self.top_keys:
            lines.append(
                "top keys by backlog: "
                + ", ".join(f"{k.key!r}={k.backlog} (worker {k.worker})" for k in self.top_keys)
            )
        return "\n".join(lines)


def snapshot(pool: Pool, top: int) -> PoolStats:
    """Read the pool's counters (consistent with each other) and queued batches.

    Each counter is read under the lock that owns it, with the pool's lock held
    throughout, so ``submitted`` is always ``completed + failed + cancelled +
    pending`` and ``pending`` is between 0 and ``max_pending``. Finding the top keys
    walks the queued tasks (O(pending)) without holding any lock.
    """
    # Under the pool's lock nothing is admitted, so ``submitted`` stands still
    # while the workers' done counts (each under its own lock) only grow:
    # pending, the difference, is between 0 and what it was when we started.
    with pool.lock:
        counts = []
        waits: list[tuple[list[int], float]] = []
        runs: list[tuple[list[int], float]] = []
        for w in pool.workers:
            with w.lock:
                counts.append((w.routed - w.finished, *w.ended))
                if pool.timing:
                    waits.append((list(w.waits), w.wait_sum))
                    runs.append((list(w.runs), w.run_sum))
        waiting = len(pool.inbox)
        submitted = pool.accepted + waiting
        in_transit = pool.routing + waiting
        rejected = pool.rejected
        key_moves = pool.key_moves
        parked, held_keys, held_tasks = pool.parked, pool.held_keys, pool.held_tasks
    pending = submitted - sum(c[1] + c[2] + c[3] for c in counts)
    retries = sum(c[4] for c in counts)
    with pool.unkeyed_lock:
        unkeyed_backlog = len(pool.unkeyed)
    workers = []
    keys: Counter[Key] = Counter()
    where: dict[Key, int] = {}
    for worker, (backlog, completed, failed, cancelled, _) in zip(
        pool.workers, counts, strict=True
    ):
        if backlog:
            batch = worker.batch
            # Queued batches first, then the unfinished part of the running
            # batch: its tail, as long as what the queued ones do not account
            # for. (Slots of tasks finished, or taken back by the dispatcher,
            # are None and count for nothing.)
            waiting = 0
            for group in _copy_batches(worker):
                for task in group:
                    if task is not None:
                        waiting += 1
                        _note(task, worker.index, keys, where)
            left = min(max(backlog - waiting, 0), len(batch))
            for task in batch[len(batch) - left :]:
                if task is not None:
                    _note(task, worker.index, keys, where)
        workers.append(
            WorkerStats(
                index=worker.index,
                backlog=backlog,
                running=worker.current is not None,
                completed=completed,
                failed=failed,
                cancelled=cancelled,
            )
        )
    return PoolStats(
        max_workers=pool.max_workers,
        max_pending=pool.max_pending,
        submitted=submitted,
        completed=sum(w.completed for w in workers),
        failed=sum(w.failed for w in workers),
        cancelled=sum(w.cancelled for w in workers),
        rejected=rejected,
        pending=pending,
        unkeyed_backlog=unkeyed_backlog,
        in_transit=in_transit,
        workers=tuple(workers),
        top_keys=tuple(
            KeyBacklog(key=key, backlog=count, worker=where[key])
            for key, count in (keys.most_common(top) if top > 0 else ())
        ),
        keys_bound=len(keys),
        key_moves=key_moves,
        wait_seconds=_seconds(waits) if pool.timing else None,
        run_seconds=_seconds(runs) if pool.timing else None,
        retries=retries,
        parked=parked,
        held_keys=held_keys,
        held_tasks=held_tasks,
    )


def _note(task: Task, index: int, keys: Counter[Key], where: dict[Key, int]) -> None:
    # A queued or running task: count it against its key (unkeyed ones have none).
    if task.key is not None:
        keys[task.key] += 1
        where[task.key] = index


def _copy_batches(worker: Worker) -> list[list[Task]]:
    # The dispatcher appends and the worker pops while we copy. On the default
    # build the copy can see the deque change and raise; a free-threaded build
    # copies under the deque's own lock. A retry covers the first case.
    for _ in range(10):
        try:
            return list(worker.batches)
        except RuntimeError:
            continue
    return []
