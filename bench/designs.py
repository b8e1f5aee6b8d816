"""The designs the benchmarks compare, all behind one small interface.

Every design takes ``submit(key, fn, *args, topic=0) -> Future`` and
``shutdown()`` (which waits until every thread it started has exited):

* :class:`KeyedKeyed`: ``KeyedPoolExecutor``, every task with its key (default
  routing, ``"affinity"``); :class:`KeyedHash`: the same with ``routing="hash"``.
* :class:`KeyedUnkeyed`: ``KeyedPoolExecutor``, every task with ``key=None``.
* :class:`Stdlib`: ``concurrent.futures.ThreadPoolExecutor``; orders nothing.
* :class:`PerTopic`: the usual alternative: one keyed pool per topic,
  3 topics x 1024 threads, each thread with its own queue, routed by hash.
* :class:`NoteLiteral`: the simplest dispatcher design, taken literally: one
  dispatcher thread, a ``queue.Queue(100)`` per worker, a blocking ``put`` into
  a full worker queue, and round-robin for unkeyed tasks (try each worker
  without blocking, then block on the one it started at).
* :class:`HashedSingle`: N single-thread executors, one chosen by the key's
  hash (the Apache BookKeeper ``OrderedExecutor`` style).
* :class:`Mailboxes`: per-key mailboxes on a ``ThreadPoolExecutor``: a key's
  tasks wait in its own queue, and while it has any, one drain of that queue
  runs on whichever thread is free (what a user could write in 30 lines).
* :class:`RoutedInSubmit`: keyedpool's hash routing done in ``submit``, with
  keyedpool's own future and a bare queue per thread, and no dispatcher thread:
  the difference to keyedpool keyed is what the dispatcher costs.

The reference designs (the last three) are small and written to be fair to
them: the same mmh3 hash as keyedpool, standard ``Future`` objects, no extra
work per task. They live here, never in ``keyedpool``.
"""

from __future__ import annotations

import abc
import collections
import itertools
import queue
import threading
from collections.abc import Callable, Hashable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, ClassVar, cast

import mmh3

from keyedpool import KeyedPoolExecutor
from keyedpool._task import Task

__all__ = [
    "DESIGNS",
    "Design",
    "HashedSingle",
    "Key",
    "KeyedHash",
    "Mailboxes",
    "RoutedInSubmit",
    "KeyedKeyed",
    "KeyedUnkeyed",
    "NoteLiteral",
    "PerTopic",
    "Stdlib",
    "by_name",
    "route",
]

Key = str | bytes | int
Handler = Callable[..., object]


def route(key: Key, workers: int) -> int:
    """The worker index of *key*: keyedpool's rule (mmh3, seed 0, unsigned) modulo *workers*."""
    if isinstance(key, int):
        return mmh3.hash(b"%d" % key, 0, False) % workers
    return mmh3.hash(key, 0, False) % workers


def _run(future: Future[Any], fn: Handler, args: tuple[Any, ...]) -> None:
    # What ThreadPoolExecutor's work item does: mark running, call, settle.
    if not future.set_running_or_notify_cancel():
        return
    try:
        result = fn(*args)
    except BaseException as exc:  # into the future, as in the stdlib
        future.set_exception(exc)
    else:
        future.set_result(result)


_Work = tuple["Future[Any]", Handler, tuple[Any, ...]]


def _serve(inbox: queue.SimpleQueue[_Work | None] | queue.Queue[_Work | None]) -> None:
    # A worker thread of the reference designs: run what arrives, in order, until None.
    get = inbox.get
    while True:
        work = get()
        if work is None:
            return
        _run(*work)


class Design(abc.ABC):
    """A pool design, as the benchmarks see it."""

    #: Short name, for ``--designs`` and file names.
    name: ClassVar[str]
    #: Name in tables and charts.
    label: ClassVar[str]
    #: Whether it keeps the order of tasks per key (order violations must be 0).
    ordered: ClassVar[bool]

    def __init__(self, workers: int) -> None:
        self._threads_before = threading.active_count()
        self._workers = workers

    @classmethod
    def create(cls, workers: int) -> Design:
        """Make the design with *workers* threads (the per-topic design has its own count)."""
        return cls(workers)

    @property
    def workers(self) -> int:
        """The number of threads that run tasks (for the ideal I/O throughput)."""
        return self._workers

    @abc.abstractmethod
    def submit(self, key: Key | None, fn: Handler, /, *args: Any, topic: int = 0) -> Future[Any]:
        """Schedule ``fn(*args)``; *key* None: no key; only the per-topic design uses *topic*."""

    @abc.abstractmethod
    def shutdown(self) -> None:
        """Finish what was submitted, then return once every thread of the design has exited."""

    def lane(self, key: Key | None, topic: int = 0) -> Hashable | None:
        """Which serial lane (one thread) this task must use; ``None`` if any thread may run it."""
        return None

    def threads_started(self) -> int:
        """Threads alive now that were not alive when the design was made.

        Exact while nothing else in the process starts or stops threads, which
        is how the benchmark runs it.
        """
        return threading.active_count() - self._threads_before


