"""``type: azure_eventhubs``: Azure Event Hubs through azure-eventhub (async, pure-Python AMQP).

How MessageQueueInterface maps onto Event Hubs (queue name = hub name; the gateway's
``request_queue_name`` maps to ``azure_eventhubs_name``):

- publish/publish_batch: ``publisher``. One long-lived EventHubProducerClient per hub.
- consume: ``receiver`` reads every partition of the hub as ``azure_eventhubs_consumer_group``.
  An event stays in flight until acknowledge or reject. acknowledge = checkpoint: a
  partition's checkpoint (a file in gateway.state_dir, or Blob Storage) moves only up to
  the event before its lowest one still in flight, so a restart redelivers every event not
  settled (at-least-once) and out-of-order acknowledgements never skip one.
- reject(requeue=True) sends a copy to the end of the hub (same partition key, properties,
  ``openhqm_retry_count`` + 1) and settles the original; reject(requeue=False) sends it to
  the hub ``azure_eventhubs_dlq_name`` (``openhqm_dlq_reason``, ``openhqm_dlq_source``) or,
  without one, appends it to the local dead-letter file, then settles the original.
- get_queue_depth = per partition, last enqueued sequence number - checkpoint (events
  handed out but not settled are still backlog).
- create/delete/purge: NotSupportedError (hubs are managed in Azure). No delayed delivery
  and no priorities (a non-zero priority travels as the property ``openhqm_priority``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Self

from azure.eventhub import EventData
from azure.eventhub.aio import EventHubProducerClient

from gateway.config import Config
from gateway.errors import MessageRejected, NotSupportedError, QueueError, UplinkUnavailable
from gateway.message import ATTR_MESSAGE_ID, Body, QueueMessage
from gateway.queue.inflight import InFlight
from gateway.queue.interface import Handler, MessageQueueInterface, PublishResult
from gateway.queue.keys import KeyTemplate
from gateway.uplinks.eventhubs.blobstore import BlobCheckpoints, blob_module, open_blob_store
from gateway.uplinks.eventhubs.checkpoints import (
    CheckpointFile,
    Checkpoints,
    FileCheckpoints,
    PartitionState,
    append_dead_letter,
)
from gateway.uplinks.eventhubs.clients import ClientFactory, entity_path, load_credential, namespace_of
from gateway.uplinks.eventhubs.errors import BACKEND, translate
from gateway.uplinks.eventhubs.publisher import Publisher, make_event
from gateway.uplinks.eventhubs.receiver import Receiver, event_body, text
from gateway.uplinks.eventhubs.settings import EventHubsSettings, check_settings

log = logging.getLogger("gateway.uplinks.eventhubs")

PROP_RETRY_COUNT = "openhqm_retry_count"
PROP_LAST_ERROR = "openhqm_last_error"
PROP_PRIORITY = "openhqm_priority"
PROP_DLQ_REASON = "openhqm_dlq_reason"
PROP_DLQ_SOURCE = "openhqm_dlq_source"
_REWRITTEN = {ATTR_MESSAGE_ID, PROP_RETRY_COUNT, PROP_LAST_ERROR}
_WHY = "Event Hubs are managed in Azure, not by clients"
#: the SDK logs every AMQP state change at INFO; the gateway shows its warnings only
_SDK_LOGGER = "azure.eventhub"


@dataclass(eq=False)
class _Hub:
    name: str
    store: Checkpoints
    partitions: dict[str, PartitionState] = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def partition(self, partition_id: str) -> PartitionState:
        state = self.partitions.get(partition_id)
        if state is None:
            state = self.partitions[partition_id] = PartitionState.from_checkpoint(
                self.store.checkpoints.get(partition_id))
        return state


@dataclass(eq=False, slots=True)
class _InFlight:
    hub: _Hub
    partition_id: str
    sequence_number: int
    partition_key: str | None
    message: QueueMessage


class EventHubsQueue(MessageQueueInterface):
    backend_name = BACKEND
    #: the service acknowledges a message once it stored it
    durable_acks = True

    def __init__(self, settings: EventHubsSettings, *, state_dir: str,
                 request_queue_name: str = "openhqm-requests") -> None:
        check_settings(settings)
        sdk_log = logging.getLogger(_SDK_LOGGER)
        if sdk_log.level == logging.NOTSET:
            sdk_log.setLevel(logging.WARNING)
        self.settings = settings
        self.state_dir = state_dir
        self.request_queue_name = request_queue_name
        self.default_hub = (settings.azure_eventhubs_name or entity_path(settings)
                            or request_queue_name)
        self.namespace = namespace_of(settings)
        self.key = KeyTemplate.parse(settings.azure_eventhubs_partition_key,
                                     "queue.azure_eventhubs_partition_key")
        self.clients = ClientFactory(settings, load_credential(settings))
        if settings.azure_eventhubs_checkpoint_store:
            blob_module()  # a missing package fails `config check`, not the first ack
        self.publisher = Publisher(self.key, send_timeout=settings.azure_eventhubs_send_timeout)
        self._connected = False
        self._producers: dict[str, EventHubProducerClient] = {}
        self._hubs: dict[str, _Hub] = {}
        self._in_flight: InFlight[_InFlight] = InFlight(
            lambda r: (r.hub.name, r.partition_id, r.sequence_number))
        self._receivers: set[Receiver] = set()
        self._blob_store: Any = None
        self._closing: set[asyncio.Task[None]] = set()
        #: partition ids per hub (a hub's partition count never shrinks)
        self._partition_ids: dict[str, list[str]] = {}

    @classmethod
    def from_config(cls, config: Config) -> Self:
        settings: EventHubsSettings = config.queue.settings
        return cls(settings, state_dir=config.gateway.state_dir,
                   request_queue_name=config.queue.request_queue_name)

    def hub_for(self, queue_name: str) -> str:
        return self.default_hub if queue_name == self.request_queue_name else queue_name

    # -- connections --------------------------------------------------------------------

    @property
    def target(self) -> str:
        return f"{self.namespace}/{self.default_hub}"

    async def connect(self) -> None:
        if self._connected:
            return
        self._connected = True
        if self.settings.azure_eventhubs_checkpoint_store:
            self._blob_store = open_blob_store(self.settings.azure_eventhubs_checkpoint_store,
                                               self.settings.azure_eventhubs_checkpoint_container)
        try:
            props = await self._management(self.default_hub, "get_eventhub_properties")
        except BaseException:
            await self.disconnect()
            raise
        self._partition_ids[self.default_hub] = [str(p) for p in props["partition_ids"]]

    async def disconnect(self) -> None:
        self._connected = False
        receivers, self._receivers = list(self._receivers), set()
        for receiver in receivers:
            self._close_later(receiver)
        closing, self._closing = list(self._closing), set()
        await asyncio.gather(*closing, return_exceptions=True)
        self._in_flight.clear()
        self._hubs.clear()  # positions restart from the checkpoints: in flight is redelivered
        blob_store, self._blob_store = self._blob_store, None
        if blob_store is not None:
            try:
                async with asyncio.timeout(self.settings.azure_eventhubs_request_timeout):
                    await blob_store.close()
            except Exception as exc:
                log.debug("eventhubs: closing the checkpoint store: %s", exc)
        producers, self._producers = list(self._producers.values()), {}
        for producer in producers:
            try:
                async with asyncio.timeout(self.settings.azure_eventhubs_request_timeout):
                    await producer.close()
            except Exception as exc:
                log.debug("eventhubs: closing a producer: %s", exc)

    def _close_later(self, receiver: Receiver) -> None:
        """Close a consumer client in the background: the SDK's close takes a second or
        more (it polls its partition tasks once a second); disconnect() waits for it."""
        task = asyncio.create_task(receiver.close(self.settings.azure_eventhubs_request_timeout))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _partitions(self, hub: str) -> list[str]:
        ids = self._partition_ids.get(hub)
        if ids is None:
            found = await self._management(hub, "get_partition_ids")
            ids = self._partition_ids[hub] = [str(p) for p in found]
        return ids

    def _producer(self, hub: str) -> EventHubProducerClient:
        if not self._connected:
            raise UplinkUnavailable("not connected", backend=BACKEND)
        producer = self._producers.get(hub)
        if producer is None:
            producer = self._producers[hub] = self.clients.producer(hub)
        return producer

    async def _management(self, hub: str, call: str, *args: Any) -> Any:
        producer = self._producer(hub)
        try:
            async with asyncio.timeout(self.settings.azure_eventhubs_request_timeout):
                return await getattr(producer, call)(*args)
        except Exception as exc:
            raise translate(exc, f"{call} {hub}") from exc

    async def health_check(self) -> bool:
        if not self._connected:
            return False
        try:
            await self._management(self.default_hub, "get_eventhub_properties")
        except QueueError as exc:
            log.debug("eventhubs health check failed: %s", exc)
            return False
        return True

    # -- publishing ---------------------------------------------------------------------

    async def publish(self, queue_name: str, message: Body, priority: int = 0,
                      attributes: dict[str, str] | None = None, delay_seconds: float = 0, *,
                      message_id: str | None = None) -> str:
        if delay_seconds > 0:
            raise NotSupportedError(BACKEND, "delay_seconds", "Event Hubs has no delayed delivery")
        return await self._publish_one(queue_name, message, priority, attributes,
                                       message_id=message_id, priority_attribute=PROP_PRIORITY)

    async def publish_batch(self, queue_name: str,
                            messages: Sequence[QueueMessage]) -> list[PublishResult]:
        if not messages:
            return []
        hub = self.hub_for(queue_name)
        try:
            producer = self._producer(hub)
        except QueueError as exc:
            return [PublishResult(m.id, exc) for m in messages]
        return await self.publisher.publish_batch(producer, hub, messages)

    async def _send_copy(self, hub: str, partition_key: str | None, body: bytes,
                         properties: dict[str, str], message_id: str) -> None:
        producer = self._producer(hub)
        try:
            async with asyncio.timeout(self.settings.azure_eventhubs_send_timeout):
                batch = await producer.create_batch(partition_key=partition_key)
                try:
                    batch.add(make_event(body, properties, message_id))
                except ValueError:
                    raise MessageRejected(f"the event is larger than the hub {hub!r} accepts",
                                          backend=BACKEND) from None
                await producer.send_batch(batch)
        except Exception as exc:
            raise translate(exc, f"send a copy to {hub}") from exc

    # -- consuming ----------------------------------------------------------------------

    async def _hub(self, hub: str) -> _Hub:
        state = self._hubs.get(hub)
        if state is None:
            group = self.settings.azure_eventhubs_consumer_group
            store: Checkpoints
            if self._blob_store is not None:
                store = BlobCheckpoints(self._blob_store,
                                        self.settings.azure_eventhubs_checkpoint_container,
                                        self.namespace, hub, group)
            else:
                store = FileCheckpoints(CheckpointFile.for_hub(self.state_dir, self.namespace,
                                                               hub, group))
            await store.load()
            state = self._hubs.setdefault(hub, _Hub(hub, store))
        return state

    async def consume(self, queue_name: str, handler: Handler, batch_size: int = 10,
                      wait_time_seconds: float = 1.0) -> None:
        name = self.hub_for(queue_name)
        partition_ids = await self._partitions(name)
        hub = await self._hub(name)
        starts = {pid: hub.partition(pid).start() for pid in partition_ids}
        receiver = Receiver(self.clients.consumer(name), name, starts, batch_size=batch_size,
                            prefetch=self.settings.azure_eventhubs_prefetch)
        self._receivers.add(receiver)
        receiver.start()
        try:
            while True:
                try:
                    async with asyncio.timeout(max(wait_time_seconds, 0.05)):
                        partition_id, events = await receiver.batches.get()
                except TimeoutError:
                    died = receiver.failed()
                    if died is not None:
                        raise translate(died, f"receive from {name}") from died
                    if not self._connected:
                        raise UplinkUnavailable("not connected", backend=BACKEND) from None
                    continue
                for event in events:
                    msg = self._track(hub, partition_id, event)
                    if msg is not None:
                        await self._handle(handler, msg)
        finally:
            if receiver in self._receivers:
                self._receivers.discard(receiver)
                self._close_later(receiver)

    async def _handle(self, handler: Handler, msg: QueueMessage) -> None:
        try:
            await handler(msg)
        except Exception as exc:
            log.warning("eventhubs: handler failed for %s: %s; requeueing", msg.id, exc)
            await self.reject(msg.id, requeue=True,
                              reason=f"handler raised {type(exc).__name__}: {exc}")

    def _track(self, hub: _Hub, partition_id: str, event: EventData) -> QueueMessage | None:
        sequence = event.sequence_number
        state = hub.partition(partition_id)
        start = state.start()
        if sequence is None or (start is not None and sequence < start):
            return None  # handed out before (the SDK re-read after an error)
        attrs = {text(k): text(v) for k, v in (event.properties or {}).items()}
        retries = attrs.pop(PROP_RETRY_COUNT, "0")
        attrs.pop(PROP_LAST_ERROR, None)
        msg_id = attrs.pop(ATTR_MESSAGE_ID, "") or f"{hub.name}-{partition_id}-{sequence}"
        enqueued = event.enqueued_time
        msg = QueueMessage(msg_id, event_body(event), attrs,
                           enqueued.timestamp() if isinstance(enqueued, datetime) else 0.0,
                           int(retries) if retries.isdigit() else 0, event)
        state.delivered(sequence, str(event.offset or ""))
        key = event.partition_key
        self._in_flight.track(msg_id, _InFlight(
            hub, partition_id, sequence, text(key) if key is not None else None, msg))
        return msg

    async def acknowledge(self, message_id: str) -> bool:
        return await self._in_flight.settle(message_id, self._settle)

    async def reject(self, message_id: str, requeue: bool = True, reason: str = "") -> bool:
        async def move(entry: _InFlight) -> bool:
            await self._move(entry, requeue, reason)
            return await self._settle(entry)
        return await self._in_flight.settle(message_id, move)

    async def _move(self, entry: _InFlight, requeue: bool, reason: str) -> None:
        msg = entry.message
        props = {k: v for k, v in msg.attributes.items() if k not in _REWRITTEN}
        props[ATTR_MESSAGE_ID] = msg.id
        if requeue:
            props[PROP_RETRY_COUNT] = str(msg.retry_count + 1)
            if reason:
                props[PROP_LAST_ERROR] = reason
            await self._send_copy(entry.hub.name, entry.partition_key, msg.body, props, msg.id)
            return
        source = f"{entry.hub.name}/{entry.partition_id}/{entry.sequence_number}"
        props[PROP_RETRY_COUNT] = str(msg.retry_count)
        props[PROP_DLQ_REASON] = reason
        props[PROP_DLQ_SOURCE] = source
        dlq = self.settings.azure_eventhubs_dlq_name
        if dlq:
            await self._send_copy(dlq, entry.partition_key, msg.body, props, msg.id)
            return
        record = {"message_id": msg.id, "hub": entry.hub.name, "namespace": self.namespace,
                  "partition_id": entry.partition_id, "sequence_number": entry.sequence_number,
                  "reason": reason, "properties": props}
        await asyncio.to_thread(append_dead_letter, self.state_dir, record, msg.body)

    async def _settle(self, entry: _InFlight) -> bool:
        """Done with this event: move the partition's checkpoint as far as it may go."""
        state = entry.hub.partition(entry.partition_id)
        state.settle(entry.sequence_number)
        async with entry.hub.lock:
            checkpoint = state.pending()
            if checkpoint is not None:
                await entry.hub.store.save(entry.partition_id, checkpoint)
                state.checkpointed(checkpoint)
        return True

    # -- depth and administration -------------------------------------------------------

    async def get_queue_depth(self, queue_name: str) -> int:
        name = self.hub_for(queue_name)
        partition_ids = await self._partitions(name)
        hub = await self._hub(name)
        answers = await asyncio.gather(
            *(self._management(name, "get_partition_properties", pid) for pid in partition_ids))
        depth = 0
        for pid, props in zip(partition_ids, answers, strict=True):
            if props.get("is_empty"):
                continue
            last = int(props["last_enqueued_sequence_number"])
            begin = int(props["beginning_sequence_number"])
            done = hub.partition(pid).offsets.committed
            depth += max(0, last + 1 - max(begin, done))
        return depth

    async def create_queue(self, queue_name: str, **kwargs: Any) -> bool:
        raise NotSupportedError(BACKEND, "create_queue", _WHY)

    async def delete_queue(self, queue_name: str) -> bool:
        raise NotSupportedError(BACKEND, "delete_queue", _WHY)

    async def purge_queue(self, queue_name: str) -> int:
        raise NotSupportedError(BACKEND, "purge_queue", _WHY)

