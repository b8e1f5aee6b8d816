"""timing=True: how long tasks waited and ran, as histograms in stats()."""

from __future__ import annotations

import math
import threading

import pytest
from _util import TIMEOUT

from keyedpool import KeyedPoolExecutor, TaskSeconds


def test_every_task_is_counted_once_in_both_histograms() -> None:
    release = threading.Event()
    with KeyedPoolExecutor(3, timing=True) as pool:
        held = pool.submit("k", release.wait, TIMEOUT)
        behind = [pool.submit("k", int, i) for i in range(5)]  # wait for `held`
        others = [pool.submit(f"o{i}", int, i) for i in range(20)]
        unkeyed = [pool.submit(None, int, i) for i in range(10)]
        failing = pool.submit("bad", int, "x")
        release.set()
        assert held.result(TIMEOUT) is True
        assert [f.result(TIMEOUT) for f in behind + others + unkeyed] == [
            *range(5),
            *range(20),
            *range(10),
        ]
        assert isinstance(failing.exception(TIMEOUT), ValueError)
    stats = pool.stats()  # after shutdown: every count is in
    for times in (stats.wait_seconds, stats.run_seconds):
        assert isinstance(times, TaskSeconds)
        assert times.count == 37 == stats.completed + stats.failed
        assert times.buckets[-1] == math.inf and list(times.buckets) == sorted(times.buckets)
        assert list(times.counts) == sorted(times.counts)  # cumulative
        assert times.counts[-1] == times.count
        assert times.sum >= 0.0
        assert times.quantile(0.0) <= times.quantile(0.5) <= times.quantile(1.0)
        assert times.quantile(1.0) in times.buckets


def test_off_by_default() -> None:
    with KeyedPoolExecutor(1) as pool:
        assert pool.submit("k", int, 1).result(TIMEOUT) == 1
    stats = pool.stats()
    assert stats.wait_seconds is None and stats.run_seconds is None


def test_quantile_reads_the_buckets() -> None:
    times = TaskSeconds((0.1, 1.0, math.inf), (5, 9, 10), 10, 4.2)
    assert times.quantile(0.5) == 0.1
    assert times.quantile(0.9) == 1.0
    assert times.quantile(1.0) == math.inf
    assert TaskSeconds((1.0, math.inf), (0, 0), 0, 0.0).quantile(0.99) == 0.0
    with pytest.raises(ValueError, match="between 0 and 1"):
        times.quantile(1.5)
