"""routing="affinity": a key stays on a worker only while it has tasks there.

Order per key is checked for both routing modes in test_ordering.py and
test_stress.py; here is what affinity adds: a slow or stuck key never holds up
other keys, keys spread over the workers, and what stats() says about it.
"""

from __future__ import annotations

import threading
from concurrent.futures import wait
from typing import Any

import pytest
from _util import TIMEOUT

import keyedpool._dispatcher
from keyedpool import DeadlockError, KeyedPoolExecutor


def test_a_worker_stuck_on_one_key_gets_no_new_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    # A worker seems stuck once it finished nothing for _dispatcher.STALLED
    # seconds while it had work; keys that arrive before that may still queue
    # behind it. Here "at once", so the test needs no sleep.
    monkeypatch.setattr(keyedpool._dispatcher, "STALLED", 0.0)
    release = threading.Event()
    entered = threading.Event()

    def stuck() -> None:
        entered.set()
        release.wait(TIMEOUT)

    with KeyedPoolExecutor(4, routing="affinity", max_pending=20_000) as pool:
        blocker = pool.submit("stuck", stuck)
        behind = [pool.submit("stuck", int, i) for i in range(50)]
        assert entered.wait(TIMEOUT)
        try:
            # With routing="hash" about a quarter of these keys would share the
            # stuck key's worker and wait with it.
            others = [pool.submit(f"key-{i % 400}", str.upper, "x") for i in range(8000)]
            done, not_done = wait(others, timeout=TIMEOUT)
            assert not not_done, f"{len(not_done)} tasks of other keys waited for the stuck key"
            assert not blocker.done() and not any(f.done() for f in behind)
            stats = pool.stats()
            assert stats.top_keys[0].key == "stuck" and stats.top_keys[0].backlog == 51
        finally:
            release.set()
    assert [f.result() for f in behind] == list(range(50))


def test_keys_queued_behind_a_task_that_gets_stuck_move_to_other_workers() -> None:
    # The keys are routed while the first task still looks healthy (it has
    # run for less than _dispatcher.STALLED), so some of them queue behind it
    # on its worker. Once it has finished nothing for that long, the
    # dispatcher takes them back and runs them elsewhere: every task of the
    # other keys finishes while the stuck one still runs.
    release = threading.Event()
    entered = threading.Event()

    def stuck() -> None:
        entered.set()
        release.wait(2 * TIMEOUT)  # longer than the wait below

    order: dict[str, list[int]] = {}
    lock = threading.Lock()

    def note(key: str, i: int) -> None:
        with lock:
            order.setdefault(key, []).append(i)

    with KeyedPoolExecutor(2, routing="affinity", max_pending=20_000) as pool:
        blocker = pool.submit("stuck", stuck)
        assert entered.wait(TIMEOUT)
        try:
            # With two workers, about half of these keys go to the stuck one.
            others = [pool.submit(f"key-{i % 40}", note, f"key-{i % 40}", i) for i in range(400)]
            behind = pool.submit("stuck", int, 7)
            done, not_done = wait(others, timeout=TIMEOUT)
            assert not not_done, f"{len(not_done)} tasks of other keys waited for the stuck key"
            assert not blocker.done() and not behind.done()
            assert pool.stats().key_moves > 0
        finally:
            release.set()
        assert behind.result(TIMEOUT) == 7
    for key, seen in order.items():
        assert seen == sorted(seen), f"{key} ran out of order: {seen}"
    assert sum(map(len, order.values())) == 400


