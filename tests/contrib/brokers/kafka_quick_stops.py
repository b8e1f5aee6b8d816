"""Stop a KafkaConsumer right after it started, each time on a fresh mock cluster.

Run by test_kafka.py in a process of its own, so that a stop that hangs in
librdkafka only fails that test (the process is killed). Usage::

    python kafka_quick_stops.py ROUNDS [PROTOCOL]

PROTOCOL is the group protocol: ``classic`` (the default) or ``consumer``
(the next-generation one, KIP-848). Prints one line per round: how many
rebalance callbacks ran during the stop, and how many of them ran inside
librdkafka's ``close()``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from keyedpool.contrib.kafka import KafkaConsumer

HERE = Path(__file__).parent


class _Close:
    """Stands in for the consumer's client: notes when its close() is running."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self.closing = False

    def close(self) -> None:
        self.closing = True
        try:
            self._client.close()
        finally:
            self.closing = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


class WatchedConsumer(KafkaConsumer):
    """A KafkaConsumer whose client notes when close() runs."""

    def _open(self) -> None:
        super()._open()
        self.client = _Close(self._consumer)
        self._consumer = self.client


def one_round(protocol: str) -> tuple[int, int]:
    # A fresh cluster: its first group join ends about when a consumer started
    # at once is stopped, so the assignment often arrives during the stop.
    cluster = subprocess.Popen(
        [sys.executable, str(HERE / "kafka_mock_cluster.py")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    assert cluster.stdin is not None and cluster.stdout is not None
    try:
        bootstrap = json.loads(cluster.stdout.readline())["bootstrap"]
        for name in ("t", "t.dead"):
            cluster.stdin.write(f"topic {name} 1\n")
            cluster.stdin.flush()
            assert cluster.stdout.readline().strip() == "ok"
        inside_close: list[bool] = []  # per callback: did it run inside close()?

        def callback(partitions: Any) -> None:
            inside_close.append(consumer.client.closing)

        config: dict[str, Any] = {"bootstrap.servers": bootstrap, "group.id": "quick",
                                  "log_level": 3}
        if protocol == "classic":
            config.update({"session.timeout.ms": 3000, "heartbeat.interval.ms": 300})
        else:  # (the broker sets these with the next-generation protocol)
            config["group.protocol"] = protocol
        consumer = WatchedConsumer("t", lambda message: None, config=config,
                                   on_assign=callback, on_revoke=callback)
        with consumer:
            pass
        return len(inside_close), sum(inside_close)
    finally:
        cluster.stdin.close()
        cluster.wait()


if __name__ == "__main__":
    for _ in range(int(sys.argv[1])):
        print(*one_round(sys.argv[2] if len(sys.argv) > 2 else "classic"), flush=True)
