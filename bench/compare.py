"""Every design side by side, in one process run: ``python -m bench.compare [--quick]``.

For each repetition, each design (in an order that rotates per repetition)
gets a fresh pool that runs every workload in turn, and is then shut down and
joined before the next design starts, so no thread or backlog of one design
is left when the next one runs. Before each workload the garbage collector
runs; the task lists are built once, before any timing, and frozen out of the
collector's way (``gc.freeze``), and every design runs the same tasks with the
same handlers. Each figure is the median over the repetitions, with the min
and max beside it.

Workloads (W = ``--workers``):

* ``noop-uniform``, ``noop-zipf``: no-op handlers, keys uniform or Zipf
  distributed over 1024 keys;
* ``mix``: an event-processing scenario, three topics: orders (keyed, Zipf),
  payments (keyed, uniform) and notifications (no key), no-op handlers;
* ``io``: every handler sleeps 1 ms (blocking I/O), uniform keys;
* ``stuck``: the ``io`` tasks again, after one task whose handler blocks until
  the end of the measurement: the throughput of every task that does not have
  to wait for that handler, and the share of all the other keys' tasks that
  finish while it blocks;
* ``hot``: two hot keys with 400 queued 1 ms tasks each, then 2,000 tasks over
  998 cold keys: when the cold tasks finish (p50, p99);
* ``latency-idle``: one task at a time, submit-to-start time;
* ``latency-load``: 1 ms handlers offered at half of W / 1 ms.

Resident memory is measured in a fresh process per design (``--rss-probe``),
since freed thread stacks and arenas would otherwise be reused by the next one.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .designs import DESIGNS, Design, Key, Mailboxes, PerTopic, Stdlib, by_name

__all__ = ["Config", "main"]

perf_counter = time.perf_counter
sleep = time.sleep

KEYS = 1024
ZIPF_S = 1.1
STUCK_KEY = "order-stuck"
TOPICS = ("orders", "payments", "notifications")
#: A stuck handler gives up after this long, so a bug cannot hang the benchmark.
STUCK_LIMIT = 120.0
#: Upper bound for any wait that should end on its own.
HANG_LIMIT = 300.0

THROUGHPUT_WORKLOADS = ("noop-uniform", "noop-zipf", "mix", "io")
WORKLOAD_TITLES = {
    "noop-uniform": "no-op, uniform keys",
    "noop-zipf": "no-op, Zipf keys",
    "mix": "mix, 3 topics",
    "io": "1 ms I/O",
    "stuck": "1 ms I/O, one key stuck",
}


# -- configuration --------------------------------------------------------------


@dataclass
class Config:
    """What one run measures, and how much of it."""

    workers: int
    reps: int
    noop_tasks: int
    io_tasks: int
    latency_seconds: float
    idle_samples: int
    stuck_window: float
    rss_reps: int
    designs: list[type[Design]]
    per_topic_workers: int = PerTopic.PER_TOPIC
    io_seconds: float = 0.001
    load: float = 0.5
    quick: bool = False
    charts: bool = True


def make_config(args: argparse.Namespace) -> Config:
    workers: int = args.workers
    if workers < 1:
        raise SystemExit("--workers must be at least 1")
    try:
        designs = (
            [by_name(n.strip()) for n in args.designs.split(",")] if args.designs else list(DESIGNS)
        )
    except ValueError as exc:
        raise SystemExit(f"--designs: {exc}") from None
    if Stdlib not in designs:
        designs.insert(0, Stdlib)  # every ratio is to it
    # The io/stuck workloads need enough tasks to fill the note-literal design's
    # queues (workers * 100 plus 100 per worker), or its collapse cannot show.
    io_floor = workers * 125
    # Otherwise about 0.15 s (quick) or 0.5 s (full) of ideal I/O time per run.
    if args.quick:
        io_tasks = max(io_floor, int(workers / 0.001 * 0.15))
        cfg = Config(workers, 3, 10_000, io_tasks, 0.3, 300, 0.6, 1, designs)
    else:
        io_tasks = max(io_floor, int(workers / 0.001 * 0.5))
        cfg = Config(workers, 5, 100_000, io_tasks, 2.0, 1000, 3.0, 3, designs)
    cfg.quick = args.quick
    cfg.charts = not args.no_charts
    cfg.per_topic_workers = args.per_topic_workers
    if args.reps is not None:
        if args.reps < 1:
            raise SystemExit("--reps must be at least 1")
        cfg.reps = args.reps
    if cfg.per_topic_workers < 1:
        raise SystemExit("--per-topic-workers must be at least 1")
    return cfg


def make_design(cls: type[Design], cfg: Config) -> Design:
    if cls is PerTopic:
        return PerTopic(per_topic=cfg.per_topic_workers)
    return cls.create(cfg.workers)


# -- inputs, built once before any timing -------------------------------------------


@dataclass
class Batch:
    """The tasks of one workload: key (None: no key), per-key sequence number, topic."""

    keys: list[str | None]
    seqs: list[int]
    topics: list[int]


def _sequence(keys: list[str | None], topics: list[int]) -> Batch:
    counts: dict[str, int] = {}
    seqs = []
    for key in keys:
        if key is None:
            seqs.append(0)
        else:
            n = counts.get(key, 0)
            counts[key] = n + 1
            seqs.append(n)
    return Batch(keys, seqs, topics)


def _zipf_weights(n: int) -> list[float]:
    return [1.0 / (k**ZIPF_S) for k in range(1, n + 1)]


def keyed_batch(n: int, zipf: bool, seed: int) -> Batch:
    """*n* keyed tasks over ``KEYS`` keys; a key's topic is its number modulo 3."""
    rng = random.Random(seed)
    if zipf:
        picks = rng.choices(range(KEYS), weights=_zipf_weights(KEYS), k=n)
    else:
        picks = [rng.randrange(KEYS) for _ in range(n)]
    keys: list[str | None] = [f"{TOPICS[k % 3]}-{k}" for k in picks]
    return _sequence(keys, [k % 3 for k in picks])


