"""Plain records passed between the store and its callers."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import orjson

from gateway.message import ATTR_MESSAGE_ID, ATTR_MQTT_TOPIC, QueueMessage

if TYPE_CHECKING:
    from gateway.store.frames import Frame


@dataclass(slots=True)
class NewMessage:
    """A message offered to the store. ``topic`` is its order key (the MQTT topic)."""

    id: str
    topic: str
    payload: bytes
    attributes: dict[str, str] = field(default_factory=dict)
    received_at: float = 0.0
    priority: int = 0
    delay_seconds: float = 0.0
    #: set by the caller when the message must go straight to the dead-letter table
    dead_letter_reason: str | None = None
    #: the ingress's fast path: >= 0 = the record flags (QoS, retain, from MQTT, see
    #: ``gateway.store.frames``) and ``attributes`` holds only the others; -1 = read the
    #: MQTT attributes from ``attributes``
    mqtt_flags: int = -1


class AppendStatus(enum.Enum):
    STORED = "stored"
    DEAD_LETTERED = "dead_lettered"
    DROPPED = "dropped"
    #: no destination's topics match: acknowledged, not kept, counted as ``unrouted``
    UNROUTED = "unrouted"
    #: accepted by every uplink it is routed to before it was due to be written: never
    #: stored (write-avoidance, gateway/express.py)
    UPLINKED = "uplinked"


@dataclass(frozen=True, slots=True)
class AppendOutcome:
    status: AppendStatus
    reason: str = ""

    @property
    def durable(self) -> bool:
        """The message is durable: the store took responsibility for it (stored or
        dead-lettered), or its uplinks did (uplinked)."""
        return self.status is not AppendStatus.DROPPED


STORED = AppendOutcome(AppendStatus.STORED)
UNROUTED = AppendOutcome(AppendStatus.UNROUTED, "no uplink takes this topic")


#: the derived id: received milliseconds, the store's id prefix, the seq (docs/architecture.md)
_SEQ_MASK = (1 << 40) - 1


class _Ext:
    """What a stored message knows beyond a log record's hand-out: a detached message's own
    fields, and the caches of what was built on first use."""

    __slots__ = ("attempts", "order", "priority", "qattrs", "queue", "raw_attrs", "received",
                 "stamp")

    def __init__(self, order: int, received: float | None = None, queue: str = "",  # noqa: PLR0917
                 priority: int = 0, attempts: int = 0,
                 raw_attrs: dict[str, str] | None = None,
                 stamp: Mapping[str, str] | None = None) -> None:
        self.order = order
        self.received = received
        self.queue = queue
        self.priority = priority
        self.attempts = attempts
        #: the attributes as stored (no id; a log record's MQTT ones rebuilt from its flags)
        self.raw_attrs = raw_attrs
        #: the attributes as the uplink sees them (with the id and the MQTT topic), once built
        self.qattrs: dict[str, str] | None = None
        #: a detached message's store-wide attributes (a log record's are its frame's)
        self.stamp = stamp


class StoredMessage(QueueMessage):
    """A message handed out by the store, and the QueueMessage the uplink gets: one object, its
    fields built on first use (the store alone needs none of them, an uplink those it reads).

    ``seq`` is the handle its settlement names: the log seq of a record in the log, or
    ``-pid`` of a parked message. ``order`` is the log seq both kinds sort by. ``shape`` (see
    QueueMessage) is shared by the log records of a frame with the same topic and flags.
    A hand-out builds one per record with six fields set; the rest lives in ``_ext``, made
    when first needed."""

    __slots__ = ("_ext", "_frame", "_id", "_index", "payload", "seq", "topic", "until")
    seq: int
    topic: str  # a plain field here, a property in QueueMessage
    payload: bytes
    #: lease deadline (monotonic) while handed out; inf once given back
    until: float
    _frame: Frame | None
    _index: int
    _id: str | None
    _ext: _Ext | None

    # positional on purpose: built once per message on the drain's hot path
    def __init__(self, seq: int, topic: str, payload: bytes, frame: Frame, index: int,  # noqa: PLR0917
                 until: float) -> None:
        """A log record: ``index`` in ``frame``, leased until ``until`` (monotonic)."""
        self.seq = seq
        self.topic = topic
        self.payload = payload
        self._frame = frame
        self._index = index
        self.until = until
        self._id = self._ext = None

    @classmethod
    def detached(cls, seq: int, queue: str, topic: str, payload: bytes, received_at: float, *,
                 order: int, priority: int, attempts: int, msg_id: str,
                 attributes: dict[str, str],
                 stamp: Mapping[str, str] | None = None) -> StoredMessage:
        """A message that is not (or no longer) a log record: parked, or built to be."""
        msg = cls.__new__(cls)
        msg.seq, msg.topic, msg.payload = seq, topic, payload
        msg._frame, msg._index, msg._id, msg.until = None, 0, msg_id, 0.0
        msg._ext = _Ext(order, received_at, queue, priority, attempts, attributes, stamp)
        return msg

    @property
    def _x(self) -> _Ext:
        ext = self._ext
        if ext is None:
            ext = self._ext = _Ext(self.seq)
        return ext

    # -- the QueueMessage fields ------------------------------------------------------

    @property
    def id(self) -> str:
        if self._id is None:
            frame = self._frame
            assert frame is not None
            i = self._index
            self._id = frame.explicit_id(i) or (
                frame.id_head(i) + hex(self.seq & _SEQ_MASK)[2:].zfill(10))
        return self._id

    @id.setter
    def id(self, value: str) -> None:
        self._id = value

    @property
    def body(self) -> bytes:
        return self.payload

    @body.setter
    def body(self, value: bytes) -> None:
        self.payload = value

    @property
    def attributes(self) -> dict[str, str]:
        """Stored attributes plus the message id, the MQTT topic and the store's stamp (the
        gateway id, which wins over a stored attribute of that name), built once."""
        ext = self._x
        attrs = ext.qattrs
        if attrs is None:
            frame = self._frame
            template = frame.template(self._index) if frame is not None else None
            if template is not None:
                attrs = template.copy()  # the frame put the stamp in the shared template
            else:
                attrs = dict(self.stored_attributes)
                if self.topic:
                    attrs.setdefault(ATTR_MQTT_TOPIC, self.topic)
                stamp = frame.stamp if frame is not None else ext.stamp
                if stamp:
                    attrs.update(stamp)
            attrs.setdefault(ATTR_MESSAGE_ID, self.id)
            ext.qattrs = attrs
        return attrs

    @attributes.setter
    def attributes(self, value: dict[str, str]) -> None:
        self._x.qattrs = value

    @property
    def timestamp(self) -> float:
        return self.received_at

    @timestamp.setter
    def timestamp(self, value: float) -> None:
        self._x.received = value

    @property
    def retry_count(self) -> int:
        return self.attempts

    @retry_count.setter
    def retry_count(self, value: int) -> None:
        self._x.attempts = value

    @property
    def raw_message(self) -> StoredMessage:
        return self

    @raw_message.setter
    def raw_message(self, value: object) -> None:
        raise AttributeError("a stored message is its own raw message")

    @property
    def shape(self) -> object | None:
        frame = self._frame
        return frame.template(self._index) if frame is not None else None

    @shape.setter
    def shape(self, value: object | None) -> None:
        raise AttributeError("a stored message's shape comes from its frame")

    # -- the store's own ---------------------------------------------------------------

    @property
    def order(self) -> int:
        """The log seq this message sorts by (its own seq for a log record)."""
        ext = self._ext
        return self.seq if ext is None else ext.order

    @property
    def priority(self) -> int:
        ext = self._ext
        return 0 if ext is None else ext.priority

    @property
    def attempts(self) -> int:
        """Failed deliveries so far (a log record has none: a retried one is parked)."""
        ext = self._ext
        return 0 if ext is None else ext.attempts

    @property
    def queue(self) -> str:
        frame = self._frame
        return frame.queue if frame is not None else self._x.queue

    @property
    def received_at(self) -> float:
        ext = self._ext
        if ext is not None and ext.received is not None:
            return ext.received
        frame = self._frame
        assert frame is not None
        return frame.received_ms(self._index) / 1000

    @property
    def stored_attributes(self) -> dict[str, str]:
        """The attributes as stored: without the id (log records: MQTT ones from flags)."""
        ext = self._x
        if ext.raw_attrs is None:
            frame = self._frame
            ext.raw_attrs = frame.attributes(self._index) if frame is not None else {}
        return ext.raw_attrs

    @property
    def size(self) -> int:
        """The size counted against ``store.max_bytes``."""
        frame = self._frame
        if frame is not None:
            return frame.size(self._index)
        attrs = self._x.raw_attrs
        return len(self.payload) + len(self.topic) + (len(orjson.dumps(attrs)) if attrs else 0)

    def to_queue_message(self) -> QueueMessage:
        return self

    def __repr__(self) -> str:
        return (f"StoredMessage(seq={self.seq}, topic={self.topic!r}, "
                f"payload={self.payload[:40]!r}, attempts={self.attempts})")


def queue_messages(msgs: list[StoredMessage]) -> list[QueueMessage]:
    """The messages as the uplink takes them (each is its own QueueMessage)."""
    return list(msgs)


@dataclass(slots=True)
class Settlement:
    """What happened to a leased batch. Seqs not named anywhere keep their lease."""

    delivered: list[int] = field(default_factory=list)
    #: (seq, delay seconds, error text): failed, try again later; counts as an attempt
    retry: list[tuple[int, float, str]] = field(default_factory=list)
    #: (seq, reason): failed for good
    dead: list[tuple[int, str]] = field(default_factory=list)
    #: back to the queue at once, no attempt counted (uplink unavailable, shutdown)
    release: list[int] = field(default_factory=list)
    #: the destination (cursor) that leased the batch: the cursors of one queue share seqs,
    #: so with several uplinks a settlement must name it; '' = find it by handle
    cursor: str = ""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    dl_seq: int
    id: str
    queue: str
    topic: str
    payload: bytes
    attributes: dict[str, str]
    received_at: float
    failed_at: float
    attempts: int
    reason: str


@dataclass(frozen=True, slots=True)
class QueueStats:
    queue: str
    depth: int
    #: leased and not settled; None when read from the file by another process (leases
    #: live in the daemon's memory)
    in_flight: int | None
    oldest_age_seconds: float | None
    dead_letter: int
    delivered_total: int
    dropped: dict[str, int]
