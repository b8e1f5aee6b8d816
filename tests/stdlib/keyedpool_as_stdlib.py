"""Make ``concurrent.futures.ThreadPoolExecutor`` be ``keyedpool.ThreadPoolExecutor``.

Used only by ``run_cpython_tests.py``, to run CPython's own tests (and the
subprocesses they start) against the drop-in.
"""

import concurrent.futures
import concurrent.futures.thread

import keyedpool

concurrent.futures.ThreadPoolExecutor = keyedpool.ThreadPoolExecutor  # type: ignore[misc]
concurrent.futures.thread.ThreadPoolExecutor = keyedpool.ThreadPoolExecutor  # type: ignore[misc]