class KeyedKeyed(Design):
    """keyedpool with every task keyed, default routing ("affinity"): per-key order."""

    name = "keyedpool"
    label = "keyedpool keyed"
    ordered = True

    def __init__(self, workers: int) -> None:
        super().__init__(workers)
        self._pool = KeyedPoolExecutor(workers, thread_name_prefix="bench-kp")
        self._submit = self._pool.submit

    def submit(self, key: Key | None, fn: Handler, /, *args: Any, topic: int = 0) -> Future[Any]:
        return self._submit(key, fn, *args)

    def lane(self, key: Key | None, topic: int = 0) -> Hashable | None:
        # No fixed worker: only the key's own tasks must wait for one another.
        return key

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)


class KeyedHash(KeyedKeyed):
    """keyedpool keyed, ``routing="hash"``: a key always runs on the worker its hash picks."""

    name = "keyedpool-hash"
    label = "keyedpool keyed, hash"

    def __init__(self, workers: int) -> None:
        Design.__init__(self, workers)
        self._pool = KeyedPoolExecutor(workers, thread_name_prefix="bench-kph", routing="hash")
        self._submit = self._pool.submit

    def lane(self, key: Key | None, topic: int = 0) -> Hashable | None:
        return None if key is None else self._pool.worker_index(key)


class KeyedUnkeyed(KeyedKeyed):
    """keyedpool with every task unkeyed (``key=None``): any free worker."""

    name = "keyedpool-unkeyed"
    label = "keyedpool unkeyed"
    ordered = False

    def submit(self, key: Key | None, fn: Handler, /, *args: Any, topic: int = 0) -> Future[Any]:
        return self._submit(None, fn, *args)

    def lane(self, key: Key | None, topic: int = 0) -> Hashable | None:
        return None


class Stdlib(Design):
    """``concurrent.futures.ThreadPoolExecutor``: one shared queue, no order per key."""

    name = "threadpool"
    label = "ThreadPoolExecutor"
    ordered = False

    def __init__(self, workers: int) -> None:
        super().__init__(workers)
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="bench-tpe")
        self._submit = self._pool.submit

    def submit(self, key: Key | None, fn: Handler, /, *args: Any, topic: int = 0) -> Future[Any]:
        return self._submit(fn, *args)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)


class PerTopic(Design):
    """A keyed pool per topic, every thread with its own queue (the usual alternative).

    Threads start with the pool (as the goroutines did). A keyed task goes to
    ``route(key) % per_topic`` of its topic's pool; an unkeyed task round-robin
    over that topic's threads. Queues are unbounded ``SimpleQueue`` objects, the
    fastest the standard library has, and routing happens in ``submit`` (no
    dispatcher hop): the kindest version of this design.
    """

    name = "per-topic"
    label = "per-topic 3x1024"
    ordered = True

    #: 3 topics x 1024 threads: the shape this design usually has.
    TOPICS = 3
    PER_TOPIC = 1024

    def __init__(self, topics: int = TOPICS, per_topic: int = PER_TOPIC) -> None:
        super().__init__(topics * per_topic)
        self._topics = topics
        self._per_topic = per_topic
        self._queues: list[list[queue.SimpleQueue[_Work | None]]] = [
            [queue.SimpleQueue() for _ in range(per_topic)] for _ in range(topics)
        ]
        self._next = [itertools.count() for _ in range(topics)]
        self._threads = [
            threading.Thread(target=_serve, args=(q,), name=f"bench-topic{t}_{i}")
            for t, row in enumerate(self._queues)
            for i, q in enumerate(row)
        ]
        self._closed = False
        for thread in self._threads:
            thread.start()

    @classmethod
    def create(cls, workers: int) -> Design:
        # Always the note's 3 x 1024: that is the design being compared.
        return cls()

    def submit(self, key: Key | None, fn: Handler, /, *args: Any, topic: int = 0) -> Future[Any]:
        if self._closed:
            raise RuntimeError("cannot schedule new futures after shutdown")
        row = self._queues[topic % self._topics]
        if key is None:
            index = next(self._next[topic % self._topics]) % self._per_topic
        else:
            index = route(key, self._per_topic)
        future: Future[Any] = Future()
        row[index].put((future, fn, args))
        return future

    def lane(self, key: Key | None, topic: int = 0) -> Hashable | None:
        if key is None:
            return None
        return (topic % self._topics, route(key, self._per_topic))

    def shutdown(self) -> None:
        self._closed = True
        for row in self._queues:
            for q in row:
                q.put(None)
        for thread in self._threads:
            thread.join()


