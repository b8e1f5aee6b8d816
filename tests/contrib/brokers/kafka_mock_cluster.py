"""Run librdkafka's built-in mock Kafka cluster in its own process, for the Kafka tests and bench.

No Kafka broker package can be installed here, so the Kafka tests use the one
stand-in the project allows: the mock cluster that ships inside librdkafka (the
C library under ``confluent-kafka``). It speaks the real Kafka protocol
(produce, fetch, consumer groups with join/sync/heartbeat, offset commits) on
loopback TCP ports, so every client here, in every process, talks to it exactly
as it would to a real broker.

confluent-kafka has no Python API for the mock cluster, so this helper calls
librdkafka's public mock API (``rdkafka_mock.h``) through :mod:`ctypes`, found in
the library that ``confluent_kafka.cimpl`` links against. That lets it create
topics with a chosen number of partitions and shorten the initial group
rebalance delay. If those symbols are missing, it falls back to
:class:`keyedpool.contrib.kafka_mock.MockCluster` (the helper users run as
``python -m keyedpool.contrib.kafka_mock``), which starts the cluster with
``test.mock.num.brokers``: topics then get 4 partitions.

Protocol on stdin/stdout, one line each::

    <- {"bootstrap": "127.0.0.1:PORT", "partitions_settable": true}
    -> topic NAME PARTITIONS
    <- ok
    (stdin closed) -> the cluster is destroyed and the process exits

Run as ``python kafka_mock_cluster.py [--brokers N]``.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
from typing import Any

#: librdkafka's rd_kafka_type_t value for a producer handle.
_RD_KAFKA_PRODUCER = 0


class MockCluster:
    """A librdkafka mock cluster living in this process."""

    def __init__(self, brokers: int = 1, initial_rebalance_delay_ms: int = 100) -> None:
        self._keep: Any = None
        self._lib: ctypes.CDLL | None = None
        self._cluster: int | None = None
        self.bootstrap = ""
        try:
            self._start_ctypes(brokers, initial_rebalance_delay_ms)
        except (OSError, AttributeError):
            self._start_fallback(brokers)

    @property
    def partitions_settable(self) -> bool:
        """Whether :meth:`create_topic` honours the partition count."""
        return self._cluster is not None

    def _start_ctypes(self, brokers: int, delay_ms: int) -> None:
        from confluent_kafka import cimpl

        # dlsym on the extension's handle also searches the libraries it links
        # against, so this finds librdkafka whether it is bundled or the system's.
        lib = ctypes.CDLL(cimpl.__file__)
        lib.rd_kafka_conf_new.restype = ctypes.c_void_p
        lib.rd_kafka_conf_set.argtypes = [
            ctypes.c_void_p,
            ctypes.c_char_p,
            ctypes.c_char_p,
            ctypes.c_char_p,
            ctypes.c_size_t,
        ]
        lib.rd_kafka_new.restype = ctypes.c_void_p
        lib.rd_kafka_new.argtypes = [
            ctypes.c_int,
            ctypes.c_void_p,
            ctypes.c_char_p,
            ctypes.c_size_t,
        ]
        lib.rd_kafka_mock_cluster_new.restype = ctypes.c_void_p
        lib.rd_kafka_mock_cluster_new.argtypes = [ctypes.c_void_p, ctypes.c_int]
        lib.rd_kafka_mock_cluster_bootstraps.restype = ctypes.c_char_p
        lib.rd_kafka_mock_cluster_bootstraps.argtypes = [ctypes.c_void_p]
        lib.rd_kafka_mock_topic_create.restype = ctypes.c_int
        lib.rd_kafka_mock_topic_create.argtypes = [
            ctypes.c_void_p,
            ctypes.c_char_p,
            ctypes.c_int,
            ctypes.c_int,
        ]
        lib.rd_kafka_mock_group_initial_rebalance_delay_ms.restype = None
        lib.rd_kafka_mock_group_initial_rebalance_delay_ms.argtypes = [
            ctypes.c_void_p,
            ctypes.c_int32,
        ]
        errstr = ctypes.create_string_buffer(512)
        conf = lib.rd_kafka_conf_new()
        lib.rd_kafka_conf_set(conf, b"log_level", b"3", errstr, len(errstr))
        rk = lib.rd_kafka_new(_RD_KAFKA_PRODUCER, conf, errstr, len(errstr))
        if not rk:
            raise OSError(f"rd_kafka_new failed: {errstr.value.decode()}")
        cluster = lib.rd_kafka_mock_cluster_new(rk, brokers)
        if not cluster:
            raise OSError("rd_kafka_mock_cluster_new failed")
        lib.rd_kafka_mock_group_initial_rebalance_delay_ms(cluster, delay_ms)
        self._lib, self._cluster, self._keep = lib, cluster, rk
        self.bootstrap = lib.rd_kafka_mock_cluster_bootstraps(cluster).decode()

    def _start_fallback(self, brokers: int) -> None:
        from keyedpool.contrib.kafka_mock import MockCluster as PublicMockCluster

        self._keep = PublicMockCluster(brokers)
        self.bootstrap = self._keep.bootstrap_servers

    def create_topic(self, name: str, partitions: int) -> None:
        """Create *name* with *partitions* partitions (fallback: auto-created with 4)."""
        if self._lib is not None and self._cluster is not None:
            err = self._lib.rd_kafka_mock_topic_create(self._cluster, name.encode(), partitions, 1)
            if err:
                raise RuntimeError(f"rd_kafka_mock_topic_create({name!r}) failed: error {err}")
        else:
            self._keep.create_topic(name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--brokers", type=int, default=1)
    args = parser.parse_args()
    cluster = MockCluster(args.brokers)
    out = sys.stdout
    hello = {"bootstrap": cluster.bootstrap, "partitions_settable": cluster.partitions_settable}
    out.write(json.dumps(hello) + "\n")
    out.flush()
    for line in sys.stdin:
        words = line.split()
        if len(words) == 3 and words[0] == "topic":
            cluster.create_topic(words[1], int(words[2]))
            out.write("ok\n")
        else:
            out.write(f"error: unknown command {line.strip()!r}\n")
        out.flush()
    # stdin closed: our parent is done (or gone). Exit without running
    # librdkafka's teardown, which is slow and has nothing left to flush.
    out.flush()
    import os

    os._exit(0)


if __name__ == "__main__":
    main()
