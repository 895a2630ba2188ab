"""The MQTT uplink against a second, real mosquitto playing the cloud broker: TLS with a
client certificate, username/password, an ACL and persistence (tests/mqtt_cloud.py)."""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway.config import parse_config
from gateway.errors import (
    ConfigError,
    MessageRejected,
    NotSupportedError,
    RetryableError,
    UplinkUnavailable,
)
from gateway.message import QueueMessage, new_message_id
from gateway.queue.registry import create_backend
from gateway.uplinks.mqtt.settings import MqttUplinkSettings
from gateway.uplinks.mqtt.uplink import MqttQueue, outcome_error
from tests.gateway_process import GatewayProcess, Publisher, gateway_config
from tests.mqtt_cloud import PASSWORD, USER, Certs, CloudSubscriber, running_cloud
from tests.servers import ServerProcess, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def cloud(tmp_path: Path) -> Iterator[tuple[ServerProcess, Certs]]:
    yield from running_cloud(tmp_path)


def settings_for(server: ServerProcess, certs: Certs, **overrides: Any) -> MqttUplinkSettings:
    values: dict[str, Any] = {
        "mqtt_broker_host": "localhost", "mqtt_broker_port": server.port,
        "mqtt_username": USER, "mqtt_password": PASSWORD, "mqtt_ca_file": str(certs.ca),
        "mqtt_cert_file": str(certs.client_cert), "mqtt_key_file": str(certs.client_key),
        "mqtt_topic_template": "up/{gateway_id}/{topic}", "mqtt_timeout": 5.0}
    values.update(overrides)
    return MqttUplinkSettings(**values)


@pytest.fixture
async def uplink(cloud: tuple[ServerProcess, Certs]) -> AsyncIterator[MqttQueue]:
    queue = MqttQueue(settings_for(*cloud), gateway_id=f"gw{uuid.uuid4().hex[:6]}", dlq_name="dlq")
    await queue.connect()
    try:
        yield queue
    finally:
        await queue.disconnect()


def check_order(received: list[tuple[str, bytes, dict[str, str]]]) -> None:
    last: dict[str, int] = defaultdict(lambda: -1)
    seen: set[bytes] = set()
    for _, body, _ in received:
        if body in seen:
            continue
        seen.add(body)
        data = orjson.loads(body)
        assert data["n"] > last[data["topic"]], f"{data['topic']}: {data['n']} after {last[data['topic']]}"
        last[data["topic"]] = data["n"]


async def test_batch_over_tls_with_user_properties_and_order(
        cloud: tuple[ServerProcess, Certs], uplink: MqttQueue) -> None:
    server, certs = cloud
    sub = CloudSubscriber(server.port, certs, f"up/{uplink.gateway_id}/#")
    try:
        batch = [QueueMessage(new_message_id(),
                              orjson.dumps({"topic": f"sensors/d{i % 3}", "n": i}),
                              {"mqtt_topic": f"sensors/d{i % 3}", "mqtt_qos": "1"})
                 for i in range(300)]
        results = await asyncio.wait_for(uplink.publish_batch("requests", batch), 20)
        assert [r.message_id for r in results] == [m.id for m in batch]
        assert all(r.ok for r in results), [r.error for r in results if not r.ok][:3]
        await asyncio.to_thread(wait_until, lambda: len(sub.snapshot()) >= 300, 10, "300 messages")
        got = sub.snapshot()
    finally:
        sub.close()
    by_id = {props["openhqm_message_id"]: (topic, body, props) for topic, body, props in got}
    assert set(by_id) == {m.id for m in batch}
    for m in batch:
        topic, body, props = by_id[m.id]
        assert topic == f"up/{uplink.gateway_id}/{m.attributes['mqtt_topic']}"
        assert body == m.body
        assert props["mqtt_topic"] == m.attributes["mqtt_topic"]
        assert props["openhqm_uplink"] == uplink.gateway_id
    check_order(got)
    assert await uplink.health_check() is True


