"""keyedpool.contrib.otel, read by the OpenTelemetry SDK's own in-memory reader."""

from __future__ import annotations

import gc
from typing import Any

import pytest
from _pool_state import read_in_known_state, read_while_holding
from _util import TIMEOUT

pytest.importorskip(
    "opentelemetry.sdk",
    reason="the OpenTelemetry SDK is not installed: pip install keyedpool[otel] opentelemetry-sdk",
)

from opentelemetry.sdk.metrics import MeterProvider  # noqa: E402
from opentelemetry.sdk.metrics.export import InMemoryMetricReader  # noqa: E402

from keyedpool import KeyedPoolExecutor  # noqa: E402
from keyedpool.contrib.otel import register, unregister  # noqa: E402

Points = dict[tuple[str, tuple[tuple[str, Any], ...]], float]


def collect(reader: InMemoryMetricReader) -> Points:
    data = reader.get_metrics_data()
    points: Points = {}
    if data is None:
        return points
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            assert scope.scope.name == "keyedpool"
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    attributes = tuple(sorted(point.attributes.items()))
                    points[(metric.name, attributes)] = point.value
    return points


def test_a_collection_shows_the_pool_as_stats_sees_it() -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    with KeyedPoolExecutor(2, max_pending=4) as pool:
        register(pool, "orders", provider)
        points = read_in_known_state(pool, lambda: collect(reader))

    def value(name: str, **attributes: str) -> float:
        labels = {"keyedpool.pool.name": "orders", **attributes}
        return points[(name, tuple(sorted(labels.items())))]

    assert value("keyedpool.tasks", **{"keyedpool.task.outcome": "completed"}) == 5
    assert value("keyedpool.tasks", **{"keyedpool.task.outcome": "failed"}) == 2
    assert value("keyedpool.tasks", **{"keyedpool.task.outcome": "cancelled"}) == 0
    assert value("keyedpool.tasks.submitted") == 11
    assert value("keyedpool.tasks.rejected") == 1
    assert value("keyedpool.tasks.pending") == 4
    assert value("keyedpool.tasks.pending.limit") == 4
    assert value("keyedpool.workers") == 2
    assert value("keyedpool.keys.bound") == 1
    backlogs = [value("keyedpool.worker.backlog", **{"keyedpool.worker": str(i)}) for i in (0, 1)]
    assert sorted(backlogs) == [0, 4]
    running = [value("keyedpool.worker.running", **{"keyedpool.worker": str(i)}) for i in (0, 1)]
    assert sorted(running) == [0, 1]
    # Keys are unbounded: no point carries one.
    assert not [k for k in points if any("key" == name for name, _ in k[1])]


def test_a_collection_shows_retries_and_held_keys() -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    pool = KeyedPoolExecutor(2)
    try:
        register(pool, "holding", provider)
        points = read_while_holding(pool, lambda: collect(reader))
    finally:
        pool.shutdown(cancel_futures=True)

    def value(name: str) -> float:
        return points[(name, (("keyedpool.pool.name", "holding"),))]

    assert value("keyedpool.tasks.retries") == 1
    assert value("keyedpool.tasks.parked") == 2
    assert value("keyedpool.keys.held") == 2
    assert value("keyedpool.tasks.pending") == 3


def test_names_are_unique_per_provider_and_pools_leave_when_dropped() -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    first = KeyedPoolExecutor(1)
    second = KeyedPoolExecutor(1)

    def pools() -> set[str]:
        return {
            dict(k[1])["keyedpool.pool.name"]
            for k in collect(reader)
            if k[0] == "keyedpool.workers"
        }

    try:
        register(first, "a", provider)
        register(first, "a", provider)  # the same pool again: nothing changes
        with pytest.raises(ValueError, match="'a' is already registered"):
            register(second, "a", provider)
        register(second, "b", provider)
        assert pools() == {"a", "b"}
        assert unregister("a", provider) and not unregister("a", provider)
        assert pools() == {"b"}
    finally:
        first.shutdown()
        second.shutdown()
    del second
    gc.collect()
    assert pools() == set()
    with pytest.raises(TypeError, match="KeyedPoolExecutor"):
        register(object(), "x", provider)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="non-empty str"):
        register(first, "", provider)


def test_the_span_current_at_submit_is_current_in_the_task() -> None:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider

    tracer = TracerProvider().get_tracer("test")
    with KeyedPoolExecutor(2) as pool:
        with tracer.start_as_current_span("request") as span:
            inside = pool.submit("k", trace.get_current_span)
        outside = pool.submit("k", trace.get_current_span)
        assert inside.result(TIMEOUT) is span
        assert outside.result(TIMEOUT) is not span
        assert not outside.result(TIMEOUT).get_span_context().is_valid

        def child_parent() -> object:
            with tracer.start_as_current_span("work") as child:
                return child.parent  # type: ignore[attr-defined]

        with tracer.start_as_current_span("request") as span:
            parent = pool.submit("k", child_parent)
        assert parent.result(TIMEOUT) == span.get_span_context()
