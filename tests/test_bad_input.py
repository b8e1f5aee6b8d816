"""Bad input: a clear TypeError/ValueError at the call that made the mistake; nothing accepted."""

from __future__ import annotations

import pytest

from keyedpool import KeyedPoolExecutor


@pytest.fixture
def pool():  # type: ignore[no-untyped-def]
    with KeyedPoolExecutor(2, routing="hash") as p:  # worker_index() needs "hash"
        yield p


@pytest.mark.parametrize(
    ("key", "hint"),
    [
        (1.5, "not float"),
        (("topic", 1), "composite key"),
        (bytearray(b"k"), "bytes(key)"),
        (True, "not bool"),
        (["k"], "not list"),
    ],
)
def test_unsupported_key_types(pool: KeyedPoolExecutor, key: object, hint: str) -> None:
    with pytest.raises(TypeError, match="key must be str, bytes") as info:
        pool.submit(key, int)  # type: ignore[arg-type]
    assert hint in str(info.value)
    assert pool.stats().submitted == 0


def test_non_callable_fn(pool: KeyedPoolExecutor) -> None:
    with pytest.raises(TypeError, match="fn must be callable, not int"):
        pool.submit("k", 42)  # type: ignore[arg-type]
    assert pool.stats().submitted == 0


def test_forgotten_key_is_explained(pool: KeyedPoolExecutor) -> None:
    with pytest.raises(TypeError, match=r"submit takes the key first"):
        pool.submit(print, "hello")  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [0, -1])
def test_bad_max_workers(value: int) -> None:
    with pytest.raises(ValueError, match="max_workers must be greater than 0"):
        KeyedPoolExecutor(value)


def test_max_workers_must_be_an_int() -> None:
    with pytest.raises(TypeError, match="max_workers must be an int"):
        KeyedPoolExecutor("8")  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [0, -5])
def test_bad_max_pending(value: int) -> None:
    with pytest.raises(ValueError, match="max_pending must be greater than 0"):
        KeyedPoolExecutor(2, max_pending=value)


def test_bad_backpressure_settings() -> None:
    with pytest.raises(ValueError, match="on_full must be 'block' or 'raise'"):
        KeyedPoolExecutor(2, on_full="drop")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="full_timeout must be a finite number of seconds >= 0"):
        KeyedPoolExecutor(2, full_timeout=-1)
    with pytest.raises(ValueError, match="full_timeout must be a finite number"):
        KeyedPoolExecutor(2, full_timeout=float("nan"))
    # With on_full="raise" submit never waits: a timeout would be silently ignored.
    with pytest.raises(ValueError, match="only applies with on_full='block'"):
        KeyedPoolExecutor(2, on_full="raise", full_timeout=1)
    with KeyedPoolExecutor(2, on_full="raise") as refusing:
        with pytest.raises(ValueError, match="only applies with on_full='block'"):
            refusing.submit_with("k", print, full_timeout=1)
        with pytest.raises(ValueError, match="only applies with on_full='block'"):
            refusing.submit_with("k", print, on_full="raise", full_timeout=1)
        assert refusing.submit_with("k", int, ("7",), on_full="block", full_timeout=1).result() == 7
        assert refusing.stats().submitted == 1  # nothing refused was accepted
    with pytest.raises(TypeError, match="initializer must be a callable"):
        KeyedPoolExecutor(2, initializer="setup")  # type: ignore[arg-type]


def test_bad_per_call_backpressure(pool: KeyedPoolExecutor) -> None:
    with pytest.raises(ValueError, match="on_full"):
        pool.submit_with("k", int, on_full="later")  # type: ignore[arg-type]
    assert pool.stats().submitted == 0


def test_worker_index_of_none_is_refused(pool: KeyedPoolExecutor) -> None:
    with pytest.raises(ValueError, match="None means no key"):
        pool.worker_index(None)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        pool.worker_index(2.5)  # type: ignore[arg-type]


def test_map_rejects_a_bad_key_before_submitting(pool: KeyedPoolExecutor) -> None:
    with pytest.raises(TypeError):
        pool.map(int, ["1"], key=3.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="chunksize"):
        pool.map(int, ["1"], chunksize=0)
    assert pool.stats().submitted == 0


def test_str_subclass_and_int_subclass_keys_are_accepted(pool: KeyedPoolExecutor) -> None:
    import enum

    class Region(enum.IntEnum):
        EU = 7

    class Name(str):
        pass

    assert pool.submit(Region.EU, int, 1).result() == 1
    assert pool.submit(Name("n"), int, 2).result() == 2
    assert pool.worker_index(Region.EU) == pool.worker_index(7)
