"""Connecting to NATS: a wrong address fails at once with one clear error; reconnects still last.

nats-py's ``max_reconnect_attempts`` (default 60, ``reconnect_time_wait`` = 2 s
apart) also bounds the very first connect, so an address where nothing listens
used to make ``NatsConsumer.start()`` take two minutes and log a traceback per
try, and ``NatsPublisher`` give up with an empty ``TimeoutError()`` after its
10 s timeout.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable

import pytest

pytest.importorskip("nats", reason="nats-py is not installed (pip install keyedpool[nats])")

import nats.errors  # noqa: E402
from _broker_checks import WAIT, Server  # noqa: E402
from _proxy import TcpProxy  # noqa: E402
from _util import wait_until  # noqa: E402

from keyedpool.contrib.nats import NatsConsumer, NatsMessage, NatsPublisher  # noqa: E402

# A hang (the old two minutes) fails the test instead of stalling the run.
pytestmark = pytest.mark.timeout(60)

# Only an upper bound: the tests are about "fails, with this message", not about
# speed. Well above the few seconds a failing connect takes now (each server
# tried twice, 2 s apart), well below the two minutes it took before.
FAILS_WITHIN = 15.0


def _free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then closed again)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tracebacks(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r for r in caplog.records
        if r.name.split(".")[0] in ("keyedpool", "nats") and (r.exc_info or r.exc_text)
    ]


def _noisy(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        f"{r.name}: {r.getMessage()}" for r in caplog.records
        if r.name.split(".")[0] in ("keyedpool", "nats") and r.levelno >= logging.WARNING
    ]


def _fails_clearly(
    connect: Callable[[], object], caplog: pytest.LogCaptureFixture
) -> nats.errors.NoServersError:
    caplog.set_level(logging.DEBUG)
    started = time.monotonic()
    # nats-py's own "no server could be reached" error (what start() raised
    # before, after two minutes), so code that catches it keeps working.
    with pytest.raises(nats.errors.NoServersError) as raised:
        connect()
    elapsed = time.monotonic() - started
    assert elapsed < FAILS_WITHIN, f"took {elapsed:.1f} s to fail"
    assert not _tracebacks(caplog), [r.getMessage() for r in _tracebacks(caplog)]
    assert not _noisy(caplog), _noisy(caplog)
    return raised.value


def test_start_fails_at_once_with_the_address_when_nothing_listens(
    caplog: pytest.LogCaptureFixture,
) -> None:
    address = f"127.0.0.1:{_free_port()}"
    consumer = NatsConsumer(f"nats://{address}", "S", print)
    error = _fails_clearly(consumer.start, caplog)
    message = str(error)
    assert f"nats://{address}" in message, message
    assert "could not connect to NATS" in message, message
    assert "refused" in message, message  # the reason, from the last try
    assert consumer.error is error
    assert consumer.stop() is False  # never ran


def test_the_publisher_fails_at_once_with_the_address_when_nothing_listens(
    caplog: pytest.LogCaptureFixture,
) -> None:
    address = f"127.0.0.1:{_free_port()}"
    message = str(_fails_clearly(lambda: NatsPublisher(f"nats://{address}", "S", shards=1),
                                 caplog))
    assert f"nats://{address}" in message, message
    assert "could not connect to NATS" in message, message
    assert not any(t.name.startswith("keyedpool-nats-publisher") for t in threading.enumerate())


def test_every_address_is_named_and_no_password(caplog: pytest.LogCaptureFixture) -> None:
    first, second = _free_port(), _free_port()
    consumer = NatsConsumer(
        [f"nats://me:secret@127.0.0.1:{first}", f"127.0.0.1:{second}"], "S", print
    )
    message = str(_fails_clearly(consumer.start, caplog))
    assert f"nats://127.0.0.1:{first}" in message, message
    assert f"nats://127.0.0.1:{second}" in message, message
    assert "secret" not in message, message


def test_an_error_callback_of_ones_own_still_hears_every_failed_try(
    caplog: pytest.LogCaptureFixture,
) -> None:
    heard: list[Exception] = []

    async def on_error(error: Exception) -> None:
        heard.append(error)

    consumer = NatsConsumer(
        f"nats://127.0.0.1:{_free_port()}", "S", print,
        connect_options={"error_cb": on_error, "reconnect_time_wait": 0.05},
    )
    _fails_clearly(consumer.start, caplog)
    assert len(heard) == 2, heard  # the one server, tried twice


def test_a_running_consumer_outlasts_an_outage_longer_than_the_first_connect_tries(
    nats_server: Server,
) -> None:
    # The first connect tries each server twice; once connected, nats-py's own
    # max_reconnect_attempts (60 here, the default) must apply again, or the
    # consumer would give up on the third refused try of this outage.
    stream = f"ORDERS_{uuid.uuid4().hex[:8]}"
    proxy = TcpProxy(nats_server.port)
    failed_tries: list[Exception] = []
    handled: list[bytes] = []
    got = threading.Event()

    async def on_error(error: Exception) -> None:
        failed_tries.append(error)

    def handle(message: NatsMessage) -> None:
        handled.append(message.data)
        got.set()

    consumer = NatsConsumer(
        f"nats://127.0.0.1:{proxy.port}", stream, handle, shards=1,
        process_index=0, process_count=1, poll_timeout=0.2,
        connect_options={"error_cb": on_error, "reconnect_time_wait": 0.1},
    ).start()
    try:
        proxy.down()
        # Refused tries (no event for them), or the consumer gave up.
        wait_until(lambda: len(failed_tries) >= 5 or consumer.stopping)
        assert not consumer.stopping, f"gave up after {len(failed_tries)} tries: {consumer.error!r}"
        proxy.up()
        with NatsPublisher(f"nats://{nats_server.url}", stream, shards=1) as pub:
            pub.publish("k", b"after the outage")
        assert got.wait(WAIT), "the consumer did not come back after the outage"
        assert handled == [b"after the outage"]
        assert consumer.stop() is True
    finally:
        proxy.down()
        consumer.stop(wait=False)
