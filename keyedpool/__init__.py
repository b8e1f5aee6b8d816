"""keyedpool: a thread pool that keeps order per key and runs different keys concurrently.

>>> from keyedpool import KeyedPoolExecutor
>>> with KeyedPoolExecutor(max_workers=4) as pool:
...     first = pool.submit("order-123", str.upper, "charge")
...     second = pool.submit("order-123", str.upper, "ship")   # runs after `first`
...     print(first.result(), second.result())
CHARGE SHIP
"""

from ._errors import BrokenKeyedPool, DeadlockError, PoolFull
from ._executor import KeyedPoolExecutor, default_max_workers
from ._retry import RetryPolicy
from ._routing import Key, key_bytes
from ._stats import KeyBacklog, PoolStats, TaskSeconds, WorkerStats
from ._threadpool import ThreadPoolExecutor
from ._views import KeyExecutor

__version__ = "0.2.0"

__all__ = [
    "BrokenKeyedPool",
    "DeadlockError",
    "Key",
    "KeyBacklog",
    "KeyExecutor",
    "KeyedPoolExecutor",
    "PoolFull",
    "PoolStats",
    "RetryPolicy",
    "TaskSeconds",
    "ThreadPoolExecutor",
    "WorkerStats",
    "__version__",
    "default_max_workers",
    "key_bytes",
]
