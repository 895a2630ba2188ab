"""Reading a topic back, as a Kafka consumer sees it, for tests and benchmarks: every record
of every partition from the beginning, without a consumer group (librdkafka's Consumer with
manual assignment, on a worker thread)."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition


@dataclass(frozen=True)
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]


def _consumer(bootstrap: str) -> Consumer:
    return Consumer({"bootstrap.servers": bootstrap, "group.id": f"read-{uuid.uuid4().hex}",
                     "enable.auto.commit": False, "enable.partition.eof": False})


def _partitions(consumer: Consumer, topic: str) -> list[int]:
    entry = consumer.list_topics(timeout=10).topics.get(topic)
    if entry is None or entry.error is not None:
        return []
    return sorted(entry.partitions)


def _ends(consumer: Consumer, topic: str, partitions: list[int]) -> dict[int, int]:
    return {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            for p in partitions}


def end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    """The high watermark of each partition of ``topic``."""
    consumer = _consumer(bootstrap)
    try:
        return _ends(consumer, topic, _partitions(consumer, topic))
    finally:
        consumer.close()


def read_topic(bootstrap: str, topic: str, timeout: float = 20.0) -> list[Record]:
    """Partition by partition, in offset order."""
    consumer = _consumer(bootstrap)
    try:
        partitions = _partitions(consumer, topic)
        end = _ends(consumer, topic, partitions)
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        out: dict[int, list[Record]] = {p: [] for p in partitions}
        position = {p: 0 for p in partitions}
        deadline = time.monotonic() + timeout
        while any(position[p] < end[p] for p in partitions):
            if time.monotonic() > deadline:
                raise TimeoutError(f"read {topic}: at {position}, high watermarks {end}")
            for m in consumer.consume(500, 0.5):
                err = m.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        continue
                    raise RuntimeError(f"read {topic}: {err}")
                p, offset = m.partition() or 0, m.offset() or 0
                headers = [(k, v if isinstance(v, bytes) else (v or "").encode())
                           for k, v in (m.headers() or [])]
                value = m.value()
                out[p].append(Record(topic, p, offset, m.key(),  # type: ignore[arg-type]
                                     value if isinstance(value, bytes) else b"", headers))
                position[p] = offset + 1
        return [r for p in partitions for r in out[p]]
    finally:
        consumer.close()


async def read_all(bootstrap: str, topic: str, timeout: float = 20.0) -> list[Record]:
    return await asyncio.to_thread(read_topic, bootstrap, topic, timeout)
