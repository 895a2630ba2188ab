"""How a gateway message becomes an SQS message and back. Pure functions, no SDK.

Body. An SQS body must be non-empty Unicode text from XML's character set (no NUL, no
other C0 controls except tab/LF/CR, no U+FFFE/U+FFFF). A payload that is such text in
UTF-8 is sent unchanged. Anything else (binary, invalid UTF-8, control characters) is
sent base64-encoded with the attribute ``openhqm_body_encoding=base64``; an empty payload
is sent as the body ``-`` with ``openhqm_body_encoding=empty``. ``decode`` undoes both, so
every payload round-trips byte for byte.

Attributes. SQS carries at most 10 message attributes, with names of ASCII letters,
digits, ``_ - .`` (no leading/trailing or double ``.``, not starting with ``AWS.`` or
``Amazon.``) and non-empty values. The gateway's own come first: ``openhqm_message_id``,
then ``openhqm_body_encoding`` and the dead-letter attributes when present. The message's
attributes follow in order (``mqtt_topic`` and ``openhqm_gateway_id`` first, so
they stay native attributes); each one that fits the rules and a
free slot is a native String attribute. When some do not fit (more than 10 in all, an
invalid name, an empty value), those are packed as one JSON object (ASCII-escaped) into
the attribute ``openhqm_attributes``, which takes the last slot. ``decode`` unpacks it,
so consumers of this gateway see every attribute; other consumers read the JSON.

Size. SQS counts the body's UTF-8 bytes plus each attribute's name, data type and value.
``Encoded.size`` is that count, so the uplink can refuse what SQS would refuse and fill
batch calls up to the limit.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gateway.message import (
    ATTR_CONTENT_TYPE,
    ATTR_GATEWAY_ID,
    ATTR_MESSAGE_ID,
    ATTR_MQTT_QOS,
    ATTR_MQTT_RETAIN,
    ATTR_MQTT_TOPIC,
    QueueMessage,
)

ATTR_BODY_ENCODING = "openhqm_body_encoding"
ATTR_PACKED = "openhqm_attributes"
ATTR_PRIORITY = "openhqm_priority"
ATTR_DLQ_REASON = "openhqm_dlq_reason"
ATTR_DLQ_SOURCE = "openhqm_dlq_source"
ATTR_DLQ_FAILED_AT = "openhqm_dlq_failed_at"

MAX_ATTRIBUTES = 10
EMPTY_BODY = "-"
_STRING = "String"
_FIRST = (ATTR_MQTT_TOPIC, ATTR_GATEWAY_ID, ATTR_MQTT_QOS, ATTR_MQTT_RETAIN, ATTR_CONTENT_TYPE)
#: transport attributes that decode() consumes
_TRANSPORT = frozenset({ATTR_MESSAGE_ID, ATTR_BODY_ENCODING, ATTR_PACKED})

_NOT_XML_TEXT = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,256}")
_GROUP_ID_CHAR = re.compile(r"[^\x21-\x7e]")
_DEFAULT_GROUP = "openhqm"


@dataclass(frozen=True, slots=True)
class Encoded:
    body: str
    attributes: dict[str, dict[str, str]]
    size: int


def is_sqs_text(text: str) -> bool:
    return bool(text) and _NOT_XML_TEXT.search(text) is None


def clean_text(text: str) -> str:
    """``text`` with every character SQS refuses replaced by U+FFFD."""
    return _NOT_XML_TEXT.sub("\ufffd", text)


def valid_attribute_name(name: str) -> bool:
    if not _NAME.fullmatch(name) or ".." in name or name[0] == "." or name[-1] == ".":
        return False
    lowered = name.lower()
    return not (lowered.startswith("aws.") or lowered.startswith("amazon."))


def encode_body(body: bytes) -> tuple[str, str | None]:
    """(SQS body, encoding attribute or None)."""
    if not body:
        return EMPTY_BODY, "empty"
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        text = ""
    if is_sqs_text(text):
        return text, None
    return base64.b64encode(body).decode("ascii"), "base64"


def encode(message: QueueMessage, extra: Mapping[str, str] | None = None) -> Encoded:
    """The SQS body and message attributes of ``message``; ``extra`` are gateway attributes
    (priority, dead-letter reason) that take native slots before the message's own."""
    body, encoding = encode_body(message.body)
    own: dict[str, str] = {ATTR_MESSAGE_ID: message.id}
    if encoding is not None:
        own[ATTR_BODY_ENCODING] = encoding
    own.update(extra or {})
    native, packed = _place(own, message.attributes)
    if packed:
        native[ATTR_PACKED] = json.dumps(packed, ensure_ascii=True, separators=(",", ":"))
    attributes = {k: {"DataType": _STRING, "StringValue": v} for k, v in native.items()}
    size = len(body.encode("utf-8")) + sum(
        len(k.encode()) + len(_STRING) + len(v.encode("utf-8")) for k, v in native.items())
    return Encoded(body, attributes, size)


