"""consume() for Kafka on librdkafka's Consumer (confluent-kafka): one consumer per topic in
the configured group, auto-commit off, offsets committed past settled records only.

Threads: librdkafka's Consumer is blocking, so each subscription owns one worker thread and
consume and close run there, in order; a commit runs on a worker thread of its own (the
consumer's may sit in a fetch, and librdkafka takes commits from any thread). Rebalance
callbacks run on that thread inside consume/close; the bookkeeping they touch (offsets, the
uplink's in-flight records) belongs to the event loop, so they hand it to the loop and wait
for it (the loop is free then: it is awaiting that very call).

Invariants:

- The committed offset of a partition only moves past records that were settled
  (``PartitionOffsets``), so a crash or a rebalance redelivers anything not acknowledged.
- On revoke, the settled prefix is committed before the partition is given up; on assign,
  partitions that went to another member are forgotten (it redelivers what was in flight
  here), and a partition that stays resumes after what was already handed out.
- A fetched record is never dropped by a cancelled caller: it waits in ``backlog`` (and a
  fetch still running on the consumer's thread is picked up by the next call) until it is
  handed out, or a rebalance makes the consumer fetch it again.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from gateway.errors import QueueError, UplinkUnavailable
from gateway.queue.offsets import PartitionOffsets
from gateway.uplinks.kafka.errors import BACKEND, translate_rd

log = logging.getLogger("gateway.uplinks.kafka")
R = TypeVar("R")
Partition = tuple[str, int]

#: a commit that lost to a rebalance: the next owner redelivers, nothing to raise
_LOST_TO_REBALANCE = frozenset({
    KafkaError.REBALANCE_IN_PROGRESS, KafkaError.ILLEGAL_GENERATION,
    KafkaError.UNKNOWN_MEMBER_ID, KafkaError._STATE, KafkaError._NO_OFFSET,
})
#: how long a rebalance callback waits for the event loop
_LOOP_WAIT = 30.0


@dataclass(eq=False)
class Subscription:
    topic: str
    consumer: Consumer
    loop: asyncio.AbstractEventLoop
    #: called on the event loop with the partitions another member now owns
    forget: Callable[[Subscription, list[Partition]], None]
    offsets: dict[Partition, PartitionOffsets] = field(default_factory=dict)
    assigned: set[Partition] = field(default_factory=set)
    commit_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    fetch_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    executor: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(
        1, thread_name_prefix="kafka-consumer"))
    #: fetched, not yet handed out
    backlog: deque[Message] = field(default_factory=deque)
    _fetching: asyncio.Future[list[Message]] | None = None
    closed: bool = False

    @classmethod
    def start(cls, topic: str, config: dict[str, Any],
              forget: Callable[[Subscription, list[Partition]], None]) -> Subscription:
        consumer = Consumer(config)  # KafkaException: the caller names the setting
        sub = cls(topic, consumer, asyncio.get_running_loop(), forget)
        consumer.subscribe([topic], on_assign=sub._on_assign, on_revoke=sub._on_revoke)
        return sub

    async def run(self, fn: Callable[..., R], *args: Any) -> R:
        return await self.loop.run_in_executor(self.executor, fn, *args)

    # -- fetching ---------------------------------------------------------------------------

    async def fill(self, max_records: int, timeout: float) -> None:
        """Fetch up to ``max_records`` records into ``backlog`` (none after ``timeout``)."""
        async with self.fetch_lock:
            if self.backlog:
                return
            try:
                if self._fetching is None:
                    if self.closed:
                        raise RuntimeError("closed")
                    self._fetching = self.loop.run_in_executor(
                        self.executor, self._consume_some, max_records, timeout)
                messages = await asyncio.shield(self._fetching)  # a cancelled caller leaves it
            except RuntimeError as exc:  # closed by disconnect() or delete_queue()
                raise UplinkUnavailable(f"the consumer of {self.topic} is closed ({exc})",
                                        backend=BACKEND) from None
            self._fetching = None
        error: KafkaError | None = None
        for message in messages:  # every good record is kept, whatever errors come with it
            err = message.error()
            if err is None:
                self.backlog.append(message)
            elif err.code() != KafkaError._PARTITION_EOF:
                error = error or err
        if error is not None:
            if not self.backlog:
                raise translate_rd(error, f"consume {self.topic}")
            log.warning("kafka: consume %s: %s (the records fetched with it are handed out)",
                        self.topic, error.str())

    def _consume_some(self, max_records: int, timeout: float) -> list[Message]:
        """On the consumer's thread: wait up to ``timeout`` for the first record, then take
        what is already fetched, up to ``max_records``. (librdkafka's ``consume(n, t)`` waits
        for all ``n`` or the whole ``t``: a trickle of records would each wait ``t``.)"""
        first = self.consumer.consume(1, timeout)
        if not first or max_records <= 1:
            return first
        return first + self.consumer.consume(max_records - 1, 0)

    def delivered(self, partition: Partition, offset: int) -> None:
        self.offsets.setdefault(partition, PartitionOffsets()).delivered(offset)

    # -- committing -------------------------------------------------------------------------

    async def commit(self, partition: Partition) -> None:
        """Commit past the settled prefix of ``partition`` (no-op when nothing moved)."""
        async with self.commit_lock:
            offsets = self.offsets.get(partition)
            position = offsets.committable() if offsets is not None else None
            if offsets is None or position is None or self.closed:
                return
            # not on the consumer's thread: that may sit in a fetch for wait_time_seconds, and
            # librdkafka takes a commit from any thread
            if await asyncio.to_thread(self._commit_now, [(partition, position)]):
                offsets.committed = position

    def _commit_now(self, positions: Sequence[tuple[Partition, int]]) -> bool:
        """On the consumer's thread. False when the commit lost to a rebalance."""
        try:
            self.consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in positions],
                                 asynchronous=False)
        except RuntimeError as exc:  # closed meanwhile: the next owner redelivers
            log.info("kafka: commit for %s skipped: %s", [p for p, _ in positions], exc)
            return False
        except KafkaException as exc:
            err = exc.args[0] if exc.args else None
            if isinstance(err, KafkaError) and err.code() in _LOST_TO_REBALANCE:
                log.info("kafka: commit for %s lost to a rebalance (%s); it may be redelivered",
                         [p for p, _ in positions], err.str())
                return False
            raise translate_rd(err if err is not None else exc, f"commit {self.topic}") from None
        return True

    # -- rebalances (on the consumer's thread) ----------------------------------------------

    def _on_loop(self, fn: Callable[[], R]) -> R | None:
        """Run ``fn`` on the event loop and wait for it; None when the loop is gone."""
        async def call() -> R:
            return fn()
        try:
            return asyncio.run_coroutine_threadsafe(call(), self.loop).result(_LOOP_WAIT)
        except (RuntimeError, TimeoutError) as exc:  # loop closed or stuck: commit nothing
            log.warning("kafka: rebalance bookkeeping skipped: %r", exc)
            return None

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        revoked = [(tp.topic, tp.partition) for tp in partitions]

        def settled() -> list[tuple[Partition, int]]:
            out = []
            for p in revoked:
                self.assigned.discard(p)
                offsets = self.offsets.get(p)
                position = offsets.committable() if offsets is not None else None
                if offsets is not None and position is not None:
                    out.append((p, position))
            return out

        positions = self._on_loop(settled) or []
        if positions:
            try:
                if self._commit_now(positions):
                    def note() -> None:
                        for p, position in positions:
                            if p in self.offsets:
                                self.offsets[p].committed = position
                    self._on_loop(note)
            except QueueError as exc:
                log.warning("kafka: commit on revoke failed: %s", exc)

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        assigned = {(tp.topic, tp.partition) for tp in partitions}

        def update() -> dict[Partition, int]:
            self.backlog.clear()  # fetched again from where each partition resumes
            gone = [p for p in self.offsets if p not in assigned]
            for p in gone:  # another member owns it now and will redeliver
                del self.offsets[p]
            if gone:
                self.forget(self, gone)
            self.assigned = set(assigned)
            return {p: o.next_offset for p, o in self.offsets.items() if o.next_offset >= 0}

        resume = self._on_loop(update) or {}
        for tp in partitions:  # still ours: skip what was already handed out
            position = resume.get((tp.topic, tp.partition))
            if position is not None:
                tp.offset = position
        consumer.assign(partitions)

    # -- closing ----------------------------------------------------------------------------

    async def close(self) -> None:
        if self.closed:
            return
        try:
            await self.run(self.consumer.close)
        except (KafkaException, RuntimeError) as exc:
            log.debug("kafka: consumer close: %s", exc)
        finally:
            self.closed = True
            self.executor.shutdown(wait=False)
