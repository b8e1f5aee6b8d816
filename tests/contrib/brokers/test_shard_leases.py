"""The broker-independent rule that splits shards among consumer processes.

The lease mechanics themselves are tested against real servers in
test_redis_consumer.py and test_nats_consumer.py (a process joins; a process
is killed and the survivor takes over); this file checks only the pure
assignment rule every process computes.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from keyedpool.contrib._shards import assign, new_token


@given(
    shards=st.integers(1, 64),
    members=st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=10, unique=True),
)
def test_every_shard_has_exactly_one_owner_and_the_split_is_even(
    shards: int, members: list[str]
) -> None:
    parts = [assign(shards, members, me) for me in members]
    owned = [s for part in parts for s in part]
    assert sorted(owned) == list(range(shards))  # each shard once, none missing
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_every_member_computes_the_same_answer_whatever_order_it_sees() -> None:
    assert assign(8, ["b", "a", "c"], "a") == assign(8, ["c", "b", "a"], "a")
    # A member that is not in the list yet (its first heartbeat) counts itself in.
    assert assign(4, ["a"], "b") == frozenset({1, 3})


def test_tokens_differ_for_the_same_name() -> None:
    assert new_token("host-1") != new_token("host-1")
    assert new_token("host-1").startswith("host-1/")