_STOP = object()


class NoteLiteral(Design):
    """The simplest dispatcher design, taken literally (the head-of-line reference).

    ``submit`` puts on one dispatch queue (``queue.Queue(workers * 100)``, the
    note's default size). One dispatcher thread takes each task and, for a key,
    does a *blocking* ``put`` into that worker's ``queue.Queue(100)``: while that
    queue is full, nothing else is dispatched. A task without a key goes
    round-robin: starting at the next worker, try each without blocking, and if
    all are full, block on the starting worker. Threads start with the pool.
    """

    name = "note-literal"
    label = "note literal"
    ordered = True

    WORKER_QUEUE = 100

    def __init__(self, workers: int) -> None:
        super().__init__(workers)
        self._inbox: queue.Queue[object] = queue.Queue(workers * 100)
        self._queues: list[queue.Queue[_Work | None]] = [
            queue.Queue(self.WORKER_QUEUE) for _ in range(workers)
        ]
        self._closed = False
        self._threads = [
            threading.Thread(target=_serve, args=(q,), name=f"bench-literal_{i}")
            for i, q in enumerate(self._queues)
        ]
        self._threads.append(
            threading.Thread(target=self._dispatch, name="bench-literal_dispatcher")
        )
        for thread in self._threads:
            thread.start()

    def submit(self, key: Key | None, fn: Handler, /, *args: Any, topic: int = 0) -> Future[Any]:
        if self._closed:
            raise RuntimeError("cannot schedule new futures after shutdown")
        future: Future[Any] = Future()
        self._inbox.put((key, (future, fn, args)))
        return future

    def _dispatch(self) -> None:
        get = self._inbox.get
        queues = self._queues
        count = len(queues)
        turn = 0
        while True:
            item = get()
            if item is _STOP:
                for q in queues:
                    q.put(None)
                return
            key, work = cast("tuple[Key | None, _Work]", item)
            if key is not None:
                queues[route(key, count)].put(work)  # blocks while that worker is full
                continue
            start = turn
            turn = (turn + 1) % count
            for step in range(count):
                try:
                    queues[(start + step) % count].put_nowait(work)
                    break
                except queue.Full:
                    pass
            else:
                queues[start].put(work)

    def lane(self, key: Key | None, topic: int = 0) -> Hashable | None:
        return None if key is None else route(key, self._workers)

    def shutdown(self) -> None:
        self._closed = True
        self._inbox.put(_STOP)
        for thread in self._threads:
            thread.join()


class HashedSingle(Design):
    """N single-thread executors, one chosen by the key's hash (BookKeeper ``OrderedExecutor``).

    A task without a key goes to the next executor round-robin, blind to load
    (``OrderedExecutor`` picks a random thread, which spreads the same way).
    Each executor starts its thread on its first task.
    """

    name = "hashed-single"
    label = "N single-thread"
    ordered = True

    def __init__(self, workers: int) -> None:
        super().__init__(workers)
        self._executors = [
            ThreadPoolExecutor(1, thread_name_prefix=f"bench-hashed{i}") for i in range(workers)
        ]
        self._submits = [executor.submit for executor in self._executors]
        self._next = itertools.count()

    def submit(self, key: Key | None, fn: Handler, /, *args: Any, topic: int = 0) -> Future[Any]:
        submits = self._submits
        if key is None:
            index = next(self._next) % len(submits)
        else:
            index = route(key, len(submits))
        return submits[index](fn, *args)

    def lane(self, key: Key | None, topic: int = 0) -> Hashable | None:
        return None if key is None else route(key, len(self._executors))

    def shutdown(self) -> None:
        for executor in self._executors:
            executor.shutdown(wait=True)


