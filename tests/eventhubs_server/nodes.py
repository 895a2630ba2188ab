"""What the links of a connection attach to: ``$cbs``, ``$management``, hubs and partitions.

Incoming nodes take a client's deliveries and return ``None`` (Accepted) or an
``(error condition, description)`` pair (Rejected). Outgoing nodes hand the connection the
next encoded message to send and wake it when there is something new.
"""

from __future__ import annotations

import logging
import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tests.eventhubs_server.codec import Array, Described, Int, Symbol, Timestamp
from tests.eventhubs_server.frames import (
    AMQP_VALUE,
    DATA,
    PROPERTIES_FIELDS,
    FrameError,
    Message,
    decode_message,
    encode_message,
)
from tests.eventhubs_server.store import Hub, NewEvent, Partition, StoredEvent

if TYPE_CHECKING:
    from tests.eventhubs_server.connection import Connection
    from tests.eventhubs_server.server import ServerState

log = logging.getLogger("tests.eventhubs_server")

BATCH_FORMAT = 0x80013700
SELECTOR_FILTER = "apache.org:selector-filter:string"
SELECTOR_FILTER_CODE = 0x0000468C00000004
RUNTIME_METRIC = "com.microsoft:enable-receiver-runtime-metric"
EPOCH = "com.microsoft:epoch"
MAX_PENDING_REPLIES = 1024
_SELECTOR = re.compile(
    r"^\s*amqp\.annotation\.x-opt-(offset|sequence-number|enqueued-time)\s*(>=|>)\s*'([^']*)'\s*$")


@dataclass
class Delivery:
    payload: bytes
    message_format: int
    oversize: bool


def text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8")
    return str(value)


def _string_keys(mapping: dict[Any, Any] | None) -> dict[str, Any]:
    return {text(k) or "": v for k, v in (mapping or {}).items()}


class IncomingNode:
    address = ""

    async def deliver(self, delivery: Delivery) -> tuple[str, str] | None:
        raise NotImplementedError

    def offered_capabilities(self) -> Any:
        return None


class OutgoingNode:
    address = ""
    reply_address: str | None = None

    def bind(self, wake: Callable[[], None]) -> None:
        self._wake = wake
        wake()

    def next_payload(self, peek: bool = False) -> bytes | None:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def offered_capabilities(self) -> Any:
        return None


# ------------------------------------------------------------------ request / reply nodes


class ReplyNode(OutgoingNode):
    """The client's receiving end of ``$cbs`` or ``$management``: replies queue here."""

    def __init__(self, address: str, reply_address: str | None) -> None:
        self.address = address
        self.reply_address = reply_address
        self.pending: deque[bytes] = deque()

    def push(self, payload: bytes) -> None:
        self.pending.append(payload)
        self._wake()

    def next_payload(self, peek: bool = False) -> bytes | None:
        if not self.pending:
            return None
        return self.pending[0] if peek else self.pending.popleft()


class RequestNode(IncomingNode):
    def __init__(self, address: str, state: ServerState, connection: Connection) -> None:
        self.address = address
        self.state = state
        self.connection = connection

    async def deliver(self, delivery: Delivery) -> tuple[str, str] | None:
        request = decode_message(delivery.payload)
        props = {k: text(v) if isinstance(v, (bytes, str)) else v
                 for k, v in _string_keys(request.application_properties).items()}
        status, description, body = self.answer(request, props)
        reply = Message(
            properties=[None, None, request.property(4), None, None, request.property(0)]
            + [None] * (PROPERTIES_FIELDS - 6),
            # the SDK asks for "status-description" but its link reads "statusDescription"
            application_properties={"status-code": Int(status),
                                    "status-description": description,
                                    "statusDescription": description},
            body=[(AMQP_VALUE, body)])
        link = self.connection.find_reply_link(self.address, text(request.property(4)))
        if link is None:
            log.warning("%s request without a reply link", self.address)
            return ("amqp:precondition-failed", f"attach a receiver on {self.address} first")
        assert isinstance(link.node, ReplyNode)
        if len(link.node.pending) >= MAX_PENDING_REPLIES:  # the client grants no credit
            return ("amqp:resource-limit-exceeded",
                    f"{MAX_PENDING_REPLIES} replies wait for link credit on {self.address}")
        link.node.push(encode_message(reply))
        return None

    def answer(self, request: Message, props: dict[str, Any]) -> tuple[int, str, Any]:
        raise NotImplementedError


