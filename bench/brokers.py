"""Messages per second through Redis Streams and NATS JetStream: keyedpool consumers vs a plain one.

Run ``python -m bench.brokers`` from the repository (``redis-server`` and
``nats-server`` must be installed; each is started on 127.0.0.1, on a free port,
in a temp dir, and stopped after). For each broker it publishes ``--messages``
messages over ``--keys`` keys into ``--shards`` shards, then measures:

* **plain, serial**: one process that fetches and handles the messages one
  after another, acking each (what a consumer without a pool does);
* **keyedpool, 1 process** and **keyedpool, 2 processes**: ``RedisConsumer`` /
  ``NatsConsumer`` with ``--workers`` workers each, in order per key.

Every handler simulates ``--cost-ms`` of blocking I/O (``time.sleep``). The rate
is messages / (last handler end - first handler start) over all the processes
of a run (``time.monotonic`` is one clock for all processes on Linux). It prints
a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


# -- servers ---------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def _server(cmd: Callable[[int, Path], list[str]]) -> Iterator[int]:
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="keyedpool-bench-") as tmp:
        proc = subprocess.Popen(
            cmd(port, Path(tmp)), cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            deadline = time.monotonic() + 20
            while True:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                        break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"{cmd(port, Path(tmp))[0]} did not start") from None
                    time.sleep(0.02)
            yield port
        finally:
            proc.terminate()
            proc.wait(10)


def _redis_cmd(port: int, tmp: Path) -> list[str]:
    return [str(shutil.which("redis-server")), "--port", str(port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--dir", str(tmp)]


def _nats_cmd(port: int, tmp: Path) -> list[str]:
    return [str(shutil.which("nats-server")), "-js", "-a", "127.0.0.1", "-p", str(port),
            "-sd", str(tmp / "js")]


# -- publishing ------------------------------------------------------------------


def _keys(count: int) -> list[str]:
    return [f"order-{i}" for i in range(count)]


def _publish_redis(port: int, stream: str, messages: int, keys: list[str], shards: int) -> None:
    import redis

    from keyedpool.contrib.redis import publish

    client = redis.Redis(port=port)
    with client.pipeline(transaction=False) as pipe:
        for i in range(messages):
            publish(pipe, stream, keys[i % len(keys)], {"seq": i // len(keys)}, shards=shards)
            if i % 1000 == 999:
                pipe.execute()
        pipe.execute()
    client.close()


def _publish_nats(port: int, stream: str, messages: int, keys: list[str], shards: int) -> None:
    import nats

    from keyedpool.contrib.nats import KEY_HEADER, shard_of, shard_subject

    async def main() -> None:
        nc = await nats.connect(f"nats://127.0.0.1:{port}")
        js = nc.jetstream()
        await js.add_stream(name=stream, subjects=[f"{stream}.*"])
        for i in range(messages):
            key = keys[i % len(keys)]
            await nc.publish(shard_subject(stream, shard_of(key, shards)),
                             str(i // len(keys)).encode(), headers={KEY_HEADER: key})
        await nc.flush()
        while (await js.stream_info(stream)).state.messages < messages:
            await asyncio.sleep(0.01)
        await nc.close()

    asyncio.run(main())


# -- one consumer process (python -m bench.brokers --consume CONFIG) --------------


class _Meter:
    """Counts handled messages; sets ``done`` at the expected count."""

    def __init__(self, expected: int, cost: float) -> None:
        self.expected = expected
        self.cost = cost
        self.lock = threading.Lock()
        self.count = 0
        self.first: float | None = None
        self.last = 0.0
        self.done = threading.Event()

    def handle(self) -> None:
        if self.first is None:
            self.first = time.monotonic()
        time.sleep(self.cost)
        with self.lock:
            self.count += 1
            if self.count >= self.expected:
                self.last = time.monotonic()
                self.done.set()


def _consume(config: dict[str, Any]) -> dict[str, Any]:
    meter = _Meter(config["expected"], config["cost"])
    broker, mode, port = config["broker"], config["mode"], config["port"]
    if broker == "redis" and mode == "keyed":
        import redis

        from keyedpool.contrib.redis import RedisConsumer

        consumer: Any = RedisConsumer(
            redis.Redis(port=port), config["stream"], lambda m: meter.handle(), group="bench",
            shards=config["shards"], process_index=config["index"],
            process_count=config["processes"], max_workers=config["workers"],
        )
        consumer.start()
        meter.done.wait()
        consumer.stop()
    elif broker == "nats" and mode == "keyed":
        from keyedpool.contrib.nats import NatsConsumer

        consumer = NatsConsumer(
            f"nats://127.0.0.1:{port}", config["stream"], lambda m: meter.handle(),
            shards=config["shards"], process_index=config["index"],
            process_count=config["processes"], max_workers=config["workers"],
        )
        consumer.start()
        meter.done.wait()
        consumer.stop()
    elif broker == "redis":
        _serial_redis(config, meter)
    else:
        _serial_nats(config, meter)
    return {"first": meter.first, "last": meter.last, "handled": meter.count}


def _serial_redis(config: dict[str, Any], meter: _Meter) -> None:
    import redis

    from keyedpool.contrib.redis import shard_stream

    client = redis.Redis(port=config["port"])
    streams = [shard_stream(config["stream"], s) for s in range(config["shards"])]
    for name in streams:
        client.xgroup_create(name, "plain", id="0", mkstream=True)
    while not meter.done.is_set():
        reply: Any = client.xreadgroup(
            "plain", "c", dict.fromkeys(streams, ">"), count=100, block=100
        )
        for stream, entries in reply or []:
            for entry_id, _fields in entries:
                meter.handle()
                client.xack(stream, "plain", entry_id)


def _serial_nats(config: dict[str, Any], meter: _Meter) -> None:
    import nats
    import nats.errors

    async def main() -> None:
        nc = await nats.connect(f"nats://127.0.0.1:{config['port']}")
        js = nc.jetstream()
        sub = await js.pull_subscribe(f"{config['stream']}.*", durable="plain",
                                      stream=config["stream"])
        while not meter.done.is_set():
            try:
                msgs = await sub.fetch(100, timeout=1)
            except nats.errors.TimeoutError:
                continue
            for msg in msgs:
                meter.handle()
                await msg.ack()
        await nc.close()

    asyncio.run(main())


# -- runs ------------------------------------------------------------------------


def _run(
    broker: str, mode: str, processes: int, port: int, args: argparse.Namespace
) -> float:
    from keyedpool.contrib.consumer import shard_of

    stream = f"BENCH_{uuid.uuid4().hex[:8]}"
    keys = _keys(args.keys)
    publish = _publish_redis if broker == "redis" else _publish_nats
    publish(port, stream, args.messages, keys, args.shards)
    per_key = [args.messages // len(keys) + (1 if i < args.messages % len(keys) else 0)
               for i in range(len(keys))]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    procs = []
    for index in range(processes):
        expected = sum(
            n
            for key, n in zip(keys, per_key, strict=True)
            if shard_of(key, args.shards) % processes == index
        )
        config = {
            "broker": broker, "mode": mode, "port": port, "stream": stream,
            "shards": args.shards, "index": index, "processes": processes,
            "workers": args.workers, "cost": args.cost_ms / 1000, "expected": expected,
        }
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "bench.brokers", "--consume", json.dumps(config)],
            cwd=REPO, env=env, stdout=subprocess.PIPE, text=True,
        ))
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"consumer process failed ({proc.returncode})")
        results.append(json.loads(out.strip().splitlines()[-1]))
    handled = sum(int(r["handled"]) for r in results)
    span = max(float(r["last"]) for r in results) - min(float(r["first"]) for r in results)
    return handled / span


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--consume", help=argparse.SUPPRESS)
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--keys", type=int, default=100)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--workers", type=int, default=32)
    parser.add_argument("--cost-ms", type=float, default=1.0,
                        help="simulated blocking I/O per message")
    parser.add_argument("--brokers", default="redis,nats")
    args = parser.parse_args()
    if args.consume:
        print(json.dumps(_consume(json.loads(args.consume))), flush=True)
        return

    print(f"{args.messages} messages over {args.keys} keys, {args.shards} shards, "
          f"{args.cost_ms} ms of blocking I/O per message, {args.workers} workers per process, "
          f"{os.cpu_count()} CPUs\n")
    print("| broker | consumer | processes | msg/s | vs plain |")
    print("|---|---|---:|---:|---:|")
    servers = {"redis": ("redis-server", _redis_cmd), "nats": ("nats-server", _nats_cmd)}
    for broker in args.brokers.split(","):
        binary, cmd = servers[broker]
        if shutil.which(binary) is None:
            print(f"| {broker} | ({binary} not installed: skipped) | | | |")
            continue
        with _server(cmd) as port:
            plain = _run(broker, "plain", 1, port, args)
            print(f"| {broker} | plain, serial | 1 | {plain:,.0f} | 1.0x |", flush=True)
            for processes in (1, 2):
                rate = _run(broker, "keyed", processes, port, args)
                print(f"| {broker} | keyedpool | {processes} | {rate:,.0f} | "
                      f"{rate / plain:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
