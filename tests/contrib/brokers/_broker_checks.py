"""Helpers shared by the broker tests: consumer processes, and what their log must show.

``ConsumerProcess`` starts ``consumer_proc.py`` as a real OS process and follows
its stdout (``ready``, ``handled N``, ``stats {...}``) on a thread, so a test
waits on a condition instead of sleeping. ``check_log`` reads the shared
``O_APPEND`` log the processes write and counts lost messages, order violations
and duplicates, allowing for at-least-once redelivery.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RUNNER = Path(__file__).with_name("consumer_proc.py")
#: The repository, so that the processes import this keyedpool even when it is not installed.
REPO = Path(__file__).resolve().parents[3]

# Upper bounds that turn a hang into a failure; nothing is timed.
WAIT = 60.0


class ConsumerProcess:
    """A ``consumer_proc.py`` process with its stdout followed on a thread.

    Every stdout line is kept in :attr:`lines`; all processes share one
    condition (:attr:`changed`), so :meth:`wait` can wait for a predicate over
    several processes' output (e.g. the offsets a group committed).
    """

    #: Notified on every line any process prints (and when one exits).
    changed = threading.Condition()

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        self.proc = subprocess.Popen(
            [sys.executable, str(RUNNER), json.dumps(config)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.pid = self.proc.pid
        self._changed = ConsumerProcess.changed
        self.lines: list[str] = []
        self.ready = False
        self.handled = 0
        self.stats: dict[str, int] | None = None
        self.stderr: list[str] = []
        self._out = threading.Thread(target=self._follow_stdout, daemon=True)
        self._err = threading.Thread(target=self._follow_stderr, daemon=True)
        self._out.start()
        self._err.start()

    def _follow_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                if line.startswith("handled "):
                    self.handled = int(line.split()[1])
                elif line.startswith("ready"):
                    self.ready = True
                elif line.startswith("stats "):
                    self.stats = json.loads(line[6:])
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def _follow_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line)

    def wait_handled(self, count: int, timeout: float = WAIT) -> None:
        """Wait until the process reported at least *count* handled messages."""
        with self._changed:
            ok = self._changed.wait_for(
                lambda: self.handled >= count or self.proc.poll() is not None, timeout
            )
        assert ok and self.handled >= count, (
            f"process {self.pid} handled {self.handled} < {count}; "
            f"stderr: {''.join(self.stderr)[-3000:]}"
        )

    @classmethod
    def wait(cls, predicate: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
        """Wait (on the processes' output, no polling) until *predicate()* holds."""
        with cls.changed:
            ok = cls.changed.wait_for(predicate, timeout)
        assert ok, f"timed out waiting for {what}"

    def kill(self) -> None:
        """SIGKILL: no drain, no ack, no goodbye."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(WAIT)
        self._out.join(WAIT)

    def stop(self) -> dict[str, int]:
        """SIGTERM (graceful stop); return the stats it printed. Asserts exit code 0."""
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(WAIT)
        self._out.join(WAIT)
        self._err.join(WAIT)
        assert code == 0, f"exit {code}: {''.join(self.stderr)[-3000:]}"
        assert self.stats is not None, "no stats printed"
        return self.stats

    def close(self) -> None:
        """Kill the process if it still runs (test teardown)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(WAIT)


@dataclass(frozen=True)
class Server:
    """A broker server a fixture started (see conftest.py)."""

    host: str
    port: int
    directory: Path

    @property
    def url(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass
class LogCheck:
    """What a shared consumer log shows."""

    #: Handled messages per key, in log order: (pid, seq, redelivered).
    by_key: dict[str, list[tuple[int, int, bool]]] = field(default_factory=dict)
    lost: list[tuple[str, int]] = field(default_factory=list)
    #: (key, description) for each message of a key that ran before an earlier one.
    violations: list[tuple[str, str]] = field(default_factory=list)
    #: Messages handled more than once (at-least-once delivery after a crash).
    duplicates: int = 0
    #: Duplicates per process id (the process that handled the copy).
    duplicates_by_pid: dict[int, int] = field(default_factory=dict)
    total: int = 0


def read_log(path: Path) -> list[tuple[int, str, int, bool]]:
    """(pid, key, seq, redelivered) per complete line; a line cut by SIGKILL is skipped."""
    out = []
    data = path.read_bytes() if path.exists() else b""
    for line in data.split(b"\n"):
        parts = line.split()
        if len(parts) == 4:
            out.append((int(parts[0]), parts[1].decode(), int(parts[2]), parts[3] == b"1"))
    return out


def count_handled(path: Path) -> set[tuple[str, int]]:
    """The distinct (key, seq) pairs in the log."""
    return {(key, seq) for _, key, seq, _ in read_log(path)}


def check_log(path: Path, expected: dict[str, int], *, rewinds: bool = False) -> LogCheck:
    """Check the log against *expected* (key -> message count, seqs 0..n-1).

    Rules (at least once, in order per key):

    * every (key, seq) is handled at least once (else: lost);
    * within one process, a key's seqs strictly increase (a redelivery starts a
      new process's run, never goes back inside one); with ``rewinds=True``
      this rule is off: a process may go back in a key (Kafka hands a
      partition back to the same process at its committed offset after a
      rebalance whose commit failed: a redelivery, not a reordering);
    * across the whole log, a key never jumps ahead: each seq is at most one
      more than the highest handled before it (else a later message overtook).
      With ``rewinds=True`` the stricter form: a seq runs only after every
      earlier seq of its key ran at least once.

    A seq handled again is a duplicate.
    """
    if rewinds:
        return _check_log_rewinds(path, expected)
    check = LogCheck()
    by_key: dict[str, list[tuple[int, int, bool]]] = defaultdict(list)
    for pid, key, seq, redelivered in read_log(path):
        by_key[key].append((pid, seq, redelivered))
        check.total += 1
    check.by_key = dict(by_key)
    for key, count in expected.items():
        records = by_key.get(key, [])
        seen = {seq for _, seq, _ in records}
        check.lost.extend((key, s) for s in range(count) if s not in seen)
        high = -1
        last_in_pid: dict[int, int] = {}
        for pid, seq, _ in records:
            previous = last_in_pid.get(pid)
            if previous is not None and seq <= previous:
                check.violations.append((key, f"pid {pid} ran {seq} after {previous}"))
            last_in_pid[pid] = seq
            if seq > high + 1:
                check.violations.append((key, f"{seq} ran before {high + 1}"))
            if seq <= high:
                check.duplicates += 1
                check.duplicates_by_pid[pid] = check.duplicates_by_pid.get(pid, 0) + 1
            high = max(high, seq)
    unexpected = set(by_key) - set(expected)
    for key in unexpected:
        check.violations.append((key, "unexpected key"))
    return check


def proc_config(log: Path, **config: Any) -> dict[str, Any]:
    """A ``consumer_proc.py`` config with the test defaults filled in."""
    base: dict[str, Any] = {"log": str(log), "progress": 100, "workers": 8, "cost": 0.0}
    base.update(config)
    return base



def _check_log_rewinds(path: Path, expected: dict[str, int]) -> LogCheck:
    check = LogCheck()
    by_key: dict[str, list[tuple[int, int, bool]]] = defaultdict(list)
    for pid, key, seq, redelivered in read_log(path):
        by_key[key].append((pid, seq, redelivered))
        check.total += 1
    check.by_key = dict(by_key)
    for key in set(by_key) - set(expected):
        check.violations.append((key, "unexpected key"))
    for key, count in expected.items():
        seen: set[int] = set()
        prefix = 0  # seqs below this were all handled
        for pid, seq, _ in by_key.get(key, []):
            if seq > prefix:
                check.violations.append((key, f"{seq} ran before {prefix}"))
            if seq in seen:
                check.duplicates += 1
                check.duplicates_by_pid[pid] = check.duplicates_by_pid.get(pid, 0) + 1
            seen.add(seq)
            while prefix in seen:
                prefix += 1
        check.lost.extend((key, s) for s in range(count) if s not in seen)
    return check
