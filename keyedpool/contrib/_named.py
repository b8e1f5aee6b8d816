"""The pools a metrics exporter shows, by name (for the Prometheus and OpenTelemetry adapters)."""

from __future__ import annotations

import threading
import weakref

from keyedpool import KeyedPoolExecutor

__all__ = ["NamedPools"]


class NamedPools:
    """Pools by name, held weakly: a pool that is garbage-collected leaves by itself."""

    def __init__(self) -> None:
        #: Owns ``_pools``: register/unregister (any thread) against collections.
        self._lock = threading.Lock()
        self._pools: dict[str, weakref.ref[KeyedPoolExecutor]] = {}

    @staticmethod
    def check(pool: object, name: object) -> None:
        """Refuse what ``register`` cannot take, before anything is made."""
        if not isinstance(pool, KeyedPoolExecutor):
            raise TypeError(f"register takes a KeyedPoolExecutor, not {type(pool).__name__}")
        if not isinstance(name, str) or not name:
            raise ValueError(f"the pool's name must be a non-empty str, not {name!r}")

    def add(self, pool: KeyedPoolExecutor, name: str) -> None:
        """Show *pool* as *name*; the same pool again changes nothing."""
        with self._lock:
            known = self._pools.get(name)
            if known is not None and known() is not None and known() is not pool:
                raise ValueError(
                    f"keyedpool: a pool named {name!r} is already registered; "
                    "give each pool its own name, or unregister the old one first"
                )
            self._pools[name] = weakref.ref(pool)

    def remove(self, name: str) -> bool:
        """Stop showing *name*; ``False`` if it was not shown."""
        with self._lock:
            return self._pools.pop(name, None) is not None

    def live(self) -> list[tuple[str, KeyedPoolExecutor]]:
        """The pools still alive, by name (forgetting those that were collected)."""
        with self._lock:
            pools = [(name, ref()) for name, ref in self._pools.items()]
            for name in [name for name, pool in pools if pool is None]:
                del self._pools[name]
        return [(name, pool) for name, pool in pools if pool is not None]
