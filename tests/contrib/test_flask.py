"""keyedpool.contrib.flask with real Flask apps and the test client."""

from __future__ import annotations

import contextvars
import io
import logging
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any

import pytest

flask = pytest.importorskip("flask", reason="Flask is not installed: pip install keyedpool[flask]")

from _util import wait_until  # noqa: E402
from flask import (  # noqa: E402
    Flask,
    current_app,
    g,
    has_app_context,
    has_request_context,
    request,
    session,
)

from keyedpool.contrib.flask import KeyedPool, job_status  # noqa: E402

WAIT = 30  # upper bound only: turns a hang into a failure
HERE = os.path.dirname(os.path.abspath(__file__))

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


def make_app(name: str = "shop", **config: Any) -> Flask:
    app = Flask(name)
    app.config.update(KEYEDPOOL_MAX_WORKERS=4, KEYEDPOOL_THREAD_NAME_PREFIX=f"kp-{name}")
    app.config.update(config)
    return app


@pytest.fixture(autouse=True)
def _fresh_request_id() -> Iterator[None]:
    # Tests set request_id in the main thread; do not let one test see another's.
    token = request_id.set("-")
    yield
    request_id.reset(token)


@pytest.fixture
def pool() -> Iterator[KeyedPool]:
    ext = KeyedPool()
    yield ext
    ext.shutdown(wait=True)


@pytest.fixture
def app(pool: KeyedPool) -> Flask:
    app = make_app()
    pool.init_app(app)
    return app


def test_order_per_key_across_requests(app: Flask, pool: KeyedPool) -> None:
    gate = threading.Event()
    ledger: dict[str, list[int]] = {}
    futures: list[Future[None]] = []

    def post(account: str, seq: int) -> None:
        if seq == 0:
            gate.wait(WAIT)  # hold each account's first task: the rest queue up behind it
        ledger.setdefault(account, []).append(seq)

    @app.post("/accounts/<account>/entries/<int:seq>")
    def add_entry(account: str, seq: int) -> tuple[str, int]:
        futures.append(pool.submit(account, post, account, seq))
        return "queued", 202

    client = app.test_client()
    accounts = ["alice", "bob", "carol"]
    for seq in range(30):
        for account in accounts:
            assert client.post(f"/accounts/{account}/entries/{seq}").status_code == 202
    assert ledger == {}  # every response came back while the work was held
    gate.set()
    for future in futures:
        future.result(WAIT)
    assert ledger == {a: list(range(30)) for a in accounts}


def test_task_runs_in_a_fresh_app_context_with_a_copy_of_the_request(
    app: Flask, pool: KeyedPool
) -> None:
    torn_down: list[str] = []

    @app.teardown_appcontext
    def teardown(exc: BaseException | None) -> None:
        torn_down.append(threading.current_thread().name)

    def inspect_context() -> dict[str, Any]:
        return {
            "app": current_app.name,
            "g_from_view": getattr(g, "user", None),
            "path": request.path,
            "args": request.args.to_dict(),
            "request_id": request_id.get(),
            "thread": threading.current_thread().name,
        }

    @app.get("/report")
    def report() -> dict[str, Any]:
        g.user = "alice"  # the view's g: the task gets a fresh one
        request_id.set("req-7")
        return pool.submit("alice", inspect_context).result(WAIT)

    seen = app.test_client().get("/report?month=11").get_json()
    assert seen["app"] == "shop"
    assert seen["g_from_view"] is None
    assert seen["path"] == "/report"
    assert seen["args"] == {"month": "11"}
    assert seen["request_id"] == "req-7"  # the submitter's contextvars reach the task
    assert seen["thread"].startswith("kp-shop_")
    assert seen["thread"] in torn_down  # the task's own app context was popped


def test_many_tasks_from_one_request_each_get_their_own_context(
    app: Flask, pool: KeyedPool
) -> None:
    """flask-executor #53: sharing one request-context copy across threads breaks."""

    def read_path(n: int) -> str:
        return f"{request.path}:{request.args['n']}:{n}"

    @app.get("/fan-out")
    def fan_out() -> list[str]:
        futures = [pool.submit(None, read_path, n) for n in range(50)]
        return [f.result(WAIT) for f in futures]

    assert app.test_client().get("/fan-out?n=5").get_json() == [
        f"/fan-out:5:{n}" for n in range(50)
    ]


