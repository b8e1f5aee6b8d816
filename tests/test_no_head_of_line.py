"""routing="hash": one stuck key never holds up tasks that do not share its worker, keyed or not.

(With the default, routing="affinity", it holds up no other key at all: see test_affinity.py.)
"""

from __future__ import annotations

import threading
from concurrent.futures import wait

from _util import TIMEOUT, wait_until

from keyedpool import KeyedPoolExecutor


def test_stuck_key_does_not_stop_other_workers_or_unkeyed_tasks() -> None:
    release = threading.Event()
    pool = KeyedPoolExecutor(4, routing="hash")
    try:
        stuck = "stuck-aggregate"
        stuck_worker = pool.worker_index(stuck)
        blocker = pool.submit(stuck, release.wait, TIMEOUT)
        behind = [pool.submit(stuck, int, i) for i in range(50)]
        others = [f"key-{i}" for i in range(400)]
        free_keys = [k for k in others if pool.worker_index(k) != stuck_worker]
        sharing = [k for k in others if pool.worker_index(k) == stuck_worker]
        assert free_keys and sharing
        keyed = [pool.submit(k, str.upper, k) for k in free_keys for _ in range(20)]
        unkeyed = [pool.submit(None, str.lower, "X") for _ in range(2000)]
        done, not_done = wait(keyed + unkeyed, timeout=TIMEOUT)
        assert not not_done
        assert all(f.result() == "x" for f in unkeyed)
        # The stuck key and the keys hashed to its worker wait: that is per-key order.
        assert not blocker.done() and not any(f.done() for f in behind)
        stats = pool.stats()
        assert stats.workers[stuck_worker].running
        assert stats.workers[stuck_worker].backlog == 51
        assert stats.top_keys[0].key == stuck and stats.top_keys[0].backlog == 51
        assert stats.top_keys[0].worker == stuck_worker
    finally:
        release.set()
        pool.shutdown()
    assert blocker.result() is True
    assert [f.result() for f in behind] == list(range(50))


def test_unkeyed_task_goes_to_the_idle_worker_not_behind_a_busy_one() -> None:
    # Two workers; worker A runs a task that blocks. However many unkeyed
    # tasks follow, each must run on the free worker B, never behind A.
    release = threading.Event()
    started = threading.Event()
    with KeyedPoolExecutor(2, routing="hash") as pool:

        def block() -> str:
            started.set()
            release.wait(TIMEOUT)
            return threading.current_thread().name

        busy = pool.submit(None, block)
        assert started.wait(TIMEOUT)
        names = [pool.submit(None, lambda: threading.current_thread().name) for _ in range(500)]
        done, not_done = wait(names, timeout=TIMEOUT)
        assert not not_done
        release.set()
        busy_name = busy.result(TIMEOUT)
    assert busy_name not in {f.result() for f in names}


def test_unkeyed_tasks_wait_while_every_worker_is_busy_then_run() -> None:
    release = threading.Event()
    with KeyedPoolExecutor(2, routing="hash") as pool:
        keys = [f"k{i}" for i in range(20)]
        # Block both workers, with keys of each.
        chosen = [next(k for k in keys if pool.worker_index(k) == w) for w in (0, 1)]
        blockers = [pool.submit(k, release.wait, TIMEOUT) for k in chosen]
        wait_until(lambda: sum(w.running for w in pool.stats().workers) == 2)
        waiting = [pool.submit(None, int, i) for i in range(10)]
        # Both workers are stuck, so all ten wait in the unkeyed queue.
        wait_until(lambda: pool.stats().in_transit == 0)
        assert pool.stats().unkeyed_backlog == 10
        assert not any(f.done() for f in waiting)
        release.set()
        assert [f.result(TIMEOUT) for f in waiting] == list(range(10))
        assert all(f.result(TIMEOUT) for f in blockers)
