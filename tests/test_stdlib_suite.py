"""CPython's own ThreadPoolExecutor tests, run against keyedpool.ThreadPoolExecutor.

They come from the running interpreter's ``test`` package (CPython's test suite
is not copied into this project). Builds without that package (pyenv's 3.11 and
3.12 here) skip this test; CI runs it on 3.13.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.skipif(
    importlib.util.find_spec("test.test_concurrent_futures") is None,
    reason="this Python build ships without CPython's test package",
)
def test_cpython_thread_pool_tests_pass_against_the_drop_in() -> None:
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "stdlib", "run_cpython_tests.py")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    summary = [line for line in proc.stdout.splitlines() if "passed" in line or "FAIL" in line]
    assert proc.returncode == 0, "\n".join(summary) + proc.stderr[-3000:]
    assert summary[-1].endswith(" passed, 0 failed")
    assert int(summary[-1].split()[0]) >= 40  # the suite really ran
