"""Adapters at the edge: frameworks and brokers. They import the core, never the reverse.

Each adapter has its own extra, e.g. ``pip install keyedpool[flask]``.
"""

from __future__ import annotations

import importlib.util


def _require(package: str, extra: str, adapter: str) -> None:
    """Raise a clear ``ModuleNotFoundError`` if *package*, which *adapter* needs, is missing.

    Called by each adapter before it imports its framework or broker client,
    so that ``import keyedpool.contrib.redis`` without redis-py says which
    extra to install instead of a bare "No module named 'redis'".
    """
    try:
        found = importlib.util.find_spec(package) is not None
    except ValueError:  # a module in sys.modules whose __spec__ is None
        found = True
    if not found:
        raise ModuleNotFoundError(
            f"{adapter} needs the {package!r} package, which is not installed: "
            f"pip install 'keyedpool[{extra}]'",
            name=package,
        )
