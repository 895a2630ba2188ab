"""queue.downlink: parsed as a nested section, environment overrides, the loop guard naming
both keys, and turning consumed messages into local MQTT commands."""

from __future__ import annotations

import base64
import dataclasses
import time
from pathlib import Path
from typing import Any

import pytest

from gateway.config import effective_config, load_config, parse_config
from gateway.downlink.command import CommandRules, expiry
from gateway.downlink.settings import DownlinkConfig, IngressView
from gateway.downlink.topics import TopicTemplate, Undeliverable, filter_covers
from gateway.errors import ConfigError
from gateway.message import QueueMessage, correlation_attributes, correlation_data

SAMPLE = Path(__file__).resolve().parents[2] / "config" / "gateway.yaml"


def cfg(downlink: dict[str, Any], *, subscriptions: tuple[str, ...] = ("sensors/#",),
        exclude: tuple[str, ...] = (), queue: dict[str, Any] | None = None) -> Any:
    return parse_config({
        "gateway": {"id": "gw7"},
        "ingress": {"subscriptions": [{"topic": t} for t in subscriptions],
                    "exclude": list(exclude)},
        "queue": {"type": "redis", **(queue or {}), "downlink": downlink}}, "test.yaml")


def test_off_by_default_and_every_key_documented_in_the_sample() -> None:
    loaded = load_config(str(SAMPLE), {})
    assert loaded.queue.downlink == DownlinkConfig()
    assert loaded.queue.downlink.enabled is False
    text = SAMPLE.read_text()
    section = text[text.index("  downlink:\n"):]
    for f in dataclasses.fields(DownlinkConfig):
        assert f"\n    {f.name}:" in section, f"config/gateway.yaml lacks queue.downlink.{f.name}"
    assert "\n  exclude:" in text


def test_environment_overrides_reach_the_nested_section() -> None:
    loaded = load_config(None, {
        "OPENHQM_QUEUE__DOWNLINK__ENABLED": "true",
        "OPENHQM_QUEUE__DOWNLINK__SOURCE": "commands:{gateway_id}",
        "OPENHQM_QUEUE__DOWNLINK__MAX_ATTEMPTS": "3",
        "OPENHQM_QUEUE__DOWNLINK__OVERRIDES__REDIS_CLAIM_IDLE": "5s",
        "OPENHQM_INGRESS__EXCLUDE": "devices/+/commands",
    })
    dl = loaded.queue.downlink
    assert (dl.enabled, dl.source, dl.max_attempts) == (True, "commands:{gateway_id}", 3)
    assert dl.overrides == {"redis_claim_idle": 5.0}  # converted to the backend's type
    assert loaded.ingress.exclude == ["devices/+/commands"]


def test_overrides_are_checked_against_the_backend_and_secrets_masked() -> None:
    with pytest.raises(ConfigError) as err:
        cfg({"enabled": True, "overrides": {"kafka_consumer_group": "g"}})
    assert err.value.key == "queue.downlink.overrides.kafka_consumer_group"
    assert "redis_consumer_group" in err.value.reason
    mqtt = parse_config({"queue": {"type": "mqtt", "mqtt_topic_template": "{queue}/{topic}",
                                   "downlink": {"overrides": {"mqtt_password": "hunter2",
                                                              "mqtt_qos": "2"}}}}, "t")
    assert mqtt.queue.downlink.overrides == {"mqtt_password": "hunter2", "mqtt_qos": 2}
    shown = effective_config(mqtt)["queue"]["downlink"]["overrides"]
    assert shown == {"mqtt_password": "***", "mqtt_qos": 2}


