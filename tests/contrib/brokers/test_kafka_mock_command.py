"""``python -m keyedpool.contrib.kafka_mock`` stops on SIGTERM as it does on Ctrl-C.

A supervisor (systemd, Docker, a CI script) stops the command with SIGTERM, often
while clients are still connected to the cluster; it must exit, not hang.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

pytest.importorskip("confluent_kafka", reason="the Kafka mock cluster needs confluent-kafka")

from _broker_checks import REPO  # noqa: E402
from confluent_kafka import Producer  # noqa: E402

WAIT = 30.0

pytestmark = pytest.mark.timeout(120)


def _start() -> subprocess.Popen[str]:
    paths = [str(REPO), os.environ.get("PYTHONPATH")]  # this keyedpool, even if not installed
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, paths))}
    return subprocess.Popen(
        [sys.executable, "-m", "keyedpool.contrib.kafka_mock", "demo"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )


def _stopped_by(cluster: subprocess.Popen[str], signum: int) -> int:
    cluster.send_signal(signum)
    try:
        return cluster.wait(WAIT)
    except subprocess.TimeoutExpired:
        cluster.kill()
        raise


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("run", range(3))
def test_the_command_exits_on_a_signal_with_a_client_still_connected(
    signum: int, run: int
) -> None:
    cluster = _start()
    try:
        assert cluster.stdout is not None
        bootstrap = cluster.stdout.readline().strip()
        assert bootstrap.startswith("127.0.0.1:"), bootstrap
        producer = Producer({"bootstrap.servers": bootstrap, "log_level": 0})
        producer.produce("demo", key=b"k", value=b"v")
        assert producer.flush(WAIT) == 0  # connected, and the cluster took a message
        code = _stopped_by(cluster, signum)
        del producer
    finally:
        if cluster.poll() is None:
            cluster.kill()
    assert code == 0, cluster.stderr.read() if cluster.stderr else code


def test_the_command_exits_on_sigterm_right_after_it_printed_its_address() -> None:
    cluster = _start()
    try:
        assert cluster.stdout is not None
        assert cluster.stdout.readline().startswith("127.0.0.1:")
        code = _stopped_by(cluster, signal.SIGTERM)
    finally:
        if cluster.poll() is None:
            cluster.kill()
    assert code == 0, cluster.stderr.read() if cluster.stderr else code
