"""Real broker servers for the consumer tests: started on 127.0.0.1, on a free port, in a temp dir.

``redis_server`` runs Debian's ``redis-server`` and ``nats_server`` runs
``nats-server -js`` (JetStream on, store in the temp dir). Each is started once
per test session and stopped after it; a test that needs one is skipped, with
the reason, only when the binary is not installed (CI installs both).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from _broker_checks import Server

# Starting a server is an upper bound, not a measurement.
START_TIMEOUT = 20.0


@pytest.fixture(autouse=True)
def no_consumer_thread_left_behind() -> Iterator[None]:
    """Every consumer thread (named ``keyedpool-<broker>-...``) a test started is gone after it."""
    before = set(threading.enumerate())
    yield
    left = [
        t for t in threading.enumerate()
        if t not in before and t.name.startswith("keyedpool-")
    ]
    for thread in left:
        thread.join(10)  # an upper bound for a thread that is finishing anyway
    alive = [t.name for t in left if t.is_alive()]
    assert not alive, f"consumer threads left running: {alive}"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(cmd: list[str], port: int, directory: Path, ready: bytes) -> Iterator[Server]:
    """Run *cmd*; yield once the server printed *ready* (its own "listening" line)."""
    log = directory / "server.log"
    proc = subprocess.Popen(cmd, cwd=directory, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    is_ready = threading.Event()

    def follow() -> None:
        # Copy the server's output to its log; signal the ready line (or its exit).
        assert proc.stdout is not None
        with open(log, "wb") as out:
            for line in proc.stdout:
                out.write(line)
                out.flush()
                if ready in line:
                    is_ready.set()
        is_ready.set()

    follower = threading.Thread(target=follow, name=f"{cmd[0]}-output", daemon=True)
    follower.start()
    try:
        if not is_ready.wait(START_TIMEOUT) or proc.poll() is not None:
            raise RuntimeError(
                f"server did not get ready on port {port} (exit code {proc.poll()}): "
                f"{log.read_text()[-2000:]}"
            )
        yield Server("127.0.0.1", port, directory)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        follower.join(10)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A ``redis-server`` on 127.0.0.1 (no persistence), for the whole session."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (apt-get install -y redis-server)")
    directory = tmp_path_factory.mktemp("redis")
    port = free_port()
    yield from _start(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(directory), "--protected-mode", "yes"],
        port, directory, b"Ready to accept connections",
    )


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A ``nats-server -js`` on 127.0.0.1 with its JetStream store in a temp dir."""
    binary = shutil.which("nats-server")
    if binary is None:
        pytest.skip("nats-server is not installed (apt-get install -y nats-server)")
    directory = tmp_path_factory.mktemp("nats")
    port = free_port()
    yield from _start(
        [binary, "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(directory / "js")],
        port, directory, b"Server is ready",
    )
