"""Messages per second through Kafka: keyedpool's consumer in 1 and 2 processes vs a serial one.

Run as ``python -m bench.brokers_kafka [--messages N] [--cost-ms MS] [--quick]``;
prints a Markdown table. With ``--rebalance`` it measures something else: how
many messages a kill-and-replace repeats (see "Rebalance" below).

The Kafka cluster is librdkafka's built-in mock cluster (no Kafka broker to
install): it speaks the real Kafka protocol on 127.0.0.1, in
a process of its own (``tests/contrib/brokers/kafka_mock_cluster.py``), so
these are real network round trips, but broker-side costs (disk, replication)
are not those of a real cluster. Compare the rows with each other, not with
numbers from a production cluster.

Every consumer runs in real OS processes (``tests/contrib/brokers/consumer_proc.py``),
each with its own group on a fresh topic of ``--partitions`` partitions, and
handles messages of ``--keys`` keys whose handler spends ``--cost-ms``
milliseconds in ``time.sleep`` (blocking I/O; 0 measures pure overhead). Rows:

* ``serial``: a plain confluent-kafka consumer that handles each message on its
  polling thread, then stores its offset (auto-committed every 0.2 s, as
  often as the keyed consumer commits);
* ``keyedpool``: :class:`keyedpool.contrib.kafka.KafkaConsumer` with
  ``--workers`` workers per process, in 1 and in 2 processes of one group.

Measurement: the consumers start on an empty topic; once every process of
the group owns its partitions, ``--messages`` messages are produced at once,
and the clock runs from just before producing until the group's committed
offsets (read from the broker) cover all of them: handled *and* committed.
Each figure is the median of ``--repeat`` runs.

Rebalance (``--rebalance``): how many messages are handled twice when one of
two consumer processes is SIGKILLed mid-stream and a replacement is started
(as a supervisor would restart it). The killed process stops making progress
after ``--stall-after`` messages with more in flight (its handlers block), so
it dies with handlers running and commits held back. By default
(``--replace after-takeover``) the replacement starts once the dead process's
session (2 s) ran out and the survivor took its partitions, so the run has both
kinds of hand-over: from a dead owner, then from a live one (the survivor gives
half of its partitions to the replacement). With ``--replace at-once`` it starts
right after the kill. Messages are produced at ``--rate`` per second all along.
Each run checks that nothing is lost and no key runs out of order, and counts:

* ``rebalances``: the rebalances after the kill (as the survivor saw them);
* ``duplicates``: messages handled more than once (from the shared log of
  every process), split into repeats of what the killed process had handled
  (``of the killed's``) and the others (``at live hand-overs``), and divided
  by the rebalances (``per rebalance``);
* ``bound``: the messages in flight in the partitions that moved, summed over
  the rebalances (``of the killed's``: the part for the killed process's
  partitions). For a live owner, what was taken and not finished when its
  revoke began (it reports that from its ``on_revoke`` hook; the rest is
  finished already and should be committed before the hand-over). For the
  killed process, every message of its partitions from its last committed
  offset (read from the broker right after the kill) up to the last one it
  handled: the fewest it can have had taken and not committed.

Target: duplicates at most the bound (``PASS``, else ``MISS``). A hand-over
whose commit is refused repeats everything its old owner finished since its
last commit, so it misses. ``--strategy`` sets ``partition.assignment.strategy``
for every process (e.g. ``range,roundrobin`` for the eager protocol; default:
the consumer's own).
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition

__all__ = ["main"]

_BROKERS = Path(__file__).resolve().parents[1] / "tests" / "contrib" / "brokers"
sys.path.insert(0, str(_BROKERS))

# The test helpers are not a package mypy can see (files = keyedpool, bench): load them by name.
_checks: Any = importlib.import_module("_broker_checks")
_kafka_proc: Any = importlib.import_module("kafka_consumer_proc")
ConsumerProcess = _checks.ConsumerProcess
proc_config = _checks.proc_config
check_log = _checks.check_log
read_log = _checks.read_log
settled = _kafka_proc.settled
in_flight_at_revokes = _kafka_proc.in_flight_at_revokes

_FACTORY = _BROKERS / "kafka_consumer_proc.py"
_WAIT = 300.0


@dataclass(frozen=True)
class Row:
    """One measured configuration."""

    consumer: str
    processes: int
    workers: int
    seconds: float
    rate: float


class _Cluster:
    """The mock cluster process."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(_BROKERS / "kafka_mock_cluster.py")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        self.bootstrap: str = json.loads(self.proc.stdout.readline())["bootstrap"]

    def topic(self, partitions: int) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        name = f"bench-{uuid.uuid4().hex[:8]}"
        self.proc.stdin.write(f"topic {name} {partitions}\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == "ok"
        return name

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(30)


def _produce(bootstrap: str, topic: str, keys: int, seqs: range) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "log_level": 3})
    for seq in seqs:
        for k in range(keys):
            producer.produce(topic, key=f"key-{k}".encode(), value=f"key-{k}:{seq}".encode())
            producer.poll(0)
    producer.flush(_WAIT)


