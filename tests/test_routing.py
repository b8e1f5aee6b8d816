"""Routing is mmh3 of the key with a fixed seed: the same worker in every process and run."""

from __future__ import annotations

import os
import subprocess
import sys

import mmh3

from keyedpool import KeyedPoolExecutor


def test_rule_is_documented_mmh3() -> None:
    pool = KeyedPoolExecutor(32, routing="hash")
    try:
        assert pool.worker_index("order-123") == mmh3.hash("order-123", 0, False) % 32
        assert pool.worker_index(b"order-123") == mmh3.hash(b"order-123", 0, False) % 32
        assert pool.worker_index(123) == pool.worker_index("123")
        assert pool.worker_index("") == mmh3.hash(b"", 0, False) % 32
        assert pool.worker_index("é") == mmh3.hash("é".encode(), 0, False) % 32
    finally:
        pool.shutdown()


def test_same_index_in_another_process_with_another_hash_seed() -> None:
    keys = ["order-123", "user-42", "", "日本"]
    pool = KeyedPoolExecutor(16, routing="hash")
    here = [pool.worker_index(k) for k in keys]
    pool.shutdown()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = (
        "from keyedpool import KeyedPoolExecutor as K; p = K(16, routing=\"hash\"); "
        f"print([p.worker_index(k) for k in {keys!r}])"
    )
    for seed in ("1", "2"):
        out = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env=dict(os.environ, PYTHONHASHSEED=seed, PYTHONPATH=root),
            timeout=60,
        ).stdout
        assert out.strip() == repr(here)


def test_keys_spread_over_workers() -> None:
    pool = KeyedPoolExecutor(8, routing="hash")
    counts = [0] * 8
    for i in range(8000):
        counts[pool.worker_index(f"order-{i}")] += 1
    pool.shutdown()
    assert min(counts) > 800 and max(counts) < 1200


def test_task_of_a_key_runs_on_its_worker() -> None:
    import threading

    with KeyedPoolExecutor(4, thread_name_prefix="route", routing="hash") as pool:
        for key in ["a", "b", "c", 5, b"z"]:
            name = pool.submit(key, lambda: threading.current_thread().name).result()
            assert name == f"route_{pool.worker_index(key)}"
