"""Which consumer process reads which shard: leases, so that survivors take over.

A sharded stream (Redis Streams, NATS subjects) keeps per-key order only if
one process at a time reads each shard. :class:`ShardLeases` gives each
process a changing set of shards, with these rules:

* **Members.** Every live consumer writes a heartbeat (a member entry that
  expires after ``ttl`` seconds) every ``ttl / 3`` seconds. A process that dies
  drops out of the members after at most ``ttl``.
* **Assignment** (:func:`assign`): the live members split the shards evenly
  (each owns ``shards // n`` or one more), by rendezvous hashing with bounded
  load: every (member, shard) pair has a fixed hash score, and the shards go
  to the members with the highest scores that still have room. Every member
  computes the same answer from the same member list, and a member joining or
  leaving moves few shards (about ``shards / n``, a little more at worst),
  so few shards have to drain. Earlier keyedpool versions split by
  ``s % n``: while a group mixes old and new processes, a shard that each
  side leaves to the other goes unread until all run the same version.
* **Leases.** A member reads a shard only while it holds the shard's lease (a
  broker key set only if absent, expiring after ``ttl``, renewed with every
  heartbeat). A lease is what makes ownership exclusive while members disagree
  about the member list for a moment.
* **Drain before handover.** When a shard should move to another member, its
  holder stops fetching from it at once, but keeps the lease until every
  message it fetched from the shard is settled (acked or dead-lettered); then
  it releases the lease, and the new owner acquires it on its next heartbeat.
  So the new owner never starts on a key while the old owner still runs one of
  its messages.
* **Death.** A dead member's leases expire after ``ttl``; the next owner takes
  each shard over with the unacked messages first (the broker adapter does
  that part), so order holds through the redelivery.
* **Lost contact.** A member that cannot renew its leases for ``ttl`` seconds
  (counted from the *start* of its last good heartbeat, so it gives up no
  later than the broker expires them) stops fetching from those shards. Its
  handlers that are already running are not interrupted, so if it was
  paused or cut off longer than ``ttl`` they may overlap with the new owner's;
  keep ``ttl`` well above a handler's running time.

The broker part is a :class:`LeaseStore`; this module holds no broker code.
"""

from __future__ import annotations

import functools
import logging
import uuid
from collections.abc import Callable, Sequence
from time import monotonic
from typing import Protocol

import mmh3

from keyedpool._routing import key_bytes

log = logging.getLogger("keyedpool.contrib")

__all__ = ["LeaseStore", "ShardLeases", "assign", "new_token"]


def assign(shards: int, members: Sequence[str], me: str) -> frozenset[int]:
    """The shards *me* should own when *members* (with *me* counted in) share *shards*.

    Each member owns ``shards // n`` shards or one more, and every member
    computes the same split from the same members, in any order. When a member
    joins or leaves, about ``shards / n`` shards change owner.

    >>> sorted(assign(8, ["b", "a"], "b"))
    [1, 3, 5, 6]
    >>> sorted(assign(8, ["a", "b", "c"], "b"))  # c joins: b hands shard 5 over
    [1, 3, 6]
    >>> sorted(len(assign(8, ["a", "b", "c"], m)) for m in "abc")
    [2, 3, 3]
    >>> assign(2, ["a", "b", "c"], "a")  # more members than shards: a spare
    frozenset()
    """
    owners = _owners(shards, tuple(sorted(set(members) | {me})))
    return frozenset(s for s, owner in enumerate(owners) if owner == me)