def mix_batch(n: int, seed: int) -> Batch:
    """Three topics: orders (Zipf ids), payments (uniform), notifications (no key)."""
    rng = random.Random(seed)
    weights = _zipf_weights(1000)
    keys: list[str | None] = []
    topics = []
    for _ in range(n):
        topic = rng.randrange(3)
        topics.append(topic)
        if topic == 0:
            keys.append(f"order-{rng.choices(range(1000), weights=weights)[0]}")
        elif topic == 1:
            keys.append(f"payment-{rng.randrange(1000)}")
        else:
            keys.append(None)
    return _sequence(keys, topics)


@dataclass
class Inputs:
    noop_uniform: Batch
    noop_zipf: Batch
    mix: Batch
    io: Batch
    latency: Batch

    @classmethod
    def build(cls, cfg: Config) -> Inputs:
        latency_tasks = max(
            cfg.idle_samples,
            int(cfg.load * cfg.workers / cfg.io_seconds * cfg.latency_seconds),
        )
        return cls(
            noop_uniform=keyed_batch(cfg.noop_tasks, False, 1),
            noop_zipf=keyed_batch(cfg.noop_tasks, True, 2),
            mix=mix_batch(cfg.noop_tasks, 3),
            io=keyed_batch(cfg.io_tasks, False, 4),
            latency=keyed_batch(latency_tasks, False, 5),
        )


# -- the handlers, with their order check ----------------------------------------------


class Probe:
    """The handlers of one run, and what they saw.

    An order violation is a task that starts after a later task of its key has
    started, or while another task of its key is running.
    """

    def __init__(self, io_seconds: float, starts: int = 0) -> None:
        self.io_seconds = io_seconds
        self.last: dict[Key, int] = {}
        self.running: set[Key] = set()
        self.violations = 0
        self.lock = threading.Lock()
        self.count = 0
        self.target = 0
        self.finished = threading.Event()
        self.finished_at = 0.0
        self.total = 0
        self.ran = 0
        self.all_done_at = 0.0
        self.slept = 0.0
        self.release = threading.Event()
        self.starts = [0.0] * starts

    def noop(self) -> None:
        pass

    def keyed(self, key: Key, seq: int) -> None:
        last = self.last
        if last.get(key, -1) > seq:
            self.violations += 1
        else:
            last[key] = seq

    def _enter(self, key: Key, seq: int) -> None:
        # A task of *key* starts: count it if another of its key runs, or a later one ran.
        running = self.running
        if key in running:
            self.violations += 1
        running.add(key)
        last = self.last
        if last.get(key, -1) > seq:
            self.violations += 1
        else:
            last[key] = seq

    def keyed_io(self, key: Key, seq: int, counted: bool) -> None:
        running = self.running
        self._enter(key, seq)
        began = perf_counter()
        sleep(self.io_seconds)
        ended = perf_counter()
        running.discard(key)
        with self.lock:
            self.slept += ended - began
            self.ran += 1
            if self.ran == self.total:
                self.all_done_at = ended
            if counted:
                self.count += 1
                if self.count == self.target:
                    self.finished_at = ended
                    self.finished.set()

    def timed_io(self, key: Key, seq: int, index: int) -> None:
        """1 ms of I/O, with the order check; note when task *index* finished."""
        self._enter(key, seq)
        sleep(self.io_seconds)
        self.running.discard(key)
        self.starts[index] = perf_counter()  # here: when it finished

    def stuck(self) -> None:
        self.release.wait(STUCK_LIMIT)

    def started_io(self, index: int) -> None:
        self.starts[index] = perf_counter()
        sleep(self.io_seconds)

    def started(self, index: int) -> None:
        self.starts[index] = perf_counter()


def _noop() -> None:
    pass


def _wait_all(futures: Sequence[Future[Any]]) -> None:
    for future in futures:
        future.result(HANG_LIMIT)


# -- one run of one workload on one design -------------------------------------------------


@dataclass
class Run:
    """The outcome of one workload on one design in one repetition."""

    design: str
    workload: str
    rep: int
    tasks: int
    seconds: float
    per_second: float
    violations: int = 0
    threads: int = 0
    extra: dict[str, float] = field(default_factory=dict)


def run_noop(design: Design, batch: Batch, cfg: Config) -> tuple[int, float, int]:
    probe = Probe(cfg.io_seconds)
    submit = design.submit
    keyed = probe.keyed
    noop = probe.noop
    futures: list[Future[Any]] = []
    append = futures.append
    start = perf_counter()
    for key, seq, topic in zip(batch.keys, batch.seqs, batch.topics, strict=True):
        if key is None:
            append(submit(None, noop, topic=topic))
        else:
            append(submit(key, keyed, key, seq, topic=topic))
    _wait_all(futures)
    seconds = perf_counter() - start
    return len(futures), seconds, probe.violations