async def test_a_refused_message_is_never_reported_delivered(
        cloud: tuple[ServerProcess, Certs]) -> None:
    # The ACL lets the gateway write up/# only. mosquitto 2.0 answers a denied publish with
    # PUBACK 0x87 and drops the connection (AWS IoT Core drops it too); whether the PUBACKs
    # or the closed socket reach the client first varies. Either way: the refused message
    # is not delivered, nothing after a lost connection is reported delivered, and the rest
    # go through once re-sent. (outcome_error's reason-code table is tested below.)
    queue = MqttQueue(settings_for(*cloud, mqtt_topic_template="{topic}"), gateway_id="gw")
    await queue.connect()
    try:
        good = [QueueMessage(new_message_id(), b"ok", {"mqtt_topic": f"up/ok/{i}"}) for i in range(4)]
        poison = QueueMessage(new_message_id(), b"no", {"mqtt_topic": "forbidden/x"})
        batch = [good[0], good[1], poison, good[2], good[3]]
        results = await queue.publish_batch("q", batch)
        errors = [r.error for r in results]
        assert not results[2].ok
        assert isinstance(errors[2], UplinkUnavailable) or (
            isinstance(errors[2], MessageRejected) and errors[2].code == "0x87"), errors
        first_down = next((i for i, e in enumerate(errors) if isinstance(e, UplinkUnavailable)),
                          len(errors))
        assert all(isinstance(e, UplinkUnavailable) for e in errors[first_down:]), errors
        again = await queue.publish_batch("q", [m for m, r in zip(batch, results, strict=True)
                                                if not r.ok and m is not poison])
        assert all(r.ok for r in again), [r.error for r in again]
    finally:
        await queue.disconnect()


async def test_wrong_password_or_untrusted_ca_is_unavailable(
        cloud: tuple[ServerProcess, Certs], tmp_path: Path) -> None:
    server, certs = cloud
    with pytest.raises(UplinkUnavailable, match="refused the connection"):
        await MqttQueue(settings_for(server, certs, mqtt_password="wrong")).connect()
    other = tmp_path / "other-ca.crt"
    other.write_bytes(certs.client_cert.read_bytes())  # not the CA that signed the server
    with pytest.raises(UplinkUnavailable, match=r"CERTIFICATE_VERIFY_FAILED|certificate"):
        await MqttQueue(settings_for(server, certs, mqtt_ca_file=str(other))).connect()
    results = await MqttQueue(settings_for(server, certs)).publish_batch(
        "q", [QueueMessage(new_message_id(), b"x")])
    assert isinstance(results[0].error, UplinkUnavailable)  # never connected


async def test_consume_acknowledge_and_reject_by_republishing(uplink: MqttQueue) -> None:
    received: asyncio.Queue[QueueMessage] = asyncio.Queue()

    async def handler(msg: QueueMessage) -> None:
        await received.put(msg)

    task = asyncio.create_task(uplink.consume("requests", handler))
    try:
        await asyncio.sleep(0.5)  # the persistent subscription is in place
        first = await uplink.publish("requests", b"one", attributes={"mqtt_topic": "s/1"})
        msg = await asyncio.wait_for(received.get(), 10)
        assert (msg.id, msg.body, msg.retry_count) == (first, b"one", 0)
        assert msg.attributes["mqtt_topic"] == "s/1"
        assert await uplink.reject(first, requeue=True, reason="later") is True
        again = await asyncio.wait_for(received.get(), 10)
        assert (again.id, again.retry_count) == (first, 1)
        assert await uplink.acknowledge(first) is True
        assert await uplink.acknowledge(first) is False
        assert await uplink.acknowledge(new_message_id()) is False
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    for call in (uplink.get_queue_depth("requests"), uplink.create_queue("x"),
                 uplink.delete_queue("x"), uplink.purge_queue("x")):
        with pytest.raises(NotSupportedError):
            await call
    with pytest.raises(NotSupportedError):
        await uplink.publish("requests", b"later", delay_seconds=1)