def _committed(probe: Consumer, topic: str, partitions: int) -> int:
    tps = probe.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=_WAIT)
    return sum(max(tp.offset, 0) for tp in tps)


def _wait_committed(probe: Consumer, topic: str, partitions: int, total: int) -> None:
    deadline = time.monotonic() + _WAIT
    while _committed(probe, topic, partitions) < total:
        if time.monotonic() > deadline:
            raise RuntimeError(f"not all {total} messages were committed in time")
        time.sleep(0.01)


def _run(
    cluster: _Cluster, args: argparse.Namespace, factory: str, processes: int, workers: int
) -> float:
    topic = cluster.topic(args.partitions)
    group = f"g-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory() as tmp:
        assignments = Path(tmp) / "assignments.log"
        config = proc_config(
            Path(tmp) / "handled.log",
            broker=f"{_FACTORY}:{factory}",
            url=cluster.bootstrap,
            topic=topic,
            group=group,
            workers=workers,
            cost=args.cost_ms / 1000.0,
            progress=1000,
            session_timeout_ms=6000,
            assignments=str(assignments),
        )
        probe = Consumer(
            {"bootstrap.servers": cluster.bootstrap, "group.id": group, "log_level": 3}
        )
        procs = [ConsumerProcess(config) for _ in range(processes)]
        try:
            # Measure a settled group: every process owns its partitions.
            deadline = time.monotonic() + _WAIT
            while not settled(assignments, [p.pid for p in procs], args.partitions):
                if time.monotonic() > deadline:
                    raise RuntimeError("the consumer group did not settle")
                time.sleep(0.01)
            rounds = max(1, args.messages // args.keys)
            start = time.perf_counter()
            _produce(cluster.bootstrap, topic, args.keys, range(rounds))
            _wait_committed(probe, topic, args.partitions, rounds * args.keys)
            seconds = time.perf_counter() - start
            for proc in procs:
                proc.stop()
        finally:
            probe.close()
            for proc in procs:
                proc.close()
    return seconds


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print the Markdown table."""
    parser = argparse.ArgumentParser(prog="python -m bench.brokers_kafka", description=__doc__)
    parser.add_argument("--messages", type=int, help="default 5000; 3000 with --rebalance")
    parser.add_argument("--keys", type=int, default=100)
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--cost-ms", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, help="default 3; 1 with --rebalance")
    parser.add_argument("--quick", action="store_true", help="1 repeat, 2000 messages")
    parser.add_argument(
        "--rebalance",
        action="store_true",
        help="measure the messages handled twice in a kill-and-replace instead",
    )
    parser.add_argument("--rate", type=int, default=300, help="messages/s (--rebalance)")
    parser.add_argument(
        "--replace",
        choices=("after-takeover", "at-once"),
        default="after-takeover",
        help="start the replacement once the survivor owns every partition, or right "
        "after the kill (--rebalance)",
    )
    parser.add_argument(
        "--stall-after", type=int, default=200, help="the killed process's last message"
    )
    parser.add_argument("--strategy", default="", help="partition.assignment.strategy")
    args = parser.parse_args(argv)
    if args.rebalance:
        args.messages = args.messages or 3000
        args.repeat = args.repeat or 1
        _rebalance_main(args)
        return
    args.messages = args.messages or (2000 if args.quick else 5000)
    args.repeat = args.repeat or (1 if args.quick else 3)
    setups: list[tuple[str, str, int, int]] = [
        ("serial", "make_serial", 1, 1),
        ("keyedpool", "make", 1, args.workers),
        ("keyedpool", "make", 2, args.workers),
    ]
    cluster = _Cluster()
    rows: list[Row] = []
    try:
        for name, factory, processes, workers in setups:
            times = [_run(cluster, args, factory, processes, workers) for _ in range(args.repeat)]
            seconds = statistics.median(times)
            messages = max(1, args.messages // args.keys) * args.keys
            rows.append(Row(name, processes, workers, seconds, messages / seconds))
    finally:
        cluster.close()
    serial = rows[0].rate
    print(
        f"Kafka (librdkafka mock cluster on loopback), {args.messages} messages over "
        f"{args.keys} keys, {args.partitions} partitions, handler cost {args.cost_ms:g} ms, "
        f"median of {args.repeat}\n"
    )
    print("| consumer | processes | workers/process | seconds | messages/s | vs serial |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row.consumer} | {row.processes} | {row.workers} | {row.seconds:.2f} | "
            f"{row.rate:,.0f} | {row.rate / serial:.1f}x |"
        )


# -- rebalance: kill one process, start a replacement ---------------------------------


@dataclass(frozen=True)
class RebalanceRun:
    """What one kill-and-replace run showed."""

    messages: int
    rebalances: int
    duplicates: int
    of_killed: int
    bound: int
    killed_bound: int
    lost: int
    violations: int

    @property
    def target_met(self) -> bool:
        return self.duplicates <= self.bound


class _PacedProducer:
    """Produces ``key-K:seq`` messages round by round at a steady rate, on a thread."""

    def __init__(self, bootstrap: str, topic: str, keys: int, rounds: int, rate: int) -> None:
        self.where: dict[tuple[str, int], tuple[int, int]] = {}  # (key, seq) -> (partition, offset)
        self.failed: list[KafkaError] = []
        self._producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "log_level": 3})
        self._topic, self._keys, self._rounds, self._rate = topic, keys, rounds, rate
        # A daemon: if the bench fails, it does not keep the process alive.
        self._thread = threading.Thread(target=self._run, name="bench-producer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self) -> None:
        self._thread.join(_WAIT)
        if self._thread.is_alive() or self.failed:
            raise RuntimeError(f"producing failed: {self.failed[:3]}")

    def _delivered(self, error: KafkaError | None, message: Message) -> None:
        if error is not None:
            self.failed.append(error)
            return
        key, _, seq = (message.value() or b"").decode().partition(":")
        partition, offset = message.partition(), message.offset()
        assert partition is not None and offset is not None
        self.where[(key, int(seq))] = (partition, offset)

    def _run(self) -> None:
        start = time.monotonic()
        sent = 0
        for seq in range(self._rounds):
            for k in range(self._keys):
                key = f"key-{k}"
                self._producer.produce(
                    self._topic,
                    key=key.encode(),
                    value=f"{key}:{seq}".encode(),
                    on_delivery=self._delivered,
                )
                sent += 1
            self._producer.poll(0)
            # Pace by rounds: sleep until this many messages are due.
            ahead = start + sent / self._rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
        self._producer.flush(_WAIT)


def _kill_and_replace(cluster: _Cluster, args: argparse.Namespace) -> RebalanceRun:
    topic = cluster.topic(args.partitions)
    group = f"g-{uuid.uuid4().hex[:8]}"
    rounds = max(1, args.messages // args.keys)
    total = rounds * args.keys
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "handled.log"

        def config(**extra: Any) -> dict[str, Any]:
            made: dict[str, Any] = proc_config(
                log,
                broker=f"{_FACTORY}:make",
                url=cluster.bootstrap,
                topic=topic,
                group=group,
                workers=args.workers,
                cost=args.cost_ms / 1000.0,
                session_timeout_ms=2000,
                strategy=args.strategy,
                **extra,
            )
            return made

        probe = Consumer(
            {"bootstrap.servers": cluster.bootstrap, "group.id": group, "log_level": 3}
        )
        survivor = ConsumerProcess(config())
        victim = ConsumerProcess(config(stall_after=args.stall_after))
        procs = [survivor, victim]
        try:
            ConsumerProcess.wait(
                lambda: _owned_each_once([survivor, victim], args.partitions),
                "the group to settle",
                _WAIT,
            )
            producer = _PacedProducer(cluster.bootstrap, topic, args.keys, rounds, args.rate)
            producer.start()
            victim.wait_handled(args.stall_after, _WAIT)
            owned_by_victim = _kafka_proc.owned_from_lines(victim.lines)
            victim.kill()
            # The victim can commit no more: its committed offsets are final.
            at_kill = {
                tp.partition: max(tp.offset, 0)
                for tp in probe.committed(
                    [TopicPartition(topic, p) for p in sorted(owned_by_victim)], timeout=_WAIT
                )
            }
            survivor_lines_at_kill = len(survivor.lines)
            if args.replace == "after-takeover":
                # Wait until the dead process's session ran out and the survivor
                # took its partitions: the replacement then takes half of them
                # over from a live owner.
                ConsumerProcess.wait(
                    lambda: len(_kafka_proc.owned_from_lines(survivor.lines))
                    == args.partitions,
                    "the survivor to take the dead process's partitions",
                    _WAIT,
                )
            replacement = ConsumerProcess(config())
            procs.append(replacement)
            producer.join()
            _wait_committed(probe, topic, args.partitions, total)
            # Everything is committed: the graceful stops below repeat nothing.
            live_lines = survivor.lines[survivor_lines_at_kill:] + list(replacement.lines)
            for proc in (survivor, replacement):
                proc.stop()
        finally:
            probe.close()
            for proc in procs:
                proc.close()
        check = check_log(log, {f"key-{k}": rounds for k in range(args.keys)}, rewinds=True)
        records = read_log(log)
    # Repeats of messages the killed process had handled first.
    first: dict[tuple[str, int], int] = {}
    of_killed = 0
    for pid, key, seq, _ in records:
        if first.setdefault((key, seq), pid) == victim.pid and pid != victim.pid:
            of_killed += 1
    # The killed process's in-flight: its partitions from the last commit to the last
    # message it handled.
    last_handled: dict[int, int] = {}
    for pid, key, seq, _ in records:
        if pid == victim.pid:
            partition, offset = producer.where[(key, seq)]
            last_handled[partition] = max(last_handled.get(partition, -1), offset)
    killed_bound = sum(
        max(0, last_handled.get(p, -1) + 1 - at_kill.get(p, 0)) for p in owned_by_victim
    )
    live_bound = in_flight_at_revokes(live_lines)
    rebalances = sum(1 for line in survivor.lines[survivor_lines_at_kill:]
                     if line.startswith("assign"))
    return RebalanceRun(
        messages=total,
        rebalances=rebalances,
        duplicates=check.duplicates,
        of_killed=of_killed,
        bound=killed_bound + live_bound,
        killed_bound=killed_bound,
        lost=len(check.lost),
        violations=len(check.violations),
    )


def _owned_each_once(procs: list[Any], partitions: int) -> bool:
    owned = [_kafka_proc.owned_from_lines(p.lines) for p in procs]
    every = sorted(p for parts in owned for p in parts)
    return all(owned) and every == list(range(partitions))


def _rebalance_main(args: argparse.Namespace) -> None:
    cluster = _Cluster()
    try:
        runs = [_kill_and_replace(cluster, args) for _ in range(args.repeat)]
    finally:
        cluster.close()
    strategy = args.strategy or "the consumer's default"
    when = "at once" if args.replace == "at-once" else "once the survivor took over"
    print(
        f"Kafka kill-and-replace (librdkafka mock cluster on loopback): 2 processes, one "
        f"SIGKILLed after {args.stall_after} messages and replaced {when}; "
        f"{runs[0].messages} messages over {args.keys} keys at {args.rate}/s, "
        f"{args.partitions} partitions, handler cost {args.cost_ms:g} ms, "
        f"partition.assignment.strategy: {strategy}\n"
    )
    print(
        "| run | rebalances | duplicates | of the killed's | at live hand-overs "
        "| per rebalance | bound | of the killed's | lost | order violations | target |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for i, run in enumerate(runs, 1):
        per = run.duplicates / run.rebalances if run.rebalances else float(run.duplicates)
        print(
            f"| {i} | {run.rebalances} | {run.duplicates} | {run.of_killed} | "
            f"{run.duplicates - run.of_killed} | {per:.1f} | {run.bound} | "
            f"{run.killed_bound} | {run.lost} | {run.violations} | "
            f"{'PASS' if run.target_met else 'MISS'} |"
        )
    met = all(run.target_met for run in runs)
    print(
        f"\nTarget: duplicates at most the messages in flight in the partitions that "
        f"moved: {'PASS' if met else 'MISS'}"
    )
    if any(run.lost or run.violations for run in runs):
        raise SystemExit("messages were lost or ran out of order")


if __name__ == "__main__":
    main()
