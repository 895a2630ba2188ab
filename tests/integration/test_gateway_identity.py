"""Gateway identity behind the real daemon (issue #18): with ``gateway: {id: gw-test-7}``
every message reaches every backend (redis, kafka, sqs, gcp_pubsub, azure_eventhubs, mqtt,
custom) with the attribute ``openhqm_gateway_id = gw-test-7``, read back as the backend's
own consumer sees it (stream field, record header, message attribute, application property,
MQTT 5 user property, the plugin's journal). A device's user property of that name does
not win, and a key template with ``{gateway_id}`` keys the Kafka records."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway.message import ATTR_GATEWAY_ID, ATTR_MQTT_TOPIC
from tests.gateway_process import GatewayProcess, Publisher, gateway_config
from tests.integration.test_end_to_end import read_stream
from tests.servers import ServerProcess, free_port, mosquitto_server, redis_server, wait_until

pytestmark = pytest.mark.integration

GID = "gw-test-7"
BACKENDS = ["redis", "kafka", "sqs", "gcp_pubsub", "azure_eventhubs", "mqtt", "custom"]
#: (body, attributes, key or None) of one message as the backend's consumer sees it
Got = tuple[bytes, dict[str, str], bytes | None]


@dataclass
class Target:
    queue: dict[str, Any]
    #: everything arrived so far
    read: Callable[[], list[Got]]
    env: dict[str, str] = field(default_factory=dict)
    cleanups: list[Callable[[], None]] = field(default_factory=list)


def _name() -> str:
    return f"gid-{uuid.uuid4().hex[:10]}"


def _redis(tmp: Path, request: pytest.FixtureRequest) -> Target:
    server = redis_server(tmp / "redis")
    server.start()
    stream = _name()
    return Target({"type": "redis", "redis_url": f"redis://127.0.0.1:{server.port}/0",
                   "request_queue_name": stream},
                  lambda: [(b, a, None) for _, b, a in read_stream(server.port, stream)],
                  cleanups=[server.stop])


def _kafka(tmp: Path, request: pytest.FixtureRequest) -> Target:
    from tests.kafka_read import read_topic

    broker = request.getfixturevalue("kafka_broker")
    topic = _name()

    def read() -> list[Got]:
        try:
            records = read_topic(broker.bootstrap, topic, timeout=5)
        except Exception:  # not created yet
            return []
        return [(r.value, {k: v.decode() for k, v in r.headers}, r.key) for r in records]

    return Target({"type": "kafka", "kafka_bootstrap_servers": broker.bootstrap,
                   "request_queue_name": topic,
                   "kafka_message_key": "{gateway_id}/{topic[2]}"}, read)


def _sqs(tmp: Path, request: pytest.FixtureRequest) -> Target:
    import boto3

    from gateway.uplinks.sqs import codec
    from tests.sqs_servers import DUMMY_AWS_ENV, endpoint, moto_sqs_server

    server = moto_sqs_server(tmp / "moto")
    server.start(30)
    name = _name()
    client = boto3.client("sqs", endpoint_url=endpoint(server), region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    got: list[Got] = []

    def read() -> list[Got]:
        try:
            url = client.get_queue_url(QueueName=name)["QueueUrl"]
        except client.exceptions.QueueDoesNotExist:
            return got
        reply = client.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1,
                                       MessageAttributeNames=["All"])
        for raw in reply.get("Messages") or []:
            native = raw["MessageAttributes"]
            # a plain SQS consumer sees it as a native String attribute, not packed
            assert native[ATTR_GATEWAY_ID] == {"DataType": "String", "StringValue": GID}
            msg = codec.decode(raw)
            got.append((msg.body, msg.attributes, None))
            client.delete_message(QueueUrl=url, ReceiptHandle=raw["ReceiptHandle"])
        return got

    return Target({"type": "sqs", "endpoint_url": endpoint(server), "sqs_auto_create_queues": True,
                   "request_queue_name": name}, read, dict(DUMMY_AWS_ENV), [server.stop])


def _pubsub(tmp: Path, request: pytest.FixtureRequest) -> Target:
    from tests.pubsub_server import FakeAdmin, pubsub_fake

    fake = pubsub_fake(tmp / "pstest")
    fake.start()
    project, topic = _name(), _name()
    admin = FakeAdmin(fake.host, project)
    got: list[Got] = []

    def read() -> list[Got]:
        try:
            pulled = admin.pull(f"{topic}-openhqm", at_least=0, timeout=3)
        except Exception:  # the uplink did not create it yet
            return got
        got.extend((bytes(r.message.data), dict(r.message.attributes),
                    r.message.ordering_key.encode() or None) for r in pulled)
        return got

    return Target({"type": "gcp_pubsub", "gcp_project_id": project,
                   "gcp_emulator_host": fake.host, "request_queue_name": topic}, read,
                  cleanups=[admin.close, fake.stop])


def _eventhubs(tmp: Path, request: pytest.FixtureRequest) -> Target:
    from tests.eventhubs_server import EventHubsServer

    server = EventHubsServer({}, port=free_port())
    server.start()
    hub = _name()
    server.add_hub(hub, 1)
    return Target({"type": "azure_eventhubs",
                   "azure_eventhubs_connection_string": server.connection_string(),
                   "azure_eventhubs_name": hub},
                  lambda: [(e.body, {k: str(v) for k, v in e.properties.items()},
                            e.partition_key.encode() if e.partition_key else None)
                           for e in server.events(hub)],
                  cleanups=[server.stop])


class _CloudReader:
    """An MQTT 5 subscriber on the cloud broker: payload and user properties."""

    def __init__(self, port: int, topic_filter: str) -> None:
        self.got: list[Got] = []
        self._lock = threading.Lock()
        ready = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2,
                                  client_id=f"gid-reader-{uuid.uuid4().hex[:6]}",
                                  protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: ready.set()
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(topic_filter, qos=1)
        self.client.loop_start()
        assert ready.wait(10), "no SUBACK from the cloud broker"

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        user = dict(getattr(msg.properties, "UserProperty", None) or [])
        with self._lock:
            self.got.append((bytes(msg.payload), user, None))

    def read(self) -> list[Got]:
        with self._lock:
            return list(self.got)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _mqtt(tmp: Path, request: pytest.FixtureRequest) -> Target:
    cloud = mosquitto_server(tmp / "cloud")
    cloud.start()
    reader = _CloudReader(cloud.port, "up/#")
    return Target({"type": "mqtt", "mqtt_broker_host": "127.0.0.1",
                   "mqtt_broker_port": cloud.port, "mqtt_topic_template": "up/{topic}"},
                  reader.read, cleanups=[reader.close, cloud.stop])


def _custom(tmp: Path, request: pytest.FixtureRequest) -> Target:
    from tests.contract.backend_custom import require_file_plugin

    require_file_plugin()
    from openhqm_file_uplink import pending_messages

    outbox, name = tmp / "outbox", _name()
    return Target({"type": "custom", "request_queue_name": name,
                   "custom_module": "openhqm_file_uplink", "custom_class": "FileQueue",
                   "custom_config": {"directory": str(outbox), "fsync": False}},
                  lambda: [(m.body, m.attributes, None) for m in pending_messages(outbox, name)])


MAKERS = {"redis": _redis, "kafka": _kafka, "sqs": _sqs, "gcp_pubsub": _pubsub,
          "azure_eventhubs": _eventhubs, "mqtt": _mqtt, "custom": _custom}


@pytest.fixture
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Target]:
    made = MAKERS[request.param](tmp_path, request)
    try:
        yield made
    finally:
        for cleanup in made.cleanups:
            cleanup()


def publish_v5(port: int, topic: str, payload: bytes, user: list[tuple[str, str]]) -> None:
    """One QoS 1 message with MQTT 5 user properties, as a device would send it."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"dev-{uuid.uuid4().hex[:6]}",
                         protocol=mqtt.MQTTv5)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.UserProperty = user
        client.publish(topic, payload, qos=1, properties=props).wait_for_publish(10)
    finally:
        client.loop_stop()
        client.disconnect()


