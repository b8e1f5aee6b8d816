"""``stats()``: a cheap, typed snapshot of the pool's queues and counters."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ._routing import Key

if TYPE_CHECKING:
    from ._pool import Pool
    from ._task import Task
    from ._worker import Worker

__all__ = ["KeyBacklog", "PoolStats", "WorkerStats", "snapshot"]


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

    def table(self) -> str:
        """The snapshot as a small text table, one row per worker."""
        lines = [
            f"submitted={self.submitted} completed={self.completed} failed={self.failed} "
            f"cancelled={self.cancelled} rejected={self.rejected} pending={self.pending}"
            f"/{self.max_pending} unkeyed_backlog={self.unkeyed_backlog}",
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
    """Read the pool's counters and queued batches; O(pending tasks), no locks held."""
    workers = []
    keys: Counter[Key] = Counter()
    where: dict[Key, int] = {}
    for worker in pool.workers:
        backlog = max(worker.backlog, 0)
        if top > 0 and backlog:
            queued = _copy_batches(worker)
            batch = worker.batch
            # The unfinished part of the running batch is its tail.
            left = min(max(backlog - sum(map(len, queued)), 0), len(batch))
            for group in [batch[len(batch) - left :], *queued]:
                for task in group:
                    if task.key is not None:
                        keys[task.key] += 1
                        where[task.key] = worker.index
        workers.append(
            WorkerStats(
                index=worker.index,
                backlog=backlog,
                running=worker.current is not None,
                completed=worker.completed,
                failed=worker.failed,
                cancelled=worker.cancelled,
            )
        )
    return PoolStats(
        max_workers=pool.max_workers,
        max_pending=pool.max_pending,
        submitted=pool.accepted,
        completed=sum(w.completed for w in workers),
        failed=sum(w.failed for w in workers),
        cancelled=sum(w.cancelled for w in workers),
        rejected=pool.rejected,
        pending=pool.pending,
        unkeyed_backlog=len(pool.unkeyed),
        in_transit=pool.in_transit,
        workers=tuple(workers),
        top_keys=tuple(
            KeyBacklog(key=key, backlog=count, worker=where[key])
            for key, count in keys.most_common(top)
        ),
    )


def _copy_batches(worker: Worker) -> list[list[Task]]:
    # The deque may change while we copy it; copying is atomic in practice
    # under the GIL, but a retry makes that a non-issue.
    for _ in range(10):
        try:
            return list(worker.batches)
        except RuntimeError:
            continue
    return []
