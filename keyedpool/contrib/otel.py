"""OpenTelemetry metrics for keyedpool pools, read from ``stats()`` when the SDK collects.

    pip install 'keyedpool[otel]'

>>> from keyedpool import KeyedPoolExecutor
>>> from keyedpool.contrib.otel import register
>>> pool = KeyedPoolExecutor(32)
>>> register(pool, "orders")      # on the global MeterProvider (opentelemetry.metrics)

The figures are those of :mod:`keyedpool.contrib.prometheus`, as asynchronous
(observable) instruments of the meter ``"keyedpool"``: each collection calls
``pool.stats()``, and nothing is measured per task. Every point carries the
attribute ``keyedpool.pool.name`` (the name given to :func:`register`), and
never a key (keys are unbounded; ``stats().top_keys`` names the busiest ones).

==================================  ================  ===========================================
instrument                          kind              what
==================================  ================  ===========================================
``keyedpool.tasks``                 counter           tasks that ended, by
                                                      ``keyedpool.task.outcome``: ``completed``,
                                                      ``failed`` or ``cancelled``
``keyedpool.tasks.submitted``       counter           tasks accepted by ``submit``
``keyedpool.tasks.rejected``        counter           submits refused with ``PoolFull``
``keyedpool.key_moves``             counter           times a key went to another worker than its
                                                      last one (``routing="affinity"``)
``keyedpool.tasks.pending``         up-down counter   accepted and not finished
``keyedpool.tasks.pending.limit``   up-down counter   the pool's ``max_pending``
``keyedpool.workers``               up-down counter   the pool's ``max_workers``
``keyedpool.unkeyed.backlog``       up-down counter   unkeyed tasks waiting for a free worker
``keyedpool.keys.bound``            up-down counter   keys with tasks queued or running now
``keyedpool.tasks.retries``         counter           failed attempts that were run again
``keyedpool.tasks.parked``          up-down counter   tasks waiting for their delay or retry
``keyedpool.keys.held``             up-down counter   keys held by such a task
``keyedpool.worker.backlog``        up-down counter   per ``keyedpool.worker`` (its index): keyed
                                                      tasks routed there and not finished
``keyedpool.worker.running``        up-down counter   per ``keyedpool.worker``: 1 while it runs
                                                      a task
==================================  ================  ===========================================

Task times (``timing=True``) are not exported here: OpenTelemetry has no
asynchronous histogram. Read ``stats().wait_seconds`` and ``run_seconds``.

Trace context needs nothing from this module: each task runs in a copy of the
submitter's ``contextvars`` context (``copy_context=True``, the default), so
the span that was current at ``submit`` is the current span inside the task.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterable
from typing import cast

from keyedpool.contrib import _require

_require("opentelemetry", "otel", "keyedpool.contrib.otel")

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, MeterProvider, Observation

from keyedpool import KeyedPoolExecutor, PoolStats, WorkerStats
from keyedpool.contrib._named import NamedPools

__all__ = ["PoolsInstruments", "register", "unregister"]

#: The attribute that names the pool in every point.
POOL = "keyedpool.pool.name"


class PoolsInstruments:
    """The instruments of one meter provider: every pool registered there, by name.

    One per provider, so that each instrument is created once; :func:`register`
    makes it on first use.
    """

    def __init__(self, provider: MeterProvider) -> None:
        self.pools = NamedPools()
        meter = provider.get_meter("keyedpool")
        for name, unit, text, kind, read in _INSTRUMENTS:
            make = (
                meter.create_observable_counter
                if kind == "counter"
                else meter.create_observable_up_down_counter
            )
            make(name, callbacks=[self._callback(read)], unit=unit, description=text)

    def _callback(self, read: _Reader) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            points: list[Observation] = []
            for name, pool in self.pools.live():
                for value, attributes in read(pool.stats(top_keys=0)):
                    points.append(Observation(value, {POOL: name, **attributes}))
            return points

        return observe


_Reader = Callable[[PoolStats], Iterable[tuple[int, dict[str, str]]]]


def _total(field: str) -> _Reader:
    return lambda s: [(getattr(s, field), {})]


def _by_outcome(s: PoolStats) -> Iterable[tuple[int, dict[str, str]]]:
    return [
        (getattr(s, outcome), {"keyedpool.task.outcome": outcome})
        for outcome in ("completed", "failed", "cancelled")
    ]


def _per_worker(value: Callable[[WorkerStats], int]) -> _Reader:
    return lambda s: [(value(w), {"keyedpool.worker": str(w.index)}) for w in s.workers]


#: (name, unit, description, kind, how to read it from a PoolStats).
_INSTRUMENTS: list[tuple[str, str, str, str, _Reader]] = [
    ("keyedpool.tasks", "{task}", "Tasks that ended, by outcome.", "counter", _by_outcome),
    ("keyedpool.tasks.submitted", "{task}", "Tasks accepted by submit.", "counter",
     _total("submitted")),
    ("keyedpool.tasks.rejected", "{task}", "Submits refused with PoolFull.", "counter",
     _total("rejected")),
    ("keyedpool.key_moves", "{move}", "Times a key went to another worker than its last one.",
     "counter", _total("key_moves")),
    ("keyedpool.tasks.pending", "{task}", "Tasks accepted and not finished.", "updown",
     _total("pending")),
    ("keyedpool.tasks.pending.limit", "{task}", "The most pending tasks the pool holds.",
     "updown", _total("max_pending")),
    ("keyedpool.workers", "{thread}", "Worker threads at most.", "updown",
     _total("max_workers")),
    ("keyedpool.unkeyed.backlog", "{task}", "Unkeyed tasks waiting for a free worker.",
     "updown", _total("unkeyed_backlog")),
    ("keyedpool.keys.bound", "{key}", "Keys with tasks queued or running now.", "updown",
     _total("keys_bound")),
    ("keyedpool.tasks.retries", "{attempt}", "Failed attempts that were run again.", "counter",
     _total("retries")),
    ("keyedpool.tasks.parked", "{task}",
     "Tasks waiting, without a worker, for their delay or their next retry.", "updown",
     _total("parked")),
    ("keyedpool.keys.held", "{key}", "Keys held by a delayed or retrying task.", "updown",
     _total("held_keys")),
    ("keyedpool.worker.backlog", "{task}",
     "Keyed tasks routed to a worker and not finished, the running one included.", "updown",
     _per_worker(lambda w: w.backlog)),
    ("keyedpool.worker.running", "{task}", "1 while the worker runs a task.", "updown",
     _per_worker(lambda w: 1 if w.running else 0)),
]  # fmt: skip


#: One set of instruments per provider. Owner: _lock.
_instruments: weakref.WeakKeyDictionary[MeterProvider, PoolsInstruments] = (
    weakref.WeakKeyDictionary()
)
_lock = threading.Lock()


def register(
    pool: KeyedPoolExecutor, name: str, meter_provider: MeterProvider | None = None
) -> PoolsInstruments:
    """Export *pool*'s ``stats()`` as OpenTelemetry metrics with ``keyedpool.pool.name=name``.

    *meter_provider* is the global one (``opentelemetry.metrics.get_meter_provider()``)
    unless given: set yours up first. Registering the same pool under the same
    name again does nothing; another live pool under a name already taken is a
    ``ValueError``.
    """
    NamedPools.check(pool, name)
    instruments = cast(PoolsInstruments, _instruments_of(meter_provider, create=True))
    instruments.pools.add(pool, name)
    return instruments


def unregister(name: str, meter_provider: MeterProvider | None = None) -> bool:
    """Stop exporting the pool registered as *name*; ``False`` if there was none."""
    instruments = _instruments_of(meter_provider, create=False)
    return instruments is not None and instruments.pools.remove(name)


def _instruments_of(provider: MeterProvider | None, create: bool) -> PoolsInstruments | None:
    if provider is None:
        provider = metrics.get_meter_provider()
    with _lock:
        instruments = _instruments.get(provider)
        if instruments is None and create:
            instruments = _instruments[provider] = PoolsInstruments(provider)
        return instruments