def test_task_does_not_close_the_views_uploaded_files(app: Flask, pool: KeyedPool) -> None:
    """Regression: the task's request context used to share the view's Request; popping
    it closed request.files while the view still read them."""

    @app.post("/upload")
    def upload() -> dict[str, Any]:
        doc = request.files["doc"]  # loaded before the task runs
        seen = pool.submit("u", lambda: request.path).result(WAIT)
        return {"seen": seen, "body": doc.read().decode()}

    response = app.test_client().post(
        "/upload",
        data={"doc": (io.BytesIO(b"hello"), "doc.txt")},
        content_type="multipart/form-data",
    )
    assert response.status_code == 200, response.text
    assert response.get_json() == {"seen": "/upload", "body": "hello"}


def test_each_task_gets_its_own_detached_request_without_the_body(
    app: Flask, pool: KeyedPool
) -> None:
    app.secret_key = "test"

    def inspect_request() -> dict[str, Any]:
        return {
            "request": request._get_current_object(),  # type: ignore[attr-defined]
            "path": request.path,
            "args": request.args.to_dict(),
            "view_args": request.view_args,
            "header": request.headers.get("X-Trace"),
            "cookie": request.cookies.get("theme"),
            "session": session.get("user"),
            "form": request.form.to_dict(),
            "files": list(request.files),
            "data": request.get_data(as_text=True),
        }

    @app.post("/orders/<int:order>")
    def order(order: int) -> dict[str, Any]:
        assert request.form["note"] == "gift"  # the view reads its body as usual
        futures = [pool.submit(None, inspect_request) for _ in range(2)]
        first, second = (f.result(WAIT) for f in futures)
        # Objects, not id()s: a dead task's request could leave its id to another.
        mine = request._get_current_object()  # type: ignore[attr-defined]
        theirs = first.pop("request"), second.pop("request")
        assert theirs[0] is not mine and theirs[1] is not mine and theirs[0] is not theirs[1]
        assert first == second
        assert request.form["note"] == "gift"  # still readable after the tasks ran
        return first

    @app.get("/login")
    def login() -> str:
        session["user"] = "alice"
        return "ok"

    client = app.test_client()
    client.get("/login")
    client.set_cookie("theme", "dark")
    response = client.post(
        "/orders/7?source=web",
        data={"note": "gift", "doc": (io.BytesIO(b"x"), "x.txt")},
        headers={"X-Trace": "t-1"},
    )
    assert response.status_code == 200, response.text
    assert response.get_json() == {
        "path": "/orders/7",
        "args": {"source": "web"},
        "view_args": {"order": 7},
        "header": "t-1",
        "cookie": "dark",
        "session": "alice",
        "form": {},  # no body: pass form, file and JSON data as arguments
        "files": [],
        "data": "",
    }


def _context_report() -> dict[str, Any]:
    return {
        "app": current_app.name if has_app_context() else None,
        "request": has_request_context(),
        "request_id": request_id.get(),
    }


def test_submit_from_app_context_only_code(app: Flask, pool: KeyedPool) -> None:
    with app.app_context():
        request_id.set("ctx-only")
        seen = pool.submit("k", _context_report).result(WAIT)
    assert seen == {"app": "shop", "request": False, "request_id": "ctx-only"}


def test_submit_from_a_thread_with_no_flask_context(app: Flask, pool: KeyedPool) -> None:
    """A consumer thread: no app context at all (flask-executor #52 fails here)."""
    out: list[dict[str, Any]] = []

    def consumer() -> None:
        assert not has_app_context()
        request_id.set("consumer")
        out.append(pool.submit("k", _context_report).result(WAIT))

    thread = threading.Thread(target=consumer)
    thread.start()
    thread.join(WAIT)
    assert out == [{"app": "shop", "request": False, "request_id": "consumer"}]


def test_submit_from_a_cli_command(app: Flask, pool: KeyedPool) -> None:
    @app.cli.command("refresh-cache")
    def refresh_cache() -> None:
        seen = pool.submit("cache", _context_report).result(WAIT)
        print(f"app={seen['app']} request={seen['request']}")

    result = app.test_cli_runner().invoke(args=["refresh-cache"])
    assert result.exception is None, result.output
    assert "app=shop request=False" in result.output


def test_job_decorator(app: Flask, pool: KeyedPool) -> None:
    @pool.job
    def charge(account: str, cents: int) -> str:
        return f"{current_app.name}:{account}:{cents}"

    with app.app_context():  # a direct call runs here, synchronously
        assert charge("bob", 5) == "shop:bob:5"
    assert charge.submit("bob", "bob", 250).result(WAIT) == "shop:bob:250"
    assert charge.__name__ == "charge"


