"""Frames: the packed records of one append group, as stored in a segment (format 2).

A frame is a fixed 52-byte header and a body (``docs/architecture.md``, *On-disk layout*)::

    header  magic "HQF2" | body_len u32 | pos u64 | first_seq u64 | cum_bytes u64 |
            count u32 | qid u16 | flags u16 | base_ms u64 | crc32 u32     (little-endian)
    body    n_topics u16, then per topic: len u16, UTF-8
            flags   count x u8    bits 0-1 QoS, 2 retain, 3 from MQTT, 4 has extras
            topic   count x u16   index into the frame's topic table
            delta   count x u32   received time, milliseconds after base_ms
            length  count x u32   payload length
            payloads, concatenated
            extras  per record with bit 4: id_len u16, id (UTF-8, "" = derived),
                    attrs_len u32, attributes (JSON object, or nothing)

The body is zlib-compressed (header flag bit 0) when that saves at least an eighth. The CRC
covers the body as stored. Columns decode with one ``array.frombytes`` each, so reading costs
a few C calls per frame and a slice per payload, not a loop of varints per record.

Promises: ``encode`` and ``decode`` are inverses; ``decode`` raises ``FrameError`` for any
body it cannot read (bad CRC, bad zlib stream, columns that do not add up) and never returns
a partly read frame; a header whose magic or position is not the expected one is not a frame
(``read_header`` returns None), which is how stale bytes after a segment's fill point end it.
"""

from __future__ import annotations

import struct
import sys
import zlib
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import accumulate
from types import MappingProxyType
from typing import NamedTuple

import orjson

from gateway.message import (
    ATTR_MESSAGE_ID,
    ATTR_MQTT_QOS,
    ATTR_MQTT_RETAIN,
    ATTR_MQTT_TOPIC,
)

MAGIC = b"HQF2"
HEADER = struct.Struct("<4sIQQQIHHQI")
HEADER_SIZE = HEADER.size  # 52
FLAG_ZLIB = 1

# record flags
QOS_MASK = 0x03
RETAIN = 0x04
FROM_MQTT = 0x08
HAS_EXTRAS = 0x10

_QOS_TEXT = ("0", "1", "2", "3")
_BIG_ENDIAN = sys.byteorder != "little"
#: a frame read outside a cursor: nothing added to its records' attributes
NO_STAMP: Mapping[str, str] = MappingProxyType({})
#: a delta that does not fit in u32 milliseconds (49 days) goes into a frame of its own
MAX_DELTA_MS = 0xFFFF_FFFF
#: compress only when it saves at least this fraction (1/8)
_MIN_SAVING_SHIFT = 3


class FrameError(ValueError):
    """A frame body that cannot be decoded (damaged or not a frame)."""


@dataclass(frozen=True, slots=True)
class Header:
    body_len: int
    pos: int
    first_seq: int
    cum_bytes: int
    count: int
    qid: int
    flags: int
    base_ms: int
    crc: int

    @property
    def end(self) -> int:
        """The position right after this frame."""
        return self.pos + HEADER_SIZE + self.body_len

    @property
    def next_seq(self) -> int:
        return self.first_seq + self.count


class Record(NamedTuple):
    """One record to encode. ``extras`` holds what the columns cannot: attributes other than
    the MQTT ones, and an id that is not derived from the seq. (A tuple: one per message
    appended, the cheapest object to build.)"""

    topic: str
    payload: bytes
    received_ms: int
    flags: int = 0
    extras: bytes = b""


_ID_LEN = struct.Struct("<H")
_ATTRS_LEN = struct.Struct("<I")


def extras_blob(message_id: str | None, attributes: dict[str, str] | None) -> bytes:
    """The extras of a record (its own id, its other attributes), or b"" when it needs none."""
    if not message_id and not attributes:
        return b""
    raw_id = message_id.encode() if message_id else b""
    attrs = orjson.dumps(attributes) if attributes else b""
    return _ID_LEN.pack(len(raw_id)) + raw_id + _ATTRS_LEN.pack(len(attrs)) + attrs


def record_size(topic: str, payload_len: int, extras: bytes) -> int:
    """The size counted against ``store.max_bytes``: payload + topic + attributes (JSON)."""
    if not extras:
        return payload_len + len(topic)
    (id_len,) = _ID_LEN.unpack_from(extras)
    return payload_len + len(topic) + len(extras) - 6 - int(id_len)


def _u32s(values: list[int]) -> bytes:
    arr = array("I", values)
    if _BIG_ENDIAN:
        arr.byteswap()
    return arr.tobytes()


def _u16s(values: list[int]) -> bytes:
    arr = array("H", values)
    if _BIG_ENDIAN:
        arr.byteswap()
    return arr.tobytes()