@pytest.mark.parametrize("target", BACKENDS, indirect=True)
def test_the_gateway_id_arrives_at_every_backend(tmp_path: Path, mosquitto: ServerProcess,
                                                 target: Target) -> None:
    root = f"gid/{uuid.uuid4().hex[:8]}"
    gw = GatewayProcess(gateway_config(tmp_path, mosquitto.port, root, target.queue,
                                       gateway={"id": GID}), tmp_path, env=target.env)
    gw.start()
    pub = Publisher(mosquitto.port)
    sent = {b"a0": f"{root}/dev0/t", b"a1": f"{root}/dev0/t", b"b0": f"{root}/dev1/t"}
    try:
        for body, topic in sent.items():
            pub.publish(topic, body)
        pub.wait_all_acked(len(sent))
        # a device that names itself: its own property of that name does not win
        publish_v5(mosquitto.port, f"{root}/dev2/t", b"spoof",
                   [(ATTR_GATEWAY_ID, "spoofed"), ("device", "d2")])
        sent[b"spoof"] = f"{root}/dev2/t"
        got: dict[bytes, tuple[dict[str, str], bytes | None]] = {}

        def arrived() -> bool:
            got.update({body: (attrs, key) for body, attrs, key in target.read()})
            return set(sent) <= set(got)

        wait_until(arrived, 60, "every message at the backend")
        assert gw.stop() == 0
    finally:
        pub.close()
        gw.stop()
    for body, topic in sent.items():
        attrs, key = got[body]
        assert attrs[ATTR_GATEWAY_ID] == GID, (body, attrs)
        assert attrs[ATTR_MQTT_TOPIC] == topic
        if target.queue["type"] == "kafka":
            assert key == f"{GID}/{topic.split('/')[2]}".encode()
    assert got[b"spoof"][0]["device"] == "d2"  # other user properties travel as before


