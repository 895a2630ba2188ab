"""publish_batch for Event Hubs: EventDataBatch objects filled to the hub's limit, one outcome
per message, kept order per partition key.

- Every message becomes one event: the body byte for byte, application properties
  ``openhqm_message_id`` (also the AMQP message-id), ``mqtt_topic`` and every other attribute;
  an attribute ``content_type`` also sets the AMQP content-type.
- Messages are grouped by their partition key (``azure_eventhubs_partition_key``, default the
  MQTT topic), keeping their order within a key. Each group is sent in batches created
  with that key (``create_batch(partition_key=...)``): a batch takes events until ``add``
  raises ValueError (the hub's maximum message size, which the SDK learns from the link),
  then it is sent and a new one started. Groups are sent one after the other.
- An event that does not fit even into an empty batch is larger than the hub accepts: that
  message alone gets MessageRejected (the forwarder dead-letters it), the rest flow. When
  the service refuses a whole batch for a message-level reason (message-size-exceeded), its
  events are re-sent one per batch so that only the guilty one is rejected.
- The hub unreachable (or refusing the credentials): that batch and everything not yet sent
  get UplinkUnavailable and nothing more is attempted. Another retryable failure fails its
  batch and the rest of its key (order), and the other keys go on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from azure.eventhub import EventData, EventDataBatch
from azure.eventhub.aio import EventHubProducerClient

from gateway.errors import (
    MessageRejected,
    PermanentError,
    QueueError,
    RetryableError,
    UplinkUnavailable,
)
from gateway.message import ATTR_CONTENT_TYPE, ATTR_MESSAGE_ID, QueueMessage
from gateway.queue.interface import PublishResult
from gateway.queue.keys import KeyTemplate
from gateway.uplinks.eventhubs.errors import BACKEND, translate


def make_event(body: bytes, properties: dict[str, str], message_id: str) -> EventData:
    event = EventData(body)
    props: dict[str | bytes, Any] = {k: v for k, v in properties.items()}
    event.properties = props
    event.message_id = message_id
    content_type = properties.get(ATTR_CONTENT_TYPE)
    if content_type:
        event.content_type = content_type
    return event


def event_properties(msg: QueueMessage) -> dict[str, str]:
    properties = {ATTR_MESSAGE_ID: msg.id}
    properties.update((k, v) for k, v in msg.attributes.items() if k != ATTR_MESSAGE_ID)
    return properties


def partition_key(template: KeyTemplate, msg: QueueMessage) -> str | None:
    key = template.render(msg)
    return key.decode("utf-8") if key is not None else None


class _Stop(Exception):
    """Internal: the hub is unreachable; everything not yet sent gets ``error``."""

    def __init__(self, error: UplinkUnavailable) -> None:
        self.error = error


def _unavailable(error: QueueError) -> UplinkUnavailable:
    """A whole batch failed for a reason that is not the messages' (unreachable, refused
    credentials): never dead-letter messages for it."""
    if isinstance(error, UplinkUnavailable):
        return error
    return UplinkUnavailable(str(error).removeprefix(f"[{BACKEND}] "), backend=BACKEND,
                             code=error.code)


class Publisher:
    def __init__(self, key: KeyTemplate, *, send_timeout: float) -> None:
        self.key = key
        self.send_timeout = send_timeout

    async def publish_batch(self, producer: EventHubProducerClient, hub: str,
                            messages: Sequence[QueueMessage]) -> list[PublishResult]:
        groups: dict[str | None, list[int]] = {}
        for index, msg in enumerate(messages):
            groups.setdefault(partition_key(self.key, msg), []).append(index)
        send = _Round(producer, hub, messages, self.send_timeout)
        error = UplinkUnavailable("no outcome", backend=BACKEND)
        try:
            for key, indexes in groups.items():
                await send.group(key, indexes)
        except _Stop as stop:
            error = stop.error
        return [r if r is not None else PublishResult(m.id, error)
                for r, m in zip(send.results, messages, strict=True)]


class _Round:
    """One publish_batch call: the messages, their results so far, how to send."""

    def __init__(self, producer: EventHubProducerClient, hub: str,
                 messages: Sequence[QueueMessage], send_timeout: float) -> None:
        self.producer = producer
        self.hub = hub
        self.messages = messages
        self.send_timeout = send_timeout
        self.results: list[PublishResult | None] = [None] * len(messages)

    def fail(self, indexes: list[int], error: QueueError) -> None:
        for index in indexes:
            if self.results[index] is None:
                self.results[index] = PublishResult(self.messages[index].id, error)

    def add(self, batch: EventDataBatch, index: int) -> bool:
        msg = self.messages[index]
        try:
            batch.add(make_event(msg.body, event_properties(msg), msg.id))
        except ValueError:
            return False
        return True

    async def group(self, key: str | None, indexes: list[int]) -> None:
        """Send one partition key's messages in order, in as few batches as fit."""
        batch: EventDataBatch | None = None
        members: list[int] = []
        for position, index in enumerate(indexes):
            if batch is None:
                batch = await self.create(key, indexes[position:])
                if batch is None:
                    return
            if self.add(batch, index):
                members.append(index)
                continue
            fresh = await self.create(key, indexes[position:])
            if fresh is None:  # ``create`` failed the rest with its error; members share it
                failed = self.results[index]
                self.fail(members, failed.error if failed is not None and failed.error
                          else RetryableError("not sent", backend=BACKEND))
                return
            if self.add(fresh, index):  # it fits a batch of its own: this one is full
                if members:
                    failure = await self.send(key, batch, members)
                    if failure is not None:  # keep order: nothing behind a failed batch
                        self.fail(members + indexes[position:], failure)
                        return
                batch, members = fresh, [index]
                continue
            msg = self.messages[index]
            limit = getattr(batch, "max_size_in_bytes", "?")
            self.results[index] = PublishResult(msg.id, MessageRejected(
                f"the event ({len(msg.body)} body bytes with its properties) is larger than "
                f"the hub {self.hub!r} accepts ({limit} bytes)", backend=BACKEND,
                code="message-size-exceeded"))
        if batch is not None and members:
            failure = await self.send(key, batch, members)
            if failure is not None:
                self.fail(members, failure)

    async def create(self, key: str | None, rest: list[int]) -> EventDataBatch | None:
        """A new batch for ``key``; None (``rest`` failed) on a retryable error."""
        try:
            async with asyncio.timeout(self.send_timeout):
                return await self.producer.create_batch(partition_key=key)
        except Exception as exc:
            error = translate(exc, f"open a batch for {self.hub}")
        if isinstance(error, UplinkUnavailable | PermanentError):
            raise _Stop(_unavailable(error)) from None
        self.fail(rest, error)
        return None

    async def send(self, key: str | None, batch: EventDataBatch,
                   members: list[int]) -> QueueError | None:
        """Send one batch and fill the results of its members; or return the error that
        failed the whole batch for a retryable reason."""
        try:
            async with asyncio.timeout(self.send_timeout):
                await self.producer.send_batch(batch, timeout=self.send_timeout)
        except Exception as exc:
            error = translate(exc, f"send to {self.hub}")
        else:
            for index in members:
                self.results[index] = PublishResult(self.messages[index].id)
            return None
        if isinstance(error, MessageRejected):
            if len(members) == 1:
                self.fail(members, error)
                return None
            for index in members:  # one per batch: only the guilty one is rejected
                single = await self.create(key, [index])
                if single is None:
                    continue
                if not self.add(single, index):
                    self.fail([index], error)
                    continue
                failure = await self.send(key, single, [index])
                if failure is not None:
                    self.fail([index], failure)
            return None
        if isinstance(error, UplinkUnavailable | PermanentError):
            stop = _unavailable(error)
            self.fail(members, stop)
            raise _Stop(stop)
        return error