def encode(records: Sequence[Record], *, pos: int, first_seq: int, cum_bytes: int, qid: int,
           compress: bool) -> bytes:
    """One frame (header + body) for ``records``; their received times must lie within
    ``MAX_DELTA_MS`` of the earliest (the writer splits frames otherwise)."""
    topics: dict[str, int] = {}
    names, payloads, times, flag_list, extra_list = zip(*records, strict=True)
    base_ms = min(times)
    topic_idx = [topics.setdefault(name, len(topics)) for name in names]
    deltas = [t - base_ms for t in times]
    lengths = [len(p) for p in payloads]
    extras = [e for e in extra_list if e]
    flags = bytes(f | HAS_EXTRAS if e else f for f, e in zip(flag_list, extra_list, strict=True)
                  ) if extras else bytes(flag_list)
    table = [struct.pack("<H", len(topics))]
    for name in topics:
        raw = name.encode()
        table.append(struct.pack("<H", len(raw)) + raw)
    body = b"".join((*table, flags, _u16s(topic_idx), _u32s(deltas), _u32s(lengths),
                     *payloads, *extras))
    frame_flags = 0
    if compress and len(body) >= 64:
        packed = zlib.compress(body, 1)
        if len(packed) <= len(body) - (len(body) >> _MIN_SAVING_SHIFT):
            body, frame_flags = packed, FLAG_ZLIB
    header = HEADER.pack(MAGIC, len(body), pos, first_seq, cum_bytes, len(records), qid,
                         frame_flags, base_ms, zlib.crc32(body))
    return header + body


def read_header(raw: bytes | memoryview, expected_pos: int) -> Header | None:
    """The header at the start of ``raw``, or None when there is no frame there: too short,
    another magic, or written for another position (stale bytes of a reused segment)."""
    if len(raw) < HEADER_SIZE:
        return None
    magic, body_len, pos, first_seq, cum, count, qid, flags, base_ms, crc = HEADER.unpack_from(raw)
    if magic != MAGIC or pos != expected_pos:
        return None
    return Header(body_len, pos, first_seq, cum, count, qid, flags, base_ms, crc)


