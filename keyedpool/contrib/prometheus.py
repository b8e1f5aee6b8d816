"""Prometheus metrics for keyedpool pools, read from ``stats()`` when Prometheus scrapes.

    pip install 'keyedpool[prometheus]'

>>> from prometheus_client import start_http_server
>>> from keyedpool import KeyedPoolExecutor
>>> from keyedpool.contrib.prometheus import register
>>> pool = KeyedPoolExecutor(32)
>>> register(pool, "orders")          # on prometheus_client's default registry
>>> start_http_server(8000)           # then scrape http://<host>:8000/metrics

Each scrape calls ``pool.stats()``, which reads the counters the pool keeps
anyway: nothing more is measured per task, except task times in a pool made
with ``KeyedPoolExecutor(..., timing=True)``. A pool that is garbage-collected leaves
the metrics by itself; :func:`unregister` removes one sooner.

The metrics, each with a ``pool`` label (the name given to :func:`register`),
and never a label per key (keys are unbounded; ``stats().top_keys`` names the
busiest ones):

=====================================  =======  ==============================================
name                                   type     what
=====================================  =======  ==============================================
``keyedpool_tasks_total``              counter  tasks that ended, by ``outcome``: ``completed``,
                                                ``failed`` (raised) or ``cancelled``
``keyedpool_submitted_total``          counter  tasks accepted by ``submit``
``keyedpool_rejected_total``           counter  submits refused with ``PoolFull``
``keyedpool_key_moves_total``          counter  times a key went to another worker than its
                                                last one (``routing="affinity"``)
``keyedpool_pending_tasks``            gauge    accepted and not finished (bounded by
                                                ``keyedpool_max_pending_tasks``)
``keyedpool_max_pending_tasks``        gauge    the pool's ``max_pending``
``keyedpool_workers``                  gauge    the pool's ``max_workers``
``keyedpool_unkeyed_backlog_tasks``    gauge    unkeyed tasks waiting for a free worker
``keyedpool_keys_bound``               gauge    keys with tasks queued or running now
``keyedpool_retries_total``            counter  failed attempts that were run again
                                                (``submit_with(retry=...)``)
``keyedpool_parked_tasks``             gauge    tasks waiting, without a worker, for their
                                                delay or their next retry
``keyedpool_held_keys``                gauge    keys held by such a task (their later tasks
                                                wait behind it)
``keyedpool_worker_backlog_tasks``     gauge    per ``worker``: keyed tasks routed there and not
                                                finished, the running one included
``keyedpool_worker_running``           gauge    per ``worker``: 1 while it runs a task
``keyedpool_task_seconds``             histo-   pools made with ``timing=True`` only: by
                                       gram     ``phase``, ``wait`` (submit to start) and
                                                ``run``
=====================================  =======  ==============================================
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator

from keyedpool.contrib import _require

_require("prometheus_client", "prometheus", "keyedpool.contrib.prometheus")

from prometheus_client.core import (
    REGISTRY,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from keyedpool import KeyedPoolExecutor, TaskSeconds
from keyedpool.contrib._named import NamedPools

__all__ = ["PoolsCollector", "register", "unregister"]


class PoolsCollector(Collector):
    """The collector of one registry: every pool registered there, by name.

    One per registry, because a registry refuses two collectors that export
    the same metric names; :func:`register` makes it on first use.
    """

    def __init__(self) -> None:
        self.pools = NamedPools()

    def add(self, pool: KeyedPoolExecutor, name: str) -> None:
        self.pools.add(pool, name)

    def remove(self, name: str) -> bool:
        return self.pools.remove(name)

    def collect(self) -> Iterator[Metric]:
        pools = self.pools.live()
        tasks = CounterMetricFamily(
            "keyedpool_tasks", "Tasks that ended, by outcome.", labels=["pool", "outcome"]
        )
        # One value per pool: (family, the PoolStats field it shows).
        per_pool: list[tuple[CounterMetricFamily | GaugeMetricFamily, str]] = [
            (CounterMetricFamily(name, text, labels=["pool"]), field)
            for name, text, field in _COUNTERS
        ]
        per_pool += [
            (GaugeMetricFamily(name, text, labels=["pool"]), field) for name, text, field in _GAUGES
        ]
        backlog = GaugeMetricFamily(
            "keyedpool_worker_backlog_tasks",
            "Keyed tasks routed to a worker and not finished, the running one included.",
            labels=["pool", "worker"],
        )
        running = GaugeMetricFamily(
            "keyedpool_worker_running", "1 while the worker runs a task.", labels=["pool", "worker"]
        )
        seconds = HistogramMetricFamily(
            "keyedpool_task_seconds",
            "How long tasks waited (from submit to start) and ran, by phase.",
            labels=["pool", "phase"],
        )
        for name, pool in pools:
            s = pool.stats(top_keys=0)
            for phase, times in (("wait", s.wait_seconds), ("run", s.run_seconds)):
                if times is not None:
                    seconds.add_metric([name, phase], _buckets(times), times.sum)
            for outcome in ("completed", "failed", "cancelled"):
                tasks.add_metric([name, outcome], getattr(s, outcome))
            for family, field in per_pool:
                family.add_metric([name], getattr(s, field))
            for w in s.workers:
                backlog.add_metric([name, str(w.index)], w.backlog)
                running.add_metric([name, str(w.index)], 1 if w.running else 0)
        yield tasks
        for family, _ in per_pool:
            yield family
        yield backlog
        yield running
        yield seconds


def _buckets(times: TaskSeconds) -> list[tuple[str, float]]:
    # Prometheus's bucket labels: the bound as a float, the last one "+Inf".
    return [
        ("+Inf" if bound == float("inf") else repr(float(bound)), count)
        for bound, count in zip(times.buckets, times.counts, strict=True)
    ]


#: (metric name, help, the PoolStats field) for the per-pool counters and gauges.
_COUNTERS = [
    ("keyedpool_submitted", "Tasks accepted by submit.", "submitted"),
    ("keyedpool_rejected", "Submits refused with PoolFull.", "rejected"),
    ("keyedpool_key_moves", "Times a key went to another worker than its last one.", "key_moves"),
    ("keyedpool_retries", "Failed attempts that were run again (retry=).", "retries"),
]
_GAUGES = [
    ("keyedpool_pending_tasks", "Tasks accepted and not finished.", "pending"),
    ("keyedpool_max_pending_tasks", "The most pending tasks the pool holds.", "max_pending"),
    ("keyedpool_workers", "Worker threads at most.", "max_workers"),
    (
        "keyedpool_unkeyed_backlog_tasks",
        "Unkeyed tasks waiting for a free worker.",
        "unkeyed_backlog",
    ),
    ("keyedpool_keys_bound", "Keys with tasks queued or running now.", "keys_bound"),
    (
        "keyedpool_parked_tasks",
        "Tasks waiting, without a worker, for their delay or their next retry.",
        "parked",
    ),
    ("keyedpool_held_keys", "Keys held by a delayed or retrying task.", "held_keys"),
]


#: One collector per registry. Owner: _collectors_lock.
_collectors: weakref.WeakKeyDictionary[CollectorRegistry, PoolsCollector] = (
    weakref.WeakKeyDictionary()
)
_collectors_lock = threading.Lock()


def register(
    pool: KeyedPoolExecutor, name: str, registry: CollectorRegistry = REGISTRY
) -> PoolsCollector:
    """Export *pool*'s ``stats()`` as Prometheus metrics labelled ``pool=name``.

    *registry* is prometheus_client's default one unless given. Registering
    the same pool under the same name again does nothing; another live pool
    under a name already taken is a ``ValueError``. Returns the registry's
    collector (one for all the pools registered there).
    """
    NamedPools.check(pool, name)
    with _collectors_lock:
        collector = _collectors.get(registry)
        if collector is None:
            collector = PoolsCollector()
            registry.register(collector)
            _collectors[registry] = collector
    collector.add(pool, name)
    return collector


def unregister(name: str, registry: CollectorRegistry = REGISTRY) -> bool:
    """Stop exporting the pool registered as *name*; ``False`` if there was none."""
    with _collectors_lock:
        collector = _collectors.get(registry)
    return collector is not None and collector.remove(name)
