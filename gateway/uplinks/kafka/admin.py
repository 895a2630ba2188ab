"""Kafka's admin API for the uplink, on librdkafka's AdminClient (confluent-kafka).

Every call is asynchronous: librdkafka answers admin requests on its own background thread
and resolves a concurrent future, which is awaited here (``asyncio.wrap_future``); the one
blocking call (``list_topics``) runs on a worker thread. Errors leave as the gateway's error
tree (``translate_rd``); transient ones (coordinator loading, leader moving) are retried up
to ``request_timeout``.

Partitions are plain ``(topic, partition)`` tuples outside this module.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Future
from typing import Any, TypeVar

from confluent_kafka import ConsumerGroupTopicPartitions, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient
from confluent_kafka.admin._listoffsets import OffsetSpec
from confluent_kafka.cimpl import NewTopic

from gateway.uplinks.kafka.errors import translate_rd

R = TypeVar("R")
Partition = tuple[str, int]

#: librdkafka's "no offset" (OFFSET_INVALID)
NO_OFFSET = -1001


def _error(exc: BaseException) -> KafkaError | None:
    if isinstance(exc, KafkaException) and exc.args and isinstance(exc.args[0], KafkaError):
        return exc.args[0]
    return None


class Admin:
    def __init__(self, config: dict[str, Any], request_timeout: float) -> None:
        self.client = AdminClient(config)
        self.request_timeout = request_timeout

    def _timeouts(self) -> dict[str, float]:
        return {"request_timeout": self.request_timeout}

    async def _call(self, start: Callable[[], Awaitable[R]], what: str) -> R:
        """Run ``start`` and retry Kafka's transient errors until request_timeout."""
        delay = 0.05
        deadline = time.monotonic() + self.request_timeout
        while True:
            try:
                return await start()
            except KafkaException as exc:
                err = _error(exc)
                if err is None or not err.retriable() or time.monotonic() + delay > deadline:
                    raise translate_rd(err if err is not None else exc, what) from None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    @staticmethod
    async def _wait(future: Future[Any]) -> Any:
        return await asyncio.wrap_future(future)

    @classmethod
    async def _done_unless(cls, future: Future[Any], code: int) -> bool:
        """True when the operation succeeded, False when it failed with ``code`` (the topic
        already exists / did not exist); any other failure is raised."""
        try:
            await cls._wait(future)
        except KafkaException as exc:
            err = _error(exc)
            if err is not None and err.code() == code:
                return False
            raise
        return True

    async def describe_cluster(self, timeout: float | None = None) -> None:
        """One round trip to the cluster; raises UplinkUnavailable when there is none."""
        limit = self.request_timeout if timeout is None else timeout
        try:
            await self._wait(self.client.describe_cluster(request_timeout=limit))
        except KafkaException as exc:
            raise translate_rd(_error(exc) or exc, "describe cluster") from None

    async def partitions(self, topic: str) -> list[Partition]:
        """The topic's partitions; [] when it does not exist. Asks for all topics on purpose:
        a metadata request naming a missing topic makes an auto-creating broker create it."""
        async def ask() -> list[Partition]:
            meta = await asyncio.to_thread(self.client.list_topics, None, self.request_timeout)
            entry = meta.topics.get(topic)
            if entry is None or entry.error is not None or not entry.partitions:
                return []
            return sorted((topic, p) for p in entry.partitions)
        return await self._call(ask, "list topics")

    async def watermarks(self, partitions: Sequence[Partition]) -> tuple[dict[Partition, int],
                                                                          dict[Partition, int]]:
        """Per partition: the log start offset and the high watermark."""
        async def offsets(spec: OffsetSpec) -> dict[Partition, int]:
            futures = self.client.list_offsets(
                {TopicPartition(t, p): spec for t, p in partitions}, **self._timeouts())
            return {(tp.topic, tp.partition): int((await self._wait(f)).offset)
                    for tp, f in futures.items()}

        async def both() -> tuple[dict[Partition, int], dict[Partition, int]]:
            earliest = OffsetSpec.earliest()  # type: ignore[no-untyped-call]
            latest = OffsetSpec.latest()  # type: ignore[no-untyped-call]
            return await offsets(earliest), await offsets(latest)
        return await self._call(both, "list offsets")

    async def committed(self, group: str, partitions: Sequence[Partition]) -> dict[Partition, int]:
        """The group's committed offsets; partitions without one are left out."""
        async def ask() -> dict[Partition, int]:
            request = ConsumerGroupTopicPartitions(
                group, [TopicPartition(t, p) for t, p in partitions])
            futures = self.client.list_consumer_group_offsets([request], **self._timeouts())
            result = await self._wait(futures[group])
            return {(tp.topic, tp.partition): int(tp.offset) for tp in result.topic_partitions
                    if tp.error is None and tp.offset >= 0}
        return await self._call(ask, "consumer group offsets")

    async def create_topic(self, topic: str, partitions: int, replication_factor: int,
                           config: dict[str, str]) -> bool:
        """False when it already exists."""
        async def ask() -> bool:
            futures = self.client.create_topics(
                [NewTopic(topic, num_partitions=partitions,
                          replication_factor=replication_factor, config=config)],
                operation_timeout=self.request_timeout, **self._timeouts())
            return await self._done_unless(futures[topic], KafkaError.TOPIC_ALREADY_EXISTS)
        return await self._call(ask, f"create topic {topic}")

    async def delete_topic(self, topic: str) -> bool:
        """False when there was no such topic."""
        async def ask() -> bool:
            futures = self.client.delete_topics([topic], operation_timeout=self.request_timeout,
                                                **self._timeouts())
            return await self._done_unless(futures[topic], KafkaError.UNKNOWN_TOPIC_OR_PART)
        return await self._call(ask, f"delete topic {topic}")

    async def delete_records(self, before: dict[Partition, int]) -> None:
        """Delete every record below the given offset of each partition."""
        async def ask() -> None:
            futures = self.client.delete_records(
                [TopicPartition(t, p, offset) for (t, p), offset in before.items()],
                operation_timeout=self.request_timeout, **self._timeouts())
            for future in futures.values():
                await self._wait(future)
        await self._call(ask, "delete records")