def _mqtt_config(ingress_port: int, broker_port: int, template: str,
                 subscription: str = "sensors/#") -> dict[str, Any]:
    return {"ingress": {"port": ingress_port, "subscriptions": [{"topic": subscription}]},
            "gateway": {"id": "gw1"},
            "queue": {"type": "mqtt", "mqtt_broker_host": "localhost",
                      "mqtt_broker_port": broker_port, "mqtt_topic_template": template}}


@pytest.mark.parametrize(("template", "subscription", "loops"), [
    ("{topic}", "sensors/#", True),
    ("{queue}/{topic}", "#", True),
    ("{queue}/{topic}", "+/sensors/#", True),
    ("cloud/{gateway_id}/{topic}", "sensors/#", False),
    ("cloud/{gateway_id}/{topic}", "cloud/gw2/#", False),
    ("cloud/{gateway_id}/{topic}", "cloud/gw1/x", True),
])
def test_the_same_broker_with_a_looping_template_is_refused(template: str, subscription: str,
                                                            loops: bool) -> None:
    same = parse_config(_mqtt_config(1883, 1883, template, subscription), "test.yaml")
    if loops:
        with pytest.raises(ConfigError) as err:
            create_backend(same)
        assert err.value.key == "queue.mqtt_topic_template"
        assert "ingest its own uplink" in err.value.reason
    else:
        assert isinstance(create_backend(same), MqttQueue)
    other = parse_config(_mqtt_config(1883, 8883, template, subscription), "test.yaml")
    assert isinstance(create_backend(other), MqttQueue)  # another broker: no loop possible


@pytest.mark.parametrize(("code", "kind"), [
    (0x00, None), (0x10, None), (0x87, MessageRejected), (0x90, MessageRejected),
    (0x95, MessageRejected), (0x99, MessageRejected), (0x97, RetryableError),
    (0x80, RetryableError), (-9, MessageRejected)])
def test_puback_reason_codes(code: int, kind: type[Exception] | None) -> None:
    error = outcome_error((code, "text"))
    assert (type(error) if error is not None else None) is kind


def test_bad_templates_are_refused() -> None:
    for template in ("{sensor}", "up/#/{topic}", ""):
        with pytest.raises(ConfigError) as err:
            create_backend(parse_config(_mqtt_config(1883, 8883, template), "test.yaml"))
        assert err.value.key == "queue.mqtt_topic_template"


def test_daemon_outage_of_the_cloud_broker_loses_nothing(
        tmp_path: Path, mosquitto: ServerProcess, cloud: tuple[ServerProcess, Certs]) -> None:
    server, certs = cloud
    root = f"mq/{uuid.uuid4().hex[:8]}"
    settings = settings_for(server, certs, mqtt_topic_template="up/{topic}")
    queue = {"type": "mqtt", **{k: v for k, v in vars_of(settings).items() if v is not None}}
    config = gateway_config(tmp_path, mosquitto.port, root, queue)
    sub = CloudSubscriber(server.port, certs, f"up/{root}/#")
    gw = GatewayProcess(config, tmp_path)
    gw.start()
    pub = Publisher(mosquitto.port)
    try:
        topics = [f"{root}/dev{i}/temp" for i in range(3)]
        sent = [orjson.dumps({"topic": t, "n": n}) for n in range(150) for t in topics]
        for body in sent[:200]:
            pub.publish(orjson.loads(body)["topic"], body)
        pub.wait_all_acked(200)
        server.stop()  # the cloud goes away part-way
        for body in sent[200:]:
            pub.publish(orjson.loads(body)["topic"], body)
        pub.wait_all_acked(len(sent))  # the gateway keeps taking messages meanwhile
        server.start()
        wait_until(lambda: {b for _, b, _ in sub.snapshot()} >= set(sent), 30,
                   f"all {len(sent)} messages at the cloud")
        assert gw.stop() == 0
    finally:
        pub.close()
        sub.close()
        gw.stop()
    got = sub.snapshot()
    assert {b for _, b, _ in got} == set(sent)
    check_order(got)


def vars_of(settings: MqttUplinkSettings) -> dict[str, Any]:
    import dataclasses

    return {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)}
