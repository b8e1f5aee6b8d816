"""The core properties, many rounds, under the most hostile thread switching we can get.

``sys.setswitchinterval(1e-6)`` and several submitting threads: order per key,
no overlap within a key, nothing lost, capacity never exceeded, unkeyed work
run, ``stats()`` always consistent, shutdown joining everything. Each round is
small; the module takes well under a minute. ``KEYEDPOOL_STRESS_ROUNDS`` runs
more rounds (as for a long run on a free-threaded build).
"""

from __future__ import annotations

import os
import random
import threading
from collections import defaultdict
from concurrent.futures import Future, wait
from typing import Any

import pytest
from _util import TIMEOUT

import keyedpool._dispatcher
from keyedpool import KeyedPoolExecutor, PoolFull
from keyedpool._pool import Pool

ROUNDS = int(os.environ.get("KEYEDPOOL_STRESS_ROUNDS", "60"))
SUBMITTERS = 4
PER_SUBMITTER = 300


pytestmark = pytest.mark.usefixtures("fast_switching")

#: "affinity-rescue": affinity routing where a worker seems stuck after 2 ms
#: without finishing a task, so the dispatcher keeps taking queued tasks back
#: from workers while they claim them (see Pool.take_back).
#: "affinity-balance": every worker that runs out of work has some of the
#: busiest workers' queued tasks moved to it at once (no pause between two
#: balances), racing the workers that claim them.
ROUTINGS = ["hash", "affinity", "affinity-rescue", "affinity-balance"]


#: How many tasks each take-back moved, over the whole module: all of a
#: worker's other keys (a rescue), or some of them (a balance).
TAKEN_BACK: list[int] = []
BALANCED: list[int] = []
#: The routings that ran in this module.
RAN: set[str] = set()


def _routing(name: str, monkeypatch: pytest.MonkeyPatch) -> str:
    RAN.add(name)
    if name in ("affinity-rescue", "affinity-balance"):
        if name == "affinity-rescue":
            monkeypatch.setattr(keyedpool._dispatcher, "STALLED", 0.002)
        else:
            monkeypatch.setattr(keyedpool._dispatcher, "BALANCE_EVERY", 0.0)
        take_back = Pool.take_back

        def counted(self: Pool, worker: Any, want: int = 0) -> Any:
            taken = take_back(self, worker, want)
            (BALANCED if want else TAKEN_BACK).append(len(taken))
            return taken

        monkeypatch.setattr(Pool, "take_back", counted)
        return "affinity"
    return name


class Ledger:
    """What the tasks saw: per-key order, overlaps, and the most pending at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ran: dict[Any, list[int]] = defaultdict(list)
        self.running: set[Any] = set()
        self.overlaps = 0
        self.unkeyed = 0

    def task(self, key: Any, seq: int) -> int:
        with self.lock:
            if key is None:
                self.unkeyed += 1
            else:
                if key in self.running:
                    self.overlaps += 1
                self.running.add(key)
                self.ran[key].append(seq)
        if seq % 7 == 0:
            threading.Event().wait(0.0001)  # a little blocking I/O
        with self.lock:
            self.running.discard(key)
        if seq % 13 == 0:
            raise ValueError(seq)  # failures must not break order or counts
        return seq


def _round(max_workers: int, max_pending: int, on_full: str, routing: str) -> None:
    ledger = Ledger()
    pool = KeyedPoolExecutor(
        max_workers,
        max_pending=max_pending,
        on_full=on_full,  # type: ignore[arg-type]
        log_unretrieved=False,
        routing=routing,  # type: ignore[arg-type]
    )
    futures: list[list[Future[Any]]] = [[] for _ in range(SUBMITTERS)]
    refused = [0] * SUBMITTERS
    bad_stats: list[str] = []
    start = threading.Barrier(SUBMITTERS + 1)
    stop_watching = threading.Event()

    def submitter(n: int) -> None:
        rng = random.Random(n)
        start.wait(TIMEOUT)
        for i in range(PER_SUBMITTER):
            # Keys are per submitter, so each key's submit order is known.
            key = None if rng.random() < 0.2 else f"s{n}-k{rng.randrange(8)}"
            try:
                futures[n].append(pool.submit(key, ledger.task, key, i))
            except PoolFull:
                refused[n] += 1

    def watcher() -> None:
        while not stop_watching.is_set():
            s = pool.stats(top_keys=3)
            if s.pending < 0 or s.pending > max_pending:
                bad_stats.append(f"pending {s.pending}")
            if s.submitted != s.completed + s.failed + s.cancelled + s.pending:
                bad_stats.append(f"counts do not add up: {s}")
            if any(w.backlog < 0 for w in s.workers):
                bad_stats.append("negative backlog")

    threads = [threading.Thread(target=submitter, args=(n,)) for n in range(SUBMITTERS)]
    watch = threading.Thread(target=watcher)
    for t in threads:
        t.start()
    watch.start()
    start.wait(TIMEOUT)
    for t in threads:
        t.join(TIMEOUT)
        assert not t.is_alive(), "a submit hung"
    everything = [f for fs in futures for f in fs]
    done, not_done = wait(everything, timeout=TIMEOUT)
    stop_watching.set()
    watch.join(TIMEOUT)
    pool.shutdown(wait=True)
    assert not not_done, f"{len(not_done)} tasks never finished"
    assert not bad_stats, bad_stats[:3]
    assert ledger.overlaps == 0
    for key, seqs in ledger.ran.items():
        assert seqs == sorted(seqs), f"order broken for {key}"
    final = pool.stats()
    assert final.pending == 0
    assert final.submitted == len(everything) == SUBMITTERS * PER_SUBMITTER - sum(refused)
    assert final.submitted == final.completed + final.failed
    ran = sum(len(v) for v in ledger.ran.values()) + ledger.unkeyed
    assert ran == len(everything), "a task ran twice or not at all"


#: The pool shapes each stress round runs: a small pool that blocks when full,
#: a smaller one that refuses, and a roomy one that is never full.
SHAPES = {
    "blocking-capacity": {"max_workers": 4, "max_pending": 16, "on_full": "block"},
    "refusing-capacity": {"max_workers": 3, "max_pending": 8, "on_full": "raise"},
    "roomy-pool": {"max_workers": 8, "max_pending": 10_000, "on_full": "block"},
}


@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_stress(shape: str, routing: str, monkeypatch: pytest.MonkeyPatch) -> None:
    routing = _routing(routing, monkeypatch)
    for _ in range(ROUNDS):
        _round(**SHAPES[shape], routing=routing)  # type: ignore[arg-type]


def test_the_rescue_and_balance_runs_took_tasks_back() -> None:
    # Runs after the stress tests above (pytest keeps the file's order): the
    # "affinity-rescue" and "affinity-balance" rounds must really have moved
    # tasks, or they tested nothing.
    if ROUNDS and "affinity-rescue" in RAN:
        assert sum(TAKEN_BACK) > 0, f"{len(TAKEN_BACK)} take-backs, none took a task"
    if ROUNDS and "affinity-balance" in RAN:
        assert sum(BALANCED) > 0, f"{len(BALANCED)} balances, none moved a task"
