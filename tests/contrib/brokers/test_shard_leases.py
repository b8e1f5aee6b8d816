"""The lease rules of :class:`ShardLeases`, driven by a fake clock and an in-memory store.

Each member is a :class:`ShardLeases` with its own connection to one shared
:class:`MemoryStore`, whose member entries and leases expire on the same fake
clock, as Redis keys with a TTL do. Time moves in steps of 1/8 s (exact in
binary, so no rounding creeps into the comparisons); after every step the
checks in :func:`run` hold: a shard is read by one member at most, that member
holds its lease in the store, and no member reads a shard whose messages
another member is still handling.

The same rules against real servers (a process joins; a process is killed
and the survivor takes over) are in test_redis_consumer.py and
test_nats_consumer.py; the split itself is in test_shard_assignment.py.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from itertools import pairwise

import pytest

from keyedpool.contrib.consumer._shards import ShardLeases, assign, new_token

SHARDS = 8
TTL = 3.0  # heartbeats every 1 s; a failed one is tried again after 0.3 s
STEP = 0.125


class FakeClock:
    """The time, moved on by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class MemoryStore:
    """A LeaseStore in memory: entries expire on the fake clock, like Redis keys with a TTL."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.members: dict[str, float] = {}  # token -> when its entry expires
        self.leases: dict[int, tuple[str, float]] = {}  # shard -> (holder, expiry)

    def _expire(self) -> None:
        now = self.clock()
        self.members = {t: until for t, until in self.members.items() if until > now}
        self.leases = {s: lease for s, lease in self.leases.items() if lease[1] > now}

    def owner(self, shard: int) -> str | None:
        self._expire()
        lease = self.leases.get(shard)
        return None if lease is None else lease[0]

    def heartbeat(
        self, token: str, ttl: float, held: Sequence[int]
    ) -> tuple[list[str], list[bool]]:
        self._expire()
        until = self.clock() + ttl
        self.members[token] = until
        mine = []
        for shard in held:
            ours = self.owner(shard) == token
            if ours:
                self.leases[shard] = (token, until)
            mine.append(ours)
        return sorted(self.members), mine

    def acquire(self, shard: int, token: str, ttl: float) -> bool:
        if self.owner(shard) is not None:
            return False
        self.leases[shard] = (token, self.clock() + ttl)
        return True

    def release(self, shard: int, token: str) -> None:
        if self.owner(shard) == token:
            del self.leases[shard]

    def leave(self, token: str) -> None:
        self.members.pop(token, None)


class Link:
    """One member's connection to the store: it can fail, and it can be slow."""

    def __init__(self, store: MemoryStore, clock: FakeClock) -> None:
        self.store = store
        self.clock = clock
        self.failing: set[str] = set()  # names of the calls that raise
        self.latency = 0.0  # seconds each call takes before the store acts
        self.calls: list[tuple[float, str]] = []  # (time it was made, name)

    def cut(self) -> None:
        self.failing = {"heartbeat", "acquire", "release", "leave"}

    def _call(self, name: str) -> None:
        self.calls.append((self.clock(), name))
        if name in self.failing:
            raise ConnectionError("the broker is unreachable")
        self.clock.now += self.latency

    def beats(self) -> list[float]:
        return [at for at, name in self.calls if name == "heartbeat"]

    def heartbeat(
        self, token: str, ttl: float, held: Sequence[int]
    ) -> tuple[list[str], list[bool]]:
        self._call("heartbeat")
        return self.store.heartbeat(token, ttl, held)

    def acquire(self, shard: int, token: str, ttl: float) -> bool:
        self._call("acquire")
        return self.store.acquire(shard, token, ttl)

    def release(self, shard: int, token: str) -> None:
        self._call("release")
        self.store.release(shard, token)

    def leave(self, token: str) -> None:
        self._call("leave")
        self.store.leave(token)


class Member:
    """A consumer process as far as leases go: its ShardLeases and the shards still busy."""

    def __init__(self, token: str, store: MemoryStore, clock: FakeClock) -> None:
        self.token = token
        self.clock = clock
        self.link = Link(store, clock)
        self.busy: set[int] = set()  # shards with fetched messages not settled yet
        self.changes: list[frozenset[int]] = []  # what on_change was called with
        self.leases = ShardLeases(
            self.link, SHARDS, TTL, token, on_change=self.changes.append, clock=clock
        )

    def part(self, *members: str) -> frozenset[int]:
        """The shards this member should own among *members*."""
        return assign(SHARDS, members, self.token)

    def tick(self) -> None:
        self.leases.tick(self.busy.__contains__)

    def reading(self) -> frozenset[int]:
        """The shards it fetches from now (an adapter stops at ``valid_until``, tick or not)."""
        return self.leases.readable if self.clock() < self.leases.valid_until else frozenset()