class CbsNode(RequestNode):
    def answer(self, request: Message, props: dict[str, Any]) -> tuple[int, str, Any]:
        if props.get("operation") != "put-token":
            log.warning("$cbs operation %r is not implemented", props.get("operation"))
            return 501, f"$cbs operation {props.get('operation')!r} is not implemented", None
        self.state.record_token(str(props.get("name")))
        return 202, "Accepted", None


class ManagementNode(RequestNode):
    def answer(self, request: Message, props: dict[str, Any]) -> tuple[int, str, Any]:
        operation, kind = props.get("operation"), props.get("type")
        if operation != "READ" or kind not in ("com.microsoft:eventhub", "com.microsoft:partition"):
            log.warning("$management %r of %r is not implemented", operation, kind)
            return 501, f"$management {operation!r} of {kind!r} is not implemented", None
        hub = self.state.store.hub(str(props.get("name")))
        if hub is None:
            return 404, f"no event hub {props.get('name')!r}", None
        if kind == "com.microsoft:eventhub":
            return 200, "OK", {
                "name": hub.name, "type": "com.microsoft:eventhub",
                "created_at": Timestamp(int(hub.created_at.timestamp() * 1000)),
                "partition_count": Int(len(hub.partitions)),
                "partition_ids": Array(hub.partitions)}
        partition = hub.partitions.get(str(props.get("partition")))
        if partition is None:
            return 404, f"hub {hub.name!r} has no partition {props.get('partition')!r}", None
        return 200, "OK", partition_info(hub, partition)


def partition_info(hub: Hub, partition: Partition) -> dict[str, Any]:
    last = partition.events[-1] if partition.events else None
    return {
        "name": hub.name, "type": "com.microsoft:partition", "partition": partition.partition_id,
        "begin_sequence_number": partition.events[0].sequence_number if last else 0,
        "last_enqueued_sequence_number": last.sequence_number if last else -1,
        "last_enqueued_offset": str(last.offset) if last else "-1",
        "last_enqueued_time_utc": Timestamp(last.enqueued_ms if last else 0),
        "is_partition_empty": last is None,
    }


# ------------------------------------------------------------------ event hub nodes


class HubSendNode(IncomingNode):
    def __init__(self, state: ServerState, hub: Hub, partition_id: str | None) -> None:
        self.state = state
        self.hub = hub
        self.partition_id = partition_id
        self.address = hub.name

    async def deliver(self, delivery: Delivery) -> tuple[str, str] | None:
        if delivery.oversize or len(delivery.payload) > self.state.max_message_size:
            return ("amqp:link:message-size-exceeded",
                    f"message larger than {self.state.max_message_size} bytes")
        rejection = self.state.store.take_rejection(self.hub)
        if rejection is not None:
            return rejection
        try:
            events, key = _events_of(delivery)
        except FrameError as exc:
            log.warning("rejecting a delivery to %s: %s", self.hub.name, exc)
            return exc.condition, exc.description
        partition_id = self.partition_id or self.state.store.choose_partition(self.hub, key)
        self.state.store.append(self.hub, partition_id, events)
        return None