def test_a_worker_that_runs_out_of_work_takes_keys_queued_on_a_busy_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The end of a burst: keys stay with their worker while they have tasks
    # there, so one worker can be left with a queue while another has none.
    # The idle one is given some of that queue at once. (The stuck-worker
    # rescue is switched off here, so nothing else can move those keys.)
    monkeypatch.setattr(keyedpool._dispatcher, "STALLED", 1e9)
    release_long, release_short = threading.Event(), threading.Event()
    long_started, short_started = threading.Event(), threading.Event()

    def hold(started: threading.Event, release: threading.Event) -> bool:
        started.set()
        return release.wait(2 * TIMEOUT)  # longer than the wait below

    order: dict[str, list[int]] = {}
    lock = threading.Lock()

    def note(key: str, i: int) -> None:
        with lock:
            order.setdefault(key, []).append(i)

    with KeyedPoolExecutor(2, routing="affinity") as pool:
        long = pool.submit("long", hold, long_started, release_long)
        assert long_started.wait(TIMEOUT)
        short = pool.submit("short", hold, short_started, release_short)
        assert short_started.wait(TIMEOUT)
        try:
            # Both workers are busy: these keys go to the one with less queued,
            # so about half of them wait behind "long".
            others = [pool.submit(f"k{i % 10}", note, f"k{i % 10}", i) for i in range(40)]
            release_short.set()
            done, not_done = wait(others, timeout=TIMEOUT)
            assert not not_done, f"{len(not_done)} tasks waited behind the long task"
            assert not long.done()
            assert pool.stats().key_moves > 0
        finally:
            release_long.set()
        assert long.result(TIMEOUT) is True and short.result(TIMEOUT) is True
    for key, seen in order.items():
        assert seen == sorted(seen), f"{key} ran out of order: {seen}"
    assert sum(map(len, order.values())) == 40


def test_keys_with_nothing_queued_go_to_free_workers() -> None:
    # One task per key at a time: each key is free again before its next
    # task, so the work spreads over every worker instead of by hash.
    with KeyedPoolExecutor(4, routing="affinity") as pool:
        seen: set[str] = set()
        lock = threading.Lock()
        gate = threading.Barrier(4)

        def meet() -> None:
            gate.wait(TIMEOUT)  # only passes if four tasks run at once
            with lock:
                seen.add(threading.current_thread().name)

        # Four keys that routing="hash" would put on fewer than four workers.
        futures = [pool.submit("same-hash-" + str(i), meet) for i in range(4)]
        wait(futures, timeout=TIMEOUT)
        assert all(f.exception() is None for f in futures)
        assert len(seen) == 4


def test_stats_count_bound_keys_and_moves() -> None:
    release = threading.Event()
    with KeyedPoolExecutor(2, routing="affinity") as pool:
        first = pool.submit("a", release.wait, TIMEOUT)
        pool.submit("a", int, 1)
        pool.submit("b", int, 2).result(TIMEOUT)
        stats = pool.stats()
        assert stats.keys_bound == 1  # "a" (running, and one queued); "b" is done
        release.set()
        assert first.result(TIMEOUT) is True
        # "b" again while another worker is busy or free: it may move; moves
        # only count keys that went somewhere else, never more than submits.
        for i in range(20):
            pool.submit("b", int, i).result(TIMEOUT)
    final = pool.stats()
    assert final.keys_bound == 0
    assert 0 <= final.key_moves <= 20


def test_worker_index_needs_hash_routing() -> None:
    with KeyedPoolExecutor(2) as pool:
        assert pool.routing == "affinity"  # the default
        with pytest.raises(RuntimeError, match="routing='hash'"):
            pool.worker_index("k")
    with KeyedPoolExecutor(2, routing="hash") as pool:
        assert pool.routing == "hash"
        assert pool.worker_index("k") in (0, 1)


def test_an_unknown_routing_is_refused() -> None:
    with pytest.raises(ValueError, match="routing must be 'affinity' or 'hash'"):
        KeyedPoolExecutor(2, routing="random")  # type: ignore[arg-type]


def test_waiting_for_a_later_task_of_the_same_key_raises() -> None:
    with KeyedPoolExecutor(2, routing="affinity") as pool:

        def waits_for_next() -> None:
            later = pool.submit("k", int, 1)
            later.result(TIMEOUT)

        with pytest.raises(DeadlockError):
            pool.submit("k", waits_for_next).result(TIMEOUT)