@pytest.mark.parametrize(("subscriptions", "exclude", "template", "loops"), [
    (("devices/#",), (), "devices/{device}/commands", True),
    (("+/+/commands",), (), "devices/{device}/commands", True),
    (("devices/+/telemetry",), (), "devices/{device}/commands", False),
    (("devices/#",), ("devices/+/commands",), "devices/{device}/commands", False),
    (("devices/#",), ("devices/d1/commands",), "devices/{device}/commands", True),  # too narrow
    (("sensors/#",), (), "cmd/dev-{n}/set", False),
])
def test_the_loop_guard_names_both_keys(subscriptions: tuple[str, ...], exclude: tuple[str, ...],
                                        template: str, loops: bool) -> None:
    downlink = {"enabled": True, "topic_template": template}
    if not loops:
        cfg(downlink, subscriptions=subscriptions, exclude=exclude)
        return
    with pytest.raises(ConfigError) as err:
        cfg(downlink, subscriptions=subscriptions, exclude=exclude)
    assert err.value.key == "queue.downlink.topic_template"
    assert "ingress.subscriptions[0].topic" in err.value.reason
    assert "ingress.exclude" in err.value.reason
    cfg({**downlink, "enabled": False}, subscriptions=subscriptions)  # off: nothing checked


def test_allowed_topics_are_guarded_and_a_source_may_not_be_the_uplink() -> None:
    with pytest.raises(ConfigError) as err:
        cfg({"enabled": True, "allowed_topics": ["sensors/+/set"]})
    assert err.value.key == "queue.downlink.allowed_topics[0]"
    cfg({"enabled": True, "allowed_topics": ["devices/+/set"]})  # attribute mode, fenced
    with pytest.raises(ConfigError) as err:
        cfg({"enabled": True, "source": "openhqm-requests"})
    assert err.value.key == "queue.downlink.source"
    with pytest.raises(ConfigError) as err:
        cfg({"enabled": True, "topic_template": "", "topic_attribute": ""})
    assert err.value.key == "queue.downlink.topic_template"


def test_an_mqtt_uplink_must_not_subscribe_to_its_own_uplinked_topics() -> None:
    def mqtt(template: str, downlink: dict[str, Any]) -> Any:
        return parse_config({"gateway": {"id": "gw7"}, "queue": {
            "type": "mqtt", "mqtt_topic_template": template, "mqtt_broker_port": 8883,
            "downlink": {"enabled": True, **downlink}}}, "t")

    with pytest.raises(ConfigError) as err:
        mqtt("up/{gateway_id}/{topic}", {})
    assert err.value.key == "queue.downlink.source" and "'up/gw7/#'" in err.value.reason
    mqtt("{queue}/{topic}", {})
    mqtt("up/{gateway_id}/{topic}",
         {"overrides": {"mqtt_topic_template": "down/{gateway_id}/{queue}/{topic}"}})


@pytest.mark.parametrize("template", ["devices/{}/x", "devices/{a/b}/x", "devices/+/{d}",
                                      "devices/{d}}", "$SYS/{d}", ""])
def test_bad_templates(template: str) -> None:
    if not template:
        with pytest.raises(ConfigError):
            cfg({"enabled": True, "topic_template": template, "topic_attribute": ""})
        return
    with pytest.raises(ConfigError) as err:
        cfg({"enabled": True, "topic_template": template})
    assert err.value.key == "queue.downlink.topic_template"


def test_template_rendering_and_filters() -> None:
    template = TopicTemplate.parse("site/{site}/dev-{id}/set", "k")
    assert template.as_filter() == "site/+/+/set"
    assert template.render({"site": "s1", "id": "7"}) == "site/s1/dev-7/set"
    for bad in ({"site": "s1"}, {"site": "s1", "id": ""}, {"site": "a/b", "id": "1"},
                {"site": "#", "id": "1"}):
        with pytest.raises(Undeliverable):
            template.render(bad)
    assert filter_covers("devices/+/commands", "devices/+/commands")
    assert filter_covers("devices/#", "devices/+/commands")
    assert not filter_covers("devices/d1/commands", "devices/+/commands")
    assert not filter_covers("devices/+", "devices/+/commands")
    assert not filter_covers("devices/+/commands", "devices/#")


