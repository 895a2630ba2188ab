"""Key templates (gateway.queue.keys): rendering, and the per-topic cache of templates that
read nothing but the MQTT topic."""

from __future__ import annotations

import pytest

from gateway.errors import ConfigError
from gateway.message import ATTR_MQTT_TOPIC, QueueMessage
from gateway.queue import keys
from gateway.queue.keys import KeyTemplate


def msg(topic: str | None, **attrs: str) -> QueueMessage:
    if topic is not None:
        attrs[ATTR_MQTT_TOPIC] = topic
    return QueueMessage("id-1", b"", attrs)


def test_placeholders_render() -> None:
    m = msg("sensors/dev-17/temp", device_id="d17")
    assert KeyTemplate.parse("{topic}").render(m) == b"sensors/dev-17/temp"
    assert KeyTemplate.parse("{topic[1]}").render(m) == b"dev-17"
    assert KeyTemplate.parse("{topic[-1]}").render(m) == b"temp"
    assert KeyTemplate.parse("site-{topic[1]}").render(m) == b"site-dev-17"
    assert KeyTemplate.parse("{attr:device_id}").render(m) == b"d17"
    assert KeyTemplate.parse("{id}").render(m) == b"id-1"
    assert KeyTemplate.parse("").render(m) is None
    assert KeyTemplate.parse("{topic[5]}").render(m) is None  # no such level: no key


def test_only_topic_templates_are_cached() -> None:
    assert KeyTemplate.parse("a-{topic[1]}-{topic}").topic_only
    assert not KeyTemplate.parse("{topic[1]}-{attr:x}").topic_only
    assert not KeyTemplate.parse("{id}").topic_only


def test_cache_keeps_keys_per_topic_including_no_key() -> None:
    template = KeyTemplate.parse("{topic[2]}")
    assert template.render(msg("a/b")) is None
    assert template.render(msg("a/b")) is None  # cached "no key" stays no key
    assert template.render(msg("a/b/c")) == b"c"
    assert template.render(msg(None)) is None
    assert template.render(msg("a/b/c")) == b"c"


def test_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(keys, "_TOPIC_CACHE_MAX", 4)
    template = KeyTemplate.parse("{topic[1]}")
    for i in range(10):
        assert template.render(msg(f"s/dev-{i}")) == f"dev-{i}".encode()
    assert len(template._by_topic) <= 4


def test_unknown_placeholder_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"queue\.kafka_message_key"):
        KeyTemplate.parse("{nope}")