# -- the dispatcher's policy, on a stand-in for the pool --------------------------------
# The tests above run real pools, where which worker a key lands on depends on
# timing. These drive the dispatcher's routing state (Affinity) directly, with
# a stand-in for the pool that records what would be queued where and lets the
# test say what each worker has finished and what time it is. The real
# take-back, racing real workers, is checked by the stress module.


class _Task:
    def __init__(self, key: str) -> None:
        self.key: str | None = key
        self.worker: int | None = None


class _Worker:
    def __init__(self, index: int) -> None:
        self.index = index
        self.thread = object()  # started


class _Pool:
    """What Affinity asks of the pool; worker i's queue is queued[i], finished[i] is done."""

    def __init__(self, workers: int) -> None:
        self.workers = [_Worker(i) for i in range(workers)]
        self.queued: list[list[_Task]] = [[] for _ in range(workers)]
        self.finished = [0] * workers
        self.moves = 0
        self.idle: list[int] = []  # workers asleep on an empty queue
        self.hints = 0  # calls of hint_balance

    def idle_workers(self) -> list[int]:
        return list(self.idle)

    def hint_balance(self) -> None:
        self.hints += 1

    def started_workers(self) -> list[_Worker]:
        return list(self.workers)

    def finished_count(self, index: int) -> int:
        return self.finished[index]

    def free_workers(self) -> list[int]:
        return []

    def give(self, worker: _Worker, group: list[_Task]) -> None:
        self.queued[worker.index].extend(group)

    def add_unkeyed(self, tasks: list[_Task]) -> int:
        return 0

    def routed(self, moves: int) -> None:
        self.moves += moves

    def moved(self, moves: int) -> None:
        self.moves += moves

    def take_back(self, worker: _Worker, want: int = 0) -> list[_Task]:
        # The first unfinished task runs; take the rest that are not of its
        # key (with want: the keys queued last, until at least want tasks).
        queue = self.queued[worker.index][self.finished[worker.index] :]
        running = queue[0].key if queue else None
        taken = [t for t in queue[1:] if t.key != running]
        if want and len(taken) > want:
            chosen: list[str | None] = []
            for task in reversed(taken):
                if task.key not in chosen:
                    chosen.append(task.key)
                    if sum(t.key in chosen for t in taken) >= want:
                        break
            taken = [t for t in taken if t.key in chosen]
        self.queued[worker.index] = self.queued[worker.index][: self.finished[worker.index]] + [
            t for t in queue if t not in taken
        ]
        return taken


