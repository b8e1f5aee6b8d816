"""A real server: gunicorn (--preload; sync and gthread workers) serving a Flask app on 127.0.0.1.

This module is also the app that server (and the `flask` CLI test) runs:
``create_app()`` below. The test drives it over HTTP and checks that responses
come back while the background work is still held, then that the work ran in
order per key, in the forked worker, inside the app (and a detached request).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from typing import Any

import pytest

pytest.importorskip("flask", reason="Flask is not installed: pip install keyedpool[flask]")

import click  # noqa: E402  (installed with Flask)
from flask import Flask, current_app, has_request_context, request  # noqa: E402

from keyedpool.contrib.flask import KeyedPool  # noqa: E402

# Not importorskip: this module is also the app of the `flask` CLI test, which
# needs no gunicorn. Without it, this module's test is skipped (not an error).
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("gunicorn") is None,
    reason="gunicorn is not installed: pip install gunicorn",
)

WAIT = 30  # upper bound only: turns a hang into a failure
HERE = os.path.dirname(os.path.abspath(__file__))


def create_app() -> Flask:
    """The app under test. KEYEDPOOL_LEDGER names the file tasks append lines to."""
    app = Flask("live")
    app.config.update(KEYEDPOOL_MAX_WORKERS=4, KEYEDPOOL_THREAD_NAME_PREFIX="kp-live")
    pool = KeyedPool(app)
    ledger = os.environ["KEYEDPOOL_LEDGER"]
    gate = threading.Event()

    def record(account: str, seq: int) -> str:
        if seq == 0 and not gate.wait(WAIT):  # each account's first task waits for the test
            raise TimeoutError("the gate was never opened")
        with open(ledger, "a") as out:
            out.write(f"{account}:{seq}\n")
        where = request.path if has_request_context() else "-"
        return f"{current_app.name}:{where}:{os.getpid()}"

    @app.post("/accounts/<account>/entries/<int:seq>")
    def add_entry(account: str, seq: int) -> tuple[dict[str, Any], int]:
        job_id = f"{account}-{seq}"
        pool.submit_stored(job_id, account, record, account, seq)
        return {"job": job_id, "status": pool.jobs.status(job_id)}, 202

    @app.post("/gate")
    def open_gate() -> dict[str, str]:
        gate.set()
        return {"gate": "open"}

    @app.get("/jobs/<job_id>")
    def job(job_id: str) -> tuple[dict[str, Any], int]:
        future = pool.jobs.get(job_id)
        if future is None:
            return {"status": "unknown"}, 404
        if request.args.get("wait"):
            future.exception(WAIT)
        body: dict[str, Any] = {"status": pool.jobs.status(job_id)}
        if future.done() and future.exception() is None:
            body["result"] = future.result()
        return body, 200

    @app.cli.command("post-entries")
    @click.argument("count", type=int)
    def post_entries(count: int) -> None:
        """Queue COUNT entries over 4 accounts and return without waiting for them."""
        futures = [
            pool.submit(f"acct-{n % 4}", record, f"acct-{n % 4}", n // 4) for n in range(count)
        ]
        print(f"pending when the command returned: {pool.executor.stats().pending}")
        gate.set()
        del futures  # the process exits now; the pool finishes the tasks first

    if os.environ.get("KEYEDPOOL_WARM_UP"):
        # Like an app that uses the pool while it is being loaded: with --preload
        # this starts the pool's threads in the gunicorn master, before the fork.
        with app.app_context():
            gate_was_open = gate.is_set()
            gate.set()
            pool.submit(None, record, "warm-up", 1).result(WAIT)
            if not gate_was_open:
                gate.clear()
    return app


def _http(port: int, method: str, path: str) -> tuple[int, Any]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(req, timeout=WAIT) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


@pytest.mark.live_server
@pytest.mark.parametrize(
    ("worker_class", "threads"),
    # --threads above 1 makes gunicorn switch a sync worker to gthread: keep 1.
    [("sync", 1), ("gthread", 4)],
    ids=["sync", "gthread"],
)
def test_gunicorn_preload_serves_fast_and_keeps_order(
    tmp_path: Any, worker_class: str, threads: int
) -> None:
    ledger = tmp_path / "ledger.txt"
    # Bind the port here and hand the socket to gunicorn: no race for a free port,
    # and requests wait in the backlog until the worker is up.
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    port = listener.getsockname()[1]
    env = {**os.environ, "KEYEDPOOL_LEDGER": str(ledger), "KEYEDPOOL_WARM_UP": "1"}
    server = subprocess.Popen(
        [
            sys.executable, "-m", "gunicorn", "--preload", "--workers", "1",
            "--worker-class", worker_class, "--threads", str(threads), "--graceful-timeout", "30",
            "--bind", f"fd://{listener.fileno()}", "--chdir", HERE,
            "test_flask_live:create_app()",
        ],
        env=env,
        pass_fds=(listener.fileno(),),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    listener.close()
    try:
        accounts = ["alice", "bob", "carol"]
        for seq in range(10):
            for account in accounts:
                status, body = _http(port, "POST", f"/accounts/{account}/entries/{seq}")
                assert status == 202
                assert body["status"] in ("pending", "running")
        # Every response came back while each account's first task was held:
        # nothing of this run is in the ledger yet (only the master's warm-up).
        assert ledger.read_text().split() == ["warm-up:1"]

        assert _http(port, "POST", "/gate")[0] == 200
        for account in accounts:
            status, body = _http(port, "GET", f"/jobs/{account}-9?wait=1")
            assert (status, body["status"]) == (200, "finished")

        lines = ledger.read_text().split()[1:]
        per_account: dict[str, list[int]] = {}
        for line in lines:
            account, seq = line.split(":")
            per_account.setdefault(account, []).append(int(seq))
        assert per_account == {a: list(range(10)) for a in accounts}

        # Ran in the app, with its own (detached) request, in the forked worker process.
        status, body = _http(port, "GET", "/jobs/bob-3")
        app_name, path, pid = body["result"].split(":")
        assert (app_name, path) == ("live", "/accounts/bob/entries/3")
        assert int(pid) != server.pid
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            output, _ = server.communicate(timeout=WAIT)
        except subprocess.TimeoutExpired:
            server.kill()
            output, _ = server.communicate()
    assert server.returncode == 0, output
    assert f"Using worker: {worker_class}" in output
