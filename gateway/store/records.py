"""Plain records passed between the store and its callers."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from gateway.message import ATTR_MESSAGE_ID, ATTR_MQTT_TOPIC, QueueMessage


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


@dataclass(slots=True)
class StoredMessage:
    seq: int
    id: str
    queue: str
    topic: str
    payload: bytes
    attributes: dict[str, str]
    received_at: float
    priority: int
    attempts: int

    def to_queue_message(self) -> QueueMessage:
        attrs = dict(self.attributes)
        attrs.setdefault(ATTR_MESSAGE_ID, self.id)
        if self.topic:
            attrs.setdefault(ATTR_MQTT_TOPIC, self.topic)
        return QueueMessage(self.id, self.payload, attrs, self.received_at, self.attempts, self)


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
