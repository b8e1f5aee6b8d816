"""Which worker a key belongs to: the routing rules, kept apart from the machinery.

With ``routing="hash"`` the rule is
``mmh3.hash(key_bytes(key), seed=0, signed=False) % workers``, where
``key_bytes`` is the UTF-8 encoding of a ``str`` key, a ``bytes`` key as it
is, and the decimal digits of an ``int`` key (so ``42`` and ``"42"`` share a worker).
Only bytes ever reach mmh3: a ``str`` holding a lone surrogate (what
``json.loads('"\\ud800"')`` returns) is encoded with ``surrogatepass`` instead
of failing, so no key a web request can send breaks routing.
It never uses Python's ``hash()``, which is randomised per process: a key lands on
the same worker index in every process and every run with the same worker count.

With ``routing="affinity"`` (see ``_dispatcher``) a key with nothing queued
goes to a free worker, else to the less busy of its two candidate workers
(:func:`two_choices`), and stays there while it has tasks queued or running.
"""

from __future__ import annotations

import mmh3

__all__ = ["Key", "SEED", "check_key", "key_bytes", "two_choices", "worker_index"]

#: A task key: tasks with equal keys run one at a time, in submit order.
Key = str | bytes | int

#: Fixed, so that routing is the same in every process and every run.
SEED = 0

# Exact types take the fast path in submit(); subclasses go through check_key().
KEY_TYPES = frozenset((str, bytes, int))

#: The hash function itself (mmh3's 32-bit MurmurHash3).
mmh3_hash = mmh3.hash


def check_key(key: object) -> None:
    """Raise ``TypeError`` unless *key* is ``None`` or a supported key."""
    if key is None:
        return
    if isinstance(key, bool):
        raise TypeError(
            "keyedpool: a key must be str, bytes or int, not bool; "
            "pass a str such as 'true' if you really mean it, or None for no key"
        )
    if isinstance(key, (str, bytes, int)):
        return
    hint = ""
    if isinstance(key, (bytearray, memoryview)):
        hint = " (mutable buffers could change after submit: pass bytes(key))"
    elif isinstance(key, tuple):
        hint = " (for a composite key, join its parts into one str, e.g. f'{topic}:{id}')"
    raise TypeError(
        f"keyedpool: a key must be str, bytes, int or None, not {type(key).__name__}{hint}"
    )


def key_bytes(key: Key) -> bytes:
    """The bytes that stand for *key* wherever keyedpool hashes it (routing and sharding).

    A ``str`` gives its UTF-8 encoding; lone surrogates, which strict UTF-8
    refuses, keep their 3-byte form (``surrogatepass``), so every ``str`` has
    bytes and equal keys have equal bytes. ``bytes`` are used as they are, and an
    ``int`` gives its decimal digits (``42`` and ``"42"`` are the same bytes).
    """
    if type(key) is str:
        return key.encode("utf-8", "surrogatepass")
    if isinstance(key, bytes):
        return bytes(key)
    if isinstance(key, int):
        # '%d' gives the same digits for int subclasses (IntEnum...) on every Python.
        return b"%d" % key
    # A str subclass.
    return str.encode(key, "utf-8", "surrogatepass")


def two_choices(data: bytes, workers: int) -> tuple[int, int]:
    """The two candidate workers of a key (its bytes) under affinity routing.

    The first is the worker ``routing="hash"`` would use; the second, from the
    hash with another seed, is always another worker (when there are two or more).
    """
    first = mmh3_hash(data, SEED, False) % workers
    if workers == 1:
        return first, first
    return first, (first + 1 + mmh3_hash(data, SEED + 1, False) % (workers - 1)) % workers


def worker_index(key: Key, workers: int) -> int:
    """The index, from ``0`` to ``workers - 1``, of the worker that runs *key*'s tasks."""
    return mmh3_hash(key_bytes(key), SEED, False) % workers