class Mailboxes(Design):
    """Per-key mailboxes on a ``ThreadPoolExecutor`` (the hand-written peer).

    ``submit`` appends the task to its key's mailbox; if the key had nothing
    waiting, it also submits one drain of that mailbox to the thread pool. The
    drain runs the key's tasks one by one until the mailbox is empty, so a key
    holds at most one thread, and any free thread can serve any key. Unkeyed
    tasks go to the thread pool directly.
    """

    name = "mailboxes"
    label = "per-key mailboxes"
    ordered = True

    def __init__(self, workers: int) -> None:
        super().__init__(workers)
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="bench-mbox")
        self._lock = threading.Lock()
        # Owner: _lock. Keys with work, and their waiting tasks.
        self._boxes: dict[Key, collections.deque[_Work]] = {}

    def submit(self, key: Key | None, fn: Handler, /, *args: Any, topic: int = 0) -> Future[Any]:
        if key is None:
            return self._pool.submit(fn, *args)
        future: Future[Any] = Future()
        with self._lock:
            box = self._boxes.get(key)
            if box is not None:
                box.append((future, fn, args))
                return future
            self._boxes[key] = collections.deque([(future, fn, args)])
        self._pool.submit(self._drain, key)
        return future

    def _drain(self, key: Key) -> None:
        boxes = self._boxes
        lock = self._lock
        while True:
            with lock:
                box = boxes[key]
                if not box:
                    del boxes[key]
                    return
                work = box.popleft()
            _run(*work)

    def lane(self, key: Key | None, topic: int = 0) -> Hashable | None:
        return key  # a key waits only for its own tasks

    def shutdown(self) -> None:
        # Drains submit nothing new, so waiting for the pool waits for them all.
        self._pool.shutdown(wait=True)


class RoutedInSubmit(Design):
    """keyedpool's hash routing without the dispatcher: ``submit`` puts on the worker's queue.

    The same future as keyedpool (its ``Task``), the same hash, a bare
    ``SimpleQueue`` per thread; threads start with the pool. Unkeyed tasks go
    round-robin. What keyedpool keyed does beyond this (a dispatcher thread,
    capacity, starting threads on demand, counts) is what the gap between
    the two costs.
    """

    name = "routed-in-submit"
    label = "routing in submit"
    ordered = True

    def __init__(self, workers: int) -> None:
        super().__init__(workers)
        self._queues: list[queue.SimpleQueue[Task | None]] = [
            queue.SimpleQueue() for _ in range(workers)
        ]
        self._puts = [q.put for q in self._queues]
        self._next = itertools.count()
        self._closed = False
        self._threads = [
            threading.Thread(target=self._serve, args=(q,), name=f"bench-routed_{i}")
            for i, q in enumerate(self._queues)
        ]
        for thread in self._threads:
            thread.start()

    @staticmethod
    def _serve(inbox: queue.SimpleQueue[Task | None]) -> None:
        get = inbox.get
        while (task := get()) is not None:
            task.run()

    def submit(self, key: Key | None, fn: Handler, /, *args: Any, topic: int = 0) -> Future[Any]:
        if self._closed:
            raise RuntimeError("cannot schedule new futures after shutdown")
        # keyedpool's Task wants its pool only to check waits from its own
        # workers, which never happens here.
        task = Task(None, key, fn, args, {}, None, False)  # type: ignore[arg-type]
        index = next(self._next) if key is None else route(key, self._workers)
        self._puts[index % self._workers](task)
        return task

    def lane(self, key: Key | None, topic: int = 0) -> Hashable | None:
        return None if key is None else route(key, self._workers)

    def shutdown(self) -> None:
        self._closed = True
        for put in self._puts:
            put(None)
        for thread in self._threads:
            thread.join()


#: Every design, in report order.
DESIGNS: tuple[type[Design], ...] = (
    KeyedKeyed,
    KeyedHash,
    KeyedUnkeyed,
    Stdlib,
    Mailboxes,
    RoutedInSubmit,
    PerTopic,
    NoteLiteral,
    HashedSingle,
)


def by_name(name: str) -> type[Design]:
    """The design called *name* (see ``Design.name``); ``ValueError`` lists the valid names."""
    for design in DESIGNS:
        if design.name == name:
            return design
    valid = ", ".join(d.name for d in DESIGNS)
    raise ValueError(f"unknown design {name!r}; choose from: {valid}")
