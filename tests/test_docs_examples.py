"""The guide's examples run as they are, and print what the guide says they print."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from _util import TIMEOUT

DOCS = Path(__file__).resolve().parent.parent / "docs"


def python_blocks(page: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(), flags=re.DOTALL)


def run(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


SCHEDULING = python_blocks("scheduling.md")


def test_the_scheduling_page_has_its_examples() -> None:
    assert len(SCHEDULING) == 5


@pytest.mark.parametrize("code", SCHEDULING, ids=[f"example-{i}" for i in range(len(SCHEDULING))])
def test_each_scheduling_example_runs(code: str) -> None:
    out = run(code)
    if "cart-7" in code:  # delay: the other key first, the reminder before the checkout
        lines = [line.split(" ", 1)[1] for line in out.splitlines()]
        assert lines == [
            "cart-9 checked out",
            "remind: items left in the cart",
            "cart-7 checked out",
        ]
    elif "saved.append" in code:  # latest wins
        assert out == "[5]\n"
    elif "search-box-1" in code:  # debounce
        assert out == "search for 'keyed'\n"
    elif "asubmit" in code:
        assert out == "['user-1: first', 'user-1: second', 'user-2: hello']\n"
    else:  # retry
        assert out.splitlines()[-1].endswith("retries")
