"""Stop a KafkaConsumer right after it started, each time on a fresh mock cluster.

Run by test_kafka.py in a process of its own, so that a stop that hangs in
librdkafka only fails that test (the process is killed). Usage::

    python kafka_quick_stops.py ROUNDS

Prints one line per round: how many rebalance callbacks ran during the stop.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from keyedpool.contrib.kafka import KafkaConsumer

HERE = Path(__file__).parent


def one_round() -> int:
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
        callbacks: list[Any] = []
        config = {"bootstrap.servers": bootstrap, "group.id": "quick",
                  "session.timeout.ms": 3000, "heartbeat.interval.ms": 300, "log_level": 3}
        with KafkaConsumer("t", lambda message: None, config=config,
                           on_assign=callbacks.append, on_revoke=callbacks.append):
            pass
        return len(callbacks)
    finally:
        cluster.stdin.close()
        cluster.wait()


if __name__ == "__main__":
    for _ in range(int(sys.argv[1])):
        print(one_round(), flush=True)