class Group:
    """Members sharing one store and one clock."""

    def __init__(self) -> None:
        self.clock = FakeClock()
        self.store = MemoryStore(self.clock)

    def member(self, token: str) -> Member:
        return Member(token, self.store, self.clock)

    def run(
        self,
        seconds: float,
        *members: Member,
        until: Callable[[], bool] | None = None,
        overlap_allowed: bool = False,
    ) -> float:
        """Tick *members* every STEP for *seconds* (or until *until* holds); returns the time.

        After each step: a shard is read by one member at most, which holds
        its lease, and (unless *overlap_allowed*) by none while another
        member still handles its messages.
        """
        end = self.clock.now + seconds
        while self.clock.now < end:
            self.clock.now += STEP
            for member in members:
                member.tick()
            self.check(members, overlap_allowed)
            if until is not None and until():
                break
        return self.clock.now

    def check(self, members: Sequence[Member], overlap_allowed: bool) -> None:
        readers: dict[int, str] = {}
        for member in members:
            for shard in member.reading():
                assert shard not in readers, f"shard {shard}: {readers[shard]} and {member.token}"
                readers[shard] = member.token
                assert self.store.owner(shard) == member.token, (shard, member.token)
                if not overlap_allowed:
                    others = [m.token for m in members if m is not member and shard in m.busy]
                    assert not others, f"{member.token} reads shard {shard}, busy in {others}"


def evenly_split(group: Group, a: Member, b: Member) -> None:
    """Start *a* and *b* together and wait until each reads its part."""
    group.run(
        10,
        a,
        b,
        until=lambda: a.leases.readable == a.part("a", "b")
        and b.leases.readable == b.part("a", "b"),
    )
    assert a.leases.readable == a.part("a", "b")
    assert b.leases.readable == b.part("a", "b")
    a.leases.gained.clear()  # what the adapter does once it took them over
    b.leases.gained.clear()


def test_tokens_differ_for_the_same_name() -> None:
    assert new_token("host-1") != new_token("host-1")
    assert new_token("host-1").startswith("host-1/")


def test_a_lone_member_takes_every_shard_and_beats_every_third_of_the_ttl() -> None:
    group = Group()
    a = group.member("a")
    a.tick()
    every = frozenset(range(SHARDS))
    assert a.leases.readable == a.leases.held == every
    assert a.leases.gained == set(every)  # to take over their unacked messages first
    assert a.changes == [every]
    assert a.leases.valid_until == TTL
    group.run(10, a)
    assert a.link.beats() == [0.0, *(float(t) for t in range(1, 11))]
    # Between heartbeats a tick does not talk to the broker at all.
    assert [name for _, name in a.link.calls].count("acquire") == SHARDS
    assert a.changes == [every]


def test_a_member_that_joins_gets_its_shards_each_after_it_drains() -> None:
    group = Group()
    a, b = group.member("a"), group.member("b")
    a.tick()
    a.leases.gained.clear()
    # a still handles messages from one of the shards that will move to b.
    draining = min(b.part("a", "b"))
    a.busy.add(draining)

    group.run(3, a, b)
    # a stopped fetching from every shard that moves at once, and released
    # all but the busy one; b took those.
    assert a.leases.readable == a.part("a", "b")
    assert a.leases.held == a.part("a", "b") | {draining}
    assert b.leases.readable == b.part("a", "b") - {draining}
    assert b.leases.gained == set(b.part("a", "b") - {draining})
    assert a.changes == [frozenset(range(SHARDS)), a.part("a", "b")]

    # However long it takes, a's heartbeats keep the lease of the draining shard.
    group.run(4 * TTL, a, b)
    assert group.store.owner(draining) == "a"
    assert draining not in b.leases.held

    a.busy.clear()
    drained = group.clock.now
    done = group.run(
        2 * TTL, a, b, until=lambda: b.leases.readable == b.part("a", "b")
    )
    assert b.leases.readable == b.part("a", "b")
    assert a.leases.held == a.part("a", "b")
    assert draining in b.leases.gained
    # a releases it at its next tick; b takes it at its next heartbeat.
    assert done - drained <= TTL / 3 + STEP


