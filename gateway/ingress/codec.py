"""MQTT 3.1.1 / 5 wire format for the subscriber side: pure encoders and an incremental decoder.

Nothing here does I/O. ``Decoder.feed`` takes whatever bytes the socket delivered and
returns every complete packet in them; an incomplete tail is kept for the next call, so a
packet may be split anywhere across reads. The decoder also keeps the connection's topic
alias table: a PUBLISH that names its topic by alias comes out with the topic resolved.
Make one ``Decoder`` per network connection (aliases do not outlive a connection).

Promises:

- A malformed packet (bad remaining length, a field running past the packet's end, a string
  that is not valid UTF-8 or contains U+0000, an unknown property, an unknown alias, an
  unexpected packet type) raises ``ProtocolError``; the caller must drop the connection.
- PUBLISH decoding is the hot path: the topic and payload are single slices of the receive
  buffer (the payload is the exact bytes sent, never decoded), properties are parsed only
  when present, and no loop runs per payload byte.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Final, Literal

from gateway.errors import GatewayError

# Packet types (the high nibble of the first byte).
CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT, AUTH = range(8, 16)

Version = Literal[4, 5]
MQTT_311: Final = 4
MQTT_5: Final = 5

#: v5 reason code sent on PUBACK/PUBREC when the store refused the message
QUOTA_EXCEEDED = 0x97
MAX_REMAINING_LENGTH = 268_435_455

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_ACK = struct.Struct(">BBH")


class ProtocolError(GatewayError):
    """The peer sent bytes that are not valid MQTT; the connection must be closed."""


# -- properties (MQTT 5) ---------------------------------------------------------------

_BYTE, _U16T, _U32T, _VBI, _STR, _BIN, _PAIR = range(7)

_PROPERTY_TABLE: dict[int, tuple[str, int]] = {
    0x01: ("payload_format_indicator", _BYTE),
    0x02: ("message_expiry_interval", _U32T),
    0x03: ("content_type", _STR),
    0x08: ("response_topic", _STR),
    0x09: ("correlation_data", _BIN),
    0x0B: ("subscription_identifiers", _VBI),
    0x11: ("session_expiry_interval", _U32T),
    0x12: ("assigned_client_identifier", _STR),
    0x13: ("server_keep_alive", _U16T),
    0x15: ("authentication_method", _STR),
    0x16: ("authentication_data", _BIN),
    0x17: ("request_problem_information", _BYTE),
    0x18: ("will_delay_interval", _U32T),
    0x19: ("request_response_information", _BYTE),
    0x1A: ("response_information", _STR),
    0x1C: ("server_reference", _STR),
    0x1F: ("reason_string", _STR),
    0x21: ("receive_maximum", _U16T),
    0x22: ("topic_alias_maximum", _U16T),
    0x23: ("topic_alias", _U16T),
    0x24: ("maximum_qos", _BYTE),
    0x25: ("retain_available", _BYTE),
    0x26: ("user_properties", _PAIR),
    0x27: ("maximum_packet_size", _U32T),
    0x28: ("wildcard_subscription_available", _BYTE),
    0x29: ("subscription_identifier_available", _BYTE),
    0x2A: ("shared_subscription_available", _BYTE),
}
_PROPERTY_ID = {name: pid for pid, (name, _) in _PROPERTY_TABLE.items()}


@dataclass(slots=True)
class Properties:
    """MQTT 5 properties; None = absent. Repeatable ones are lists."""

    payload_format_indicator: int | None = None
    message_expiry_interval: int | None = None
    content_type: str | None = None
    response_topic: str | None = None
    correlation_data: bytes | None = None
    subscription_identifiers: list[int] = field(default_factory=list)
    session_expiry_interval: int | None = None
    assigned_client_identifier: str | None = None
    server_keep_alive: int | None = None
    authentication_method: str | None = None
    authentication_data: bytes | None = None
    request_problem_information: int | None = None
    will_delay_interval: int | None = None
    request_response_information: int | None = None
    response_information: str | None = None
    server_reference: str | None = None
    reason_string: str | None = None
    receive_maximum: int | None = None
    topic_alias_maximum: int | None = None
    topic_alias: int | None = None
    maximum_qos: int | None = None
    retain_available: int | None = None
    user_properties: list[tuple[str, str]] = field(default_factory=list)
    maximum_packet_size: int | None = None
    wildcard_subscription_available: int | None = None
    subscription_identifier_available: int | None = None
    shared_subscription_available: int | None = None

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={getattr(self, name)!r}" for name, _ in _PROPERTY_TABLE.values()
                          if getattr(self, name) not in (None, []))
        return f"Properties({shown})"


def encode_properties(props: Properties | None) -> bytes:
    """The property block, length prefix included (b"\\x00" when there is none)."""
    if props is None:
        return b"\x00"
    out = bytearray()
    for pid, (name, kind) in _PROPERTY_TABLE.items():
        value = getattr(props, name)
        if value is None or (isinstance(value, list) and not value):
            continue
        for item in value if isinstance(value, list) else (value,):
            out.append(pid)
            if kind == _BYTE:
                out.append(item)
            elif kind == _U16T:
                out += _U16.pack(item)
            elif kind == _U32T:
                out += _U32.pack(item)
            elif kind == _VBI:
                out += encode_vbi(item)
            elif kind == _STR:
                out += encode_string(item)
            elif kind == _BIN:
                out += _U16.pack(len(item)) + item
            else:
                out += encode_string(item[0]) + encode_string(item[1])
    return encode_vbi(len(out)) + bytes(out)


def decode_properties(buf: bytes, pos: int, end: int) -> tuple[Properties, int]:
    """Parse a property block at ``pos``; returns the properties and the position after."""
    length, pos = decode_vbi(buf, pos, end)
    stop = pos + length
    if stop > end:
        raise ProtocolError("property length runs past the end of the packet")
    props = Properties()
    while pos < stop:
        pid = buf[pos]
        pos += 1
        entry = _PROPERTY_TABLE.get(pid)
        if entry is None:
            raise ProtocolError(f"unknown property 0x{pid:02x}")
        name, kind = entry
        value: object
        if kind == _BYTE:
            _need(pos + 1, stop)
            value, pos = buf[pos], pos + 1
        elif kind == _U16T:
            _need(pos + 2, stop)
            value, pos = (buf[pos] << 8) | buf[pos + 1], pos + 2
        elif kind == _U32T:
            _need(pos + 4, stop)
            value, pos = _U32.unpack_from(buf, pos)[0], pos + 4
        elif kind == _VBI:
            value, pos = decode_vbi(buf, pos, stop)
        elif kind == _STR:
            value, pos = decode_string(buf, pos, stop)
        elif kind == _BIN:
            value, pos = decode_binary(buf, pos, stop)
        else:
            key, pos = decode_string(buf, pos, stop)
            val, pos = decode_string(buf, pos, stop)
            value = (key, val)
        if kind in (_PAIR, _VBI):
            getattr(props, name).append(value)
        elif getattr(props, name) is not None:
            raise ProtocolError(f"property {name} appears twice")
        else:
            setattr(props, name, value)
    return props, stop


# -- primitives ------------------------------------------------------------------------


def encode_vbi(value: int) -> bytes:
    if not 0 <= value <= MAX_REMAINING_LENGTH:
        raise ValueError(f"{value} does not fit a variable byte integer")
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | 0x80 if value else byte)
        if not value:
            return bytes(out)


def decode_vbi(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    """A variable byte integer at ``pos``; ProtocolError if malformed or past ``end``."""
    value = shift = 0
    for i in range(4):
        if pos + i >= end:
            raise ProtocolError("variable byte integer runs past the end of the packet")
        byte = buf[pos + i]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos + i + 1
        shift += 7
    raise ProtocolError("variable byte integer longer than 4 bytes")


def encode_string(text: str) -> bytes:
    data = text.encode("utf-8")
    if len(data) > 0xFFFF:
        raise ValueError("an MQTT string holds at most 65535 bytes")
    return _U16.pack(len(data)) + data


def decode_string(buf: bytes, pos: int, end: int) -> tuple[str, int]:
    raw, pos = decode_binary(buf, pos, end)
    return _utf8(raw), pos


def decode_binary(buf: bytes, pos: int, end: int) -> tuple[bytes, int]:
    _need(pos + 2, end)
    stop = pos + 2 + ((buf[pos] << 8) | buf[pos + 1])
    _need(stop, end)
    return bytes(buf[pos + 2:stop]), stop


def _utf8(raw: bytes) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"string is not valid UTF-8: {exc.reason}") from None
    if "\x00" in text:
        raise ProtocolError("string contains U+0000")
    return text


def _need(stop: int, end: int) -> None:
    if stop > end:
        raise ProtocolError("field runs past the end of the packet")


def _packet(first: int, body: bytes) -> bytes:
    return bytes((first,)) + encode_vbi(len(body)) + body


# -- client -> server ------------------------------------------------------------------


def encode_connect(client_id: str, *, version: Version = MQTT_5, keepalive: int = 60,
                   clean_start: bool = False, username: str | None = None,
                   password: str | None = None, session_expiry: int | None = None,
                   receive_maximum: int | None = None) -> bytes:
    """CONNECT. ``session_expiry`` and ``receive_maximum`` are MQTT 5 only (ignored on 3.1.1)."""
    flags = 0x02 if clean_start else 0
    if username is not None:
        flags |= 0x80
    if password is not None:
        flags |= 0x40
    body = bytearray(encode_string("MQTT"))
    body += bytes((version, flags)) + _U16.pack(min(max(keepalive, 0), 0xFFFF))
    if version == MQTT_5:
        props = Properties(session_expiry_interval=session_expiry,
                           receive_maximum=receive_maximum)
        body += encode_properties(props)
    body += encode_string(client_id)
    if username is not None:
        body += encode_string(username)
    if password is not None:
        raw = password.encode("utf-8")
        body += _U16.pack(len(raw)) + raw
    return _packet(CONNECT << 4, bytes(body))


@dataclass(frozen=True, slots=True)
class SubscribeRequest:
    topic: str
    qos: int = 1
    no_local: bool = False
    retain_as_published: bool = False
    #: 0 send retained at subscribe, 1 only if the subscription is new, 2 never
    retain_handling: int = 0


def encode_subscribe(packet_id: int, requests: list[SubscribeRequest], *,
                     version: Version = MQTT_5) -> bytes:
    body = bytearray(_U16.pack(packet_id))
    if version == MQTT_5:
        body += b"\x00"
    for req in requests:
        options = req.qos & 0x03
        if version == MQTT_5:
            options |= ((0x04 if req.no_local else 0) | (0x08 if req.retain_as_published else 0)
                        | (req.retain_handling & 0x03) << 4)
        body += encode_string(req.topic) + bytes((options,))
    return _packet(SUBSCRIBE << 4 | 0x02, bytes(body))


def encode_ack(packet_type: int, packet_id: int, reason_code: int = 0, *,
               version: Version = MQTT_5) -> bytes:
    """PUBACK, PUBREC, PUBREL or PUBCOMP; the v5 reason code is written only when non-zero."""
    first = packet_type << 4 | (0x02 if packet_type == PUBREL else 0)
    if version == MQTT_5 and reason_code:
        return bytes((first, 3)) + _U16.pack(packet_id) + bytes((reason_code,))
    return _ACK.pack(first, 2, packet_id)


def encode_puback(packet_id: int, reason_code: int = 0, *, version: Version = MQTT_5) -> bytes:
    return encode_ack(PUBACK, packet_id, reason_code, version=version)


def encode_pubrec(packet_id: int, reason_code: int = 0, *, version: Version = MQTT_5) -> bytes:
    return encode_ack(PUBREC, packet_id, reason_code, version=version)


def encode_pubrel(packet_id: int, reason_code: int = 0, *, version: Version = MQTT_5) -> bytes:
    return encode_ack(PUBREL, packet_id, reason_code, version=version)


def encode_pubcomp(packet_id: int, reason_code: int = 0, *, version: Version = MQTT_5) -> bytes:
    return encode_ack(PUBCOMP, packet_id, reason_code, version=version)


PINGREQ_PACKET = b"\xc0\x00"


def encode_pingreq() -> bytes:
    return PINGREQ_PACKET


def encode_disconnect(reason_code: int = 0, *, version: Version = MQTT_5,
                      properties: Properties | None = None) -> bytes:
    if version == MQTT_5 and (reason_code or properties is not None):
        return _packet(DISCONNECT << 4, bytes((reason_code,)) + encode_properties(properties))
    return b"\xe0\x00"


# -- server -> client (encoders exist for tests and tools) ---------------------------------


def encode_publish(topic: str, payload: bytes, *, qos: int = 0, packet_id: int = 0,
                   dup: bool = False, retain: bool = False, version: Version = MQTT_5,
                   properties: Properties | None = None) -> bytes:
    first = PUBLISH << 4 | (0x08 if dup else 0) | (qos & 3) << 1 | (0x01 if retain else 0)
    body = encode_string(topic) + (_U16.pack(packet_id) if qos else b"")
    if version == MQTT_5:
        body += encode_properties(properties)
    return _packet(first, body + payload)


def encode_connack(session_present: bool, reason_code: int = 0, *, version: Version = MQTT_5,
                   properties: Properties | None = None) -> bytes:
    body = bytes((1 if session_present else 0, reason_code))
    if version == MQTT_5:
        body += encode_properties(properties)
    return _packet(CONNACK << 4, body)


def encode_suback(packet_id: int, reason_codes: list[int], *, version: Version = MQTT_5) -> bytes:
    body = _U16.pack(packet_id) + (b"\x00" if version == MQTT_5 else b"") + bytes(reason_codes)
    return _packet(SUBACK << 4, body)


# -- decoded packets -------------------------------------------------------------------


@dataclass(slots=True)
class Connack:
    session_present: bool
    #: v5 reason code or 3.1.1 return code; 0 = accepted
    reason_code: int
    properties: Properties | None = None


@dataclass(slots=True)
class Suback:
    packet_id: int
    #: one per requested topic: the granted QoS (0..2) or a failure code (0x80+)
    reason_codes: list[int]
    properties: Properties | None = None


@dataclass(slots=True)
class Publish:
    topic: str
    payload: bytes
    qos: int
    packet_id: int
    dup: bool
    retain: bool
    properties: Properties | None = None


@dataclass(slots=True)
class Ack:
    """PUBACK, PUBREC, PUBREL or PUBCOMP."""

    packet_type: int
    packet_id: int
    reason_code: int = 0
    properties: Properties | None = None


@dataclass(slots=True)
class Pingresp:
    pass


@dataclass(slots=True)
class Disconnect:
    reason_code: int = 0
    properties: Properties | None = None

    def describe(self) -> str:
        """Why the broker closed the connection, as the logs say it."""
        text = f"the broker sent DISCONNECT with reason 0x{self.reason_code:02x}"
        if self.properties is not None and self.properties.reason_string:
            text += f" ({self.properties.reason_string})"
        return text


Packet = Connack | Suback | Publish | Ack | Pingresp | Disconnect

_FLAGS = {CONNACK: 0, PUBACK: 0, PUBREC: 0, PUBREL: 2, PUBCOMP: 0, SUBACK: 0, PINGRESP: 0,
          DISCONNECT: 0}


class Decoder:
    """Incremental decoder for packets a broker sends to a client."""

    def __init__(self, version: Version = MQTT_5, max_packet_size: int = MAX_REMAINING_LENGTH) -> None:
        self.version = version
        self.max_packet_size = max_packet_size
        self._buf = b""
        self._aliases: dict[int, str] = {}

    @property
    def pending(self) -> int:
        """Bytes held back because they do not yet make a complete packet."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[Packet]:
        buf = self._buf + data if self._buf else data
        n = len(buf)
        pos = 0
        out: list[Packet] = []
        append = out.append
        while n - pos >= 2:
            first = buf[pos]
            length = buf[pos + 1]
            start = pos + 2
            if length & 0x80:
                length, start = self._long_length(buf, pos, n)
                if start < 0:
                    break
            end = start + length
            if end > n:
                break
            if first >> 4 == PUBLISH:
                append(self._publish(buf, first, start, end))
            else:
                append(self._control(first, buf, start, end))
            pos = end
        self._buf = buf[pos:] if pos < n else b""
        return out

    def _long_length(self, buf: bytes, pos: int, n: int) -> tuple[int, int]:
        """(remaining length, body start), or (0, -1) when the header is still incomplete."""
        value = shift = 0
        for i in range(1, 5):
            if pos + i >= n:
                return 0, -1
            byte = buf[pos + i]
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                if value > self.max_packet_size:
                    raise ProtocolError(f"packet of {value} bytes exceeds the maximum")
                return value, pos + i + 1
            shift += 7
        raise ProtocolError("remaining length longer than 4 bytes")

    def _publish(self, buf: bytes, first: int, pos: int, end: int) -> Publish:
        qos = (first >> 1) & 3
        if end - pos < 2:
            raise ProtocolError("PUBLISH too short for its topic")
        p = pos + 2 + ((buf[pos] << 8) | buf[pos + 1])
        if p > end:
            raise ProtocolError("PUBLISH topic runs past the end of the packet")
        try:
            topic = buf[pos + 2:p].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ProtocolError(f"PUBLISH topic is not valid UTF-8: {exc.reason}") from None
        if "\x00" in topic:
            raise ProtocolError("PUBLISH topic contains U+0000")
        packet_id = 0
        if qos:
            if qos == 3:
                raise ProtocolError("PUBLISH with QoS 3")
            if p + 2 > end:
                raise ProtocolError("PUBLISH packet id runs past the end of the packet")
            packet_id = (buf[p] << 8) | buf[p + 1]
            if not packet_id:
                raise ProtocolError("PUBLISH with packet id 0")
            p += 2
        props = None
        if self.version == MQTT_5:
            if p < end and buf[p] == 0:
                p += 1
            else:
                props, p = decode_properties(buf, p, end)
                topic = self._resolve_alias(topic, props.topic_alias)
        if not topic:
            raise ProtocolError("PUBLISH without a topic")
        return Publish(topic, buf[p:end], qos, packet_id, bool(first & 0x08), bool(first & 1),
                       props)

    def _resolve_alias(self, topic: str, alias: int | None) -> str:
        if alias is None:
            return topic
        if alias == 0:
            raise ProtocolError("topic alias 0")
        if topic:
            self._aliases[alias] = topic
            return topic
        known = self._aliases.get(alias)
        if known is None:
            raise ProtocolError(f"unknown topic alias {alias}")
        return known

    def _control(self, first: int, buf: bytes, pos: int, end: int) -> Packet:
        ptype = first >> 4
        expected = _FLAGS.get(ptype)
        if expected is None:
            raise ProtocolError(f"unexpected packet type {ptype} from the server")
        if first & 0x0F != expected:
            raise ProtocolError(f"bad fixed-header flags for packet type {ptype}")
        v5 = self.version == MQTT_5
        if ptype in (PUBACK, PUBREC, PUBREL, PUBCOMP):
            _need(pos + 2, end)
            packet_id = (buf[pos] << 8) | buf[pos + 1]
            reason, props = 0, None
            if v5 and end > pos + 2:
                reason = buf[pos + 2]
                if end > pos + 3:
                    props, pos = decode_properties(buf, pos + 3, end)
                    _exact(pos, end)
            elif not v5:
                _exact(pos + 2, end)
            return Ack(ptype, packet_id, reason, props)
        if ptype == CONNACK:
            _need(pos + 2, end)
            if buf[pos] & 0xFE:
                raise ProtocolError("CONNACK with reserved flags set")
            session_present, reason = bool(buf[pos] & 1), buf[pos + 1]
            props = None
            if v5:
                props, pos = decode_properties(buf, pos + 2, end)
                _exact(pos, end)
            else:
                _exact(pos + 2, end)
            return Connack(session_present, reason, props)
        if ptype == SUBACK:
            _need(pos + 2, end)
            packet_id = (buf[pos] << 8) | buf[pos + 1]
            pos += 2
            props = None
            if v5:
                props, pos = decode_properties(buf, pos, end)
            if pos >= end:
                raise ProtocolError("SUBACK without reason codes")
            return Suback(packet_id, list(buf[pos:end]), props)
        if ptype == PINGRESP:
            _exact(pos, end)
            return Pingresp()
        # DISCONNECT (server to client exists only in MQTT 5)
        if not v5:
            raise ProtocolError("DISCONNECT from the server on MQTT 3.1.1")
        if pos == end:
            return Disconnect()
        props = None
        if end > pos + 1:
            props, stop = decode_properties(buf, pos + 1, end)
            _exact(stop, end)
        return Disconnect(buf[pos], props)


def _exact(pos: int, end: int) -> None:
    if pos != end:
        raise ProtocolError("packet length does not match its contents")


def decode_packet(data: bytes, version: Version = MQTT_5) -> Packet:
    """Decode exactly one whole packet (tests and tools)."""
    decoder = Decoder(version)
    packets = decoder.feed(data)
    if len(packets) != 1 or decoder.pending:
        raise ProtocolError("expected exactly one complete packet")
    return packets[0]
