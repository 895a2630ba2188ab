"""AMQP 1.0 framing, performatives and the message format (spec parts 2 and 3).

Every performative this server writes carries its FULL field list (trailing nulls included):
the azure-eventhub pure-Python stack reads fields by position and breaks on a trimmed list.
Incoming performatives may be trimmed (the spec allows it); :func:`fields` pads them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

from tests.eventhubs_server.codec import (
    AmqpDecodeError,
    AmqpNotImplemented,
    Described,
    Symbol,
    UInt,
    ULong,
    decode_at,
    encode,
)

AMQP_HEADER = b"AMQP\x00\x01\x00\x00"
SASL_HEADER = b"AMQP\x03\x01\x00\x00"
FRAME_AMQP = 0x00
FRAME_SASL = 0x01

# descriptor code -> (name, number of fields)
PERFORMATIVES: dict[int, tuple[str, int]] = {
    0x10: ("open", 10), 0x11: ("begin", 8), 0x12: ("attach", 14), 0x13: ("flow", 11),
    0x14: ("transfer", 11), 0x15: ("disposition", 6), 0x16: ("detach", 3), 0x17: ("end", 1),
    0x18: ("close", 1), 0x40: ("sasl-mechanisms", 1), 0x41: ("sasl-init", 3),
    0x42: ("sasl-challenge", 1), 0x43: ("sasl-response", 1), 0x44: ("sasl-outcome", 2),
}
CODES = {name: code for code, (name, _) in PERFORMATIVES.items()}

ERROR, ACCEPTED, REJECTED, RELEASED, MODIFIED, RECEIVED = 0x1D, 0x24, 0x25, 0x26, 0x27, 0x23
SOURCE, TARGET = 0x28, 0x29
SOURCE_FIELDS, TARGET_FIELDS = 11, 7  # source: ... distribution-mode, filter (7), ...

# message sections
HEADER, DELIVERY_ANNOTATIONS, MESSAGE_ANNOTATIONS, PROPERTIES = 0x70, 0x71, 0x72, 0x73
APPLICATION_PROPERTIES, DATA, AMQP_SEQUENCE, AMQP_VALUE, FOOTER = 0x74, 0x75, 0x76, 0x77, 0x78
PROPERTIES_FIELDS = 13  # message-id user-id to subject reply-to correlation-id content-type ...
HEADER_FIELDS = 5


class FrameError(Exception):
    """A frame or performative that violates the protocol (the connection is closed)."""

    def __init__(self, condition: str, description: str) -> None:
        super().__init__(f"{condition}: {description}")
        self.condition = condition
        self.description = description


def _condition(exc: AmqpDecodeError) -> str:
    return "amqp:not-implemented" if isinstance(exc, AmqpNotImplemented) else "amqp:decode-error"


def descriptor_code(descriptor: Any) -> int | None:
    if isinstance(descriptor, int) and not isinstance(descriptor, bool):
        return int(descriptor)
    return None


def described_list(code: int, values: list[Any], length: int) -> Described:
    """A described list padded with nulls to its full ``length``."""
    if len(values) > length:
        raise ValueError(f"descriptor 0x{code:x} has {length} fields, got {len(values)}")
    return Described(ULong(code), list(values) + [None] * (length - len(values)))


def fields(value: Any, length: int) -> list[Any]:
    """The field list of a described list, padded to ``length``."""
    items = value.value if isinstance(value, Described) else value
    if items is None:
        items = []
    if not isinstance(items, list):
        raise FrameError("amqp:decode-error", "a composite type is not encoded as a list")
    if len(items) > length:
        raise FrameError("amqp:decode-error", f"{len(items)} fields where {length} are defined")
    return list(items) + [None] * max(0, length - len(items))


def error(condition: str, description: str | None = None) -> Described:
    return described_list(ERROR, [Symbol(condition), description, None], 3)


def error_fields(value: Any) -> tuple[str | None, str | None]:
    if value is None:
        return None, None
    condition, description, _ = fields(value, 3)
    return (str(condition) if condition is not None else None,
            str(description) if description is not None else None)


# ------------------------------------------------------------------ frames


@dataclass
class Frame:
    frame_type: int
    channel: int
    name: str | None  # performative name; None for an empty (heartbeat) frame
    fields: list[Any] = field(default_factory=list)
    payload: bytes = b""


def encode_frame(channel: int, name: str, values: list[Any], payload: bytes = b"",
                 frame_type: int = FRAME_AMQP) -> bytes:
    code = CODES[name]
    body = encode(described_list(code, values, PERFORMATIVES[code][1])) + payload
    return struct.pack(">IBBH", 8 + len(body), 2, frame_type, channel) + body


def empty_frame() -> bytes:
    return struct.pack(">IBBH", 8, 2, FRAME_AMQP, 0)


def transfer_overhead(channel: int, values: list[Any]) -> int:
    return len(encode_frame(channel, "transfer", values))


def parse_frame(header: bytes, rest: bytes) -> Frame:
    """``header`` is the 8-byte frame header, ``rest`` the remaining size-8 bytes."""
    size, doff, frame_type, channel = struct.unpack(">IBBH", header)
    if doff < 2 or doff * 4 > size:
        raise FrameError("amqp:connection:framing-error", f"bad data offset {doff}")
    body = rest[doff * 4 - 8:]
    if not body:
        return Frame(frame_type, channel, None)
    try:
        performative, end = decode_at(body, 0)
    except AmqpDecodeError as exc:
        raise FrameError(_condition(exc), str(exc)) from exc
    if not isinstance(performative, Described):
        raise FrameError("amqp:decode-error", "frame body is not a described performative")
    code = descriptor_code(performative.descriptor)
    if code not in PERFORMATIVES:
        raise FrameError("amqp:not-implemented",
                         f"performative {performative.descriptor!r} is not implemented")
    name, length = PERFORMATIVES[code]
    return Frame(frame_type, channel, name, fields(performative, length), bytes(body[end:]))


# ------------------------------------------------------------------ messages


@dataclass
class Message:
    """A bare AMQP message plus its annotations, section by section."""

    header: list[Any] | None = None
    delivery_annotations: dict[Any, Any] | None = None
    message_annotations: dict[Any, Any] | None = None
    properties: list[Any] | None = None
    application_properties: dict[Any, Any] | None = None
    body: list[tuple[int, Any]] = field(default_factory=list)  # (section code, value)
    footer: dict[Any, Any] | None = None

    def property(self, index: int) -> Any:
        return self.properties[index] if self.properties else None

    def data(self) -> bytes:
        """The data sections concatenated; other body kinds are refused."""
        if any(code != DATA for code, _ in self.body):
            raise FrameError("amqp:not-implemented",
                             "only data-section bodies are implemented (no amqp-value/sequence)")
        return b"".join(bytes(value) for _, value in self.body)


_SECTION_ATTRS = {HEADER: "header", DELIVERY_ANNOTATIONS: "delivery_annotations",
                  MESSAGE_ANNOTATIONS: "message_annotations", PROPERTIES: "properties",
                  APPLICATION_PROPERTIES: "application_properties", FOOTER: "footer"}


def decode_message(data: bytes) -> Message:
    message = Message()
    pos = 0
    try:
        while pos < len(data):
            section, pos = decode_at(data, pos)
            code = descriptor_code(section.descriptor) if isinstance(section, Described) else None
            if code in (DATA, AMQP_SEQUENCE, AMQP_VALUE):
                message.body.append((code, section.value))
            elif code in (HEADER, PROPERTIES):
                length = HEADER_FIELDS if code == HEADER else PROPERTIES_FIELDS
                setattr(message, _SECTION_ATTRS[code], fields(section, length))
            elif code in _SECTION_ATTRS:
                setattr(message, _SECTION_ATTRS[code], section.value)
            else:
                raise FrameError("amqp:decode-error", f"unknown message section {section!r:.80}")
    except AmqpDecodeError as exc:
        raise FrameError(_condition(exc), f"bad message: {exc}") from exc
    return message


def encode_message(message: Message) -> bytes:
    parts: list[bytes] = []
    if message.header is not None:
        parts.append(encode(described_list(HEADER, message.header, HEADER_FIELDS)))
    for code, value in ((DELIVERY_ANNOTATIONS, message.delivery_annotations),
                        (MESSAGE_ANNOTATIONS, message.message_annotations)):
        if value is not None:
            parts.append(encode(Described(ULong(code), value)))
    if message.properties is not None:
        parts.append(encode(described_list(PROPERTIES, message.properties, PROPERTIES_FIELDS)))
    if message.application_properties is not None:
        parts.append(encode(Described(ULong(APPLICATION_PROPERTIES),
                                      message.application_properties)))
    for code, value in message.body:
        parts.append(encode(Described(ULong(code), value)))
    if message.footer is not None:
        parts.append(encode(Described(ULong(FOOTER), message.footer)))
    return b"".join(parts)


def outcome(code: int, error_value: Described | None = None) -> Described:
    if code == REJECTED:
        return described_list(REJECTED, [error_value], 1)
    return described_list(code, [], 0)


def uint(value: int) -> UInt:
    return UInt(value & 0xFFFFFFFF)
