"""What the keyedpool message consumers share: options, counters, errors and the engine.

The broker adapters (:mod:`keyedpool.contrib.redis`, :mod:`keyedpool.contrib.nats`
and :mod:`keyedpool.contrib.kafka`) only fetch, ack and keep their shards;
everything else is the same for all three and lives here:

* **Order per key, across failures.** Messages of one key are handled one at a
  time, in the order the broker delivered them. A failed handler is retried as
  the :class:`~keyedpool.RetryPolicy` says: it waits for its backoff in the
  pool without holding a worker, and its key's later messages wait behind it
  while every worker runs other keys.
* **Ack after success.** A message is acked (committed) only once its handler
  returned, or once it was written to the dead-letter destination (its
  attempts ran out, its handler raised :class:`DeadLetter`, or its key could
  not be read).
* **At least once.** A message handled but not acked yet when a process dies
  is handled again by the next reader: make handlers idempotent.
* **Backpressure.** At most ``max_in_flight`` messages are fetched and not
  settled; a consumer never drops a message because a shared pool is full (it
  waits for room, whatever the pool's ``on_full`` says).
* **Graceful stop.** :meth:`Consumer.stop` stops fetching, waits for the
  messages in flight, acks them and closes. The consumer's thread is not a
  daemon and is stopped this way at interpreter exit.

>>> from keyedpool.contrib.consumer import ConsumerOptions
>>> ConsumerOptions(batch=0)
Traceback (most recent call last):
    ...
ValueError: batch must be greater than 0
"""

from keyedpool import RetryPolicy

from ._engine import Consumer, ShardedConsumer
from ._handling import ConsumerStats, DeadLetter, KeyedHandling, shard_of
from ._options import ConsumerArgs, ConsumerOptions, Default, ShardedConsumerArgs

__all__ = [
    "Consumer",
    "ConsumerArgs",
    "ConsumerOptions",
    "ConsumerStats",
    "DeadLetter",
    "Default",
    "KeyedHandling",
    "RetryPolicy",
    "ShardedConsumer",
    "ShardedConsumerArgs",
    "shard_of",
]
