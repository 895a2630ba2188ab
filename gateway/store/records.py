"""Plain records passed between the store and its callers."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

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


class AppendStatus(enum.Enum):
    STORED = "stored"
    DEAD_LETTERED = "dead_lettered"
    DROPPED = "dropped"


@dataclass(frozen=True, slots=True)
class AppendOutcome:
    status: AppendStatus
    reason: str = ""

    @property
    def durable(self) -> bool:
        """The store took responsibility for the message (stored or dead-lettered)."""
        return self.status is not AppendStatus.DROPPED


STORED = AppendOutcome(AppendStatus.STORED)


#: the derived id: received milliseconds, the store's id prefix, the seq (docs/architecture.md)
_SEQ_MASK = (1 << 40) - 1


def derive_id(received_ms: int, prefix: str, seq: int) -> str:
    return f"{received_ms & 0xFFFF_FFFF_FFFF:012x}{prefix}{seq & _SEQ_MASK:010x}"


class StoredMessage:
    """A message handed out by the store. ``seq`` is the handle its settlement names: the log
    seq of a record in the log, or ``-pid`` of a parked message. ``order`` is the log seq
    both kinds sort by. The id, attributes and received time of a log record are read from
    its frame on first use (the uplink needs them once; the store alone never)."""

    __slots__ = ("_attrs", "_frame", "_id", "_index", "_queue", "_received", "attempts",
                 "order", "payload", "priority", "seq", "topic", "until")
    seq: int
    order: int
    topic: str
    payload: bytes
    priority: int
    attempts: int
    #: lease deadline (monotonic) while handed out; inf once given back
    until: float
    _frame: Frame | None
    _index: int
    _id: str | None
    _attrs: dict[str, str] | None
    _received: float | None
    _queue: str

    # positional on purpose: built once per message on the drain's hot path
    def __init__(self, seq: int, topic: str, payload: bytes, frame: Frame, index: int,  # noqa: PLR0917
                 until: float) -> None:
        """A log record: ``index`` in ``frame``, leased until ``until`` (monotonic); the hot
        path of a drain builds these."""
        self.seq = self.order = seq
        self.topic = topic
        self.payload = payload
        self._frame = frame
        self._index = index
        self.until = until
        self.priority = self.attempts = 0
        self._id = self._attrs = self._received = None

    @classmethod
    def detached(cls, seq: int, queue: str, topic: str, payload: bytes, received_at: float, *,
                 order: int, priority: int, attempts: int, msg_id: str,
                 attributes: dict[str, str]) -> StoredMessage:
        """A message that is not (or no longer) a log record: parked, or built to be."""
        msg = cls.__new__(cls)
        msg.seq, msg.topic, msg.payload = seq, topic, payload
        msg._frame, msg._index = None, 0
        msg.order, msg.priority, msg.attempts = order, priority, attempts
        msg._id, msg._attrs, msg._received = msg_id, attributes, received_at
        msg._queue, msg.until = queue, 0.0
        return msg

    @property
    def queue(self) -> str:
        frame = self._frame
        return frame.queue if frame is not None else self._queue

    @property
    def received_at(self) -> float:
        if self._received is None:
            frame = self._frame
            assert frame is not None
            self._received = frame.received_ms(self._index) / 1000
        return self._received

    @property
    def id(self) -> str:
        if self._id is None:
            frame = self._frame
            assert frame is not None
            self._id = frame.explicit_id(self._index) or derive_id(
                frame.received_ms(self._index), frame.prefix, self.order)
        return self._id

    @property
    def attributes(self) -> dict[str, str]:
        if self._attrs is None:
            frame = self._frame
            self._attrs = frame.attributes(self._index) if frame is not None else {}
        return self._attrs

    @property
    def size(self) -> int:
        """The size counted against ``store.max_bytes``."""
        frame = self._frame
        if frame is not None:
            return frame.size(self._index)
        attrs = self._attrs
        return len(self.payload) + len(self.topic) + (len(orjson.dumps(attrs)) if attrs else 0)

    def to_queue_message(self) -> QueueMessage:
        attrs = dict(self.attributes)
        msg_id = self.id
        attrs.setdefault(ATTR_MESSAGE_ID, msg_id)
        if self.topic:
            attrs.setdefault(ATTR_MQTT_TOPIC, self.topic)
        return QueueMessage(msg_id, self.payload, attrs, self.received_at, self.attempts, self)

    def __repr__(self) -> str:
        return (f"StoredMessage(seq={self.seq}, topic={self.topic!r}, "
                f"payload={self.payload[:40]!r}, attempts={self.attempts})")


def queue_messages(msgs: list[StoredMessage]) -> list[QueueMessage]:
    """``[m.to_queue_message() for m in msgs]``, with what repeats done once: a log record
    without extras gets its attributes from one template per (topic, flags) of its frame, and
    its id from a per-millisecond prefix. The forwarder's hot path."""
    out: list[QueueMessage] = []
    append = out.append
    frame: Frame | None = None
    templates: dict[tuple[str, int], dict[str, str]] = {}
    ms_hex: dict[int, str] = {}
    base = 0
    prefix = ""
    deltas: Any = ()
    flags: bytes = b""
    for m in msgs:
        f = m._frame
        i = m._index
        if f is None or m._id is not None or m._attrs is not None or i in f.extras:
            append(m.to_queue_message())
            continue
        if f is not frame:
            frame, base, deltas, flags, prefix = f, f.header.base_ms, f.deltas, f.flags, f.prefix
            templates.clear()
        ms = base + deltas[i]
        head = ms_hex.get(ms)
        if head is None:
            head = ms_hex[ms] = f"{ms & 0xFFFF_FFFF_FFFF:012x}{prefix}"
        msg_id = m._id = f"{head}{m.order & _SEQ_MASK:010x}"
        key = (m.topic, flags[i])
        template = templates.get(key)
        if template is None:
            template = templates[key] = f.attributes(i)
            if m.topic:
                template.setdefault(ATTR_MQTT_TOPIC, m.topic)
        attrs = template.copy()
        attrs[ATTR_MESSAGE_ID] = msg_id
        append(QueueMessage(msg_id, m.payload, attrs, ms / 1000, 0, m))
    return out


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