def test_a_member_does_not_take_a_shard_it_still_drains_from_an_earlier_turn() -> None:
    group = Group()
    a = group.member("a")
    a.busy.add(3)  # say it owned shard 3 before and is still settling it
    a.tick()
    assert 3 not in a.leases.held
    assert group.store.owner(3) is None
    a.busy.clear()
    group.run(TTL / 3, a)
    assert 3 in a.leases.readable


def test_a_dead_members_shards_are_taken_over_once_its_leases_expire() -> None:
    group = Group()
    a, b = group.member("a"), group.member("b")
    evenly_split(group, a, b)
    group.run(1, a, b)
    # b dies: it ticks no more.
    last_beat = b.link.beats()[-1]
    done = group.run(3 * TTL, a, until=lambda: len(a.leases.readable) == SHARDS)
    assert a.leases.readable == frozenset(range(SHARDS))
    assert a.leases.gained == set(b.part("a", "b"))  # their unacked messages come first
    # Not before b's leases expired (run() checked that every step), and at a's
    # first heartbeat after that.
    assert last_beat + TTL <= done <= last_beat + TTL + TTL / 3 + STEP


def test_a_member_cut_off_from_the_broker_stops_reading_before_its_leases_expire() -> None:
    group = Group()
    a, b = group.member("a"), group.member("b")
    evenly_split(group, a, b)
    mine = a.part("a", "b")
    # Each call takes a while, so the broker's expiry is later than a's own.
    a.link.latency = STEP
    group.run(1, a, b)
    last_good = a.link.beats()[-1]
    assert a.leases.valid_until == last_good + TTL
    assert all(group.store.leases[s][1] >= last_good + STEP + TTL for s in mine)

    a.link.cut()
    group.run(last_good + TTL - STEP - group.clock.now, a, b)
    assert a.leases.readable == mine  # still surely its own
    group.run(STEP, a, b)
    assert group.clock.now == a.leases.valid_until
    assert a.leases.readable == a.leases.held == frozenset()
    assert a.changes[-1] == frozenset()
    # It kept trying, 0.3 s after each failed try (at the first tick from then on).
    tries = [t for t in a.link.beats() if t > last_good]
    assert len(tries) >= 5
    assert all(0.3 <= later - earlier <= 0.3 + STEP for earlier, later in pairwise(tries))

    # b takes a's shards once the broker expires them (run() checks not before).
    group.run(2 * TTL, a, b, until=lambda: len(b.leases.readable) == SHARDS)
    assert b.leases.readable == frozenset(range(SHARDS))

    # Back in touch, a rejoins and gets its part again, each shard after b let it go.
    a.link.failing.clear()
    a.link.latency = 0.0
    group.run(4 * TTL, a, b, until=lambda: a.leases.readable == mine)
    assert a.leases.readable == mine
    assert b.leases.readable == b.part("a", "b")


def test_a_failed_heartbeat_after_the_leases_run_out_drops_them(
    caplog: pytest.LogCaptureFixture,
) -> None:
    group = Group()
    a = group.member("a")
    a.tick()
    a.link.cut()
    group.clock.now = TTL - STEP  # a heartbeat is due; it fails; the leases still hold
    a.tick()
    assert a.leases.readable == frozenset(range(SHARDS))
    group.clock.now = TTL + 2 * STEP  # no tick until the retry, after they ran out
    a.tick()
    assert len(a.link.beats()) == 3
    assert a.leases.held == frozenset()
    assert "could not renew its leases in time" in caplog.text
    assert "heartbeat failed; trying again" in caplog.text


def test_a_member_paused_past_the_ttl_finds_its_leases_taken(
    caplog: pytest.LogCaptureFixture,
) -> None:
    group = Group()
    a, b = group.member("a"), group.member("b")
    evenly_split(group, a, b)
    # a is paused (a stopped VM, a long GC): it does not tick; b takes over.
    group.run(3 * TTL, b, until=lambda: len(b.leases.readable) == SHARDS)
    assert b.leases.readable == frozenset(range(SHARDS))
    # Its fetching task, which checks valid_until, stopped without a tick.
    assert a.reading() == frozenset()
    a.tick()
    assert "its lease was taken" in caplog.text
    assert a.leases.held == frozenset()
    group.run(4 * TTL, a, b, until=lambda: a.leases.readable == a.part("a", "b"))
    assert a.leases.readable == a.part("a", "b")
    assert b.leases.readable == b.part("a", "b")