def test_stored_jobs_can_be_polled_by_a_later_request(app: Flask, pool: KeyedPool) -> None:
    gate = threading.Event()

    def export(account: str) -> str:
        gate.wait(WAIT)
        return f"export of {account}"

    @app.post("/exports/<account>")
    def start_export(account: str) -> tuple[dict[str, str], int]:
        job_id = f"export-{account}"
        pool.submit_stored(job_id, account, export, account)
        return {"job": job_id}, 202

    @app.get("/jobs/<job_id>")
    def job(job_id: str) -> tuple[dict[str, Any], int]:
        future = pool.jobs.get(job_id)
        if future is None:
            return {"status": "unknown"}, 404
        body: dict[str, Any] = {"status": job_status(future)}
        if future.done():
            body["result"] = future.result()
        return body, 200

    client = app.test_client()
    job_id = client.post("/exports/alice").get_json()["job"]
    assert client.get(f"/jobs/{job_id}").get_json()["status"] in ("pending", "running")
    with pytest.raises(ValueError, match="still pending or running"):
        with app.app_context():
            pool.submit_stored(job_id, "alice", export, "alice")
    gate.set()
    pool.jobs.get(job_id).result(WAIT)  # type: ignore[union-attr]
    assert client.get(f"/jobs/{job_id}").get_json() == {
        "status": "finished",
        "result": "export of alice",
    }
    assert client.get("/jobs/nope").status_code == 404


def test_stored_jobs_are_bounded_and_forget_finished_ones_first(pool: KeyedPool) -> None:
    app = make_app("bounded", KEYEDPOOL_MAX_STORED_JOBS=3)
    pool.init_app(app)
    gate = threading.Event()
    with app.app_context():
        running = pool.submit_stored("slow", "k1", gate.wait, WAIT)
        for n in range(3):
            pool.submit_stored(f"quick-{n}", "k2", str, n).result(WAIT)
        # Full (3): adding quick-2 forgot quick-0, the oldest *finished* job; "slow" stays.
        assert "slow" in pool.jobs and "quick-0" not in pool.jobs
        assert pool.jobs.status("slow") in ("pending", "running")
        assert pool.jobs.status("quick-2") == "finished"
        assert len(pool.jobs) == 3
        gate.set()
        running.result(WAIT)
        failed = pool.submit_stored("bad", "k3", int, "x")
        with pytest.raises(ValueError):
            failed.result(WAIT)
        assert pool.jobs.status("bad") == "failed"
        assert pool.jobs.pop("bad") is failed and "bad" not in pool.jobs


def test_one_extension_many_apps(pool: KeyedPool) -> None:
    shop, admin = make_app("shop"), make_app("admin")
    pool.init_app(shop)
    pool.init_app(admin)
    for app in (shop, admin):
        with app.app_context():
            assert pool.submit(None, lambda: current_app.name).result(WAIT) == app.name
            assert pool.executor.max_workers == 4
    with pytest.raises(RuntimeError, match="several apps"):
        pool.submit(None, print)


def test_pool_threads_start_with_the_first_submit(app: Flask, pool: KeyedPool) -> None:
    def threads() -> list[str]:
        return [t.name for t in threading.enumerate() if t.name.startswith("kp-shop_")]

    app.test_client()
    with app.app_context():
        assert pool.executor.max_workers == 4  # configured at init_app
    assert threads() == []  # no pool thread before the first submit
    with app.app_context():
        ran_on = pool.submit(None, lambda: threading.current_thread().name).result(WAIT)
    # At least the dispatcher and the worker that ran the task (more start on demand).
    assert "kp-shop_dispatcher" in threads()
    assert ran_on in threads() and ran_on != "kp-shop_dispatcher"


@pytest.mark.parametrize(
    ("config", "error", "message"),
    [
        ({"KEYEDPOOL_MAX_WORKERS": 0}, ValueError, "KEYEDPOOL_MAX_WORKERS"),
        ({"KEYEDPOOL_MAX_WORKERS": "8"}, TypeError, "KEYEDPOOL_MAX_WORKERS"),
        ({"KEYEDPOOL_MAX_PENDING": -1}, ValueError, "KEYEDPOOL_MAX_PENDING"),
        ({"KEYEDPOOL_ON_FULL": "drop"}, ValueError, "KEYEDPOOL_ON_FULL"),
        ({"KEYEDPOOL_FULL_TIMEOUT": "1"}, TypeError, "KEYEDPOOL_FULL_TIMEOUT"),
        ({"KEYEDPOOL_MAX_STORED_JOBS": 0}, ValueError, "KEYEDPOOL_MAX_STORED_JOBS"),
        ({"KEYEDPOOL_ROUTING": "fast"}, ValueError, "KEYEDPOOL_ROUTING"),
        ({"KEYEDPOOL_SLOW_TASK_WARNING": 0}, ValueError, "KEYEDPOOL_SLOW_TASK_WARNING"),
    ],
)
def test_bad_config_is_reported_at_init_app(
    config: dict[str, Any], error: type[Exception], message: str
) -> None:
    app = make_app(**config)
    with pytest.raises(error, match=message):
        KeyedPool(app)


