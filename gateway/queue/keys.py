"""The key template: which part of a message decides its partition (Kafka record key, Event
Hubs partition key, Pub/Sub ordering key, SQS FIFO message group).

These backends keep order only among messages with the same key. Keying by device (an MQTT
topic level) keeps each device's messages in order.

Placeholders, anything else is literal text:

    {topic}        the MQTT topic                      sensors/dev-17/temp
    {topic[N]}     its Nth level, 0-based; -1 = last   {topic[1]} -> dev-17
    {attr:NAME}    a message attribute                 {attr:device_id}
    {id}           the gateway message id (spreads messages evenly, no order)
    {gateway_id}   gateway.id, the openhqm_gateway_id attribute   {gateway_id}/{topic[1]}

A placeholder without a value renders as ''. A key that renders empty means "no key".
Not ``str.format``: a template from config must not reach attributes of Python objects.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from gateway.errors import ConfigError
from gateway.message import ATTR_GATEWAY_ID, ATTR_MQTT_TOPIC, QueueMessage

_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_LEVEL = re.compile(r"topic\[(-?[0-9]+)\]")

Part = Callable[[QueueMessage], str]

#: rendered keys kept per MQTT topic, for templates that read nothing but the topic
_TOPIC_CACHE_MAX = 8192
_NO_KEY = b""


def _literal(text: str) -> Part:
    return lambda _msg: text


def _topic(msg: QueueMessage) -> str:
    return msg.attributes.get(ATTR_MQTT_TOPIC, "")


def _level(index: int) -> Part:
    def part(msg: QueueMessage) -> str:
        levels = _topic(msg).split("/")
        try:
            return levels[index]
        except IndexError:
            return ""
    return part


def _attr(name: str) -> Part:
    return lambda msg: msg.attributes.get(name, "")


def _id(msg: QueueMessage) -> str:
    return msg.id


def _gateway_id(msg: QueueMessage) -> str:
    return msg.attributes.get(ATTR_GATEWAY_ID, "")


@dataclass(frozen=True, slots=True)
class KeyTemplate:
    template: str
    parts: tuple[Part, ...]
    #: every part is literal text or reads the MQTT topic: keys are cached per topic
    topic_only: bool = False
    #: the template reads the message id ({id}): no two messages share a key by shape
    uses_id: bool = False
    _by_topic: dict[str, bytes] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def parse(cls, template: str, key: str = "queue.kafka_message_key") -> KeyTemplate:
        parts: list[Part] = []
        pos = 0
        topic_only = True
        for match in _PLACEHOLDER.finditer(template):
            if match.start() > pos:
                parts.append(_literal(template[pos:match.start()]))
            name = match.group(1)
            parts.append(_placeholder(name, template, key))
            topic_only = topic_only and (name == "topic" or bool(_LEVEL.fullmatch(name)))
            pos = match.end()
        rest = template[pos:]
        if "{" in rest or "}" in rest:
            raise ConfigError(key, template, "unbalanced '{' or '}'")
        if rest:
            parts.append(_literal(rest))
        return cls(template, tuple(parts), topic_only,
                   any(m.group(1) == "id" for m in _PLACEHOLDER.finditer(template)))

    def render(self, msg: QueueMessage) -> bytes | None:
        if not self.topic_only:
            return self._render(msg)
        topic = msg.attributes.get(ATTR_MQTT_TOPIC, "")
        key = self._by_topic.get(topic)
        if key is None:
            if len(self._by_topic) >= _TOPIC_CACHE_MAX:
                self._by_topic.clear()
            key = self._by_topic[topic] = self._render(msg) or _NO_KEY
        return key or None

    def _render(self, msg: QueueMessage) -> bytes | None:
        parts = self.parts
        if len(parts) == 1:  # the usual case: one placeholder, no join
            text = parts[0](msg)
        elif not parts:
            return None
        else:
            text = "".join([part(msg) for part in parts])
        return text.encode("utf-8") if text else None


def _placeholder(name: str, template: str, key: str) -> Part:
    if name == "topic":
        return _topic
    if name == "id":
        return _id
    if name == "gateway_id":
        return _gateway_id
    level = _LEVEL.fullmatch(name)
    if level:
        return _level(int(level.group(1)))
    if name.startswith("attr:") and len(name) > len("attr:"):
        return _attr(name[len("attr:"):])
    raise ConfigError(key, template, f"unknown placeholder {{{name}}}; use {{topic}}, "
                      "{topic[N]}, {attr:NAME}, {id} or {gateway_id}")