def run_io(
    design: Design, batch: Batch, cfg: Config, stuck: bool, window: float = HANG_LIMIT
) -> tuple[int, float, int, dict[str, float]]:
    """The ``io`` workload; with *stuck*, one task blocks first and we count the others.

    With *stuck*, the others get *window* seconds; those that have not finished
    by then are stuck behind the blocked handler (the design "collapsed").

    "Others" are the tasks that do not share the stuck key's thread. Both runs
    time them, so that with and without the stuck key the same tasks compare.
    """
    probe = Probe(cfg.io_seconds)
    blocked = design.lane(STUCK_KEY, 0)
    counted = [
        blocked is None or design.lane(key, topic) != blocked
        for key, topic in zip(batch.keys, batch.topics, strict=True)
    ]
    probe.target = sum(counted)
    probe.total = len(counted)
    futures: list[Future[Any]] = []
    begun = threading.Event()
    start = [0.0]
    failure: list[BaseException] = []

    def produce() -> None:
        # A thread of its own: with the note-literal design, submit blocks for
        # as long as the stuck handler does.
        submit = design.submit
        handler = probe.keyed_io
        append = futures.append
        try:
            start[0] = perf_counter()
            begun.set()
            if stuck:
                append(submit(STUCK_KEY, probe.stuck, topic=0))
            for key, seq, topic, count in zip(
                batch.keys, batch.seqs, batch.topics, counted, strict=True
            ):
                append(submit(key, handler, key, seq, count, topic=topic))
        except BaseException as exc:  # the main thread re-raises it
            failure.append(exc)
            begun.set()

    producer = threading.Thread(target=produce, name="bench-producer")
    producer.start()
    begun.wait(HANG_LIMIT)
    probe.finished.wait(window)
    with probe.lock:  # the handlers update count and finished_at under it
        completed = probe.count
        done = completed == probe.target
        others_seconds = (probe.finished_at if done else perf_counter()) - start[0]
    # Of every task of the other keys (whatever thread it needs), how many
    # finished while the stuck one still blocks.
    finished_while_stuck = sum(f.done() for f in futures[1:]) if stuck else 0
    probe.release.set()
    producer.join(HANG_LIMIT)
    if failure:
        raise failure[0]
    if not stuck and not done:
        raise RuntimeError(f"{design.label}: io workload did not finish in {HANG_LIMIT} s")
    _wait_all(futures)
    extra = {
        "others": float(probe.target),
        "completed": float(completed),
        "collapsed": float(not done),
        "others_per_second": completed / others_seconds,
        "slept": probe.slept / max(1, probe.ran),
        "window": window if stuck else 0.0,
        "other_keys_share": finished_while_stuck / len(batch.keys),
    }
    if stuck:
        return completed, others_seconds, probe.violations, extra
    return probe.ran, probe.all_done_at - start[0], probe.violations, extra


#: The hot-keys workload: two keys with this many 1 ms tasks queued each,
#: submitted first, then COLD_TASKS tasks over COLD_KEYS other keys.
HOT_TASKS = 400
COLD_TASKS = 2000
COLD_KEYS = 998


def run_hot(design: Design, cfg: Config) -> tuple[int, float, int, dict[str, float]]:
    """Two hot keys with a backlog, then many cold keys: when do the cold tasks finish?"""
    keys: list[str] = [f"hot-{i % 2}" for i in range(2 * HOT_TASKS)]
    rng = random.Random(6)
    keys += [f"cold-{rng.randrange(COLD_KEYS)}" for _ in range(COLD_TASKS)]
    probe = Probe(cfg.io_seconds, len(keys))
    submit = design.submit
    handler = probe.timed_io
    futures: list[Future[Any]] = []
    start = perf_counter()
    for i, key in enumerate(keys):
        futures.append(submit(key, handler, key, i, i))
    _wait_all(futures)
    seconds = perf_counter() - start
    cold = [end - start for end in probe.starts[2 * HOT_TASKS :]]
    extra = {f"cold_{p}": v for p, v in _percentiles(cold).items()}
    return len(keys), seconds, probe.violations, extra


def _percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    last = len(ordered) - 1
    return {
        "p50": ordered[round(0.50 * last)],
        "p99": ordered[round(0.99 * last)],
        "max": ordered[last],
    }


def run_latency_idle(
    design: Design, batch: Batch, cfg: Config
) -> tuple[int, float, dict[str, float]]:
    n = cfg.idle_samples
    probe = Probe(cfg.io_seconds, n)
    submitted = [0.0] * n
    submit = design.submit
    started = probe.started
    begin = perf_counter()
    for i in range(n):
        sleep(0.0005)  # let every thread of the pool go back to waiting
        key = batch.keys[i]
        topic = batch.topics[i]
        submitted[i] = perf_counter()
        submit(key, started, i, topic=topic).result(HANG_LIMIT)
    seconds = perf_counter() - begin
    return n, seconds, _percentiles([s - t for s, t in zip(probe.starts, submitted, strict=True)])