def rules(**downlink: Any) -> CommandRules:
    dl = DownlinkConfig(enabled=True, **downlink)
    return CommandRules(dl, IngressView(["sensors/#", "devices/+/up"], ["sensors/echo/#"]))


def message(**attributes: str) -> QueueMessage:
    return QueueMessage("id-1", b"payload", dict(attributes), time.time())


def test_commands_from_attributes() -> None:
    command = rules().build(message(
        mqtt_topic="devices/d1/down", response_topic="devices/d1/up", correlation_id="req-9",
        content_type="application/json", mqtt_retain="true", expires_at="2100-01-01T00:00:00Z",
        note="n"))
    assert (command.topic, command.retain, command.content_type) == (
        "devices/d1/down", True, "application/json")
    assert command.correlation == b"req-9" and command.response_topic == "devices/d1/up"
    assert command.deadline == pytest.approx(4102444800.0)
    assert command.user_properties == (("openhqm_message_id", "id-1"), ("note", "n"))
    props = command.properties(4102444800.0 - 42.5)
    assert props.message_expiry_interval == 42  # rounded down: never kept too long


@pytest.mark.parametrize(("attributes", "fragment"), [
    ({}, "attribute 'mqtt_topic' is missing"),
    ({"mqtt_topic": "sensors/d1/temp"}, "matches the ingress subscription 'sensors/#'"),
    ({"mqtt_topic": "a/+/b"}, "wildcard"),
    ({"mqtt_topic": "$SYS/x"}, "starts with '$'"),
    ({"mqtt_topic": "x/y", "expires_at": "soon"}, "neither UNIX seconds nor an ISO 8601"),
    ({"mqtt_topic": "x/y", "expires_at": "2030-01-01T00:00:00"}, "no time zone"),
    ({"mqtt_topic": "x/y", "response_topic": "a/#"}, "not a topic name"),
])
def test_undeliverable_commands_say_why(attributes: dict[str, str], fragment: str) -> None:
    with pytest.raises(Undeliverable) as err:
        rules().build(message(**attributes))
    assert fragment in err.value.reason


def test_excluded_and_allowed_topics() -> None:
    assert rules().build(message(mqtt_topic="sensors/echo/1")).topic == "sensors/echo/1"
    fenced = rules(allowed_topics=["devices/+/down"])
    assert fenced.build(message(mqtt_topic="devices/d2/down")).topic == "devices/d2/down"
    with pytest.raises(Undeliverable, match="allowed_topics"):
        fenced.build(message(mqtt_topic="other/d2/down"))


def test_correlation_data_round_trips_text_and_binary() -> None:
    for data in (b"req-1", "ü".encode(), b"\x00\xff\x10", b""):
        attributes = correlation_attributes(data)
        assert correlation_data(attributes) == data
    assert correlation_attributes(b"\xff") == {
        "correlation_data_base64": base64.b64encode(b"\xff").decode()}
    assert expiry("1700000000.5") == 1700000000.5 and expiry(None) is None and expiry(" ") is None


async def test_the_ingress_carries_a_reply_up_and_excludes_what_it_is_told() -> None:
    from gateway.config import IngressConfig
    from gateway.ingress import MqttIngress
    from gateway.ingress.codec import Properties, Publish

    async def sink(messages: list[Any]) -> list[Any]:
        return []

    ingress = MqttIngress(IngressConfig(exclude=["devices/+/down"]), "gw", sink)
    props = Properties(response_topic="devices/d1/up", correlation_data=b"req-9",
                       user_properties=[("correlation_id", "spoofed"), ("k", "v")])
    reply = ingress.to_message(Publish("devices/d1/up", b"ok", 1, 1, False, False, props), 1.0)
    assert reply.attributes == {"k": "v", "response_topic": "devices/d1/up",
                                "correlation_id": "req-9"}
    assert ingress.excluded_topic is not None
    assert ingress.excluded_topic("devices/d1/down") and not ingress.excluded_topic("devices/d1/up")
    assert MqttIngress(IngressConfig(), "gw", sink).excluded_topic is None  # hot path untouched
