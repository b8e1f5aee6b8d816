"""Acks on their way to the broker: batched, and counted per shard until they are written.

A message's ack is not sent by the worker that settled it: workers add it
here, and the consumer's own thread (the one that fetches) sends
what has gathered as one batch. A shard counts each of its messages from the
moment the consumer receives it until its ack is written, so that a shard is
handed to another process only when nothing of it is left here.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["Acks"]

M = TypeVar("M")


class Acks(Generic[M]):
    """Settled messages waiting for their ack, and how many of each shard's are unacked.

    Args:
        shards: how many shards (partitions, streams...) the messages come from.
        on_added: called (by the thread that adds it, a worker mostly) when a
            message is added to an empty batch: the consumer's thread may want to
            send it soon.
    """

    def __init__(self, shards: int, on_added: Callable[[], None]) -> None:
        self._on_added = on_added
        # Owner of everything below: _lock.
        self._lock = threading.Lock()
        #: (message, dead, shard) settled and not taken for sending yet, oldest first.
        self._waiting: list[tuple[M, bool, int]] = []
        #: Per shard: messages received and not acked (their ack not written yet).
        self._unacked = [0] * shards

    def received(self, shard: int) -> None:
        """A message of *shard* was received: count it until its ack is written."""
        with self._lock:
            self._unacked[shard] += 1

    def forget(self, shard: int) -> None:
        """A message of *shard* counted by :meth:`received` will never be acked here."""
        with self._lock:
            self._unacked[shard] -= 1

    def add(self, message: M, dead: bool, shard: int) -> None:
        """*message* is settled (``dead``: dead-lettered); ack it soon. Any thread."""
        with self._lock:
            self._waiting.append((message, dead, shard))
            first = len(self._waiting) == 1
        if first:
            self._on_added()

    def take(self) -> list[tuple[M, bool, int]]:
        """The messages to ack now, oldest first; pass them to :meth:`sent` or :meth:`failed`."""
        with self._lock:
            batch, self._waiting = self._waiting, []
        return batch

    def sent(self, batch: list[tuple[M, bool, int]]) -> None:
        """The acks of *batch* are written."""
        with self._lock:
            for _, _, shard in batch:
                self._unacked[shard] -= 1

    def failed(self, batch: list[tuple[M, bool, int]]) -> None:
        """The acks of *batch* could not be written: take them again next time (first)."""
        with self._lock:
            self._waiting[:0] = batch

    def busy(self, shard: int) -> bool:
        """Whether messages of *shard* were received here and their acks are not written."""
        with self._lock:
            return self._unacked[shard] > 0
