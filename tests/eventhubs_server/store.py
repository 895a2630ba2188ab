"""The event store of the test Event Hubs server: hubs, partitions, events, in memory.

Appends happen on the server's event-loop thread; tests read snapshots from their own
thread. One ``threading.Condition`` guards everything and wakes ``wait_for_events``;
receiver links of the loop subscribe per partition and are called after each append.
"""

from __future__ import annotations

import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class StoredEvent:
    hub: str
    partition_id: str
    sequence_number: int
    offset: int
    enqueued_time: datetime  # UTC, millisecond precision (what AMQP timestamps carry)
    body: bytes  # the data section(s) concatenated
    properties: dict[str, Any]  # application properties
    partition_key: str | None  # message annotation x-opt-partition-key
    message_id: Any
    content_type: str | None
    correlation_id: Any

    @property
    def enqueued_ms(self) -> int:
        return (self.enqueued_time - _EPOCH) // timedelta(milliseconds=1)


@dataclass(frozen=True)
class NewEvent:
    """What a producer sent, before the hub gives it a place."""

    body: bytes
    properties: dict[str, Any]
    partition_key: str | None
    message_id: Any
    content_type: str | None
    correlation_id: Any
    size: int  # encoded size, which advances the partition's byte offset


@dataclass
class Partition:
    partition_id: str
    events: list[StoredEvent] = field(default_factory=list)
    next_offset: int = 0
    listeners: set[Callable[[], None]] = field(default_factory=set)


@dataclass
class Hub:
    name: str
    partitions: dict[str, Partition]
    created_at: datetime
    round_robin: int = 0
    arrivals: list[StoredEvent] = field(default_factory=list)  # every partition, in order
    rejections: list[tuple[str, str]] = field(default_factory=list)


class Store:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._hubs: dict[str, Hub] = {}

    def add_hub(self, name: str, partitions: int) -> None:
        if partitions < 1 or "/" in name or not name:
            raise ValueError(f"bad hub {name!r} with {partitions} partitions")
        created = datetime.fromtimestamp(int(time.time()), UTC)
        with self._cond:
            if name in self._hubs:
                raise ValueError(f"hub {name!r} already exists")
            self._hubs[name] = Hub(name, {str(i): Partition(str(i)) for i in range(partitions)},
                                   created)

    def hub(self, name: str) -> Hub | None:
        with self._cond:
            return self._hubs.get(name)

    def partition(self, hub: str, partition_id: str) -> Partition | None:
        found = self.hub(hub)
        return found.partitions.get(partition_id) if found else None

    def choose_partition(self, hub: Hub, partition_key: str | None) -> str:
        ids = list(hub.partitions)
        if partition_key is not None:
            return ids[zlib.crc32(partition_key.encode("utf-8")) % len(ids)]
        with self._cond:
            chosen = ids[hub.round_robin % len(ids)]
            hub.round_robin += 1
        return chosen

    def reject_next_sends(self, hub: str, count: int, condition: str, description: str) -> None:
        with self._cond:
            self._require(hub).rejections.extend([(condition, description)] * count)

    def take_rejection(self, hub: Hub) -> tuple[str, str] | None:
        with self._cond:
            return hub.rejections.pop(0) if hub.rejections else None

    def append(self, hub: Hub, partition_id: str, new: list[NewEvent]) -> list[StoredEvent]:
        partition = hub.partitions[partition_id]
        now = datetime.fromtimestamp(int(time.time() * 1000) / 1000, UTC)
        stored = []
        with self._cond:
            for event in new:
                record = StoredEvent(
                    hub=hub.name, partition_id=partition_id,
                    sequence_number=len(partition.events), offset=partition.next_offset,
                    enqueued_time=now, body=event.body, properties=event.properties,
                    partition_key=event.partition_key, message_id=event.message_id,
                    content_type=event.content_type, correlation_id=event.correlation_id)
                partition.events.append(record)
                hub.arrivals.append(record)
                partition.next_offset += event.size
                stored.append(record)
            self._cond.notify_all()
            listeners = list(partition.listeners)
        for wake in listeners:
            wake()
        return stored

    def events(self, hub: str, partition_id: str | None = None) -> list[StoredEvent]:
        with self._cond:
            found = self._require(hub)
            if partition_id is not None:
                if partition_id not in found.partitions:
                    raise KeyError(f"hub {hub!r} has no partition {partition_id!r}")
                return list(found.partitions[partition_id].events)
            return list(found.arrivals)

    def wait_for_events(self, hub: str, count: int, timeout: float) -> list[StoredEvent]:
        deadline = time.monotonic() + timeout
        with self._cond:
            found = self._require(hub)
            while (have := len(found.arrivals)) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"hub {hub!r}: waited {timeout}s for {count} events, have {have}")
                self._cond.wait(left)
        return self.events(hub)

    def _require(self, hub: str) -> Hub:
        if hub not in self._hubs:
            raise KeyError(f"no hub {hub!r}")
        return self._hubs[hub]