class Frame:
    """A decoded frame: its header and columns; payloads are sliced on demand."""

    __slots__ = (
        "_heads",
        "_templates",
        "_total",
        "body",
        "deltas",
        "extras",
        "flags",
        "header",
        "lengths",
        "offsets",
        "prefix",
        "queue",
        "sizes",
        "stamp",
        "topic_idx",
        "topics",
    )

    def __init__(self, header: Header, stored_body: bytes | memoryview) -> None:
        self.header = header
        self._total = -1
        self._templates: dict[tuple[int, int], dict[str, str]] = {}
        self._heads: dict[int, str] = {}
        #: set by the reader: the queue's name and the store's id prefix (derived ids)
        self.queue = self.prefix = ""
        #: set by the reader: attributes the store adds to every record (the gateway id)
        self.stamp: Mapping[str, str] = NO_STAMP
        if zlib.crc32(stored_body) != header.crc:
            raise FrameError(f"frame at {header.pos}: CRC mismatch")
        body = bytes(stored_body)
        if header.flags & FLAG_ZLIB:
            try:
                body = zlib.decompress(body)
            except zlib.error as exc:
                raise FrameError(f"frame at {header.pos}: {exc}") from None
        try:
            self._parse(body, header.count)
        except (struct.error, ValueError, IndexError, UnicodeDecodeError) as exc:
            raise FrameError(f"frame at {header.pos}: {exc}") from None

    def _parse(self, body: bytes, n: int) -> None:
        (n_topics,) = struct.unpack_from("<H", body, 0)
        off = 2
        topics: list[str] = []
        for _ in range(n_topics):
            (length,) = struct.unpack_from("<H", body, off)
            topics.append(body[off + 2:off + 2 + length].decode())
            off += 2 + length
        self.topics = topics
        self.flags = body[off:off + n]
        off += n
        self.topic_idx = self._column("H", body, off, n)
        off += 2 * n
        #: received time of each record, milliseconds after ``header.base_ms``
        self.deltas = self._column("I", body, off, n)
        off += 4 * n
        lengths = self._column("I", body, off, n)
        off += 4 * n
        self.lengths = lengths
        #: where each payload starts in ``body`` (and, last, where the payloads end)
        offsets = self.offsets = list(accumulate(lengths, initial=off))
        off = offsets[-1]
        self.extras: dict[int, tuple[str | None, dict[str, str] | None]] = {}
        extra_lens: dict[int, int] = {}
        flags = self.flags
        if len(flags) != n or off > len(body) or max(self.topic_idx, default=0) >= max(len(topics), 1):
            raise FrameError(f"frame at {self.header.pos}: columns do not add up")
        for i in range(n):
            if flags[i] & HAS_EXTRAS:
                (id_len,) = _ID_LEN.unpack_from(body, off)
                raw_id = body[off + 2:off + 2 + id_len].decode()
                off += 2 + id_len
                (length,) = _ATTRS_LEN.unpack_from(body, off)
                attrs = orjson.loads(body[off + 4:off + 4 + length]) if length else None
                if attrs is not None and not isinstance(attrs, dict):
                    raise FrameError("attributes are not an object")
                self.extras[i] = (raw_id or None, attrs)
                extra_lens[i] = length
                off += 4 + length
        if off != len(body):
            raise FrameError(f"frame at {self.header.pos}: {len(body) - off} trailing bytes")
        self.body = body
        self.sizes = None
        if extra_lens:
            self.sizes = [lengths[i] + len(topics[self.topic_idx[i]]) + extra_lens.get(i, 0)
                          for i in range(n)]

    @staticmethod
    def _column(code: str, body: bytes, off: int, n: int) -> array[int]:
        arr = array(code)
        arr.frombytes(body[off:off + arr.itemsize * n])
        if _BIG_ENDIAN:
            arr.byteswap()
        if len(arr) != n:
            raise FrameError("short column")
        return arr

    @property
    def total_size(self) -> int:
        """The counted size of every record of the frame."""
        if self._total < 0:
            if self.sizes is not None:
                self._total = sum(self.sizes)
            else:
                topic_lens = [len(t) for t in self.topics]
                self._total = sum(self.lengths) + sum(map(topic_lens.__getitem__, self.topic_idx))
        return self._total

    def template(self, i: int) -> dict[str, str] | None:
        """The attributes (MQTT topic, QoS, retain) shared by every record of this frame with
        record ``i``'s topic and flags, or None when record ``i`` has extras of its own. The
        same dict for all of them: its identity is their QueueMessage ``shape``."""
        if i in self.extras:
            return None
        key = (self.topic_idx[i], self.flags[i])
        found = self._templates.get(key)
        if found is None:
            found = self._templates[key] = self.attributes(i)
            topic = self.topics[key[0]]
            if topic:
                found.setdefault(ATTR_MQTT_TOPIC, topic)
            if self.stamp:
                found.update(self.stamp)
        return found

    def id_head(self, i: int) -> str:
        """The first 22 hex digits of record ``i``'s derived id: its received milliseconds and
        the store's prefix (the same for every record of the same millisecond)."""
        ms = self.header.base_ms + self.deltas[i]
        head = self._heads.get(ms)
        if head is None:
            head = self._heads[ms] = f"{ms & 0xFFFF_FFFF_FFFF:012x}{self.prefix}"
        return head

    def received_ms(self, i: int) -> int:
        return self.header.base_ms + self.deltas[i]

    def payload(self, i: int) -> bytes:
        return self.body[self.offsets[i]:self.offsets[i + 1]]

    def topic(self, i: int) -> str:
        return self.topics[self.topic_idx[i]]

    def size(self, i: int) -> int:
        """The counted size of record ``i``."""
        if self.sizes is not None:
            return self.sizes[i]
        return self.lengths[i] + len(self.topics[self.topic_idx[i]])

    def explicit_id(self, i: int) -> str | None:
        extra = self.extras.get(i)
        return extra[0] if extra else None

    def attributes(self, i: int) -> dict[str, str]:
        """The record's attributes as the uplinks see them (MQTT ones rebuilt from flags)."""
        flags = self.flags[i]
        attrs: dict[str, str] = {}
        extra = self.extras.get(i)
        if extra and extra[1]:
            attrs.update(extra[1])
        if flags & FROM_MQTT:
            attrs.update(mqtt_attributes(self.topic(i), flags))
        return attrs


def mqtt_attributes(topic: str, flags: int) -> dict[str, str]:
    """The attributes record flags stand for (empty when the record is not from MQTT)."""
    if not flags & FROM_MQTT:
        return {}
    attrs = {ATTR_MQTT_TOPIC: topic} if topic else {}
    attrs[ATTR_MQTT_QOS] = _QOS_TEXT[flags & QOS_MASK]
    if flags & RETAIN:
        attrs[ATTR_MQTT_RETAIN] = "1"
    return attrs


def mqtt_flags(attributes: dict[str, str]) -> tuple[int, dict[str, str] | None]:
    """Split attributes into record flags and what is left for the extras: the MQTT topic,
    QoS and retain attributes the ingress sets are kept as flags (the topic is the record's
    own). Attributes that do not look exactly like the ingress's stay as they are."""
    qos = attributes.get(ATTR_MQTT_QOS)
    if qos not in ("0", "1", "2"):
        rest = {k: v for k, v in attributes.items() if k != ATTR_MESSAGE_ID}
        return 0, rest or None
    flags = FROM_MQTT | int(qos)
    retain = attributes.get(ATTR_MQTT_RETAIN)
    if retain == "1":
        flags |= RETAIN
    elif retain is not None:
        return 0, {k: v for k, v in attributes.items() if k != ATTR_MESSAGE_ID}
    rest = {k: v for k, v in attributes.items()
            if k not in (ATTR_MQTT_QOS, ATTR_MQTT_RETAIN, ATTR_MQTT_TOPIC, ATTR_MESSAGE_ID)}
    return flags, rest or None