# Every heartbeat asks again, mostly with the same members: compute each split once.
@functools.lru_cache(maxsize=16)
def _owners(shards: int, members: tuple[str, ...]) -> tuple[str, ...]:
    """The owner of each shard: rendezvous hashing with a load bound, one pass.

    Every (member, shard) pair gets a score from mmh3 (the same in every
    process, unlike ``hash()``). Going from the highest score down, a pair is
    taken if its shard has no owner yet and its member still has room: each
    member may own ``shards // n`` shards, and the first ``shards % n`` to need
    one more get it. A join only adds pairs and a leave only removes some, so
    the order of the others never changes: most shards keep their owner, and
    only shards near a member's bound move on. (Going through the shards in
    index order instead, each to its best member with room, moves a few more.)
    """
    count = len(members)
    base, extra = divmod(shards, count)
    tokens = [key_bytes(m) for m in members]
    # Ties (rare with 32-bit scores) go by the members' sorted order, the same everywhere.
    scored = sorted(
        (
            (mmh3.hash(b"%d:" % shard + token, 0, False), index, shard)
            for index, token in enumerate(tokens)
            for shard in range(shards)
        ),
        reverse=True,
    )
    load = [0] * count
    owners: dict[int, str] = {}
    for _, index, shard in scored:
        if shard in owners:
            continue
        if load[index] == base:
            if not extra:
                continue
            extra -= 1
        elif load[index] > base:
            continue
        load[index] += 1
        owners[shard] = members[index]
        if len(owners) == shards:
            break
    return tuple(owners[shard] for shard in range(shards))


def new_token(name: str) -> str:
    """A member token: the consumer's name plus a random part, unique per consumer object.

    Two processes given the same name still get different tokens, so they can
    never both believe they hold one lease.
    """
    return f"{name}/{uuid.uuid4().hex[:12]}"


class LeaseStore(Protocol):
    """The broker side of :class:`ShardLeases` (one per broker adapter)."""

    def heartbeat(
        self, token: str, ttl: float, held: Sequence[int]
    ) -> tuple[list[str], list[bool]]:
        """Refresh *token*'s member entry and renew its leases on *held*.

        Returns the live members' tokens and, per shard in *held*, whether
        the lease is still *token*'s (and was renewed).
        """
        ...

    def acquire(self, shard: int, token: str, ttl: float) -> bool:
        """Take the lease on *shard* for *ttl* seconds if nobody holds it; True if taken."""
        ...

    def release(self, shard: int, token: str) -> None:
        """Drop the lease on *shard* if *token* holds it."""
        ...

    def leave(self, token: str) -> None:
        """Remove *token* from the members (a graceful stop)."""
        ...