def _events_of(delivery: Delivery) -> tuple[list[NewEvent], str | None]:
    outer = decode_message(delivery.payload)
    if delivery.message_format == BATCH_FORMAT:
        inner = [bytes(value) for code, value in outer.body if code == DATA]
        if len(inner) != len(outer.body):
            raise FrameError("amqp:not-implemented", "batch body sections must all be data")
        messages = [(decode_message(raw), len(raw)) for raw in inner]
    elif delivery.message_format == 0:
        messages = [(outer, len(delivery.payload))]
    else:
        raise FrameError("amqp:not-implemented",
                         f"message format 0x{delivery.message_format:x} is not implemented")
    events = [_new_event(message, size) for message, size in messages]
    key = next((e.partition_key for e in events if e.partition_key is not None), None)
    if key is None:
        key = text(_string_keys(outer.message_annotations).get("x-opt-partition-key"))
    return events, key


def _new_event(message: Message, size: int) -> NewEvent:
    annotations = _string_keys(message.message_annotations)
    return NewEvent(
        body=message.data(), properties=_string_keys(message.application_properties),
        partition_key=text(annotations.get("x-opt-partition-key")),
        message_id=message.property(0), content_type=text(message.property(6)),
        correlation_id=message.property(5), size=size)


class PartitionReceiveNode(OutgoingNode):
    """Streams a partition's events from a position, then new ones as they arrive."""

    def __init__(self, hub: Hub, partition: Partition, start: int, *, metric: bool,
                 owner: tuple[ServerState, str, int | None]) -> None:
        self.hub = hub
        self.partition = partition
        self.cursor = start
        self.metric = metric
        self.address = f"{hub.name}/Partitions/{partition.partition_id}"
        state, consumer_group, self.epoch = owner
        self._changed = state.receivers_changed
        with self._changed:
            self._owners = state.receivers.setdefault(
                (hub.name, consumer_group, partition.partition_id), [])

    def claim(self, evict: Callable[[], None]) -> bool:
        """Owner level (epoch) as Event Hubs has it: a receiver with an epoch takes the
        partition from receivers with a lower or equal epoch and from those without one;
        a receiver is refused while one with a higher epoch (or any epoch, if it has none)
        holds the partition."""
        with self._changed:
            epochs = [epoch for epoch, _, _ in self._owners if epoch is not None]
            if self.epoch is None and epochs:
                return False
            if self.epoch is not None and any(epoch > self.epoch for epoch in epochs):
                return False
            evicted = list(self._owners) if self.epoch is not None else []
            self._owners.append((self.epoch, evict, self))
            self._changed.notify_all()
        for owner in evicted:
            owner[1]()  # detaches it with amqp:link:stolen and closes it (leaves the list)
        return True

    def bind(self, wake: Callable[[], None]) -> None:
        self.partition.listeners.add(wake)
        super().bind(wake)

    def close(self) -> None:
        self.partition.listeners.discard(self._wake)
        with self._changed:
            self._owners[:] = [owner for owner in self._owners if owner[2] is not self]
            self._changed.notify_all()

    def offered_capabilities(self) -> Any:
        return Array([Symbol(RUNTIME_METRIC)]) if self.metric else None

    def next_payload(self, peek: bool = False) -> bytes | None:
        events = self.partition.events
        if self.cursor >= len(events):
            return None
        if peek:
            return b""
        event = events[self.cursor]
        self.cursor += 1
        return encode_message(self._message(event))

    def _message(self, event: StoredEvent) -> Message:
        annotations: dict[Any, Any] = {
            Symbol("x-opt-sequence-number"): event.sequence_number,
            Symbol("x-opt-offset"): str(event.offset),
            Symbol("x-opt-enqueued-time"): Timestamp(event.enqueued_ms)}
        if event.partition_key is not None:
            annotations[Symbol("x-opt-partition-key")] = event.partition_key
        properties = [event.message_id, None, None, None, None, event.correlation_id,
                      Symbol(event.content_type) if event.content_type else None]
        delivery_annotations = None
        if self.metric:
            info = partition_info(self.hub, self.partition)
            delivery_annotations = {Symbol(k): info[k] for k in (
                "last_enqueued_sequence_number", "last_enqueued_offset",
                "last_enqueued_time_utc")}
            delivery_annotations[Symbol("runtime_info_retrieval_time_utc")] = Timestamp(
                int(time.time() * 1000))
        return Message(
            delivery_annotations=delivery_annotations, message_annotations=annotations,
            properties=properties + [None] * (PROPERTIES_FIELDS - len(properties)),
            application_properties=dict(event.properties) or None,
            body=[(DATA, event.body)])