def test_a_graceful_stop_hands_each_shard_over_once_drained() -> None:
    group = Group()
    a, b = group.member("a"), group.member("b")
    evenly_split(group, a, b)
    mine = a.part("a", "b")
    draining = min(mine)
    a.busy.add(draining)

    a.leases.stop_taking()
    group.run(2 * TTL, a, b)
    assert a.leases.readable == frozenset()
    assert a.leases.held == {draining}  # renewed by a's heartbeats meanwhile
    assert b.leases.readable == frozenset(range(SHARDS)) - {draining}

    a.busy.clear()
    a.leases.leave(a.busy.__contains__)
    assert a.leases.held == frozenset()
    assert "a" not in group.store.members
    group.run(TTL / 3 + STEP, b)
    assert b.leases.readable == frozenset(range(SHARDS))


def test_a_stop_that_times_out_leaves_busy_shards_leased_until_they_expire() -> None:
    group = Group()
    a, b = group.member("a"), group.member("b")
    evenly_split(group, a, b)
    stuck = min(a.part("a", "b"))
    a.busy.add(stuck)
    a.leases.stop_taking()
    group.run(1, a, b)
    last_beat = a.link.beats()[-1]
    a.leases.leave(a.busy.__contains__)  # the stop timed out: a exits with it busy
    assert group.store.owner(stuck) == "a"
    # a's handler may still run; nobody starts on the shard until the lease expires.
    done = group.run(2 * TTL, b, until=lambda: stuck in b.leases.readable)
    assert last_beat + TTL <= done <= last_beat + TTL + TTL / 3 + STEP


def test_broker_errors_on_acquire_and_release_are_retried(
    caplog: pytest.LogCaptureFixture,
) -> None:
    group = Group()
    a, b = group.member("a"), group.member("b")
    a.link.failing = {"acquire"}
    a.tick()
    # It stops at the first error, and tries again at the next heartbeat.
    assert [name for _, name in a.link.calls] == ["heartbeat", "acquire"]
    assert a.leases.held == frozenset()
    assert "could not take shard 0" in caplog.text
    a.link.failing.clear()
    group.run(TTL / 3, a)
    assert a.leases.readable == frozenset(range(SHARDS))

    a.link.failing = {"release"}
    group.run(TTL, a, b)
    assert a.leases.readable == a.part("a", "b")
    assert a.leases.held == frozenset(range(SHARDS))  # the ones to move are still a's
    assert b.leases.readable == frozenset()
    assert "could not release shard" in caplog.text
    a.link.failing.clear()
    group.run(TTL / 3 + STEP, a, b)
    assert b.leases.readable == b.part("a", "b")


def test_errors_from_on_change_and_leave_are_logged_not_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    group = Group()
    link = Link(group.store, group.clock)

    def on_change(readable: frozenset[int]) -> None:
        raise RuntimeError("a bug in on_rebalance")

    leases = ShardLeases(link, SHARDS, TTL, "a", on_change=on_change, clock=group.clock)
    leases.tick(lambda shard: False)
    assert leases.readable == frozenset(range(SHARDS))
    assert "on_rebalance raised" in caplog.text
    link.failing = {"leave"}
    leases.leave(lambda shard: False)
    assert "could not leave the consumer members" in caplog.text
    assert leases.held == frozenset()


def test_without_a_clock_it_uses_time_monotonic() -> None:
    store = MemoryStore(FakeClock())  # the broker's clock is its own
    leases = ShardLeases(store, SHARDS, TTL, "a")
    before = time.monotonic()
    leases.tick(lambda shard: False)
    after = time.monotonic()
    assert before + TTL <= leases.valid_until <= after + TTL
    assert leases.readable == frozenset(range(SHARDS))


@pytest.fixture(autouse=True)
def _warnings_are_captured(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="keyedpool.contrib")


def test_a_member_that_never_joined_does_not_try_to_leave(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A consumer whose start failed (the broker unreachable) stops without a
    # heartbeat ever getting through: leaving would only fail again, with a
    # second traceback after the error that start() already raised.
    group = Group()
    a = group.member("a")
    a.link.cut()
    with caplog.at_level(logging.WARNING, logger="keyedpool.contrib"):
        a.leases.leave(a.busy.__contains__)
    assert [name for _, name in a.link.calls] == []
    assert not caplog.records
