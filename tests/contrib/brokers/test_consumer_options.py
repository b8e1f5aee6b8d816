"""ConsumerOptions: one set of options, defaults and errors for the Redis, NATS and Kafka consumers.

Nothing here reaches a broker: the consumers are made and stopped without
being started (their clients connect only at start()).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

import pytest

from keyedpool import KeyedPoolExecutor, RetryPolicy
from keyedpool.contrib.consumer import Consumer, ConsumerOptions, Default

pytestmark = pytest.mark.timeout(60)


def _redis(**kwargs: Any) -> Consumer[Any]:
    import redis

    from keyedpool.contrib.redis import RedisConsumer

    return RedisConsumer(redis.Redis(port=1), "s", print, group="g", **kwargs)


def _nats(**kwargs: Any) -> Consumer[Any]:
    from keyedpool.contrib.nats import NatsConsumer

    return NatsConsumer("nats://127.0.0.1:1", "S", print, **kwargs)


def _kafka(**kwargs: Any) -> Consumer[Any]:
    from keyedpool.contrib.kafka import KafkaConsumer

    config = {"bootstrap.servers": "127.0.0.1:1", "group.id": "g"}
    return KafkaConsumer("t", print, config=config, **kwargs)


CONSUMERS = [
    pytest.param(make, id=name, marks=pytest.mark.skipif(
        importlib.util.find_spec(module) is None, reason=f"{module} is not installed"))
    for name, module, make in (
        ("redis", "redis", _redis),
        ("nats", "nats", _nats),
        ("kafka", "confluent_kafka", _kafka),
    )
]

BAD_OPTIONS = [
    ({"pool": "nope"}, TypeError, "pool must be a KeyedPoolExecutor"),
    ({"max_workers": 0}, ValueError, "max_workers must be greater than 0"),
    ({"max_in_flight": "3"}, TypeError, "max_in_flight must be an int"),
    ({"max_in_flight": 0}, ValueError, "max_in_flight must be greater than 0"),
    ({"retry": 3}, TypeError, "retry must be a RetryPolicy"),
    ({"dead_letter": ""}, ValueError, "dead_letter must be a non-empty name"),
    ({"dead_letter": 5}, TypeError, "dead_letter must be a name"),
    ({"on_dead_letter": 1}, TypeError, "on_dead_letter must be callable"),
    ({"on_redelivered": 1}, TypeError, "on_redelivered must be callable"),
    ({"batch": 0}, ValueError, "batch must be greater than 0"),
    ({"batch": 1.5}, TypeError, "batch must be an int"),
    ({"poll_timeout": 0}, ValueError, "poll_timeout must be a finite number"),
    ({"poll_timeout": "1"}, TypeError, "poll_timeout must be a number"),
    ({"max_in_flightt": 3}, TypeError, "unexpected keyword argument 'max_in_flightt'"),
]


@pytest.mark.parametrize(("kwargs", "error", "message"), BAD_OPTIONS)
def test_options_refuse_bad_values(kwargs: dict[str, Any], error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        ConsumerOptions.of(None, kwargs)


def test_pool_and_max_workers_together_are_refused() -> None:
    with KeyedPoolExecutor(1) as pool, pytest.raises(ValueError, match="either pool or"):
        ConsumerOptions(pool=pool, max_workers=2)


def test_keyword_arguments_override_an_options_object() -> None:
    shared = ConsumerOptions(batch=10, retry=RetryPolicy(attempts=5))
    mine = ConsumerOptions.of(shared, {"batch": 20})
    assert (mine.batch, mine.retry.attempts, shared.batch) == (20, 5, 10)
    assert ConsumerOptions().dead_letter is Default.DEAD_LETTER
    with pytest.raises(TypeError, match="options must be ConsumerOptions"):
        ConsumerOptions.of({"batch": 1}, {})  # type: ignore[arg-type]


@pytest.mark.parametrize("make", CONSUMERS)
@pytest.mark.parametrize(("kwargs", "error", "message"), BAD_OPTIONS)
def test_every_consumer_gives_the_same_error_for_a_bad_option(
    make: Callable[..., Consumer[Any]], kwargs: dict[str, Any], error: type, message: str
) -> None:
    with pytest.raises(error, match=message):
        make(**kwargs)


@pytest.mark.parametrize("make", CONSUMERS)
def test_every_consumer_has_the_same_defaults(make: Callable[..., Consumer[Any]]) -> None:
    with KeyedPoolExecutor(2, max_pending=40) as pool:
        consumer = make(pool=pool)
        try:
            assert consumer.options == ConsumerOptions(pool=pool)
            assert consumer.pool is pool
            # max_in_flight defaults to the pool's max_pending, for all three.
            assert consumer._handling.max_in_flight == 40
        finally:
            assert consumer.stop() is False  # never started: nothing to wait for
        shared = ConsumerOptions(pool=pool, max_in_flight=7, batch=3)
        consumer = make(options=shared, batch=5)
        try:
            assert consumer.options == ConsumerOptions(pool=pool, max_in_flight=7, batch=5)
            assert consumer._handling.max_in_flight == 7
        finally:
            consumer.stop()
        assert pool.submit(None, int).result(timeout=10) == 0  # a pool it was given stays up


@pytest.mark.parametrize("make", CONSUMERS)
def test_a_consumer_that_never_started_shuts_its_own_pool_down(
    make: Callable[..., Consumer[Any]],
) -> None:
    consumer = make(max_workers=2)
    assert consumer.pool.max_workers == 2
    consumer.stop()
    with pytest.raises(RuntimeError):
        consumer.pool.submit(None, int)  # shut down
    with pytest.raises(RuntimeError, match="already started"):
        consumer.start()
