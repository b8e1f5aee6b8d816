"""Fixtures shared by the framework adapter tests: markers, free ports, a throwaway PostgreSQL.

The PostgreSQL fixture starts its own cluster from Debian's binaries
(``apt-get install -y postgresql``): ``initdb`` in a temporary directory, the
server on 127.0.0.1 and a free port, stopped and removed afterwards. PostgreSQL
refuses to run as root, so as root it runs as the ``postgres`` OS user (runuser).
Tests that need it are marked ``postgresql`` and skip, saying why, only when
the binaries are missing.
"""

from __future__ import annotations

import glob
import os
import shlex
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "postgresql: needs a PostgreSQL server (the tests start a throwaway one)"
    )
    config.addinivalue_line(
        "markers", "live_server: drives a real HTTP server process over loopback"
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class PostgresServer:
    """Where the throwaway PostgreSQL listens; user ``postgres``, no password."""

    host: str
    port: int
    user: str
    data_dir: str

    def dsn(self, dbname: str = "postgres") -> str:
        return f"host={self.host} port={self.port} user={self.user} dbname={dbname}"


def _postgres_bin_dir() -> str | None:
    initdb = shutil.which("initdb")
    if initdb:
        return os.path.dirname(os.path.realpath(initdb))
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)
    return os.path.dirname(candidates[0]) if candidates else None


def _as_postgres(argv: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return argv
    runuser = shutil.which("runuser")
    if runuser:
        return [runuser, "-u", "postgres", "--", *argv]
    return ["su", "postgres", "-s", "/bin/sh", "-c", shlex.join(argv)]


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A PostgreSQL cluster of our own on 127.0.0.1, for the whole session."""
    bin_dir = _postgres_bin_dir()
    if bin_dir is None:
        pytest.skip("PostgreSQL binaries (initdb, pg_ctl) not found: apt-get install -y postgresql")
    if os.geteuid() == 0:
        try:
            import pwd

            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' OS user to run PostgreSQL")
    base = tempfile.mkdtemp(prefix="keyedpool-pg-")
    data_dir = os.path.join(base, "data")
    os.chmod(base, 0o755)
    if os.geteuid() == 0:
        os.chown(base, owner.pw_uid, owner.pw_gid)
    initdb = os.path.join(bin_dir, "initdb")
    pg_ctl = os.path.join(bin_dir, "pg_ctl")
    subprocess.run(
        _as_postgres(
            [initdb, "-D", data_dir, "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync"]
        ),
        check=True,
        capture_output=True,
        timeout=120,
    )
    port = free_port()
    options = (
        f"-c listen_addresses=127.0.0.1 -p {port} -k {base} -c fsync=off "
        "-c synchronous_commit=off -c full_page_writes=off -c max_connections=100"
    )
    subprocess.run(
        _as_postgres(
            [pg_ctl, "-D", data_dir, "-o", options, "-l", os.path.join(base, "log"), "-w", "start"]
        ),
        check=True,
        capture_output=True,
        timeout=120,
    )
    try:
        yield PostgresServer("127.0.0.1", port, "postgres", data_dir)
    finally:
        subprocess.run(
            _as_postgres([pg_ctl, "-D", data_dir, "-m", "immediate", "-w", "stop"]),
            capture_output=True,
            timeout=120,
        )
        shutil.rmtree(base, ignore_errors=True)
