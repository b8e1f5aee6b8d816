"""Messages per second through Kafka: keyedpool's consumer in 1 and 2 processes vs a serial one.

Run as ``python -m bench.brokers_kafka [--messages N] [--cost-ms MS] [--quick]``;
prints a Markdown table.

The Kafka cluster is librdkafka's built-in mock cluster (no Kafka broker
package is available here): it speaks the real Kafka protocol on 127.0.0.1, in
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
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, Producer, TopicPartition

__all__ = ["main"]

_BROKERS = Path(__file__).resolve().parents[1] / "tests" / "contrib" / "brokers"
sys.path.insert(0, str(_BROKERS))

# The test helpers are not a package mypy can see (files = keyedpool, bench): load them by name.
_checks: Any = importlib.import_module("_broker_checks")
_kafka_proc: Any = importlib.import_module("kafka_consumer_proc")
ConsumerProcess = _checks.ConsumerProcess
proc_config = _checks.proc_config
settled = _kafka_proc.settled

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
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--keys", type=int, default=100)
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--cost-ms", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="1 repeat, 2000 messages")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeat, args.messages = 1, 2000
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


if __name__ == "__main__":
    main()
