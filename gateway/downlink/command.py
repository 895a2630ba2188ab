"""A command from the cloud, as the local broker will receive it: topic, payload, MQTT 5
properties, retain flag and deadline. Pure functions, no I/O.

From the command's attributes (whatever the backend calls them: stream fields, headers,
message attributes, user properties):

    the local topic     topic_template rendered, or the attribute topic_attribute
    expires_at          UNIX seconds or ISO 8601 with a zone: after it, the command is
                        dropped (counted), never delivered late; before it, the remaining
                        lifetime goes out as the MQTT 5 message expiry
    response_topic      MQTT 5 response topic (where the device should answer)
    correlation_id      MQTT 5 correlation data (UTF-8), or correlation_data_base64 (binary)
    content_type        MQTT 5 content type
    mqtt_retain         "1"/"true": publish retained (configuration a device reads on connect)
    anything else       MQTT 5 user properties, with openhqm_message_id (the device can
                        deduplicate what at-least-once repeats)

``CommandRules.build`` raises Undeliverable for a command that can never be delivered (no
topic, a topic outside ``allowed_topics``, one the ingress would take back up, an
unreadable expiry): the downlink dead-letters it at the backend with that reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime

from gateway.downlink.settings import DownlinkConfig, IngressView
from gateway.downlink.topics import TopicTemplate, Undeliverable, topic_name_problem
from gateway.ingress.codec import Properties
from gateway.message import (
    ATTR_CONTENT_TYPE,
    ATTR_CORRELATION_DATA,
    ATTR_CORRELATION_ID,
    ATTR_EXPIRES_AT,
    ATTR_MESSAGE_ID,
    ATTR_MQTT_QOS,
    ATTR_MQTT_RETAIN,
    ATTR_RESPONSE_TOPIC,
    QueueMessage,
    correlation_data,
)
from gateway.topics import topic_matches

#: attributes that become MQTT properties or flags, not user properties
_MAPPED = frozenset({ATTR_EXPIRES_AT, ATTR_RESPONSE_TOPIC, ATTR_CORRELATION_ID,
                     ATTR_CORRELATION_DATA, ATTR_CONTENT_TYPE, ATTR_MQTT_RETAIN, ATTR_MQTT_QOS,
                     ATTR_MESSAGE_ID})
_TRUE = frozenset({"1", "true", "yes", "on"})


@dataclass(frozen=True, slots=True)
class Command:
    message_id: str
    topic: str
    payload: bytes
    retain: bool
    #: time.time() after which it must not be delivered; None = no expiry
    deadline: float | None
    response_topic: str | None
    correlation: bytes | None
    content_type: str | None
    user_properties: tuple[tuple[str, str], ...]

    def remaining(self, now: float) -> int | None:
        """Whole seconds of lifetime left (MQTT's unit, rounded down so the broker never
        keeps it too long); None = no expiry. Below 1 the command has expired."""
        if self.deadline is None:
            return None
        return max(0, math.floor(self.deadline - now))

    def properties(self, now: float) -> Properties:
        remaining = self.remaining(now)
        return Properties(message_expiry_interval=remaining, content_type=self.content_type,
                          response_topic=self.response_topic,
                          correlation_data=self.correlation,
                          user_properties=list(self.user_properties))


class CommandRules:
    """Turns consumed messages into Commands, by the downlink's config."""

    def __init__(self, dl: DownlinkConfig, ingress: IngressView, key: str = "queue.downlink") -> None:
        self.template = (TopicTemplate.parse(dl.topic_template, f"{key}.topic_template")
                         if dl.topic_template else None)
        self.topic_attribute = dl.topic_attribute
        self.allowed = list(dl.allowed_topics)
        self.ingress = ingress
        self.key = key

    def build(self, msg: QueueMessage) -> Command:
        attrs = msg.attributes
        topic = self._topic(attrs)
        response_topic = attrs.get(ATTR_RESPONSE_TOPIC) or None
        if response_topic is not None and topic_name_problem(response_topic):
            raise Undeliverable(f"{ATTR_RESPONSE_TOPIC} {response_topic!r} is not a topic name")
        skip = _MAPPED | ({self.topic_attribute} if self.template is None else set())
        user = [(ATTR_MESSAGE_ID, msg.id)]
        user += [(k, v) for k, v in attrs.items() if k not in skip]
        return Command(msg.id, topic, msg.body,
                       attrs.get(ATTR_MQTT_RETAIN, "").strip().lower() in _TRUE,
                       expiry(attrs.get(ATTR_EXPIRES_AT)), response_topic,
                       correlation_data(attrs), attrs.get(ATTR_CONTENT_TYPE) or None, tuple(user))

    def _topic(self, attrs: dict[str, str]) -> str:
        if self.template is not None:
            topic = self.template.render(attrs)
        else:
            topic = attrs.get(self.topic_attribute, "")
            if not topic:
                raise Undeliverable(f"no local topic: the attribute {self.topic_attribute!r} is "
                                   f"missing ({self.key}.topic_attribute)")
        problem = topic_name_problem(topic)
        if problem:
            raise Undeliverable(problem)
        if self.allowed and not any(topic_matches(f, topic) for f in self.allowed):
            raise Undeliverable(f"the local topic {topic!r} is not in {self.key}.allowed_topics")
        subscription = self.ingress.takes_back(topic)
        if subscription is not None:
            raise Undeliverable(f"the local topic {topic!r} matches the ingress subscription "
                               f"{subscription!r}: the gateway would uplink its own command "
                               f"(loop guard; ingress.exclude can exempt it)")
        return topic


def expiry(text: str | None) -> float | None:
    """``expires_at`` as UNIX seconds: a number, or ISO 8601 with a zone. Undeliverable when it
    is neither (a command whose lifetime cannot be known is not delivered)."""
    if text is None or not text.strip():
        return None
    value = text.strip()
    try:
        seconds = float(value)
    except ValueError:
        return _iso_time(value)
    if not math.isfinite(seconds):
        raise Undeliverable(f"{ATTR_EXPIRES_AT} {value!r} is not a time")
    return seconds


def _iso_time(value: str) -> float:
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise Undeliverable(f"{ATTR_EXPIRES_AT} {value!r} is neither UNIX seconds nor an "
                            "ISO 8601 time") from None
    if moment.tzinfo is None:
        raise Undeliverable(f"{ATTR_EXPIRES_AT} {value!r} has no time zone (add Z or +00:00)")
    return moment.timestamp()
