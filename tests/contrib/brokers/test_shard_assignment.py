"""The rule that splits shards among consumer processes (:func:`assign`).

Every process computes it on its own from the member list, so it must give
the same answer everywhere; it must split evenly; and a process joining or
leaving must move few shards, since each moved shard drains first.
"""

from __future__ import annotations

import doctest
import math
import os
import random
import subprocess
import sys

from hypothesis import given
from hypothesis import strategies as st

from keyedpool.contrib.consumer import _shards
from keyedpool.contrib.consumer._shards import assign

SHARD_COUNTS = (8, 16, 32, 64)
# Member lists tried per shard count and group size in the movement tests.
MEMBER_SETS = 12


def split(shards: int, members: list[str]) -> dict[int, str]:
    """Shard -> owner, as each member computes its own part."""
    owners: dict[int, str] = {}
    for member in members:
        for shard in assign(shards, members, member):
            assert shard not in owners, f"shard {shard} owned twice"
            owners[shard] = member
    return owners


def moved(before: dict[int, str], after: dict[int, str]) -> int:
    return sum(before[s] != after[s] for s in before)


def tokens(rng: random.Random, count: int) -> list[str]:
    """Member tokens shaped like new_token()'s: a host name, a slash, random hex."""
    return [
        f"{rng.choice(['web', 'worker', 'pod'])}-{rng.randrange(100)}/{rng.getrandbits(48):012x}"
        for _ in range(count)
    ]


def move_bound(shards: int, members: int) -> int:
    """The most shards one join or leave may move in a group of *members* (the larger side).

    The member that comes or goes owns ``ceil(shards / members)`` at most;
    moving those is the least any even split can do. The load bound moves a
    few more, near the members' limits: over 5,000 random member lists per
    case (shards 8 to 64, groups 1 to 9), the most extra seen was 5, 6, 8 and
    11 for 8, 16, 32 and 64 shards, which grows like ``sqrt(2 * shards)``.
    """
    return math.ceil(shards / members) + math.ceil(math.sqrt(2 * shards)) + 1


def test_the_examples_in_the_docstrings_are_right() -> None:
    failed, tried = doctest.testmod(_shards)
    assert tried >= 4
    assert failed == 0


@given(
    shards=st.integers(0, 64),
    members=st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=10, unique=True),
)
def test_every_shard_has_exactly_one_owner_and_the_split_is_even(
    shards: int, members: list[str]
) -> None:
    parts = [assign(shards, members, me) for me in members]
    owned = [s for part in parts for s in part]
    assert sorted(owned) == list(range(shards))  # each shard once, none missing
    low = shards // len(members)
    assert all(len(part) in (low, low + 1) for part in parts)


@given(
    shards=st.integers(1, 64),
    members=st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=10, unique=True),
    data=st.data(),
)
def test_every_member_computes_the_same_answer_whatever_order_it_sees(
    shards: int, members: list[str], data: st.DataObject
) -> None:
    shuffled = data.draw(st.permutations(members))
    twice = members + members  # a member listed twice counts once
    for me in members:
        mine = assign(shards, members, me)
        assert assign(shards, shuffled, me) == mine
        assert assign(shards, twice, me) == mine


def test_a_member_not_listed_yet_counts_itself_in() -> None:
    # Its first heartbeat: the member list it reads may not show it yet.
    assert assign(16, ["a", "c"], "b") == assign(16, ["a", "b", "c"], "b")
    assert assign(4, [], "a") == frozenset(range(4))


def test_the_split_is_fixed_for_given_tokens() -> None:
    # Processes of different versions share a group during a rolling upgrade:
    # a change to this split would make them disagree, so it is pinned here.
    members = ["web-1/0a1b2c3d4e5f", "web-2/5f4e3d2c1b0a", "worker-7/00ff00ff00ff"]
    assert split(16, members) == {
        s: members[i]
        for i, part in enumerate(
            [[3, 4, 5, 8, 10, 14], [0, 1, 7, 11, 12], [2, 6, 9, 13, 15]]
        )
        for s in part
    }


def test_the_split_does_not_depend_on_the_process_hash_seed() -> None:
    # Python's hash() of a str differs per process; the split must not.
    code = (
        "from keyedpool.contrib.consumer._shards import assign;"
        "print(sorted(assign(32, ['a/1', 'b/2', 'c/3'], 'b/2')))"
    )
    outputs = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in ("1", "2")
    }
    assert outputs == {f"{sorted(assign(32, ['a/1', 'b/2', 'c/3'], 'b/2'))}\n"}


def test_a_join_or_a_leave_moves_few_shards() -> None:
    """A join or a leave moves about the newcomer's (or the leaver's) share, never many more."""
    rng = random.Random(20240613)
    for shards in SHARD_COUNTS:
        for size in range(1, 9):
            bound = move_bound(shards, size + 1)
            joins: list[int] = []
            leaves: list[int] = []
            for _ in range(MEMBER_SETS):
                group = tokens(rng, size + 1)
                before, after = split(shards, group[:size]), split(shards, group)
                joins.append(moved(before, after))
                for gone in group:
                    rest = split(shards, [m for m in group if m != gone])
                    leaves.append(moved(after, rest))
            case = f"{shards} shards, {size} <-> {size + 1} members"
            assert max(joins) <= bound, (case, joins)
            assert max(leaves) <= bound, (case, leaves)
            # On average it is close to the least possible, shards / (size + 1).
            least = shards / (size + 1)
            assert sum(joins) / len(joins) <= 1.5 * least + 2, (case, joins)
            assert sum(leaves) / len(leaves) <= 1.5 * least + 2, (case, leaves)


def test_a_fifth_member_joining_four_moves_a_fifth_of_32_shards() -> None:
    # The case that made the old rule (s % n) a problem: it moved 24 of the 32 shards here.
    members = ["host-1/aaaa", "host-2/bbbb", "host-3/cccc", "host-4/dddd"]
    before = split(32, members)
    after = split(32, [*members, "host-5/eeee"])
    newcomer = sum(owner == "host-5/eeee" for owner in after.values())
    assert newcomer in (6, 7)
    assert moved(before, after) <= 8  # the newcomer's 6, and 2 more near the limits