def run_latency_load(
    design: Design, batch: Batch, cfg: Config
) -> tuple[int, float, dict[str, float]]:
    # Offered load: cfg.load of cfg.workers / io_seconds, the same for every design.
    rate = cfg.load * cfg.workers / cfg.io_seconds
    n = min(len(batch.keys), int(rate * cfg.latency_seconds))
    probe = Probe(cfg.io_seconds, n)
    submitted = [0.0] * n
    submit = design.submit
    handler = probe.started_io
    keys, topics = batch.keys, batch.topics
    futures: list[Future[Any]] = []
    append = futures.append
    i = 0
    begin = perf_counter()
    while i < n:
        due = min(n, int((perf_counter() - begin) * rate) + 1)
        while i < due:
            submitted[i] = perf_counter()
            append(submit(keys[i], handler, i, topic=topics[i]))
            i += 1
        if i < n:
            sleep(0.0002)
    _wait_all(futures)
    seconds = perf_counter() - begin
    return n, seconds, _percentiles([s - t for s, t in zip(probe.starts, submitted, strict=True)])


def _warm_up(design: Design, cfg: Config) -> None:
    # Start every thread a lazy design would start under load: 2 x W tasks that
    # each hold a thread for 1 ms, without a key (so they spread).
    futures = [
        design.submit(None, sleep, cfg.io_seconds, topic=i % 3) for i in range(2 * cfg.workers)
    ]
    _wait_all(futures)


@dataclass
class Lifecycle:
    design: str
    rep: int
    start: float
    shutdown: float
    threads: int


def design_pass(
    cls: type[Design], cfg: Config, inputs: Inputs, rep: int
) -> tuple[list[Run], Lifecycle]:
    """One fresh pool of *cls* runs every workload, then is shut down and joined."""
    gc.collect()
    threads_before = threading.active_count()
    begin = perf_counter()
    design = make_design(cls, cfg)
    design.submit(None, _noop, topic=0).result(HANG_LIMIT)
    start_s = perf_counter() - begin
    runs: list[Run] = []
    threads = 0
    try:
        _warm_up(design, cfg)

        def record(
            workload: str,
            tasks: int,
            seconds: float,
            violations: int = 0,
            extra: dict[str, float] | None = None,
        ) -> None:
            nonlocal threads
            started = design.threads_started()
            threads = max(threads, started)
            runs.append(
                Run(
                    cls.name,
                    workload,
                    rep,
                    tasks,
                    seconds,
                    tasks / seconds,
                    violations,
                    started,
                    extra or {},
                )
            )

        for workload, batch in (
            ("noop-uniform", inputs.noop_uniform),
            ("noop-zipf", inputs.noop_zipf),
            ("mix", inputs.mix),
        ):
            gc.collect()
            record(workload, *run_noop(design, batch, cfg))
        gc.collect()
        record("io", *run_io(design, inputs.io, cfg, stuck=False))
        gc.collect()
        # The others get cfg.stuck_window seconds, or 4 x what they took without a
        # stuck key if this design is that slow here (a busy machine).
        window = max(cfg.stuck_window, 4 * runs[-1].tasks / runs[-1].per_second)
        record("stuck", *run_io(design, inputs.io, cfg, stuck=True, window=window))
        gc.collect()
        record("hot", *run_hot(design, cfg))
        gc.collect()
        tasks, seconds, extra = run_latency_idle(design, inputs.latency, cfg)
        record("latency-idle", tasks, seconds, 0, extra)
        gc.collect()
        tasks, seconds, extra = run_latency_load(design, inputs.latency, cfg)
        record("latency-load", tasks, seconds, 0, extra)
    finally:
        begin = perf_counter()
        design.shutdown()
        shutdown_s = perf_counter() - begin
    left = threading.active_count() - threads_before
    if left:
        raise RuntimeError(f"{cls.label}: {left} threads still alive after shutdown")
    return runs, Lifecycle(cls.name, rep, start_s, shutdown_s, threads)


# -- resident memory, in a fresh process per design ---------------------------------------