class ShardLeases:
    """One consumer's view of the shards it holds, kept current by :meth:`tick`.

    The adapter calls :meth:`tick` from its fetching loop (often: it only talks
    to the broker when a heartbeat is due) with ``busy(shard)``, which says
    whether messages fetched from a shard are still unsettled. :attr:`readable`
    is then the set of shards to fetch from; shards in :attr:`gained` were just
    acquired (take over their unacked messages first), and the adapter clears
    that set once it has.

    Args:
        store: the broker's :class:`LeaseStore`.
        shards: how many shards the stream has.
        ttl: seconds a heartbeat and a lease last.
        token: this consumer's member token (see :func:`new_token`).
        on_change: called with :attr:`readable` whenever it changes.
        clock: the time in seconds, ``time.monotonic`` unless given (tests
            pass a fake one).
    """

    def __init__(
        self,
        store: LeaseStore,
        shards: int,
        ttl: float,
        token: str,
        on_change: Callable[[frozenset[int]], None] | None = None,
        clock: Callable[[], float] = monotonic,
    ) -> None:
        self._store = store
        self._clock = clock
        self._shards = shards
        self._ttl = ttl
        self.token = token
        self._on_change = on_change
        self._held: set[int] = set()
        self._target: frozenset[int] = frozenset()
        self._next_beat = 0.0
        self._valid_until = 0.0
        self._readable: frozenset[int] = frozenset()
        self._leaving = False
        #: Whether a heartbeat ever got through (so this consumer may be in the members).
        self._joined = False
        #: Shards acquired and not yet taken over by the adapter.
        self.gained: set[int] = set()

    @property
    def valid_until(self) -> float:
        """The time until which the held leases are surely ours.

        It is a reading of *clock* (``time.monotonic()`` unless another was
        given). A fetching task that runs apart from :meth:`tick` checks this
        before each fetch, so it stops in time even if the heartbeat is stuck.
        """
        return self._valid_until

    @property
    def held(self) -> frozenset[int]:
        """The shards whose lease this consumer holds (readable or draining)."""
        return frozenset(self._held)

    @property
    def readable(self) -> frozenset[int]:
        """The shards to fetch from: held, and meant to stay here."""
        return self._readable

    def tick(self, busy: Callable[[int], bool]) -> None:
        """Heartbeat if one is due, hand over drained shards, take free ones.

        Broker errors are logged, not raised: the leases stay valid until
        their time runs out, and the next tick tries again.
        """
        now = self._clock()
        if now >= self._next_beat:
            self._beat(now, busy)
        elif self._held and now >= self._valid_until:
            self._lose(self._held, "could not renew its leases in time")
        self._hand_over(busy)
        self._update()

    def stop_taking(self) -> None:
        """At a graceful stop: take no more shards, and hand each over once drained.

        Keep calling :meth:`tick` while draining: the heartbeat keeps the
        leases of the shards still draining, so nobody starts on their keys
        meanwhile. This consumer leaves the members at its next tick, so that
        the others take each shard it releases at their next heartbeat.
        """
        self._leaving = True
        self._target = frozenset()
        self._next_beat = 0.0  # beat (and so leave the members) at the next tick

    def leave(self, busy: Callable[[int], bool]) -> None:
        """At the end of a graceful stop: release every drained shard and leave the members.

        Shards still busy (the stop timed out) keep their leases until they expire.
        """
        self.stop_taking()
        self._hand_over(busy)
        self._leave_members()
        self._update()

    def _beat(self, started: float, busy: Callable[[int], bool]) -> None:
        held = sorted(self._held)
        try:
            members, mine = self._store.heartbeat(self.token, self._ttl, held)
        except Exception:
            log.warning("keyedpool: heartbeat failed; trying again", exc_info=True)
            self._next_beat = started + min(self._ttl / 10, 1.0)
            if self._held and self._clock() >= self._valid_until:
                self._lose(self._held, "could not renew its leases in time")
            return
        self._joined = True
        # The broker set the new expiry after `started`: we give up no later than it.
        self._valid_until = started + self._ttl
        self._next_beat = started + self._ttl / 3
        self._lose({s for s, ok in zip(held, mine, strict=True) if not ok}, "its lease was taken")
        if self._leaving:
            # The heartbeat renewed the leases of the shards still draining, and
            # put this consumer back in the members: leave again, or the others
            # would keep counting it in and leave the shards it releases unread.
            self._leave_members()
            return
        self._target = assign(self._shards, members, self.token)
        for shard in sorted(self._target - self._held):
            if busy(shard):
                continue  # still settling what it fetched from there before
            try:
                taken = self._store.acquire(shard, self.token, self._ttl)
            except Exception:
                log.warning("keyedpool: could not take shard %d", shard, exc_info=True)
                break
            if taken:
                self._held.add(shard)
                self.gained.add(shard)

    def _leave_members(self) -> None:
        if not self._joined:
            return  # never in the members (no heartbeat got through): nothing to leave
        try:
            self._store.leave(self.token)
        except Exception:
            log.warning("keyedpool: could not leave the consumer members", exc_info=True)

    def _hand_over(self, busy: Callable[[int], bool]) -> None:
        for shard in sorted(self._held - self._target):
            if busy(shard):
                continue  # drain first: its messages are still being handled here
            try:
                self._store.release(shard, self.token)
            except Exception:
                log.warning("keyedpool: could not release shard %d", shard, exc_info=True)
                continue  # it expires on its own
            self._held.discard(shard)
            self.gained.discard(shard)

    def _lose(self, shards: set[int], why: str) -> None:
        if shards:
            log.warning(
                "keyedpool: consumer %s lost shards %s: %s", self.token, sorted(shards), why
            )
            self._held -= shards
            self.gained -= shards

    def _update(self) -> None:
        readable = frozenset(self._held & self._target)
        if readable != self._readable:
            self._readable = readable
            if self._on_change is not None:
                try:
                    self._on_change(readable)
                except Exception:
                    log.exception("keyedpool: on_rebalance raised")
