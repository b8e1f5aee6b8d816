"""keyedpool.contrib.prometheus, scraped over HTTP from prometheus_client's own server."""

from __future__ import annotations

import gc
import urllib.request
from collections.abc import Iterator
from concurrent.futures import wait

import pytest
from _pool_state import read_in_known_state, read_while_holding
from _util import TIMEOUT

pytest.importorskip(
    "prometheus_client",
    reason="prometheus_client is not installed: pip install keyedpool[prometheus]",
)

from prometheus_client import CollectorRegistry, start_http_server  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from keyedpool import KeyedPoolExecutor  # noqa: E402
from keyedpool.contrib.prometheus import register, unregister  # noqa: E402

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture
def scrape() -> Iterator[tuple[CollectorRegistry, object]]:
    """A registry served on a free loopback port, and a function that scrapes it."""
    registry = CollectorRegistry()
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    port = server.server_port

    def get() -> Samples:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=TIMEOUT) as r:
            text = r.read().decode()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    yield registry, get
    server.shutdown()
    server.server_close()
    thread.join(TIMEOUT)


def test_a_scrape_shows_the_pool_as_stats_sees_it(scrape: tuple[CollectorRegistry, object]) -> None:
    registry, get = scrape
    with KeyedPoolExecutor(2, max_pending=4) as pool:
        register(pool, "orders", registry)
        samples: Samples = read_in_known_state(pool, get)  # type: ignore[arg-type]

    def value(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted({"pool": "orders", **labels}.items())))]

    assert value("keyedpool_tasks_total", outcome="completed") == 5
    assert value("keyedpool_tasks_total", outcome="failed") == 2
    assert value("keyedpool_tasks_total", outcome="cancelled") == 0
    assert value("keyedpool_submitted_total") == 11
    assert value("keyedpool_rejected_total") == 1
    assert value("keyedpool_pending_tasks") == 4
    assert value("keyedpool_max_pending_tasks") == 4
    assert value("keyedpool_workers") == 2
    assert value("keyedpool_keys_bound") == 1
    backlogs = [value("keyedpool_worker_backlog_tasks", worker=str(i)) for i in range(2)]
    assert sorted(backlogs) == [0, 4]  # the held task and the 3 behind it, on one worker
    running = [value("keyedpool_worker_running", worker=str(i)) for i in range(2)]
    assert sorted(running) == [0, 1]
    # Keys are unbounded: never a label per key.
    assert not [key for key in samples if any(name == "key" for name, _ in key[1])]


def test_a_scrape_shows_retries_and_held_keys(scrape: tuple[CollectorRegistry, object]) -> None:
    registry, get = scrape
    pool = KeyedPoolExecutor(2)
    try:
        register(pool, "holding", registry)
        samples: Samples = read_while_holding(pool, get)  # type: ignore[arg-type]
    finally:
        pool.shutdown(cancel_futures=True)

    def value(name: str) -> float:
        return samples[(name, (("pool", "holding"),))]

    assert value("keyedpool_retries_total") == 1
    assert value("keyedpool_parked_tasks") == 2
    assert value("keyedpool_held_keys") == 2
    assert value("keyedpool_pending_tasks") == 3


def test_names_are_unique_per_registry_and_pools_leave_when_dropped(
    scrape: tuple[CollectorRegistry, object],
) -> None:
    registry, get = scrape
    first = KeyedPoolExecutor(1)
    second = KeyedPoolExecutor(1)
    try:
        register(first, "a", registry)
        register(first, "a", registry)  # the same pool again: nothing changes
        with pytest.raises(ValueError, match="'a' is already registered"):
            register(second, "a", registry)
        register(second, "b", registry)
        pools = {dict(k[1])["pool"] for k in get() if k[0] == "keyedpool_workers"}  # type: ignore[operator]
        assert pools == {"a", "b"}
        assert unregister("a", registry) and not unregister("a", registry)
        pools = {dict(k[1])["pool"] for k in get() if k[0] == "keyedpool_workers"}  # type: ignore[operator]
        assert pools == {"b"}
    finally:
        first.shutdown()
        second.shutdown()
    del second
    gc.collect()
    assert not [k for k in get() if k[0] == "keyedpool_workers"]  # type: ignore[operator]
    with pytest.raises(TypeError, match="KeyedPoolExecutor"):
        register(object(), "x", registry)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="non-empty str"):
        register(first, "", registry)


def test_task_seconds_histogram_for_a_pool_made_with_timing(
    scrape: tuple[CollectorRegistry, object],
) -> None:
    registry, get = scrape
    timed = KeyedPoolExecutor(2, timing=True)
    untimed = KeyedPoolExecutor(2)
    try:
        register(timed, "timed", registry)
        register(untimed, "untimed", registry)
        for pool in (timed, untimed):
            wait([pool.submit(f"k{i % 3}", int, i) for i in range(30)], timeout=TIMEOUT)
    finally:
        timed.shutdown()  # after it, every task's times are counted
        untimed.shutdown()
    samples: Samples = get()  # type: ignore[operator]
    for phase in ("wait", "run"):
        labels = (("phase", phase), ("pool", "timed"))
        assert samples[("keyedpool_task_seconds_count", labels)] == 30
        assert samples[("keyedpool_task_seconds_sum", labels)] >= 0
        buckets = sorted(
            (float(dict(k[1])["le"]), v)
            for k, v in samples.items()
            if k[0] == "keyedpool_task_seconds_bucket"
            and dict(k[1])["phase"] == phase
            and dict(k[1])["pool"] == "timed"
        )
        assert buckets[-1] == (float("inf"), 30)
        assert [v for _, v in buckets] == sorted(v for _, v in buckets)  # cumulative
    # A pool made without timing=True measures nothing per task, so it has no histogram.
    untimed_series = [
        k
        for k in samples
        if k[0].startswith("keyedpool_task_seconds") and dict(k[1])["pool"] == "untimed"
    ]
    assert not untimed_series