def start_position(partition: Partition, source: list[Any]) -> int:
    """The index of the first event the selector filter lets through (FrameError if bad)."""
    filters = source[7] or {}
    selector = None
    for key, value in filters.items():
        code = value.descriptor if isinstance(value, Described) else None
        if text(key) == SELECTOR_FILTER or code in (SELECTOR_FILTER, SELECTOR_FILTER_CODE):
            selector = text(value.value if isinstance(value, Described) else value)
        else:
            raise FrameError("amqp:not-implemented", f"filter {key!r} is not implemented")
    if selector is None:
        return 0
    match = _SELECTOR.match(selector)
    if match is None:
        raise FrameError("amqp:not-implemented", f"selector {selector!r} is not implemented")
    field_name, operator, raw = match.groups()
    events = partition.events
    if field_name == "offset" and raw == "@latest":
        return len(events)
    try:
        bound = int(raw)
    except ValueError as exc:
        raise FrameError("amqp:not-implemented", f"selector value {raw!r}") from exc
    for index, event in enumerate(events):
        value = {"offset": event.offset, "sequence-number": event.sequence_number,
                 "enqueued-time": event.enqueued_ms}[field_name]
        if value > bound or (operator == ">=" and value == bound):
            return index
    return len(events)


# ------------------------------------------------------------------ address resolution


def _path(address: str) -> list[str]:
    if "://" in address:
        address = address.split("://", 1)[1].partition("/")[2]
    return [part for part in address.strip("/").split("/") if part]


Resolved = tuple[IncomingNode | OutgoingNode | None, tuple[str, str] | None]


def resolve_node(state: ServerState, connection: Connection, address: str, *,
                 client_receives: bool, source: list[Any] | None, target: list[Any] | None,
                 properties: dict[Any, Any], desired: Any) -> Resolved:
    if address in ("$cbs", "$management"):
        if client_receives:
            return ReplyNode(address, text(target[0]) if target else None), None
        node_class = CbsNode if address == "$cbs" else ManagementNode
        return node_class(address, state, connection), None
    parts = _path(address)
    hub = state.store.hub(parts[0]) if parts else None
    if hub is None:
        return None, ("amqp:not-found", f"the messaging entity {address!r} could not be found")
    if not client_receives:
        if len(parts) == 1:
            return HubSendNode(state, hub, None), None
        if len(parts) == 3 and parts[1].lower() == "partitions" and parts[2] in hub.partitions:
            return HubSendNode(state, hub, parts[2]), None
        return None, ("amqp:not-found", f"no send node {address!r}")
    if (len(parts) != 5 or parts[1].lower() != "consumergroups"
            or parts[3].lower() != "partitions" or parts[4] not in hub.partitions):
        return None, ("amqp:not-found", f"no receive node {address!r}")
    if parts[2] not in state.consumer_groups:
        return None, ("amqp:not-found", f"no consumer group {parts[2]!r} on {hub.name!r}")
    partition = hub.partitions[parts[4]]
    try:
        start = start_position(partition, source or [None] * 11)
    except FrameError as exc:
        log.warning("refusing receiver %s: %s", address, exc)
        return None, (exc.condition, exc.description)
    wanted = [desired] if isinstance(desired, (str, bytes)) else list(desired or [])
    metric = RUNTIME_METRIC in [text(c) for c in wanted]
    epoch = _string_keys(properties).get(EPOCH)
    owner = (state, parts[2], None if epoch is None else int(epoch))
    return PartitionReceiveNode(hub, partition, start, metric=metric, owner=owner), None
