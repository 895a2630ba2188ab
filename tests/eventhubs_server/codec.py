"""The AMQP 1.0 type system (spec part 1): encode Python values, decode bytes into them.

Decoding keeps the wire type where it matters for echoing values back (a uuid message id
comes back as :class:`uuid.UUID`, a symbol as :class:`Symbol`, a uint as :class:`UInt`), so
a reply can carry exactly what a request held. Encoding picks the wire type from the Python
type: ``int`` is a long, ``str`` a string, ``bytes`` a binary; the marker classes below pick
the other integer widths, symbols, timestamps and arrays.

Types this test server has no use for (decimals, char, float32 on encode) raise
:class:`AmqpDecodeError` / :class:`TypeError` instead of being guessed.
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass
from typing import Any


class AmqpDecodeError(ValueError):
    """The bytes are not valid AMQP, or use a type this codec does not implement."""


class AmqpNotImplemented(AmqpDecodeError):
    """Valid AMQP, but a type this codec does not implement."""


class Symbol(str):
    """An AMQP symbol (ASCII name), as opposed to a string."""


class UByte(int):
    pass


class UShort(int):
    pass


class UInt(int):
    pass


class ULong(int):
    pass


class Byte(int):
    pass


class Short(int):
    pass


class Int(int):
    pass


class Timestamp(int):
    """Milliseconds since the Unix epoch (UTC)."""


class Array(list[Any]):
    """An AMQP array: every element has the same type (that of the first one)."""


@dataclass(frozen=True)
class Described:
    descriptor: Any
    value: Any


# ------------------------------------------------------------------ encoding


def encode(value: Any) -> bytes:
    out = bytearray()
    _encode_into(out, value)
    return bytes(out)


def _encode_into(out: bytearray, value: Any) -> None:
    if value is None:
        out.append(0x40)
    elif isinstance(value, bool):
        out.append(0x41 if value else 0x42)
    elif isinstance(value, Described):
        out.append(0x00)
        _encode_into(out, value.descriptor)
        _encode_into(out, value.value)
    elif isinstance(value, int):
        _encode_int(out, value)
    elif isinstance(value, float):
        out += b"\x82" + struct.pack(">d", value)
    elif isinstance(value, uuid.UUID):
        out += b"\x98" + value.bytes
    elif isinstance(value, (bytes, bytearray, memoryview)):
        _encode_variable(out, bytes(value), 0xA0, 0xB0)
    elif isinstance(value, _LongSymbol):
        out += b"\xb3" + struct.pack(">I", len(value)) + value.encode("ascii")
    elif isinstance(value, _LongString):
        data = value.encode("utf-8")
        out += b"\xb1" + struct.pack(">I", len(data)) + data
    elif isinstance(value, Symbol):
        _encode_variable(out, value.encode("ascii"), 0xA3, 0xB3)
    elif isinstance(value, str):
        _encode_variable(out, value.encode("utf-8"), 0xA1, 0xB1)
    elif isinstance(value, Array):
        _encode_array(out, value)
    elif isinstance(value, (list, tuple)):
        _encode_compound(out, list(value), codes=(0x45, 0xC0, 0xD0), count=len(value))
    elif isinstance(value, dict):
        flat = [item for pair in value.items() for item in pair]
        _encode_compound(out, flat, codes=(None, 0xC1, 0xD1), count=len(flat))
    else:
        raise TypeError(f"cannot encode {type(value).__name__} as AMQP")


def _encode_int(out: bytearray, value: int) -> None:
    if isinstance(value, Timestamp):
        out += b"\x83" + struct.pack(">q", value)
    elif isinstance(value, UInt):
        if value == 0:
            out.append(0x43)
        elif value < 256:
            out += bytes((0x52, value))
        else:
            out += b"\x70" + struct.pack(">I", value)
    elif isinstance(value, ULong):
        if value == 0:
            out.append(0x44)
        elif value < 256:
            out += bytes((0x53, value))
        else:
            out += b"\x80" + struct.pack(">Q", value)
    elif isinstance(value, UByte):
        out += b"\x50" + struct.pack(">B", value)
    elif isinstance(value, UShort):
        out += b"\x60" + struct.pack(">H", value)
    elif isinstance(value, Byte):
        out += b"\x51" + struct.pack(">b", value)
    elif isinstance(value, Short):
        out += b"\x61" + struct.pack(">h", value)
    elif isinstance(value, Int):
        if -128 <= value <= 127:
            out += b"\x54" + struct.pack(">b", value)
        else:
            out += b"\x71" + struct.pack(">i", value)
    elif -128 <= value <= 127:
        out += b"\x55" + struct.pack(">b", value)
    else:
        out += b"\x81" + struct.pack(">q", value)


def _encode_variable(out: bytearray, data: bytes, small: int, large: int) -> None:
    if len(data) < 256:
        out += bytes((small, len(data)))
    else:
        out += bytes((large,)) + struct.pack(">I", len(data))
    out += data


def _encode_compound(out: bytearray, items: list[Any], *, codes: tuple[int | None, int, int],
                     count: int) -> None:
    empty, small, large = codes
    if count == 0 and empty is not None:
        out.append(empty)
        return
    body = bytearray()
    for item in items:
        _encode_into(body, item)
    if len(body) + 1 < 256 and count < 256:
        out += bytes((small, len(body) + 1, count))
    else:
        out += bytes((large,)) + struct.pack(">II", len(body) + 4, count)
    out += body


def _encode_array(out: bytearray, items: Array) -> None:
    if not items:
        raise TypeError("cannot encode an empty AMQP array: its element type is unknown")
    # Each element is encoded alone, then its constructor is stripped and written once.
    encoded = [encode(_widen(item)) for item in items]
    constructor = encoded[0][:1]
    if any(e[:1] != constructor for e in encoded):
        raise TypeError("AMQP array elements must share one type")
    body = constructor + b"".join(e[1:] for e in encoded)
    if len(body) + 1 < 256 and len(items) < 256:
        out += bytes((0xE0, len(body) + 1, len(items)))
    else:
        out += b"\xf0" + struct.pack(">II", len(body) + 4, len(items))
    out += body


def _widen(item: Any) -> Any:
    """Array elements all need the same constructor: force the 4-byte length forms."""
    if isinstance(item, Symbol):
        return _LongSymbol(item)
    if isinstance(item, str):
        return _LongString(item)
    return item


class _LongSymbol(Symbol):
    pass


class _LongString(str):
    pass


# ------------------------------------------------------------------ decoding

_FIXED: dict[int, tuple[str, Any]] = {
    0x50: (">B", UByte), 0x51: (">b", Byte), 0x60: (">H", UShort), 0x61: (">h", Short),
    0x70: (">I", UInt), 0x71: (">i", Int), 0x80: (">Q", ULong), 0x81: (">q", int),
    0x52: (">B", UInt), 0x53: (">B", ULong), 0x54: (">b", Int), 0x55: (">b", int),
    0x83: (">q", Timestamp), 0x82: (">d", float), 0x72: (">f", float),
}
_CONSTANTS: dict[int, Any] = {
    0x40: None, 0x41: True, 0x42: False, 0x43: UInt(0), 0x44: ULong(0), 0x45: [],
}


def decode(data: bytes) -> Any:
    """Decode exactly one value that fills ``data``."""
    value, end = decode_at(data, 0)
    if end != len(data):
        raise AmqpDecodeError(f"{len(data) - end} trailing bytes after an AMQP value")
    return value


def decode_at(data: bytes, pos: int) -> tuple[Any, int]:
    """Decode one value starting at ``pos``; return it and the position after it."""
    try:
        code = data[pos]
        if code == 0x00:
            descriptor, pos = decode_at(data, pos + 1)
            value, pos = decode_at(data, pos)
            return Described(descriptor, value), pos
        return _decode_body(code, data, pos + 1)
    except (IndexError, struct.error) as exc:
        raise AmqpDecodeError(f"truncated AMQP value at byte {pos}") from exc


def _decode_body(code: int, data: bytes, pos: int) -> tuple[Any, int]:
    if code in _CONSTANTS:
        constant = _CONSTANTS[code]
        return (list(constant) if isinstance(constant, list) else constant), pos
    if code in _FIXED:
        fmt, kind = _FIXED[code]
        size = struct.calcsize(fmt)
        if pos + size > len(data):
            raise AmqpDecodeError("truncated fixed-width value")
        return kind(struct.unpack_from(fmt, data, pos)[0]), pos + size
    if code == 0x56:
        return data[pos] == 1, pos + 1
    if code == 0x98:
        if pos + 16 > len(data):
            raise AmqpDecodeError("truncated uuid")
        return uuid.UUID(bytes=bytes(data[pos:pos + 16])), pos + 16
    if code in (0xA0, 0xA1, 0xA3, 0xB0, 0xB1, 0xB3):
        return _decode_variable(code, data, pos)
    if code in (0xC0, 0xC1, 0xD0, 0xD1):
        return _decode_compound(code, data, pos)
    if code in (0xE0, 0xF0):
        return _decode_array(code, data, pos)
    raise AmqpNotImplemented(f"AMQP type code 0x{code:02x} is not implemented by this server")


def _decode_variable(code: int, data: bytes, pos: int) -> tuple[Any, int]:
    if code & 0xF0 == 0xA0:
        length, pos = data[pos], pos + 1
    else:
        length, pos = struct.unpack_from(">I", data, pos)[0], pos + 4
    if pos + length > len(data):
        raise AmqpDecodeError("truncated variable-width value")
    raw = bytes(data[pos:pos + length])
    kind = code & 0x0F
    value: Any = raw if kind == 0 else raw.decode("utf-8") if kind == 1 else Symbol(raw.decode("ascii"))
    return value, pos + length


def _decode_compound(code: int, data: bytes, pos: int) -> tuple[Any, int]:
    if code in (0xC0, 0xC1):
        size, count, pos = data[pos], data[pos + 1], pos + 2
        end = pos + size - 1
    else:
        size, count = struct.unpack_from(">II", data, pos)
        pos += 8
        end = pos + size - 4
    if end > len(data):
        raise AmqpDecodeError("truncated list or map")
    items = []
    for _ in range(count):
        item, pos = decode_at(data, pos)
        items.append(item)
    if pos != end:
        raise AmqpDecodeError("list or map size does not match its elements")
    if code in (0xC0, 0xD0):
        return items, pos
    if count % 2:
        raise AmqpDecodeError("map with an odd number of elements")
    return {_hashable(items[i]): items[i + 1] for i in range(0, count, 2)}, pos


def _hashable(key: Any) -> Any:
    if isinstance(key, list):
        return tuple(key)
    if isinstance(key, dict):
        raise AmqpDecodeError("map keys that are maps are not implemented")
    return key


def _decode_array(code: int, data: bytes, pos: int) -> tuple[Any, int]:
    if code == 0xE0:
        size, count, pos = data[pos], data[pos + 1], pos + 2
        end = pos + size - 1
    else:
        size, count = struct.unpack_from(">II", data, pos)
        pos += 8
        end = pos + size - 4
    descriptor = None
    element_code = data[pos]
    pos += 1
    if element_code == 0x00:
        descriptor, pos = decode_at(data, pos)
        element_code, pos = data[pos], pos + 1
    items: Array = Array()
    for _ in range(count):
        item, pos = _decode_body(element_code, data, pos)
        items.append(item if descriptor is None else Described(descriptor, item))
    if pos != end:
        raise AmqpDecodeError("array size does not match its elements")
    return items, pos