def _place(own: dict[str, str], attributes: Mapping[str, str]) -> tuple[dict[str, str],
                                                                          dict[str, str]]:
    ordered = [k for k in _FIRST if k in attributes]
    ordered += [k for k in attributes if k not in _FIRST]
    fits = [k for k in ordered if k not in own and valid_attribute_name(k)
            and isinstance(attributes[k], str) and is_sqs_text(attributes[k])]
    misfits = [k for k in ordered if k not in own and k not in fits]
    free = MAX_ATTRIBUTES - len(own)
    if not misfits and len(fits) <= free:
        return {**own, **{k: attributes[k] for k in fits}}, {}
    native_keys = fits[:max(free - 1, 0)]
    native = {**own, **{k: attributes[k] for k in native_keys}}
    packed = {k: attributes[k] for k in ordered if k not in own and k not in native_keys}
    return native, packed


def group_id(rendered: bytes | None) -> str:
    """A FIFO MessageGroupId from a rendered template: printable ASCII, at most 128."""
    text = rendered.decode("utf-8", "replace") if rendered else ""
    text = _GROUP_ID_CHAR.sub("_", text)[:128]
    return text or _DEFAULT_GROUP


def decode(raw: Mapping[str, Any]) -> QueueMessage:
    """A received SQS message (ReceiveMessage's dict) as a QueueMessage; ``raw_message`` is it.

    The id is ``openhqm_message_id`` (the SQS MessageId for foreign messages), ``timestamp``
    the SentTimestamp, ``retry_count`` the ApproximateReceiveCount minus one."""
    attributes = _string_attributes(raw.get("MessageAttributes") or {})
    system = raw.get("Attributes") or {}
    message_id = attributes.get(ATTR_MESSAGE_ID) or str(raw.get("MessageId", ""))
    body = decode_body(str(raw.get("Body", "")), attributes.get(ATTR_BODY_ENCODING))
    packed = attributes.get(ATTR_PACKED)
    visible = {k: v for k, v in attributes.items() if k not in _TRANSPORT}
    if packed:
        visible.update(_unpack(packed))
    try:
        timestamp = int(system.get("SentTimestamp", "0")) / 1000
    except ValueError:
        timestamp = 0.0
    try:
        retry_count = max(int(system.get("ApproximateReceiveCount", "1")) - 1, 0)
    except ValueError:
        retry_count = 0
    return QueueMessage(message_id, body, visible, timestamp, retry_count, dict(raw))


def decode_body(body: str, encoding: str | None) -> bytes:
    if encoding == "empty":
        return b""
    if encoding == "base64":
        try:
            return base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            pass  # not ours after all: hand over the text as it came
    return body.encode("utf-8")


def _string_attributes(raw: Mapping[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in raw.items():
        if not isinstance(value, Mapping):
            continue
        if "StringValue" in value:
            out[str(name)] = str(value["StringValue"])
        elif "BinaryValue" in value:  # from other producers: carried as base64 text
            out[str(name)] = base64.b64encode(bytes(value["BinaryValue"])).decode("ascii")
    return out


def _unpack(packed: str) -> dict[str, str]:
    try:
        data = json.loads(packed)
    except ValueError:
        return {ATTR_PACKED: packed}
    if not isinstance(data, dict):
        return {ATTR_PACKED: packed}
    return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in data.items()}
