"""A Kafka cluster for trying :mod:`keyedpool.contrib.kafka` on a laptop: librdkafka's mock cluster.

librdkafka, the C library inside ``confluent-kafka``, contains a mock Kafka
cluster for its own tests: brokers in memory that speak the real Kafka
protocol on 127.0.0.1 (produce, fetch, consumer groups, offset commits). Any
Kafka client, in any process, connects to it as it would to a real broker.
Nothing is installed or written to disk, and everything is gone when the
process that runs it exits.

From a shell, leave it running in a terminal::

    $ python -m keyedpool.contrib.kafka_mock orders orders.dead
    127.0.0.1:40135

It creates the topics named, prints its bootstrap servers on the first line
(pass them as ``bootstrap.servers``), and runs until Ctrl-C or SIGTERM. Or,
within one process:

>>> from keyedpool.contrib.kafka_mock import MockCluster
>>> with MockCluster(topics=["orders", "orders.dead"]) as cluster:  # doctest: +SKIP
...     config = {"bootstrap.servers": cluster.bootstrap_servers, "group.id": "demo"}
...     ...                           # a KafkaConsumer, a Producer, ... with config

For trying things out and for tests, never for production. What differs from
a real cluster:

* Every topic has 4 partitions (the mock's default; confluent-kafka offers no
  way to ask for another count). Producers create topics as they use them;
  consumers do not, so create the dead-letter topic (``f"{topic}.dead"``) here.
* A consumer group's first rebalance waits about 3 seconds, and every later
  one until the members have rejoined or the session timeout is near.
* Offset commits are refused while the group is rebalancing (real brokers
  accept them until the new assignment is handed out). With eager
  rebalancing that makes a rebalance repeat more messages here than on real
  brokers; :class:`~keyedpool.contrib.kafka.KafkaConsumer`'s default,
  cooperative rebalancing, commits revoked partitions outside that window.

It is started with ``test.mock.num.brokers``, a setting that librdkafka keeps
for its own tests (it is not in its documented configuration), so a future
confluent-kafka may change it.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Iterable
from types import FrameType, TracebackType

from keyedpool.contrib import _require

_require("confluent_kafka", "kafka", "keyedpool.contrib.kafka_mock")

from confluent_kafka import Producer

__all__ = ["MockCluster", "main"]

#: The longest wait for the in-process brokers to answer (they are local: moments).
_TIMEOUT = 10.0


class MockCluster:
    """librdkafka's mock Kafka cluster, running in this process until :meth:`close`.

    Args:
        brokers: how many brokers the cluster has.
        topics: topics to create at once (see :meth:`create_topic`).

    Other processes reach it at :attr:`bootstrap_servers` as long as this
    process runs and the cluster is open. Use it as a context manager to close
    it at the end of a block.
    """

    def __init__(self, brokers: int = 1, topics: Iterable[str] = ()) -> None:
        if isinstance(brokers, bool) or not isinstance(brokers, int) or brokers < 1:
            raise ValueError(f"brokers must be a positive int, not {brokers!r}")
        # The cluster lives inside this client: librdkafka starts it for a client
        # configured with test.mock.num.brokers and stops it when the client goes.
        self._client: Producer | None = Producer(
            {"bootstrap.servers": "", "test.mock.num.brokers": brokers, "log_level": 3}
        )
        metadata = self._client.list_topics(timeout=_TIMEOUT)
        listed = sorted(metadata.brokers.values(), key=lambda broker: broker.id)
        #: The ``bootstrap.servers`` value for clients: ``"127.0.0.1:PORT[,...]"``.
        self.bootstrap_servers = ",".join(f"{b.host}:{b.port}" for b in listed)
        for name in topics:
            self.create_topic(name)

    def create_topic(self, name: str) -> None:
        """Create the topic *name* (4 partitions) unless it exists."""
        if self._client is None:
            raise RuntimeError("the mock cluster is closed")
        if not isinstance(name, str) or not name:
            raise ValueError(f"a topic name must be a non-empty str, not {name!r}")
        # A producer's metadata request creates a missing topic on the mock cluster.
        topic = self._client.list_topics(name, timeout=_TIMEOUT).topics.get(name)
        if topic is None or topic.error is not None:
            reason = "not in the metadata" if topic is None else topic.error
            raise RuntimeError(f"the mock cluster did not create topic {name!r}: {reason}")

    def close(self) -> None:
        """Stop the cluster: its brokers go away, with every message they held."""
        self._client = None  # the client's last reference: librdkafka stops the cluster

    def __enter__(self) -> MockCluster:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def main(argv: list[str] | None = None) -> None:
    """Run a mock cluster until Ctrl-C or SIGTERM; print its bootstrap servers first."""
    parser = argparse.ArgumentParser(
        prog="python -m keyedpool.contrib.kafka_mock",
        description="Run librdkafka's mock Kafka cluster on 127.0.0.1 (in memory, for "
        "trying things out and tests) until Ctrl-C. The first line printed is the "
        "value for bootstrap.servers.",
    )
    parser.add_argument(
        "topics", nargs="*", metavar="TOPIC", help="topics to create (4 partitions each)"
    )
    parser.add_argument("--brokers", type=int, default=1, help="number of brokers (default 1)")
    args = parser.parse_args(argv)
    if args.brokers < 1:
        parser.error("--brokers must be at least 1")

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    with MockCluster(args.brokers, args.topics) as cluster:
        print(cluster.bootstrap_servers, flush=True)
        topics = ", ".join(args.topics) or "none yet (producers create them as they use them)"
        print(
            f"librdkafka mock Kafka cluster (in memory, for trying things out and tests)\n"
            f"  bootstrap.servers: {cluster.bootstrap_servers}\n"
            f"  topics: {topics}\n"
            f"Ctrl-C stops it.",
            file=sys.stderr,
            flush=True,
        )
        while not stop.wait(1.0):  # a timed wait, so the signal handler gets to run
            pass


if __name__ == "__main__":
    main()
