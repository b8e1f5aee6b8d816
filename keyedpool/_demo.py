"""``python -m keyedpool``: an event-processing scenario, run and checked.

Three topics (orders, payments, shipments) carry events of aggregates such as
``order-17``; a fourth carries notifications with no aggregate. All share one
pool. The demo checks that each aggregate's events ran in the order they were
submitted, and compares the thread count with one 1024-thread pool per topic.
"""

from __future__ import annotations

import argparse
import math
import random
import threading
import time
from collections import defaultdict
from concurrent.futures import wait

from ._executor import KeyedPoolExecutor

TOPICS = ("orders", "payments", "shipments")
PER_TOPIC_WORKERS = 1024  # the alternative it is compared with: one keyed pool per topic


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m keyedpool",
        description=(
            "Run an event-processing scenario on one shared KeyedPoolExecutor: events of "
            "three topics, in order per aggregate, plus unordered notifications."
        ),
    )
    parser.add_argument("--workers", type=int, default=32, help="worker threads (default 32)")
    parser.add_argument("--events", type=int, default=20_000, help="aggregate events (20000)")
    parser.add_argument("--aggregates", type=int, default=500, help="distinct aggregates (500)")
    parser.add_argument("--notifications", type=int, default=5_000, help="unkeyed tasks (5000)")
    parser.add_argument(
        "--io-ms", type=float, default=1.0, help="blocking I/O per handler, in ms (1.0)"
    )
    parser.add_argument(
        "--seed", type=int, default=1, help="seed of the random event stream (1)"
    )
    args = parser.parse_args(argv)
    if args.workers <= 0 or args.events < 0 or args.aggregates <= 0 or args.notifications < 0:
        parser.error("--workers and --aggregates must be > 0; counts must be >= 0")
    if not math.isfinite(args.io_ms) or args.io_ms < 0:
        parser.error(f"--io-ms must be a finite number of milliseconds >= 0, not {args.io_ms:g}")

    rnd = random.Random(args.seed)
    io = args.io_ms / 1000
    lock = threading.Lock()
    handled: dict[str, list[int]] = defaultdict(list)
    notified = [0]

    def handle_event(topic: str, aggregate: str, seq: int) -> None:
        time.sleep(io)  # the blocking call: a DB write, an HTTP request...
        with lock:
            handled[aggregate].append(seq)

    def notify(user: int) -> None:
        time.sleep(io)
        with lock:
            notified[0] += 1

    # Build the stream first, so the timing covers only the pool.
    stream: list[tuple[str | None, str, int]] = []
    next_seq: dict[str, int] = defaultdict(int)
    keyed_left, unkeyed_left = args.events, args.notifications
    while keyed_left or unkeyed_left:
        if rnd.random() * (keyed_left + unkeyed_left) < keyed_left:
            aggregate = f"order-{rnd.randrange(args.aggregates)}"
            stream.append((aggregate, rnd.choice(TOPICS), next_seq[aggregate]))
            next_seq[aggregate] += 1
            keyed_left -= 1
        else:
            stream.append((None, "notifications", rnd.randrange(10_000)))
            unkeyed_left -= 1

    before = threading.active_count()
    print("keyedpool demo: ordered events and unordered notifications, on one shared pool")
    print(
        f"  {len(TOPICS)} topics of aggregate events + 1 topic of notifications; "
        f"{args.events} events over {args.aggregates} aggregates, "
        f"{args.notifications} notifications; each handler blocks {args.io_ms:g} ms"
    )
    with KeyedPoolExecutor(args.workers, thread_name_prefix="demo") as pool:
        start = time.perf_counter()
        futures = []
        for key, topic, seq in stream:
            if key is None:
                futures.append(pool.submit(None, notify, seq))
            else:
                futures.append(pool.submit(key, handle_event, topic, key, seq))
        threads = threading.active_count() - before
        busy = pool.stats(top_keys=5)  # while the last submitted tasks still run
        wait(futures)
        elapsed = time.perf_counter() - start
        final = pool.stats()

    failures = [f for f in futures if f.exception() is not None]
    violations = sum(1 for seqs in handled.values() if seqs != sorted(seqs))
    lost = len(stream) - sum(map(len, handled.values())) - notified[0]
    rate = len(stream) / elapsed
    ideal = args.workers / io if io else float("inf")
    per_topic = len(TOPICS) * PER_TOPIC_WORKERS
    print(f"  handled {len(stream)} tasks in {elapsed:.2f} s: {rate:,.0f} tasks/s", end="")
    print(f" ({rate / ideal:.0%} of the ideal {ideal:,.0f}/s)" if io else "")
    print(
        f"  per-aggregate order: {len(handled)} aggregates checked, {violations} out of order; "
        f"lost: {lost}; failed: {len(failures)}"
    )
    print(
        f"  threads: {threads} (the dispatcher and {threads - 1} of {args.workers} workers, "
        f"which start on demand) against {per_topic} for one {PER_TOPIC_WORKERS}-thread "
        f"pool per topic ({1 - threads / per_topic:.1%} fewer)"
    )
    print("  stats() right after the last submit:")
    print("    " + busy.table().replace("\n", "\n    "))
    print(
        f"  at the end: completed={final.completed} failed={final.failed} "
        f"pending={final.pending} rejected={final.rejected}"
    )
    ok = violations == 0 and lost == 0 and not failures
    print("OK: every aggregate's events ran in order" if ok else "FAILED")
    return 0 if ok else 1
