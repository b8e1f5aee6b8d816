"""keyedpool.contrib.prometheus scraped by a real Prometheus server, queried over its HTTP API.

The path docs/metrics.md walks a user through: a pool registered on a registry that
prometheus_client serves over HTTP, a Prometheus server with a scrape job for it, and a
PromQL query that must come back with the pool's figures. The server is Debian's
``prometheus`` (``apt-get install -y --no-install-recommends prometheus``), started here on
127.0.0.1 and a free port with a temporary configuration and data directory, and stopped after.
The test is skipped, saying why, only when the binary is missing. It takes about seven
seconds, most of it Prometheus's own wait of about five seconds before its first scrape.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from concurrent.futures import wait
from dataclasses import dataclass
from typing import Any

import pytest
from _util import TIMEOUT

pytest.importorskip(
    "prometheus_client",
    reason="prometheus_client is not installed: pip install keyedpool[prometheus]",
)

from prometheus_client import CollectorRegistry, start_http_server  # noqa: E402

from keyedpool import KeyedPoolExecutor  # noqa: E402
from keyedpool.contrib.prometheus import register  # noqa: E402

#: Upper bound for Prometheus to start, or to show a figure: it turns a hang into a failure.
DEADLINE = 60.0
JOB = "keyedpool-test"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Prometheus:
    """A running Prometheus server, the registry it scrapes, and its query API."""

    url: str
    registry: CollectorRegistry
    process: subprocess.Popen[bytes]
    log_path: str

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()[-4000:]

    def query(self, promql: str) -> list[dict[str, Any]]:
        """The result of an instant query: one {"metric": labels, "value": [t, "v"]} a series."""
        url = f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
        with urllib.request.urlopen(url, timeout=TIMEOUT) as r:
            answer = json.load(r)
        assert answer["status"] == "success", answer
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    def poll(self, promql: str, expected: float) -> list[dict[str, Any]]:
        """Query until the single series *promql* selects has the *expected* value."""
        deadline = time.monotonic() + DEADLINE
        while True:
            result = self.query(promql)
            if len(result) == 1 and float(result[0]["value"][1]) == expected:
                return result
            assert self.process.poll() is None, f"Prometheus exited:\n{self.log()}"
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{promql} is {result}, not {expected}, after {DEADLINE}s of scrapes every 1s"
                    f"\nPrometheus log:\n{self.log()}"
                )
            time.sleep(0.1)


def _start(binary: str, base: str) -> tuple[subprocess.Popen[bytes], str]:
    """Start Prometheus on a free loopback port; wait until it says it is ready."""
    log_path = os.path.join(base, "prometheus.log")
    for _attempt in range(3):  # the free port may be taken before Prometheus binds it
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [
                    binary,
                    f"--config.file={os.path.join(base, 'prometheus.yml')}",
                    f"--storage.tsdb.path={os.path.join(base, 'data')}",
                    f"--web.listen-address=127.0.0.1:{port}",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + DEADLINE
        while process.poll() is None and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=TIMEOUT) as r:
                    if r.status == 200:
                        return process, url
            except (urllib.error.URLError, ConnectionError):
                pass  # not listening yet, or still starting (503)
            time.sleep(0.05)
        _stop(process)
        with open(log_path, errors="replace") as f:
            log_text = f.read()
        if "address already in use" not in log_text:
            break
    raise AssertionError(f"Prometheus did not get ready on {url}:\n{log_text[-4000:]}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(TIMEOUT)


@pytest.fixture
def prometheus() -> Iterator[Prometheus]:
    """A Prometheus server scraping, every second, a registry served on a free loopback port."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip(
            "the Prometheus server is not installed: "
            "apt-get install -y --no-install-recommends prometheus"
        )
    registry = CollectorRegistry()
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    base = tempfile.mkdtemp(prefix="keyedpool-prometheus-")
    try:
        with open(os.path.join(base, "prometheus.yml"), "w") as config:
            config.write(
                "global:\n"
                "  scrape_interval: 1s\n"
                "  scrape_timeout: 1s\n"
                "scrape_configs:\n"
                f"  - job_name: {JOB}\n"
                "    static_configs:\n"
                f"      - targets: ['127.0.0.1:{server.server_port}']\n"
            )
        process, url = _start(binary, base)
        try:
            yield Prometheus(url, registry, process, os.path.join(base, "prometheus.log"))
        finally:
            _stop(process)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(TIMEOUT)
        shutil.rmtree(base, ignore_errors=True)


def test_prometheus_scrapes_the_pools_figures(prometheus: Prometheus) -> None:
    tasks = 60
    pool = KeyedPoolExecutor(4)
    try:
        register(pool, "scraped", prometheus.registry)
        completed = 'keyedpool_tasks_total{pool="scraped",outcome="completed"}'
        # Scraped before any work: the series is there, at 0, with the labels Prometheus adds.
        [series] = prometheus.poll(completed, 0)
        assert series["metric"]["job"] == JOB
        assert prometheus.query(f'up{{job="{JOB}"}}')[0]["value"][1] == "1"

        futures = [pool.submit(f"order-{i % 6}", pow, i, 2) for i in range(tasks)]
        done, not_done = wait(futures, timeout=TIMEOUT)
        assert not not_done
        assert [f.result() for f in futures] == [i * i for i in range(tasks)]

        # The next scrapes carry every task; what Prometheus stores is what stats() counts.
        prometheus.poll(completed, tasks)
        prometheus.poll('keyedpool_submitted_total{pool="scraped"}', tasks)
        prometheus.poll('keyedpool_tasks_total{pool="scraped",outcome="failed"}', 0)
        prometheus.poll('keyedpool_pending_tasks{pool="scraped"}', 0)
        prometheus.poll('keyedpool_workers{pool="scraped"}', 4)
    finally:
        pool.shutdown()
