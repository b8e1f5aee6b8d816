"""The options every keyedpool consumer takes, with one set of defaults and one set of errors."""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypedDict

from keyedpool import Key, KeyedPoolExecutor, RetryPolicy

__all__ = [
    "ConsumerArgs",
    "ConsumerOptions",
    "Default",
    "ShardedConsumerArgs",
    "check_key",
    "check_positive",
    "check_seconds",
]


class Default(enum.Enum):
    """Stands for "the broker's usual place" as an option's value (see ``dead_letter``)."""

    DEAD_LETTER = "the default dead-letter destination"

    def __repr__(self) -> str:
        return f"{type(self).__name__}.{self.name}"


@dataclass(frozen=True)
class ConsumerOptions:
    """The options shared by :class:`~keyedpool.contrib.redis.RedisConsumer`,
    :class:`~keyedpool.contrib.nats.NatsConsumer` and
    :class:`~keyedpool.contrib.kafka.KafkaConsumer`: the same names, defaults and errors.

    Pass them to a consumer as keyword arguments (``RedisConsumer(..., retry=...)``),
    or build them once and pass ``options=`` (keyword arguments given as well
    override the object's fields). A wrong type raises ``TypeError`` and a wrong
    value ``ValueError``, when the options are made.

    Attributes:
        pool: the :class:`~keyedpool.KeyedPoolExecutor` to run handlers on.
            Default: a pool of the consumer's own with *max_workers* workers,
            shut down when the consumer stops. Give one or the other, not both.
        max_workers: the size of the consumer's own pool (default:
            :func:`keyedpool.default_max_workers`).
        max_in_flight: the most messages fetched and not settled yet
            (backpressure: the consumer fetches nothing more until one is
            settled). Default: the pool's ``max_pending``.
        retry: how often a failed handler is called again, and the waits in
            between (:class:`~keyedpool.RetryPolicy`; default: 3 calls, 0.1 s
            backoff doubling). The key waits; the workers run other keys.
        dead_letter: where a message goes when its attempts ran out (or its
            handler raised :class:`DeadLetter`, or its key could not be
            read): a stream, subject or topic name. Default: the broker's
            default (``f"{stream}:dead"``, ``f"{subject}.dead"``,
            ``f"{topic}.dead"``). ``None``: log the message and drop it.
        on_dead_letter: called on a worker with each dead-lettered message and
            its error, once it was written. An error it raises is logged.
        on_redelivered: called with each message the broker delivered again
            (after a crash, say) before it is handled, and with each copy of a
            message the consumer dropped because it already had it.
        batch: the most messages one fetch asks for.
        poll_timeout: the longest single wait for the broker, in seconds; also
            how soon :meth:`~keyedpool.contrib.consumer.Consumer.stop` is noticed.
    """

    pool: KeyedPoolExecutor | None = None
    max_workers: int | None = None
    max_in_flight: int | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    dead_letter: str | Default | None = Default.DEAD_LETTER
    on_dead_letter: Callable[[Any, BaseException], object] | None = None
    on_redelivered: Callable[[Any], object] | None = None
    batch: int = 100
    poll_timeout: float = 0.1

    def __post_init__(self) -> None:
        if self.pool is not None and not isinstance(self.pool, KeyedPoolExecutor):
            raise TypeError(f"pool must be a KeyedPoolExecutor, not {type(self.pool).__name__}")
        if self.pool is not None and self.max_workers is not None:
            raise ValueError("give either pool or max_workers, not both")
        for name in ("max_workers", "max_in_flight"):
            if getattr(self, name) is not None:
                check_positive(name, getattr(self, name))
        if not isinstance(self.retry, RetryPolicy):
            raise TypeError(f"retry must be a RetryPolicy, not {type(self.retry).__name__}")
        dead = self.dead_letter
        if not (dead is None or isinstance(dead, (str, Default))):
            raise TypeError(
                f"dead_letter must be a name (str) or None, not {type(dead).__name__}"
            )
        if dead == "":
            raise ValueError(
                "dead_letter must be a non-empty name; leave it out for the default "
                "destination, or pass None to log and drop failed messages"
            )
        for name in ("on_dead_letter", "on_redelivered"):
            hook = getattr(self, name)
            if hook is not None and not callable(hook):
                raise TypeError(f"{name} must be callable or None, not {type(hook).__name__}")
        check_positive("batch", self.batch)
        check_seconds("poll_timeout", self.poll_timeout)

    @classmethod
    def of(
        cls, options: ConsumerOptions | None, overrides: Mapping[str, object]
    ) -> ConsumerOptions:
        """*options* (or the defaults) with the keyword arguments *overrides* applied.

        Raises ``TypeError`` for a name that is not an option.
        """
        if options is not None and not isinstance(options, ConsumerOptions):
            raise TypeError(f"options must be ConsumerOptions, not {type(options).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(
                f"unexpected keyword argument {unknown[0]!r}; the consumer options "
                f"are {', '.join(sorted(names))}"
            )
        if options is None:
            return cls(**overrides)  # type: ignore[arg-type]
        return dataclasses.replace(options, **overrides)  # type: ignore[arg-type]


class ConsumerArgs(TypedDict, total=False):
    """The fields of :class:`ConsumerOptions`, as keyword arguments of a consumer."""

    pool: KeyedPoolExecutor | None
    max_workers: int | None
    max_in_flight: int | None
    retry: RetryPolicy
    dead_letter: str | Default | None
    on_dead_letter: Callable[[Any, BaseException], object] | None
    on_redelivered: Callable[[Any], object] | None
    batch: int
    poll_timeout: float


class ShardedConsumerArgs(ConsumerArgs, total=False):
    """:class:`ConsumerArgs`, and how the processes of a sharded consumer share the shards."""

    shards: int
    process_index: int | None
    process_count: int | None
    lease_ttl: float
    on_rebalance: Callable[[frozenset[int]], object] | None


def check_positive(name: str, value: object) -> None:
    """Raise TypeError/ValueError unless *value* is an int > 0."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be greater than 0")


def check_seconds(name: str, value: object, *, allow_zero: bool = False) -> None:
    """Raise TypeError/ValueError unless *value* is a finite number of seconds (> 0)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, not {type(value).__name__}")
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be a finite number of seconds > 0, not {value!r}")


def check_key(key: object) -> Key | None:
    """*key* if it is a key (``str``, ``bytes``, ``int``) or ``None``; else raise TypeError."""
    if key is None or (isinstance(key, (str, bytes, int)) and not isinstance(key, bool)):
        return key
    raise TypeError(
        f"keyedpool: the key of a message must be str, bytes, int or None, "
        f"not {type(key).__name__}"
    )