def vm_rss_kb() -> int:
    """This process's resident set size in KiB (``VmRSS`` in ``/proc/self/status``)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def rss_probe(name: str, cfg: Config) -> dict[str, int]:
    """Runs in a fresh process: RSS and threads added by one design after warm-up."""
    cls = by_name(name)
    gc.collect()
    before = vm_rss_kb()
    design = make_design(cls, cfg)
    _warm_up(design, cfg)
    gc.collect()
    after = vm_rss_kb()
    threads = design.threads_started()
    design.shutdown()
    return {"rss_kb": after - before, "threads": threads}


def measure_rss(cfg: Config) -> dict[str, list[dict[str, int]]]:
    root = Path(__file__).resolve().parent.parent
    found: dict[str, list[dict[str, int]]] = {}
    for _ in range(cfg.rss_reps):
        for cls in cfg.designs:
            command = [
                sys.executable,
                "-m",
                "bench.compare",
                "--rss-probe",
                cls.name,
                "--workers",
                str(cfg.workers),
                "--per-topic-workers",
                str(cfg.per_topic_workers),
            ]
            done = subprocess.run(
                command,
                cwd=root,
                capture_output=True,
                text=True,
                timeout=HANG_LIMIT,
                check=False,
            )
            if done.returncode:
                raise RuntimeError(f"RSS probe for {cls.name} failed:\n{done.stderr}")
            found.setdefault(cls.name, []).append(json.loads(done.stdout.strip().splitlines()[-1]))
    return found


# -- the machine -----------------------------------------------------------------------------


def machine() -> dict[str, str]:
    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": model,
        "cores": f"{os.cpu_count()} ({usable} usable)",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "platform": platform.platform(),
        "load": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def sleep_time(seconds: float, samples: int = 200) -> float:
    """How long ``time.sleep(seconds)`` really takes here (median), with nothing else running."""
    took = []
    for _ in range(samples):
        begin = perf_counter()
        sleep(seconds)
        took.append(perf_counter() - begin)
    return statistics.median(took)


# -- the report ------------------------------------------------------------------------------


@dataclass
class Summary:
    median: float
    low: float
    high: float


def summarize(values: list[float]) -> Summary:
    return Summary(statistics.median(values), min(values), max(values))


def _rate(x: float) -> str:
    if x >= 1e6:
        return f"{x / 1e6:.2f}M"
    if x >= 1e3:
        return f"{x / 1e3:.1f}k"
    return f"{x:.0f}"


def _span(s: Summary) -> str:
    return f"{_rate(s.median)} [{_rate(s.low)}-{_rate(s.high)}]"


def _ms(x: float) -> str:
    ms = x * 1000
    return f"{ms:.3f}" if ms < 1 else f"{ms:.2f}" if ms < 100 else f"{ms:.0f}"


@dataclass
class Report:
    cfg: Config
    host: dict[str, str]
    runs: list[Run]
    lifecycles: list[Lifecycle]
    rss: dict[str, list[dict[str, int]]]
    seconds: float = 0.0
    load_after: str = ""
    #: How long sleep(io_seconds) takes on this machine, measured before the runs.
    slept: float = 0.001
    lines: list[str] = field(default_factory=list)

    def values(self, design: str, workload: str, what: str = "per_second") -> list[float]:
        out = []
        for run in self.runs:
            if run.design == design and run.workload == workload:
                out.append(run.per_second if what == "per_second" else run.extra[what])
        return out

    def tput(self, design: str, workload: str) -> Summary:
        return summarize(self.values(design, workload))

    def names(self) -> list[str]:
        return [cls.name for cls in self.cfg.designs]

    def label(self, name: str) -> str:
        return by_name(name).label

    def threads(self, name: str) -> int:
        return max(life.threads for life in self.lifecycles if life.design == name)

    def violations(self, name: str) -> int:
        return sum(r.violations for r in self.runs if r.design == name)

    def rss_mb(self, name: str) -> float:
        return statistics.median(p["rss_kb"] for p in self.rss[name]) / 1024

    def stuck_ratio(self, name: str) -> float:
        """The others' throughput with one key stuck, over the same tasks' without."""
        normal = statistics.median(self.values(name, "io", "others_per_second"))
        return self.tput(name, "stuck").median / normal

    def other_keys_share(self, name: str) -> float:
        """Of the other keys' tasks, the share that finished while one key was stuck (median)."""
        return statistics.median(self.values(name, "stuck", "other_keys_share"))

    def cold_p99(self, name: str) -> float:
        return statistics.median(self.values(name, "hot", "cold_p99"))

    def design_workers(self, name: str) -> int:
        if name == PerTopic.name:
            return PerTopic.TOPICS * self.cfg.per_topic_workers
        return self.cfg.workers

    def render(self) -> str:
        cfg = self.cfg
        w = cfg.workers
        base = Stdlib.name
        out: list[str] = []
        add = out.append
        mode = "quick" if cfg.quick else "full"
        add(f"# keyedpool benchmark ({mode}, W={w})")
        add("")
        h = self.host
        add(f"- machine: {h['cpu']}, {h['cores']} cores, {h['platform']}")
        add(f"- Python: {h['python']}")
        add(
            f"- load average before/after: {h['load']} / {self.load_after} "
            "(above the core count, the figures are noisy)"
        )
        add(f"- `time.sleep(0.001)` takes {h['sleep_1ms']} here (median, measured alone)")
        command = "python -m bench.compare" + (" --quick" if cfg.quick else "") + f" --workers {w}"
        add(
            f"- command: `{command}`; {cfg.reps} repetitions, interleaved; "
            f"run took {self.seconds:.0f} s"
        )
        add(
            f"- tasks per run: no-op {cfg.noop_tasks}, I/O {cfg.io_tasks}; "
            f"per-topic design: 3 x {cfg.per_topic_workers} threads, every other design W = {w}"
        )
        add("")
        add("## Throughput (tasks/s: median [min-max]; x = ratio to ThreadPoolExecutor's median)")
        add("")
        add("| design | " + " | ".join(WORKLOAD_TITLES[x] for x in THROUGHPUT_WORKLOADS) + " |")
        add("|---|" + "---:|" * len(THROUGHPUT_WORKLOADS))
        for name in self.names():
            cells = []
            for workload in THROUGHPUT_WORKLOADS:
                s = self.tput(name, workload)
                ratio = s.median / self.tput(base, workload).median
                cells.append(f"{_rate(s.median)} [{_rate(s.low)}-{_rate(s.high)}] {ratio:.2f}x")
            add(f"| {self.label(name)} | " + " | ".join(cells) + " |")
        add("")
        add("## 1 ms I/O, and one stuck key")
        add("")
        add(
            "Ideal = the design's threads / 1 ms; the next column uses the time "
            f"`time.sleep(0.001)` takes here ({self.slept * 1000:.3f} ms, median, "
            "measured alone before the runs). Others = the tasks that do "
            "not share the stuck key's thread; their throughput is timed in the I/O "
            "run (normal) and again after one task whose handler blocks until the "
            f"end (after {cfg.stuck_window:g} s, or 4x the normal run if that is longer) was "
            "submitted first (stuck)."
        )
        add("")
        add(
            "| design | I/O tasks/s | x ideal | x ideal (real sleep) "
            "| others, normal | others, one key stuck | x normal | stuck result "
            "| other keys' tasks done while stuck |"
        )
        add("|---|---:|---:|---:|---:|---:|---:|---|---:|")
        for name in self.names():
            io = self.tput(name, "io")
            ideal = self.design_workers(name) / cfg.io_seconds
            slept = self.slept
            normal = summarize(self.values(name, "io", "others_per_second"))
            stuck = self.tput(name, "stuck")
            collapsed = sum(self.values(name, "stuck", "collapsed"))
            done = statistics.median(self.values(name, "stuck", "completed"))
            others = statistics.median(self.values(name, "stuck", "others"))
            if collapsed:
                verdict = (
                    f"collapsed in {collapsed:.0f}/{len(self.values(name, 'stuck'))} "
                    f"runs: {done:.0f} of {others:.0f} done in "
                    f"{statistics.median(self.values(name, 'stuck', 'window')):.2g} s"
                )
            else:
                verdict = f"all {others:.0f} done"
            add(
                f"| {self.label(name)} | {_span(io)} | {io.median / ideal:.3f} | "
                f"{io.median * slept / cfg.io_seconds / ideal:.3f} | {_span(normal)} | "
                f"{_span(stuck)} | {self.stuck_ratio(name):.3f} | {verdict} | "
                f"{self.other_keys_share(name):.1%} |"
            )
        add("")
        add("## Hot keys")
        add("")
        add(
            f"Two hot keys with {HOT_TASKS} queued 1 ms tasks each, submitted first, then "
            f"{COLD_TASKS} 1 ms tasks over {COLD_KEYS} cold keys: when the cold tasks "
            "finish, counted from the first submit (ms; median over repetitions)."
        )
        add("")
        add("| design | cold p50 | cold p99 | cold max | all done |")
        add("|---|---:|---:|---:|---:|")
        for name in self.names():
            cells = [
                _ms(statistics.median(self.values(name, "hot", f"cold_{p}")))
                for p in ("p50", "p99", "max")
            ]
            total = statistics.median(
                r.seconds for r in self.runs if r.design == name and r.workload == "hot"
            )
            add(f"| {self.label(name)} | " + " | ".join(cells) + f" | {_ms(total)} |")
        add("")
        add("## Latency, submit to start (ms; median over repetitions)")
        add("")
        rate = cfg.load * w / cfg.io_seconds
        add(
            f"Idle: one no-op task at a time. Load: 1 ms handlers offered at {rate:.0f} tasks/s "
            f"({cfg.load:.0%} of W / 1 ms), uniform keys; for a design that cannot reach "
            "W / 1 ms (see the I/O table) that is more than half of what it really does."
        )
        add("")
        add("| design | idle p50 | idle p99 | idle max | load p50 | load p99 | load max |")
        add("|---|---:|---:|---:|---:|---:|---:|")
        for name in self.names():
            cells = []
            for workload in ("latency-idle", "latency-load"):
                for p in ("p50", "p99", "max"):
                    cells.append(_ms(statistics.median(self.values(name, workload, p))))
            add(f"| {self.label(name)} | " + " | ".join(cells) + " |")
        add("")
        add("## Threads, memory, start and shutdown, order")
        add("")
        add(
            "RSS added: in a fresh process, after the pool started all its threads. Start: "
            "constructor to first result. Shutdown: `shutdown(wait=True)` of the idle pool."
        )
        add("")
        add(
            "| design | threads started | RSS added (MB) | start ms | shutdown ms "
            "| keeps key order | order violations |"
        )
        add("|---|---:|---:|---:|---:|---|---:|")
        for name in self.names():
            cls = by_name(name)
            start = summarize([life.start for life in self.lifecycles if life.design == name])
            stop = summarize([life.shutdown for life in self.lifecycles if life.design == name])
            add(
                f"| {cls.label} | {self.threads(name)} | {self.rss_mb(name):.1f} | "
                f"{_ms(start.median)} [{_ms(start.low)}-{_ms(start.high)}] | "
                f"{_ms(stop.median)} [{_ms(stop.low)}-{_ms(stop.high)}] | "
                f"{'yes' if cls.ordered else 'no'} | {self.violations(name)} |"
            )
        add("")
        add(f"## Targets (W={w}, this run)")
        add("")
        out.extend(self.targets())
        add("")
        return "\n".join(out)

    def targets(self) -> list[str]:
        cfg = self.cfg
        w = cfg.workers
        names = self.names()
        lines: list[str] = []

        def check(ok: bool, text: str) -> None:
            lines.append(f"- {'PASS' if ok else 'MISS'}: {text}")

        base = Stdlib.name
        keyed = [n for n in ("keyedpool", "keyedpool-hash") if n in names]
        for name in [*keyed, "keyedpool-unkeyed"]:
            if name in names:
                r = self.tput(name, "noop-uniform").median / self.tput(base, "noop-uniform").median
                check(
                    r >= 2.5,
                    f"{self.label(name)} no-op throughput {r:.2f}x ThreadPoolExecutor (>= 2.5x)",
                )
        for name in keyed:
            io = self.tput(name, "io").median
            r = io / (w / cfg.io_seconds)
            vs = io / self.tput(base, "io").median
            check(
                r >= 0.9 and vs >= 1.0,
                f"{self.label(name)} 1 ms I/O over {KEYS} uniform keys: {r:.3f}x the ideal "
                f"(>= 0.90) and {vs:.2f}x ThreadPoolExecutor (>= 1.0x)",
            )
        if Mailboxes.name in names:
            theirs = self.cold_p99(Mailboxes.name)
            for name in keyed:
                ours = self.cold_p99(name)
                check(
                    ours <= 1.2 * theirs,
                    f"{self.label(name)} hot keys: cold-key p99 {_ms(ours)} ms vs per-key "
                    f"mailboxes {_ms(theirs)} ms (<= 1.2x)",
                )
        for name in keyed:
            share = self.other_keys_share(name)
            check(
                share >= 1.0,
                f"{self.label(name)} one stuck key: {share:.1%} of the other keys' tasks "
                "finish while it is stuck (100%)",
            )
        if "keyedpool-unkeyed" in names:
            io = self.tput("keyedpool-unkeyed", "io").median
            r = io / (w / cfg.io_seconds)
            slept = self.slept
            check(
                r >= 0.9,
                f"keyedpool unkeyed 1 ms I/O {r:.3f}x the ideal {w} / 1 ms (>= 0.9x); "
                f"sleep(0.001) took {slept * 1000:.3f} ms here, so the ideal at the real "
                f"sleep is {w / slept:.0f}/s and we reach {io * slept / w:.3f}x of that",
            )
        need = (w - 1) / w
        for name in ("keyedpool", "keyedpool-unkeyed"):
            if name in names:
                r = self.stuck_ratio(name)
                check(
                    r >= need,
                    f"{self.label(name)}, one key stuck: others keep {r:.3f} of normal "
                    f"throughput (>= (W-1)/W = {need:.3f})",
                )
        lines.append(
            "- note: a stuck handler holds one of W threads, so a design whose throughput is "
            "bound by its threads (unkeyed work at 1 ms) loses 1/W: (W-1)/W is the expected "
            "value there, and runs land on either side of it by the run's noise"
        )
        if "note-literal" in names:
            r = self.stuck_ratio("note-literal")
            lines.append(
                f"- note: the note-literal design keeps {r:.3f} of normal throughput with "
                "one key stuck (expected to collapse)"
            )
        if "keyedpool" in names and PerTopic.name in names:
            r = self.tput("keyedpool", "mix").median / self.tput(PerTopic.name, "mix").median
            t = self.threads("keyedpool") / max(1, self.threads(PerTopic.name))
            check(
                r >= 1.2 and t <= 0.05,
                f"keyedpool keyed vs per-topic on the 3-topic mix: {r:.2f}x its throughput "
                f"(>= 1.2x) with {t:.1%} of its threads (<= 5%)",
            )
        for name in names:
            cls = by_name(name)
            if cls.ordered:
                v = self.violations(name)
                check(v == 0, f"{cls.label}: {v} per-key order violations (must be 0)")
        if "keyedpool" in names:
            ordered = [n for n in names if by_name(n).ordered]
            p99 = ", ".join(
                f"{self.label(n)} {_ms(statistics.median(self.values(n, 'latency-load', 'p99')))}"
                for n in ordered
            )
            lines.append(
                f"- note: keyed tasks queue behind their own worker, so under load compare "
                f"keyed latency with the other ordered designs: p99 ms {p99}"
            )
        # Latency: no worse than the stdlib pool at p50 and p99.
        for name in ("keyedpool", "keyedpool-unkeyed"):
            if name not in names:
                continue
            for workload, title in (
                ("latency-idle", "idle"),
                ("latency-load", "50% load"),
            ):
                for p in ("p50", "p99"):
                    ours = statistics.median(self.values(name, workload, p))
                    theirs = statistics.median(self.values(base, workload, p))
                    check(
                        ours <= theirs,
                        f"{self.label(name)} latency {title} {p} {_ms(ours)} ms "
                        f"vs ThreadPoolExecutor {_ms(theirs)} ms (no worse)",
                    )
        return lines


