"""publish_batch for Kafka: per-partition record batches, per-message outcomes, kept order.

How a batch travels:

- Each message gets its key from the key template, the gateway message id, MQTT topic and
  attributes as headers, and a partition from the producer's partitioner (murmur2 of the
  key, as the Java client; keyless messages of one call share one partition).
- Per partition, messages go into the producer's own record batches (``create_batch`` /
  ``send_batch``, at most ``kafka_batch_size`` bytes each), one batch in flight at a time:
  Kafka allows one in-flight request per partition anyway, and waiting lets a failure stop
  that partition before anything behind it is written, which keeps per-key order.
  Partitions are sent concurrently.
- A message larger than ``kafka_max_request_size`` is rejected before sending. When the
  broker refuses a whole batch for a record-level reason (too large for the topic's
  max.message.bytes, invalid), its messages are re-sent one by one so that only the guilty
  one is rejected (MessageRejected with the broker's reason) and the rest flow.
- Unreachable broker: results carry UplinkUnavailable from the first batch that could not be
  delivered within ``kafka_delivery_timeout``. The producer keeps retrying what it already
  holds (the idempotent producer never duplicates those); when the forwarder publishes the
  same message id again, it joins that pending send instead of sending a second copy.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka import errors as ke
from aiokafka.partitioner import murmur2
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.structs import TopicPartition

from gateway.errors import MessageRejected, QueueError, UplinkUnavailable
from gateway.message import ATTR_MESSAGE_ID, QueueMessage
from gateway.queue.interface import PublishResult
from gateway.uplinks.kafka.errors import BACKEND, RECORD_REJECTED, translate
from gateway.uplinks.kafka.keys import KeyTemplate

log = logging.getLogger("gateway.uplinks.kafka")

#: message ids whose send outlived its publish_batch call, remembered this many
MAX_ORPHANS = 200_000

Headers = list[tuple[str, bytes]]

#: the producer cannot continue with its current producer id
_FATAL = (ke.OutOfOrderSequenceNumber, ke.ProducerFenced, ke.InvalidProducerEpoch,
          ke.UnknownProducerId)


@dataclass(slots=True)
class Record:
    index: int
    message: QueueMessage
    key: bytes | None
    headers: Headers


def record_headers(msg: QueueMessage) -> Headers:
    headers: Headers = [(ATTR_MESSAGE_ID, msg.id.encode())]
    headers.extend((k, v.encode("utf-8")) for k, v in msg.attributes.items() if k != ATTR_MESSAGE_ID)
    return headers


@lru_cache(maxsize=65536)
def partition_for_key(key: bytes, partitions: tuple[int, ...]) -> int:
    index: int = (murmur2(key) & 0x7FFFFFFF) % len(partitions)
    return partitions[index]


class _Unavailable(Exception):
    """Internal: stop this partition, the rest of it is UplinkUnavailable."""

    def __init__(self, error: UplinkUnavailable) -> None:
        self.error = error


class Publisher:
    def __init__(self, producer: AIOKafkaProducer, key: KeyTemplate, *,
                 max_request_size: int, delivery_timeout: float, metadata_timeout: float,
                 create_topic: Callable[[str], Awaitable[object]] | None = None) -> None:
        self.producer = producer
        self.key = key
        self.max_request_size = max_request_size
        #: bodies shorter than this cannot reach max_request_size with sane keys and headers
        self._quick_limit = max_request_size // 2 - 64 * 1024
        self.delivery_timeout = delivery_timeout
        self.metadata_timeout = metadata_timeout
        self.create_topic = create_topic
        self._orphans: OrderedDict[tuple[str, str], asyncio.Future[Any]] = OrderedDict()
        #: topics this producer has published to (created when create_topic is set)
        self.topics: set[str] = set()
        #: the producer lost its idempotence state and must be replaced
        self.broken = False

    async def ensure_topic(self, topic: str) -> None:
        """Create ``topic`` once per connection when allowed; a refusal is not fatal here
        (no CREATE permission is common): the metadata wait that follows decides."""
        if topic in self.topics:
            return
        if self.create_topic is not None:
            try:
                await self.create_topic(topic)
            except UplinkUnavailable:
                raise
            except QueueError as exc:
                log.info("kafka: could not create topic %r (%s); assuming it exists", topic, exc)
        self.topics.add(topic)

    def forget_topic(self, topic: str) -> None:
        """Stop tracking a deleted topic, so metadata refreshes do not auto-create it again."""
        self.topics.discard(topic)
        self.producer.client.set_topics(sorted(self.topics))

    async def publish_batch(self, topic: str, messages: Sequence[QueueMessage]) -> list[PublishResult]:
        deadline = time.monotonic() + self.delivery_timeout
        results: list[PublishResult | None] = [None] * len(messages)
        try:
            partitions = await self._partitions(topic)
        except QueueError as exc:
            return [PublishResult(m.id, exc) for m in messages]
        joined: list[tuple[int, asyncio.Future[Any]]] = []
        by_partition: dict[int, list[Record]] = {}
        keyless = random.choice(partitions)
        orphans = self._orphans
        for index, msg in enumerate(messages):
            pending = self._join_orphan(topic, msg.id) if orphans else None
            if pending is not None:
                joined.append((index, pending))
                continue
            record = Record(index, msg, self.key.render(msg), record_headers(msg))
            rejected = self._oversized(record)
            if rejected is not None:
                results[index] = PublishResult(msg.id, rejected)
                continue
            part = keyless if record.key is None else partition_for_key(record.key, partitions)
            by_partition.setdefault(part, []).append(record)
        await asyncio.gather(
            self._await_joined(topic, joined, messages, results, deadline),
            *(self._send_partition(topic, p, recs, results, deadline)
              for p, recs in by_partition.items()))
        return [r if r is not None else PublishResult(m.id, UplinkUnavailable(
            "not attempted", backend=BACKEND)) for r, m in zip(results, messages, strict=True)]

    async def _partitions(self, topic: str) -> tuple[int, ...]:
        await self.ensure_topic(topic)
        try:
            found = await asyncio.wait_for(self.producer.partitions_for(topic), self.metadata_timeout)
        except (TimeoutError, ke.UnknownTopicOrPartitionError):
            raise UplinkUnavailable(f"no metadata for topic {topic!r} within "
                                    f"{self.metadata_timeout:g}s (does it exist?)",
                                    backend=BACKEND, code="UNKNOWN_TOPIC_OR_PARTITION") from None
        except (ke.KafkaError, OSError) as exc:
            raise translate(exc, f"metadata for {topic!r}") from exc
        return tuple(sorted(found))

    def _oversized(self, record: Record) -> MessageRejected | None:
        body = record.message.body
        if len(body) < self._quick_limit and len(record.headers) < 64:
            return None  # far below the limit whatever the key and headers add
        size = DefaultRecordBatchBuilder.estimate_size_in_bytes(
            record.key, body, record.headers)
        if size <= self.max_request_size:
            return None
        return MessageRejected(f"message is {size} bytes with key and headers, more than "
                               f"kafka_max_request_size ({self.max_request_size})",
                               backend=BACKEND, code="MESSAGE_TOO_LARGE")

    # -- sending ------------------------------------------------------------------------

    async def _send_partition(self, topic: str, partition: int, records: list[Record],
                              results: list[PublishResult | None], deadline: float) -> None:
        position = 0
        upcoming: tuple[Any, int] | None = self._build(records, 0)
        try:
            while upcoming is not None:
                batch, count = upcoming
                group = records[position:position + count]
                after = position + count
                prebuilt: list[tuple[Any, int]] = []

                def build_next(after: int = after, prebuilt: list[tuple[Any, int]] = prebuilt) -> None:
                    if after < len(records):  # while the broker works on this batch
                        prebuilt.append(self._build(records, after))

                error = await self._deliver(topic, partition, batch, group, deadline,
                                            meanwhile=build_next)
                if error is not None and isinstance(error, RECORD_REJECTED) and count > 1:
                    await self._isolate(topic, partition, group, results, deadline)
                elif error is not None:
                    failed = translate(error, f"produce to {topic}[{partition}]")
                    if isinstance(failed, UplinkUnavailable):
                        raise _Unavailable(failed)
                    for rec in group:
                        results[rec.index] = PublishResult(rec.message.id, failed)
                    if failed.retryable:  # keep order: nothing behind a retryable failure
                        _fill(records[after:], results, failed)
                        return
                else:
                    for rec in group:
                        results[rec.index] = PublishResult(rec.message.id)
                position = after
                upcoming = prebuilt[0] if prebuilt else (
                    self._build(records, after) if after < len(records) else None)
        except _Unavailable as stop:
            _fill([r for r in records if results[r.index] is None], results, stop.error)

    def _build(self, records: list[Record], start: int) -> tuple[Any, int]:
        batch = self.producer.create_batch()
        count = 0
        for rec in records[start:]:
            if batch.append(key=rec.key, value=rec.message.body, timestamp=None,
                            headers=rec.headers) is None:
                break
            count += 1
        # an empty batch always takes its first record, however big, so count >= 1
        return batch, count

    async def _deliver(self, topic: str, partition: int, batch: Any, group: list[Record],
                       deadline: float, *, meanwhile: Callable[[], None] | None = None,
                       ) -> BaseException | None:
        """Send one batch and wait for the broker (running ``meanwhile`` once it is queued).
        Returns the failure; raises _Unavailable."""
        remaining = deadline - time.monotonic()
        try:
            future = await asyncio.wait_for(
                self.producer.send_batch(batch, topic, partition=partition), max(remaining, 0.001))
        except TimeoutError:
            raise _Unavailable(UplinkUnavailable(
                f"producer buffer for {topic}[{partition}] did not drain within "
                f"{self.delivery_timeout:g}s", backend=BACKEND)) from None
        except (ke.KafkaError, OSError) as exc:
            return exc
        if meanwhile is not None:
            meanwhile()
        done, _ = await asyncio.wait({future}, timeout=max(deadline - time.monotonic(), 0))
        if not done:
            for rec in group:
                self._orphan(topic, rec.message.id, future)
            raise _Unavailable(UplinkUnavailable(
                f"no acknowledgement from the broker for {topic}[{partition}] within "
                f"{self.delivery_timeout:g}s", backend=BACKEND))
        failure: BaseException | None = future.exception()
        if failure is not None:
            self._after_failed_batch(topic, partition, len(group), failure)
        return failure

    def _after_failed_batch(self, topic: str, partition: int, count: int,
                            failure: BaseException) -> None:
        """Keep the idempotent producer's sequence numbers in step with the broker.

        aiokafka numbers a batch when it leaves and never takes the numbers back when the
        broker refuses the batch for good; the broker, which did not store it, then sees a
        gap and answers OUT_OF_ORDER_SEQUENCE_NUMBER to everything after it (the Java
        client re-sequences in this case). The refused batch was the last one sent to this
        partition (one at a time), so stepping back by its size is exact."""
        if isinstance(failure, _FATAL):
            self.broken = True
            return
        txn = getattr(self.producer, "_txn_manager", None)
        if txn is not None and not getattr(failure, "retriable", False):
            txn.increment_sequence_number(TopicPartition(topic, partition), -count)

    async def _isolate(self, topic: str, partition: int, group: list[Record],
                       results: list[PublishResult | None], deadline: float) -> None:
        """The broker refused a batch: send its messages one by one to find the culprit."""
        log.info("broker refused a batch of %d for %s[%d]; re-sending one by one",
                 len(group), topic, partition)
        for rec in group:
            batch = self.producer.create_batch()
            batch.append(key=rec.key, value=rec.message.body, timestamp=None, headers=rec.headers)
            error = await self._deliver(topic, partition, batch, [rec], deadline)
            if error is None:
                results[rec.index] = PublishResult(rec.message.id)
                continue
            failed = translate(error, f"produce to {topic}[{partition}]")
            if isinstance(failed, UplinkUnavailable):
                raise _Unavailable(failed)
            results[rec.index] = PublishResult(rec.message.id, failed)

    # -- sends that outlived their call ---------------------------------------------------

    def _orphan(self, topic: str, message_id: str, future: asyncio.Future[Any]) -> None:
        self._orphans[(topic, message_id)] = future
        while len(self._orphans) > MAX_ORPHANS:
            _, old = self._orphans.popitem(last=False)
            _consume_exception(old)

    def _join_orphan(self, topic: str, message_id: str) -> asyncio.Future[Any] | None:
        future = self._orphans.pop((topic, message_id), None)
        if future is None:
            return None
        if future.done() and (future.cancelled() or future.exception() is not None):
            return None  # that attempt failed: send again
        return future

    async def _await_joined(self, topic: str, joined: list[tuple[int, asyncio.Future[Any]]],
                            messages: Sequence[QueueMessage],
                            results: list[PublishResult | None], deadline: float) -> None:
        if not joined:
            return
        futures = {f for _, f in joined}
        await asyncio.wait(futures, timeout=max(deadline - time.monotonic(), 0))
        for index, future in joined:
            msg_id = messages[index].id
            if not future.done():
                self._orphan(topic, msg_id, future)
                results[index] = PublishResult(msg_id, UplinkUnavailable(
                    "still waiting for the broker's acknowledgement", backend=BACKEND))
            elif future.cancelled() or future.exception() is not None:
                exc = future.exception() if not future.cancelled() else TimeoutError()
                results[index] = PublishResult(msg_id, translate(exc or TimeoutError()))
            else:
                results[index] = PublishResult(msg_id)

    def forget_pending(self) -> int:
        """Drop the memory of unfinished sends (the producer is being replaced)."""
        count = len(self._orphans)
        for future in self._orphans.values():
            _consume_exception(future)
        self._orphans.clear()
        return count


def _fill(records: list[Record], results: list[PublishResult | None], error: QueueError) -> None:
    for rec in records:
        if results[rec.index] is None:
            results[rec.index] = PublishResult(rec.message.id, error)


def _consume_exception(future: asyncio.Future[Any]) -> None:
    if future.done() and not future.cancelled():
        future.exception()  # mark retrieved: no "exception was never retrieved" noise
    else:
        future.add_done_callback(lambda f: None if f.cancelled() else f.exception())