def test_a_misspelt_config_key_is_reported_at_init_app() -> None:
    # Django rejects unknown KEYEDPOOL keys; a Flask typo must not silently
    # leave the setting at its default either.
    app = make_app("typo", KEYEDPOOL_MAX_WORKER=8)
    hint = "KEYEDPOOL_MAX_WORKER (did you mean KEYEDPOOL_MAX_WORKERS?)"
    with pytest.raises(ValueError, match=re.escape(hint)):
        KeyedPool(app)
    assert "keyedpool" not in app.extensions


def test_routing_follows_the_config() -> None:
    assert KeyedPool(make_app("routed")).executor.routing == "affinity"  # the default
    hashed = KeyedPool(make_app("hashed", KEYEDPOOL_ROUTING="hash"))
    assert hashed.executor.routing == "hash"
    assert hashed.executor.worker_index("k") in range(4)


def test_a_slow_task_is_reported_with_the_apps_own_function(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The task runs inside the extension's app-context wrapper; the warning
    # names the app's function and shows its stack, not the wrapper's.
    caplog.set_level(logging.WARNING, logger="keyedpool")
    app = make_app("slow", KEYEDPOOL_SLOW_TASK_WARNING=0.2)
    ext = KeyedPool(app)
    release = threading.Event()

    def rebuild_search_index() -> None:
        release.wait(WAIT)

    try:
        with app.app_context():
            future = ext.submit("index", rebuild_search_index)
        wait_until(lambda: any("has been running" in r.getMessage() for r in caplog.records))
    finally:
        release.set()
    assert future.result(WAIT) is None
    [record] = [r for r in caplog.records if "has been running" in r.getMessage()]
    message = record.getMessage()
    assert "key='index', function rebuild_search_index" in message
    assert "contrib/flask.py" not in message
    ext.shutdown()


def test_bad_input_is_refused(app: Flask, pool: KeyedPool) -> None:
    with app.app_context():
        with pytest.raises(TypeError, match="fn must be callable"):
            pool.submit("k", "not callable")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="key"):
            pool.submit(1.5, print)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="job_id"):
            pool.submit_stored("", "k", print)
    with pytest.raises(RuntimeError, match="already registered"):
        pool.init_app(app)
    with pytest.raises(RuntimeError, match="not registered"):
        KeyedPool().submit(None, print)


def test_full_pool_applies_its_backpressure(pool: KeyedPool) -> None:
    app = make_app(
        "tiny", KEYEDPOOL_MAX_WORKERS=1, KEYEDPOOL_MAX_PENDING=1, KEYEDPOOL_ON_FULL="raise"
    )
    pool.init_app(app)
    from keyedpool import PoolFull

    gate = threading.Event()
    with app.app_context():
        held = pool.submit("k", gate.wait, WAIT)
        with pytest.raises(PoolFull):
            pool.submit("k", print)
        gate.set()
        assert held.result(WAIT) is True


def test_submit_after_shutdown_raises(app: Flask, pool: KeyedPool) -> None:
    pool.shutdown()
    with app.app_context():
        with pytest.raises(RuntimeError, match="shutdown"):
            pool.submit("k", print)
        with pytest.raises(RuntimeError, match="shutdown"):
            pool.submit_stored("job-1", "k", print)
        assert "job-1" not in pool.jobs  # the id it had reserved is free again


def test_cli_process_finishes_queued_tasks_at_exit(tmp_path: Any) -> None:
    """A real `flask` CLI process returns with tasks still queued; they all run before exit."""
    out = tmp_path / "ledger.txt"
    env = {**os.environ, "KEYEDPOOL_LEDGER": str(out), "PYTHONPATH": HERE}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "flask",
            "--app",
            "test_flask_live:create_app",
            "post-entries",
            "200",
        ],
        env=env,
        cwd=HERE,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "pending when the command returned: 200" in proc.stdout
    lines = out.read_text().split()
    per_account: dict[str, list[int]] = {}
    for line in lines:
        account, seq = line.split(":")
        per_account.setdefault(account, []).append(int(seq))
    assert per_account == {f"acct-{a}": list(range(50)) for a in range(4)}


def test_a_request_of_another_app_is_not_copied() -> None:
    shop = make_app("shop")
    pool = KeyedPool(shop)
    other = make_app("other")  # no keyedpool on this one

    @other.get("/")
    def index() -> dict[str, Any]:
        # The task runs in shop's app context; other's request must not leak in.
        return pool.submit(None, _context_report).result(WAIT)

    try:
        assert other.test_client().get("/").get_json() == {
            "app": "shop",
            "request": False,
            "request_id": "-",
        }
    finally:
        pool.shutdown()