# -- charts ----------------------------------------------------------------------------------


def charts(report: Report, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = report.names()
    labels = [report.label(n) for n in names]
    y = list(range(len(names)))
    paths: list[Path] = []

    workloads = (*THROUGHPUT_WORKLOADS, "stuck")
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    flat = list(axes.flat)
    for ax, workload in zip(flat[: len(workloads)], workloads, strict=True):
        sums = [report.tput(n, workload) for n in names]
        med = [s.median for s in sums]
        err = [[s.median - s.low for s in sums], [s.high - s.median for s in sums]]
        ax.barh(y, med, xerr=err, color="tab:blue", capsize=3)
        ax.set_yticks(y, labels)
        ax.invert_yaxis()
        ax.set_title(WORKLOAD_TITLES[workload])
        ax.set_xlabel("tasks/s (median, min-max)")
    ax = flat[-1]
    ratios = [report.stuck_ratio(n) for n in names]
    bars = ax.barh(y, ratios, color="tab:purple")
    ax.bar_label(bars, fmt="%.2f", padding=2)
    need = (report.cfg.workers - 1) / report.cfg.workers
    ax.axvline(need, color="black", linestyle="--", linewidth=1, label="(W-1)/W")
    ax.set_yticks(y, labels)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.25)
    ax.set_title("one key stuck: others / normal")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.06), frameon=False)
    fig.suptitle(
        f"Throughput, W={report.cfg.workers} ({report.host['cpu']}, {report.host['cores']} cores)"
    )
    fig.tight_layout()
    path = out / "throughput.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    paths.append(path)

    fig, axes = plt.subplots(1, 2, figsize=(14, 5))
    width = 0.27
    for ax, (workload, title) in zip(
        axes,
        (("latency-idle", "idle"), ("latency-load", "50% load, 1 ms handlers")),
        strict=True,
    ):
        for i, p in enumerate(("p50", "p99", "max")):
            vals = [statistics.median(report.values(n, workload, p)) * 1000 for n in names]
            ax.bar([x + (i - 1) * width for x in y], vals, width, label=p)
        ax.set_xticks(y, labels, rotation=25, ha="right")
        ax.set_yscale("log")
        ax.set_ylabel("ms, submit to start")
        ax.set_title(f"Latency, {title}")
        ax.legend()
    fig.tight_layout()
    path = out / "latency.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    paths.append(path)

    fig, axes = plt.subplots(1, 2, figsize=(14, 5))
    bars = axes[0].bar(y, [report.threads(n) for n in names], color="tab:orange")
    axes[0].bar_label(bars, padding=2)
    axes[0].set_yscale("log")
    axes[0].set_title("Threads started")
    bars = axes[1].bar(y, [report.rss_mb(n) for n in names], color="tab:green")
    axes[1].bar_label(bars, fmt="%.1f", padding=2)
    axes[1].set_title("RSS added (MB, fresh process)")
    for ax in axes:
        ax.set_xticks(y, labels, rotation=25, ha="right")
    fig.tight_layout()
    path = out / "resources.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    paths.append(path)
    return paths


