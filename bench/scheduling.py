"""The cost of keyed scheduling, side by side in one run: ``python -m bench.scheduling [--quick]``.

Two measurements, each repeated (alternating the variants in every
repetition) and reported as the median, with the min and max:

* ``submit_with`` against ``submit``: the same no-op keyed tasks (uniform over
  1,024 keys), through ``submit(key, fn)`` and ``submit_with(key, fn)``, and,
  for information, with ``replace=True`` and with a ``RetryPolicy`` (a task with
  retries holds its key until it is resolved, so its key's next task waits for
  a trip through the dispatcher). Target: plain ``submit_with`` within 10% of
  ``submit``.
* a retry storm: 8,000 tasks that each block 1 ms, over 1,000 keys ("the
  other keys"), submitted together with one task on each of 1,000 more keys
  that fails twice before it succeeds (``RetryPolicy(attempts=3,
  backoff=0.01)``). The other keys' throughput is compared with the same run
  in which those 1,000 tasks succeed at once. For reference, the same storm
  retried the way a handler would do it by hand (catch, ``time.sleep(0.01)``,
  call again), which holds a worker through each backoff. Target: the other
  keys' throughput with ``retry=`` at least 0.9x the run without failures.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, wait
from typing import Any

from keyedpool import KeyedPoolExecutor, RetryPolicy

from .compare import machine

HANG_LIMIT = 300.0


def _noop() -> None:
    return None


# -- submit_with against submit ------------------------------------------------


def submit_cost(tasks: int, workers: int, variant: str) -> float:
    """Tasks per second, from the first submit until every future is done."""
    keys = [f"k{i % 1024}" for i in range(tasks)]
    policy = RetryPolicy(attempts=2, backoff=0)
    gc.collect()
    with KeyedPoolExecutor(workers, max_pending=tasks + 1) as pool:
        pool.submit(None, _noop).result(HANG_LIMIT)  # the threads are up
        submit, submit_with = pool.submit, pool.submit_with
        begin = time.perf_counter()
        if variant == "submit":
            futures = [submit(k, _noop) for k in keys]
        elif variant == "submit_with":
            futures = [submit_with(k, _noop) for k in keys]
        elif variant == "replace":
            futures = [submit_with(k, _noop, replace=True) for k in keys]
        else:
            futures = [submit_with(k, _noop, retry=policy) for k in keys]
        done, not_done = wait(futures, timeout=HANG_LIMIT)
        took = time.perf_counter() - begin
    assert not not_done, "a task never finished"
    if variant != "replace":
        assert all(f.result() is None for f in done)
    return tasks / took


# -- the retry storm ----------------------------------------------------------------


class Failing:
    """Fails its first *failures* calls at once, then returns."""

    __slots__ = ("failures", "calls")

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    def __call__(self) -> None:
        # Called by one thread at a time: the calls of one key never overlap.
        self.calls += 1
        if self.calls <= self.failures:
            raise ConnectionError("try again")


def _by_hand(failing: Failing, backoff: float, attempts: int) -> None:
    # Retrying inside the handler, as one would without retry=: the worker sleeps.
    for attempt in range(1, attempts + 1):
        try:
            return failing()
        except ConnectionError:
            if attempt == attempts:
                raise
            time.sleep(backoff * 2 ** (attempt - 1))


def storm(workers: int, others: int, variant: str, io: float = 0.001) -> float:
    """The other keys' tasks per second (first submit to the last of them done)."""
    failures = 0 if variant == "no failures" else 2
    backoff = 0.01
    policy = RetryPolicy(attempts=3, backoff=backoff)
    gc.collect()
    with KeyedPoolExecutor(workers, max_pending=others + 2000) as pool:
        pool.submit(None, _noop).result(HANG_LIMIT)
        for i in range(workers):
            pool.submit(f"warm{i}", _noop)
        other_futures: list[Future[Any]] = []
        storm_futures: list[Future[Any]] = []
        begin = time.perf_counter()
        spread = max(1, others // 1000)
        for i in range(others):
            other_futures.append(pool.submit(f"other{i % 1000}", time.sleep, io))
            # The failing keys' tasks arrive spread through the others.
            if i % spread == 0 and len(storm_futures) < 1000:
                key = f"failing{len(storm_futures)}"
                failing = Failing(failures)
                if variant == "by hand":
                    storm_futures.append(pool.submit(key, _by_hand, failing, backoff, 3))
                else:
                    storm_futures.append(pool.submit_with(key, failing, retry=policy))
        _, not_done = wait(other_futures, timeout=HANG_LIMIT)
        took = time.perf_counter() - begin
        assert not not_done, "a task never finished"
        _, not_done = wait(storm_futures, timeout=HANG_LIMIT)
        assert not not_done, "a failing task never finished"
        assert all(f.exception() is None for f in storm_futures)
        if variant == "retry=":
            assert pool.stats().retries == 2 * len(storm_futures)
    return others / took


# -- the report ------------------------------------------------------------------------


def _summary(values: list[float]) -> str:
    return f"{_rate(statistics.median(values))} [{_rate(min(values))}-{_rate(max(values))}]"


def _rate(x: float) -> str:
    return f"{x / 1e3:.1f}k" if x >= 1e3 else f"{x:.0f}"


def measure(
    reps: int, variants: Sequence[str], run: Callable[[str], float]
) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {v: [] for v in variants}
    for rep in range(reps):
        # Rotate the order each repetition, so no variant always runs first.
        order = list(variants[rep % len(variants) :]) + list(variants[: rep % len(variants)])
        for variant in order:
            results[variant].append(run(variant))
    return results


#: The variants of each measurement, the first being the one the others are compared with.
COST_LABELS = {
    "submit": "submit(key, fn)",
    "submit_with": "submit_with(key, fn)",
    "replace": "submit_with(key, fn, replace=True)",
    "retry": "submit_with(key, fn, retry=...) (none fails)",
}
STORM_LABELS = {
    "no failures": "the 1,000 tasks succeed at once",
    "retry=": "they fail twice, submit_with(retry=...)",
    "by hand": "they fail twice, retried inside the handler",
}


def table(results: dict[str, list[float]], labels: dict[str, str], target: str) -> float:
    """Print one row per variant, with its ratio to the first; return *target*'s ratio."""
    base = statistics.median(results[next(iter(labels))])
    for variant, values in results.items():
        ratio = statistics.median(values) / base
        print(f"  {labels[variant]:<46} {_summary(values):>22}  {ratio:.2f}x")
    print()
    return statistics.median(results[target]) / base


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.scheduling", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="a short run (well under a minute)")
    parser.add_argument("--workers", type=int, default=32, help="worker threads (default 32)")
    parser.add_argument("--reps", type=int, default=None, help="repetitions (quick 3, full 7)")
    args = parser.parse_args(argv)
    reps = args.reps or (3 if args.quick else 7)
    noop_tasks = 20_000 if args.quick else 100_000
    others = 8_000
    info = machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores, {info['python']}, load {info['load']}")
    print(f"workers: {args.workers}, repetitions: {reps}\n")

    threading.stack_size(0)
    cost = measure(
        reps, list(COST_LABELS), lambda v: submit_cost(noop_tasks, args.workers, v)
    )
    print(f"no-op keyed tasks ({noop_tasks:,}, 1,024 keys): tasks/s, median [min-max]")
    ratio = table(cost, COST_LABELS, "submit_with")
    hurt = measure(reps, list(STORM_LABELS), lambda v: storm(args.workers, others, v))
    print(
        f"retry storm: {others:,} tasks of 1 ms over 1,000 other keys, and 1,000 keys whose "
        "task fails twice (10 ms backoff): the other keys' tasks/s"
    )
    storm_ratio = table(hurt, STORM_LABELS, "retry=")
    print(f"- {'PASS' if ratio >= 0.9 else 'MISS'}: submit_with is within 10% of submit "
          f"({ratio:.2f}x)")
    print(f"- {'PASS' if storm_ratio >= 0.9 else 'MISS'}: in a retry storm, the other keys "
          f"keep >= 0.9x their throughput ({storm_ratio:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