def _affinity(workers: int, now: list[float], monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setattr(keyedpool._dispatcher, "monotonic", lambda: now[0])
    pool = _Pool(workers)
    return keyedpool._dispatcher.Affinity(pool), pool  # type: ignore[arg-type]


def _others_finish(pool: _Pool, home: int) -> None:
    # Every worker but *home* has run everything it was given.
    for i, queue in enumerate(pool.queued):
        if i != home:
            pool.finished[i] = len(queue)


def _crowded(
    workers: int, now: list[float], monkeypatch: pytest.MonkeyPatch, crowd: list[_Task]
) -> tuple[Any, _Pool, int]:
    # One worker runs "hot" with *crowd* (tasks of other keys) queued behind
    # it, as when they were routed while it looked idle; returns its index too.
    affinity, pool = _affinity(workers, now, monkeypatch)
    affinity.place([_Task("hot")])
    (home,) = _where(pool, "hot")
    pool.give(pool.workers[home], crowd)  # type: ignore[arg-type]
    affinity.sent[home] += len(crowd)
    for task in crowd:
        affinity.bound[task.key] = affinity.sent[home] * workers + home
    return affinity, pool, home


def _where(pool: _Pool, key: str) -> set[int]:
    return {i for i, q in enumerate(pool.queued) for t in q[pool.finished[i] :] if t.key == key}


def test_policy_keys_behind_a_stuck_task_move_once_it_stalls(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [100.0]
    affinity, pool = _affinity(4, now, monkeypatch)
    affinity.place([_Task("stuck")])
    (home,) = _where(pool, "stuck")
    # Ten keys routed in the same moment: some land behind the stuck task.
    affinity.place([_Task(f"k{i}") for i in range(10)] + [_Task("stuck")])
    on_home = [t.key for t in pool.queued[home][1:] if t.key != "stuck"]
    assert on_home, "no key landed behind the stuck task: the test shows nothing"
    _others_finish(pool, home)
    now[0] += keyedpool._dispatcher.STALLED / 4
    affinity.rescue()  # not stalled yet: nothing moves
    assert [t.key for t in pool.queued[home][1:] if t.key != "stuck"] == on_home
    now[0] += keyedpool._dispatcher.STALLED * 2
    affinity.rescue()
    assert [t.key for t in pool.queued[home]] == ["stuck", "stuck"]  # only its own key stays
    for key in on_home:
        assert key is not None and _where(pool, key) and home not in _where(pool, key)
    assert pool.moves == len(set(on_home))


def test_policy_an_overloaded_worker_sheds_its_other_keys(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [100.0]
    # The hot key's worker has 30 tasks of other keys queued behind it, the
    # others one task each.
    crowd = [_Task(f"c{i}") for i in range(30)]
    affinity, pool, home = _crowded(8, now, monkeypatch, crowd)
    for i in range(8):
        if i != home:
            affinity.place([_Task(f"solo{i}")])
    _others_finish(pool, home)
    now[0] += keyedpool._dispatcher.STALLED  # time to look again
    affinity.progress[home] = now[0]  # it finished a task just now: not stuck
    affinity.rescue()
    # Re-routed like new keys: spread over the workers by load, the hot
    # worker getting no more than its share again.
    assert len(pool.queued[home]) <= 1 + 30 // 8 + 1 < 31
    assert pool.queued[home][0].key == "hot"
    for task in crowd:
        assert task.key is not None and len(_where(pool, task.key)) == 1
    assert sum(len(q) for q in pool.queued) == 1 + 30 + 7  # nothing lost or doubled


def test_policy_a_worker_that_ran_out_of_work_gets_half_of_the_busiest_queue(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [100.0]
    # Twelve tasks of six keys queued behind "hot", the other workers idle.
    crowd = [_Task(f"c{i % 6}") for i in range(12)]
    affinity, pool, home = _crowded(4, now, monkeypatch, crowd)
    assert pool.hints == 0
    affinity.place([_Task("hot")])
    assert pool.hints == 1  # a task queued behind others: a worker may ask
    pool.idle = [i for i in range(4) if i != home]
    affinity.balance()
    target = pool.idle[0]
    # Half of the 12 waiting of other keys: whole keys, those queued last
    # (never the running key), in their order.
    assert [t.key for t in pool.queued[target]] == ["c3", "c4", "c5"] * 2
    assert [t.key for t in pool.queued[home]] == ["hot", *["c0", "c1", "c2"] * 2, "hot"]
    assert all(affinity.bound[f"c{i}"] % 4 == target for i in (3, 4, 5))
    assert pool.moves == 3
    assert sum(len(q) for q in pool.queued) == 14  # nothing lost or doubled
    assert pool.hints == 2  # some still wait: the next worker to run out asks again
    # Asked again at once: it waits until BALANCE_EVERY has passed.
    affinity.balance()
    assert len(pool.queued[target]) == 6 and affinity.asked
    assert affinity.next_look() <= keyedpool._dispatcher.BALANCE_EVERY
    now[0] += 2 * keyedpool._dispatcher.BALANCE_EVERY
    pool.idle = [i for i in range(4) if i not in (home, target)]
    affinity.balance()
    assert not affinity.asked
    assert sum(len(q) for q in pool.queued) == 14
    assert len(pool.queued[home]) < 8 and len(pool.queued[target]) < 12
    # The keys left on the busiest worker kept marks past what is routed
    # there now: once every worker has run what it has, they are free anyway.
    assert any(affinity.bound[k] // 4 > affinity.sent[home] for k in ("c0", "c1", "c2"))
    pool.finished = [len(q) for q in pool.queued]
    affinity._sweep()
    assert affinity.bound == {}


def test_policy_keys_come_from_the_busiest_worker_whose_waiting_tasks_can_move(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The busiest worker has only its running key's tasks waiting (they cannot
    # move); the next one has other keys behind its running task: those go.
    now = [100.0]
    affinity, pool, home = _crowded(3, now, monkeypatch, [_Task("hot") for _ in range(20)])
    other, idle = [i for i in range(3) if i != home]
    crowd = [_Task("slow")] + [_Task(f"c{i}") for i in range(6)]
    pool.give(pool.workers[other], crowd)  # type: ignore[arg-type]
    affinity.sent[other] += len(crowd)
    for task in crowd:
        affinity.bound[task.key] = affinity.sent[other] * 3 + other
    scanned: list[int] = []
    take_back = pool.take_back

    def counted(worker: _Worker, want: int = 0) -> list[_Task]:
        scanned.append(worker.index)
        return take_back(worker, want)

    monkeypatch.setattr(pool, "take_back", counted)
    pool.idle = [idle]
    hints = pool.hints
    affinity.balance()
    assert scanned == [home, other]
    assert [t.key for t in pool.queued[idle]] == ["c3", "c4", "c5"]
    assert pool.hints == hints + 1  # set before looking for idle workers
    # Nothing was routed to the hot key's worker since: it is not looked at again.
    pool.idle = []
    now[0] += 2 * keyedpool._dispatcher.BALANCE_EVERY
    affinity.balance()
    assert scanned == [home, other]  # no idle worker: nothing taken...
    assert pool.hints == hints + 2  # ...but the next worker to run out of work asks
    pool.idle = [idle]
    now[0] += 2 * keyedpool._dispatcher.BALANCE_EVERY
    affinity.balance()
    assert scanned == [home, other, other]


def test_policy_a_long_queue_is_left_to_the_overload_rule(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Taking half of a long queue apart is not worth it for short tasks; a
    # worker with far more queued than the others is relieved by rescue().
    monkeypatch.setattr(keyedpool._dispatcher, "BALANCE_MAX", 11)
    now = [100.0]
    crowd = [_Task(f"c{i % 6}") for i in range(12)]
    affinity, pool, home = _crowded(2, now, monkeypatch, crowd)
    pool.idle = [1 - home]
    affinity.balance()
    assert len(pool.queued[home]) == 13 and pool.moves == 0
    monkeypatch.setattr(keyedpool._dispatcher, "BALANCE_MAX", 12)
    now[0] += 2 * keyedpool._dispatcher.BALANCE_EVERY
    affinity.balance()
    assert len(pool.queued[home]) == 7 and pool.moves == 3


@pytest.mark.parametrize("workers", [1, 3])
def test_policy_nothing_moves_when_there_is_nowhere_better(
    monkeypatch: pytest.MonkeyPatch, workers: int
) -> None:
    # One worker, or every worker stuck with work queued: taking tasks back
    # would only put them back where they were, again and again.
    now = [100.0]
    affinity, pool = _affinity(workers, now, monkeypatch)
    affinity.place([_Task(f"k{i}") for i in range(60)])
    assert all(pool.queued)  # every worker has work, and none finishes any
    taken: list[int] = []
    take_back = pool.take_back

    def counted(worker: _Worker) -> list[_Task]:
        back = take_back(worker)
        taken.append(len(back))
        return back

    monkeypatch.setattr(pool, "take_back", counted)
    for _ in range(5):
        now[0] += keyedpool._dispatcher.STALLED
        affinity.rescue()
    assert taken == []
