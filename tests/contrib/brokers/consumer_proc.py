"""One consumer process for the broker scale-out tests and bench/brokers.py: a real OS process.

Run as ``python consumer_proc.py CONFIG_JSON``. ``CONFIG_JSON`` is a JSON object:

* ``broker``: ``"redis"`` or ``"nats"`` (built in), or ``"file.py:function"``: a
  factory ``function(config, record) -> consumer`` for any other broker, where
  ``record(key: str, seq: int, redelivered: bool)`` must be called by the
  consumer's handler once per handled message, and the consumer has ``run()``
  (blocks until stopped), ``stop(timeout)`` and ``stats()`` (a ``ConsumerStats``).
* ``log``: a file shared by all consumer processes of a test, opened with
  ``O_APPEND``; every handled message appends one line ``pid key seq redelivered``
  in one ``write()``, so the file holds one global order across processes and
  survives a SIGKILL;
* ``cost``: seconds of simulated I/O per message (``time.sleep``, default 0);
* ``stall_after``: after this many handled messages, every further handler call
  blocks until the process is killed (so a test can SIGKILL it with messages in
  flight, deterministically); 0 means never;
* ``progress``: print ``handled N`` on stdout every this many messages, so a test
  can wait for progress on a pipe instead of polling; with 1, each line also
  names the message: ``handled N key seq``;
* the broker's own settings (``url``, ``stream``/``subject``, ``group``, ``shards``,
  ``workers``), and either ``process_index`` and ``process_count`` (pinned
  shards) or neither (the processes share the shards through leases; then
  ``lease_ttl`` applies).

It prints ``shards 1,3,5`` (the shard numbers it reads) whenever that set
changes, ``ready`` once consuming, and on SIGTERM stops gracefully (stop
fetching, drain, ack, close), prints ``stats {json}`` and ``stopped``, and exits 0.
"""

from __future__ import annotations

import dataclasses
import faulthandler
import importlib.util
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

Record = Callable[[str, int, bool], None]


def _sharding(config: dict[str, Any]) -> dict[str, Any]:
    """The consumer's sharding arguments from *config*, and a hook that prints its shards."""
    def on_rebalance(shards: frozenset[int]) -> None:
        say("shards " + ",".join(map(str, sorted(shards))))

    out: dict[str, Any] = {"shards": config["shards"], "on_rebalance": on_rebalance}
    if "process_index" in config:
        out.update(process_index=config["process_index"], process_count=config["process_count"])
    else:
        out["lease_ttl"] = config.get("lease_ttl", 10.0)
    return out


def _redis(config: dict[str, Any], record: Record) -> Any:
    import redis

    from keyedpool.contrib.redis import RedisConsumer, RedisMessage

    host, port = config["url"].split(":")

    def handle(message: RedisMessage) -> None:
        record(str(message.key), int(message.get("seq") or -1), message.redelivered)

    return RedisConsumer(
        redis.Redis(host=host, port=int(port)),
        config["stream"],
        handle,
        group=config["group"],
        max_workers=config.get("workers", 8),
        **_sharding(config),
    )


def _nats(config: dict[str, Any], record: Record) -> Any:
    from keyedpool.contrib.nats import NatsConsumer, NatsMessage

    def handle(message: NatsMessage) -> None:
        record(str(message.key), int(message.data), message.redelivered)

    return NatsConsumer(
        f"nats://{config['url']}",
        config["stream"],
        handle,
        max_workers=config.get("workers", 8),
        ack_wait=config.get("ack_wait", 30.0),
        **_sharding(config),
    )


def say(line: str) -> None:
    """Print one stdout line with a single write(): lines from threads never interleave."""
    os.write(sys.stdout.fileno(), f"{line}\n".encode())


def _load(spec: str) -> Callable[[dict[str, Any], Record], Any]:
    path, _, name = spec.rpartition(":")
    module_spec = importlib.util.spec_from_file_location("_consumer_factory", path)
    assert module_spec is not None and module_spec.loader is not None, spec
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    factory: Callable[[dict[str, Any], Record], Any] = getattr(module, name)
    return factory


def main() -> None:
    config: dict[str, Any] = json.loads(sys.argv[1])
    # The tests send SIGABRT to a process that does not stop in time: every thread's stack.
    faulthandler.enable(all_threads=True)
    pid = os.getpid()
    log_fd = os.open(config["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    cost = float(config.get("cost", 0.0))
    stall_after = int(config.get("stall_after", 0))
    progress = int(config.get("progress", 100))
    lock = threading.Lock()
    handled = 0
    never = threading.Event()

    def record(key: str, seq: int, redelivered: bool) -> None:
        nonlocal handled
        if stall_after and handled >= stall_after:
            never.wait()  # hold this worker until the test kills the process
        if cost:
            time.sleep(cost)
        os.write(log_fd, f"{pid} {key} {seq} {int(redelivered)}\n".encode())
        with lock:
            handled += 1
            if progress == 1:
                say(f"handled {handled} {key} {seq}")
            elif handled % progress == 0:
                say(f"handled {handled}")

    broker = config["broker"]
    factory = {"redis": _redis, "nats": _nats}.get(broker) or _load(broker)
    consumer = factory(config, record)
    signal.signal(signal.SIGTERM, lambda *_: consumer.stop(config.get("drain_timeout", 30.0)))
    thread = threading.Thread(target=consumer.run, name="consumer")
    thread.start()
    say("ready")
    thread.join()
    stats = consumer.stats()
    say("stats " + json.dumps(dataclasses.asdict(stats)))
    say("stopped")
    os.close(log_fd)


if __name__ == "__main__":
    main()
