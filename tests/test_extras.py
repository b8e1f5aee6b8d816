"""An adapter whose extra is not installed says which one to install."""

from __future__ import annotations

import importlib
import sys

import pytest


@pytest.mark.parametrize(
    ("adapter", "package", "extra"),
    [
        ("keyedpool.contrib.redis", "redis", "redis"),
        ("keyedpool.contrib.nats", "nats", "nats"),
        ("keyedpool.contrib.kafka", "confluent_kafka", "kafka"),
        ("keyedpool.contrib.kafka_mock", "confluent_kafka", "kafka"),
        ("keyedpool.contrib.flask", "flask", "flask"),
        ("keyedpool.contrib.django", "django", "django"),
        ("keyedpool.contrib.prometheus", "prometheus_client", "prometheus"),
        ("keyedpool.contrib.otel", "opentelemetry", "otel"),
    ],
)
def test_a_missing_extra_names_the_pip_command(
    monkeypatch: pytest.MonkeyPatch, adapter: str, package: str, extra: str
) -> None:
    # None in sys.modules is how Python marks a module that cannot be imported.
    monkeypatch.setitem(sys.modules, package, None)  # type: ignore[arg-type]
    monkeypatch.delitem(sys.modules, adapter, raising=False)
    with pytest.raises(ModuleNotFoundError) as info:
        importlib.import_module(adapter)
    assert f"pip install 'keyedpool[{extra}]'" in str(info.value)
    assert info.value.name == package