# -- main ------------------------------------------------------------------------------------


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.compare",
        description="Run every pool design side by side and report throughput, latency, "
        "threads, memory and order.",
    )
    parser.add_argument("--quick", action="store_true", help="a short run (under a minute)")
    parser.add_argument("--workers", type=int, default=32, help="worker threads W (default 32)")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("bench/results"),
        help="directory for report.md, results.json and the charts",
    )
    parser.add_argument("--reps", type=int, default=None, help="repetitions (quick 3, full 5)")
    parser.add_argument(
        "--designs",
        default="",
        help="comma-separated subset: " + ",".join(d.name for d in DESIGNS),
    )
    parser.add_argument(
        "--per-topic-workers",
        type=int,
        default=PerTopic.PER_TOPIC,
        help="threads per topic in the per-topic design (default 1024)",
    )
    parser.add_argument("--no-charts", action="store_true", help="skip the PNG charts")
    parser.add_argument("--rss-probe", default="", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    cfg = make_config(args)
    if args.rss_probe:
        print(json.dumps(rss_probe(args.rss_probe, cfg)))
        return 0
    begin = perf_counter()
    host = machine()
    slept = sleep_time(cfg.io_seconds)
    host["sleep_1ms"] = f"{slept * 1000:.3f} ms"

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    say(
        f"machine: {host['cpu']}, {host['cores']} cores, "
        f"Python {host['python']}, load {host['load']}"
    )
    say("measuring RSS in fresh processes...")
    rss = measure_rss(cfg)
    inputs = Inputs.build(cfg)
    gc.collect()
    gc.freeze()  # the inputs stay alive all run: keep them out of every collection
    runs: list[Run] = []
    lifecycles: list[Lifecycle] = []
    order = list(cfg.designs)
    for rep in range(cfg.reps):
        for cls in order[rep % len(order) :] + order[: rep % len(order)]:
            t = perf_counter()
            got, life = design_pass(cls, cfg, inputs, rep)
            runs.extend(got)
            lifecycles.append(life)
            say(f"rep {rep + 1}/{cfg.reps} {cls.label}: {perf_counter() - t:.1f} s")
    gc.unfreeze()
    report = Report(cfg, host, runs, lifecycles, rss)
    report.seconds = perf_counter() - begin
    report.slept = slept
    report.load_after = " ".join(f"{x:.2f}" for x in os.getloadavg())
    text = report.render()
    print(text)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(text + "\n")
    (out / "results.json").write_text(
        json.dumps(
            {
                "config": {k: v for k, v in asdict(cfg).items() if k != "designs"}
                | {"designs": [d.name for d in cfg.designs]},
                "machine": host,
                "runs": [asdict(r) for r in runs],
                "lifecycles": [asdict(life) for life in lifecycles],
                "rss": rss,
            },
            indent=1,
        )
    )
    written = [out / "report.md", out / "results.json"]
    if cfg.charts:
        written.extend(charts(report, out))
    say("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
