"""QueueMessage, the one message shape every backend speaks, and the message id scheme.

A message id is assigned once, when the gateway first accepts a message, and never changes:
the same id travels with every retry to every backend (as a header, attribute or property),
so cloud consumers can deduplicate what at-least-once delivery repeats.

Ids are 32 lowercase hex characters: 48 bits of milliseconds since the epoch followed by
80 random bits. They sort by creation time and collide with negligible probability.

Bodies are bytes. The seed describes ``body`` as a dict; an MQTT payload can be JSON, text,
binary or empty, so the gateway stores and forwards the exact bytes and offers ``json()``
for callers that know the body is JSON. ``encode_body`` turns a dict/list/str into bytes.
"""

from __future__ import annotations

import base64
import binascii
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

# Attribute names the gateway sets on every message it forwards.
ATTR_MESSAGE_ID = "openhqm_message_id"
#: ``gateway.id`` of the gateway that uplinked the message (the host name by default): a cloud
#: consumer tells gateways apart by it. Set by the store on what it hands out (one entry of the
#: per-shape attribute dict, no per-message cost); the gateway's value wins over a device's.
ATTR_GATEWAY_ID = "openhqm_gateway_id"
ATTR_MQTT_TOPIC = "mqtt_topic"
ATTR_MQTT_QOS = "mqtt_qos"
ATTR_MQTT_RETAIN = "mqtt_retain"
ATTR_CONTENT_TYPE = "content_type"
# MQTT 5 request/response, carried both ways: a device's response topic and correlation data
# become these attributes on the way up; a downlink command's become MQTT 5 properties.
ATTR_RESPONSE_TOPIC = "response_topic"
#: correlation data that is UTF-8 text (the usual case: a request id)
ATTR_CORRELATION_ID = "correlation_id"
#: correlation data that is not UTF-8 text, base64-encoded
ATTR_CORRELATION_DATA = "correlation_data_base64"
#: a downlink command's absolute expiry: UNIX seconds, or ISO 8601 with a zone
ATTR_EXPIRES_AT = "expires_at"


def new_message_id(now: float | None = None) -> str:
    millis = int((time.time() if now is None else now) * 1000) & 0xFFFF_FFFF_FFFF
    return f"{millis:012x}{os.urandom(10).hex()}"


def new_message_ids(count: int, now: float) -> list[str]:
    """``count`` ids sharing one time stamp, from one ``os.urandom`` call: on the ingest hot
    path a syscall per message was the largest single cost."""
    prefix = f"{int(now * 1000) & 0xFFFF_FFFF_FFFF:012x}"
    random_hex = os.urandom(10 * count).hex()
    return [prefix + random_hex[i:i + 20] for i in range(0, 20 * count, 20)]


Body = bytes | bytearray | memoryview | str | Mapping[str, Any] | list[Any] | None


def encode_body(body: Body) -> bytes:
    """Bytes pass through unchanged; str is UTF-8; mappings and lists become JSON."""
    if body is None:
        return b""
    if isinstance(body, bytes):
        return body
    if isinstance(body, bytearray | memoryview):
        return bytes(body)
    if isinstance(body, str):
        return body.encode("utf-8")
    return orjson.dumps(body)


@dataclass(slots=True)
class QueueMessage:
    id: str
    body: bytes
    attributes: dict[str, str] = field(default_factory=dict)
    timestamp: float = 0.0
    retry_count: int = 0
    raw_message: Any | None = None
    #: messages with the same ``shape`` object (identity, not value) have the same attributes
    #: apart from the message id: an uplink may do per-shape work (headers, keys) once per
    #: batch. Set by the forwarder; None = no such promise.
    shape: object | None = field(default=None, compare=False, repr=False)

    def json(self) -> Any:
        """The body decoded as JSON; raises ValueError when it is not JSON."""
        return orjson.loads(self.body)

    @property
    def topic(self) -> str:
        """The MQTT topic the message arrived on, or '' when it did not come from MQTT."""
        return self.attributes.get(ATTR_MQTT_TOPIC, "")


def correlation_attributes(data: bytes) -> dict[str, str]:
    """MQTT 5 correlation data as an attribute: ``correlation_id`` when it is UTF-8 text
    without NUL (what request ids are), else base64 in ``correlation_data_base64``."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = "\0"
    if "\0" in text:
        return {ATTR_CORRELATION_DATA: base64.b64encode(data).decode("ascii")}
    return {ATTR_CORRELATION_ID: text}


def correlation_data(attributes: Mapping[str, str]) -> bytes | None:
    """The inverse of ``correlation_attributes``; None when the message carries neither
    attribute (or the base64 does not decode)."""
    text = attributes.get(ATTR_CORRELATION_ID)
    if text is not None:
        return text.encode("utf-8")
    encoded = attributes.get(ATTR_CORRELATION_DATA)
    if encoded is None:
        return None
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        return None