def test_a_key_template_keys_kafka_records_by_gateway(tmp_path: Path, mosquitto: ServerProcess,
                                                      kafka_broker: Any) -> None:
    """Two gateways, one topic, keys ``{gateway_id}``: each record keyed by its gateway."""
    from tests.kafka_read import read_topic

    topic = _name()
    queue = {"type": "kafka", "kafka_bootstrap_servers": kafka_broker.bootstrap,
             "request_queue_name": topic, "kafka_message_key": "{gateway_id}"}
    daemons = []
    pub = Publisher(mosquitto.port)
    try:
        for gid in ("gw-a", "gw-b"):
            root = f"{gid}/{uuid.uuid4().hex[:6]}"
            work = tmp_path / gid
            work.mkdir()
            gw = GatewayProcess(gateway_config(work, mosquitto.port, root, queue,
                                               gateway={"id": gid}), work)
            gw.start()
            daemons.append(gw)
            for n in range(5):
                pub.publish(f"{root}/dev{n}/t", f"{gid}:{n}".encode())
        pub.wait_all_acked(10)
        wait_until(lambda: len(read_topic(kafka_broker.bootstrap, topic, timeout=5)) >= 10, 60,
                   "both gateways' records")
        for gw in daemons:
            assert gw.stop() == 0
    finally:
        pub.close()
        for gw in daemons:
            gw.stop()
    records = read_topic(kafka_broker.bootstrap, topic)
    assert len(records) == 10
    for r in records:
        gid = r.value.decode().split(":")[0]
        assert r.key == gid.encode()
        assert dict(r.headers)[ATTR_GATEWAY_ID] == gid.encode()
    assert len({r.partition for r in records if r.key == b"gw-a"}) == 1  # one key, one partition


