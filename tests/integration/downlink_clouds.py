"""The cloud side of the downlink tests, per backend: the daemon's ``queue:`` section, a cloud
application publishing commands at the backend (the backend's own class, with the ordering key
the backend offers: Kafka record key, SQS FIFO group, Pub/Sub ordering key, Event Hubs
partition key = the device), how many commands the backend still holds unacknowledged, and
what the gateway uplinked (to find a device's correlated reply).

Every backend runs on a real server or fake the test suite owns: redis-server, the session's
Kafka broker, moto and ElasticMQ, pstest, the Event Hubs test server, a second mosquitto
playing the cloud broker, and the example file plugin.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway.message import QueueMessage, new_message_id
from tests.servers import ServerProcess, free_port, mosquitto_server, redis_server, wait_until

BACKENDS = ["redis", "kafka", "sqs_moto", "sqs_elasticmq", "gcp_pubsub", "azure_eventhubs",
            "mqtt", "custom"]


@dataclass(frozen=True)
class Command:
    device: str
    n: int
    extra: dict[str, str] = field(default_factory=dict)
    #: MQTT 5 properties for the MQTT cloud publish (response topic, correlation, expiry)
    response_topic: str = ""
    correlation: bytes = b""
    expiry: int = 0
    message_id: str = field(default_factory=new_message_id)

    @property
    def body(self) -> bytes:
        return orjson.dumps({"device": self.device, "n": self.n})

    def attributes(self) -> dict[str, str]:
        attrs = {"device": self.device, "n": str(self.n), "openhqm_message_id": self.message_id,
                 **self.extra}
        if self.response_topic:
            attrs["response_topic"] = self.response_topic
        if self.correlation:
            attrs["correlation_id"] = self.correlation.decode()
        return attrs

    def message(self) -> QueueMessage:
        return QueueMessage(self.message_id, self.body, self.attributes(), time.time())


@dataclass
class Cloud:
    name: str
    tag: str
    #: the daemon's queue: section, the downlink included
    queue: dict[str, Any]
    send: Callable[[list[Command]], Awaitable[None]]
    #: commands the backend holds that were not acknowledged; None: the backend cannot say
    depth: Callable[[], Awaitable[int]] | None = None
    #: attributes of every message the gateway uplinked (replies come back this way)
    uplinked: Callable[[], Awaitable[list[dict[str, str]]]] | None = None
    env: dict[str, str] = field(default_factory=dict)
    cleanup: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    #: seconds until the backend redelivers what a killed consumer held (None: at once)
    redelivery_after: float = 0.0

    @property
    def source(self) -> str:
        return f"cmd-{self.tag}"

    @property
    def uplink(self) -> str:
        return f"up-{self.tag}"


def downlink_section(tag: str, **extra: Any) -> dict[str, Any]:
    return {"enabled": True, "topic_template": f"dl/{tag}/{{device}}/cmd", "poll_wait": "1s",
            "retry_delay": "100ms", **extra}


async def make_cloud(name: str, tag: str, tmp: Path, request: pytest.FixtureRequest) -> Cloud:
    maker = {"redis": _redis, "kafka": _kafka, "sqs_moto": _sqs, "sqs_elasticmq": _sqs,
             "gcp_pubsub": _pubsub, "azure_eventhubs": _eventhubs, "mqtt": _mqtt,
             "custom": _custom}[name]
    return await maker(name, tag, tmp, request)


async def _redis(name: str, tag: str, tmp: Path, request: pytest.FixtureRequest) -> Cloud:
    from gateway.uplinks.redis.settings import RedisSettings
    from gateway.uplinks.redis.uplink import RedisStreamsQueue

    server = redis_server(tmp / "redis")
    server.start()
    url = f"redis://127.0.0.1:{server.port}/0"
    app = RedisStreamsQueue(RedisSettings(redis_url=url), consumer_name="cloud-app")
    await app.connect()
    cloud = Cloud(name, tag, {}, _send_each(app, f"cmd-{tag}"))
    cloud.queue = {"type": "redis", "redis_url": url, "request_queue_name": cloud.uplink,
                   "response_queue_name": cloud.source, "downlink": downlink_section(tag)}
    cloud.depth = lambda: app.get_queue_depth(cloud.source)  # the same consumer group

    async def uplinked() -> list[dict[str, str]]:
        entries = await app.client.xrange(cloud.uplink)
        return [json.loads(fields[b"attributes"]) for _, fields in entries]

    cloud.uplinked = uplinked

    async def close() -> None:
        await app.disconnect()
        server.stop()

    cloud.cleanup.append(close)
    return cloud


def _send_each(app: Any, queue_name: str) -> Callable[[list[Command]], Awaitable[None]]:
    async def send(commands: list[Command]) -> None:
        for c in commands:
            await app.publish(queue_name, c.body, attributes=c.attributes(),
                              message_id=c.message_id)
    return send


def _send_batch(app: Any, queue_name: str) -> Callable[[list[Command]], Awaitable[None]]:
    async def send(commands: list[Command]) -> None:
        results = await app.publish_batch(queue_name, [c.message() for c in commands])
        assert all(r.ok for r in results), [r.error for r in results if not r.ok][:3]
    return send


async def _kafka(name: str, tag: str, tmp: Path, request: pytest.FixtureRequest) -> Cloud:
    from gateway.uplinks.kafka.settings import KafkaSettings
    from gateway.uplinks.kafka.uplink import KafkaQueue
    from tests.kafka_read import read_all

    broker = request.getfixturevalue("kafka_broker")
    group = f"gw-{tag}"
    settings = KafkaSettings(kafka_bootstrap_servers=broker.bootstrap, kafka_consumer_group=group,
                             kafka_message_key="{attr:device}", kafka_request_timeout=10.0)
    app = KafkaQueue(settings, client_id="cloud-app")
    await app.connect()
    cloud = Cloud(name, tag, {}, _send_batch(app, f"cmd-{tag}"))
    await app.create_queue(cloud.source, partitions=3)  # order is kept per key = partition
    cloud.queue = {"type": "kafka", "kafka_bootstrap_servers": broker.bootstrap,
                   "kafka_request_timeout": "10s", "kafka_session_timeout": "6s",
                   "request_queue_name": cloud.uplink, "response_queue_name": cloud.source,
                   "downlink": downlink_section(tag, overrides={"kafka_consumer_group": group})}
    cloud.depth = lambda: app.get_queue_depth(cloud.source)  # lag of the downlink's group

    async def uplinked() -> list[dict[str, str]]:
        records = await read_all(broker.bootstrap, cloud.uplink)
        return [{k: v.decode() for k, v in r.headers} for r in records]

    cloud.uplinked = uplinked
    cloud.cleanup.append(app.disconnect)
    return cloud


async def _sqs(name: str, tag: str, tmp: Path, request: pytest.FixtureRequest) -> Cloud:
    from gateway.uplinks.sqs.settings import SqsSettings
    from gateway.uplinks.sqs.uplink import SqsQueue
    from tests.sqs_servers import DUMMY_AWS_ENV, endpoint

    request.getfixturevalue("sqs_env")
    server: ServerProcess = request.getfixturevalue(
        {"sqs_moto": "moto_sqs", "sqs_elasticmq": "elasticmq"}[name])
    settings = SqsSettings(endpoint_url=endpoint(server), sqs_auto_create_queues=True,
                           sqs_message_group_id="{attr:device}")
    app = SqsQueue(settings)
    await app.connect()
    cloud = Cloud(name, tag, {}, _send_batch(app, f"cmd-{tag}.fifo"), env=dict(DUMMY_AWS_ENV))
    source = f"{cloud.source}.fifo"  # FIFO: order is kept per message group = device
    await app.create_queue(source)
    cloud.queue = {"type": "sqs", "endpoint_url": endpoint(server),
                   "sqs_auto_create_queues": True, "request_queue_name": f"{cloud.uplink}.fifo",
                   "response_queue_name": source, "downlink": downlink_section(tag)}
    cloud.depth = lambda: app.get_queue_depth(source)
    cloud.cleanup.append(app.disconnect)
    return cloud


async def _pubsub(name: str, tag: str, tmp: Path, request: pytest.FixtureRequest) -> Cloud:
    from gateway.uplinks.pubsub.settings import PubSubSettings
    from gateway.uplinks.pubsub.uplink import PubSubQueue
    from tests.pubsub_server import FakeAdmin

    fake = request.getfixturevalue("pubsub_emulator")
    project = f"dl-{tag}"
    admin = FakeAdmin(fake.host, project)
    # The subscription exists before anything is published (Pub/Sub drops what reaches a
    # topic without one), with ordering on and pstest's shortest ack deadline.
    await asyncio.to_thread(admin.create, f"cmd-{tag}", f"cmd-{tag}-openhqm",
                            enable_message_ordering=True, ack_deadline_seconds=10)
    app = PubSubQueue(PubSubSettings(gcp_project_id=project, gcp_emulator_host=fake.host,
                                     gcp_ordering_key="{attr:device}"))
    await app.connect()
    cloud = Cloud(name, tag, {}, _send_batch(app, f"cmd-{tag}"), redelivery_after=10.0)
    cloud.queue = {"type": "gcp_pubsub", "gcp_project_id": project,
                   "gcp_emulator_host": fake.host, "request_queue_name": cloud.uplink,
                   "response_queue_name": cloud.source, "downlink": downlink_section(tag)}

    async def close() -> None:
        await app.disconnect()
        admin.close()

    cloud.cleanup.append(close)
    return cloud


async def _eventhubs(name: str, tag: str, tmp: Path, request: pytest.FixtureRequest) -> Cloud:
    from gateway.uplinks.eventhubs.settings import EventHubsSettings
    from gateway.uplinks.eventhubs.uplink import EventHubsQueue

    server = request.getfixturevalue("eventhubs_server")
    server.add_hub(f"cmd-{tag}", 2)
    server.add_hub(f"up-{tag}", 1)
    settings = EventHubsSettings(azure_eventhubs_connection_string=server.connection_string(),
                                 azure_eventhubs_name=f"up-{tag}",
                                 azure_eventhubs_partition_key="{attr:device}")
    app = EventHubsQueue(settings, state_dir=str(tmp / "cloud-state"))
    await app.connect()
    cloud = Cloud(name, tag, {}, _send_batch(app, f"cmd-{tag}"))
    cloud.queue = {"type": "azure_eventhubs",
                   "azure_eventhubs_connection_string": server.connection_string(),
                   "azure_eventhubs_name": cloud.uplink, "request_queue_name": cloud.uplink,
                   "response_queue_name": cloud.source, "downlink": downlink_section(tag)}

    async def depth() -> int:
        # a fresh client reads the checkpoints the daemon's downlink wrote
        reader = EventHubsQueue(settings, state_dir=str(tmp / "state"))
        await reader.connect()
        try:
            return await reader.get_queue_depth(cloud.source)
        finally:
            await reader.disconnect()

    cloud.depth = depth
    cloud.cleanup.append(app.disconnect)
    return cloud


async def _mqtt(name: str, tag: str, tmp: Path, request: pytest.FixtureRequest) -> Cloud:
    from gateway.uplinks.mqtt.settings import MqttUplinkSettings
    from gateway.uplinks.mqtt.uplink import MqttQueue

    server = mosquitto_server(tmp / "cloud-broker")
    server.start()
    settings = MqttUplinkSettings(mqtt_broker_host="127.0.0.1", mqtt_broker_port=server.port,
                                  mqtt_client_id=f"gw-{tag}-downlink", mqtt_timeout=5.0)
    # MQTT keeps nothing for a subscription that does not exist yet: the downlink's session
    # subscribes before the cloud publishes (what a deployment does once, at install time)
    await MqttQueue(settings).subscribe_session(f"cmd-{tag}")
    app = CloudClient(server.port)
    cloud = Cloud(name, tag, {}, app.send_for(f"cmd-{tag}"))
    cloud.queue = {"type": "mqtt", "mqtt_broker_host": "127.0.0.1",
                   "mqtt_broker_port": server.port, "mqtt_client_id": f"gw-{tag}",
                   "mqtt_timeout": "5s", "request_queue_name": cloud.uplink,
                   "response_queue_name": cloud.source,
                   # the local topic is what follows cmd-<tag>/ in the cloud topic
                   "downlink": downlink_section(tag, topic_template="")}
    app.subscribe(f"{cloud.uplink}/#")

    async def uplinked() -> list[dict[str, str]]:
        return [props for _, _, props in app.snapshot()]

    cloud.uplinked = uplinked

    async def close() -> None:
        app.close()
        server.stop()

    cloud.cleanup.append(close)
    return cloud


class CloudClient:
    """A plain MQTT 5 client on the cloud broker: publishes commands (the local topic in the
    cloud topic, MQTT 5 properties native) and collects what the gateway uplinks."""

    def __init__(self, port: int) -> None:
        self.received: list[tuple[str, bytes, dict[str, str]]] = []
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"cloud-app-{port}",
                                  protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def subscribe(self, topic_filter: str) -> None:
        done = self.client.subscribe(topic_filter, 1)
        assert done[0] == mqtt.MQTT_ERR_SUCCESS

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        user = dict(getattr(msg.properties, "UserProperty", None) or [])
        self.received.append((msg.topic, bytes(msg.payload), user))

    def snapshot(self) -> list[tuple[str, bytes, dict[str, str]]]:
        return list(self.received)

    def send_for(self, source: str) -> Callable[[list[Command]], Awaitable[None]]:
        async def send(commands: list[Command]) -> None:
            infos = []
            for c in commands:
                props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
                user = {k: v for k, v in c.attributes().items()
                        if k not in ("response_topic", "correlation_id")}
                props.UserProperty = list(user.items())
                if c.response_topic:
                    props.ResponseTopic = c.response_topic
                if c.correlation:
                    props.CorrelationData = c.correlation
                if c.expiry:
                    props.MessageExpiryInterval = c.expiry
                topic = f"{source}/dl/{_tag_of(source)}/{c.device}/cmd"
                infos.append(self.client.publish(topic, c.body, qos=1, properties=props))
            for info in infos:
                await asyncio.to_thread(info.wait_for_publish, 10)
        return send

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _tag_of(source: str) -> str:
    return source.removeprefix("cmd-")


async def _custom(name: str, tag: str, tmp: Path, request: pytest.FixtureRequest) -> Cloud:
    from tests.contract.backend_custom import PLUGIN_TYPE, require_file_plugin

    require_file_plugin()
    from openhqm_file_uplink import drop, pending_messages

    directory = tmp / "journals"

    async def send(commands: list[Command]) -> None:
        for c in commands:  # another process's way in: the queue's inbox
            await asyncio.to_thread(drop, directory, f"cmd-{tag}", c.body, c.attributes(),
                                    c.message_id)

    cloud = Cloud(name, tag, {}, send)
    cloud.queue = {"type": PLUGIN_TYPE, "directory": str(directory), "fsync": False,
                   "request_queue_name": cloud.uplink, "response_queue_name": cloud.source,
                   "downlink": downlink_section(tag)}

    async def depth() -> int:
        inbox = directory / f"{cloud.source}.inbox"
        waiting = len(list(inbox.glob("*.json"))) if inbox.exists() else 0
        return waiting + len(await asyncio.to_thread(pending_messages, directory, cloud.source))

    cloud.depth = depth
    return cloud


@dataclass
class Device:
    """A device on the local broker (paho, MQTT 5, QoS 1): what it receives, in order; it can
    answer a request on its response topic with the correlation data."""

    port: int
    topic_filter: str
    client_id: str = field(default_factory=lambda: f"device-{free_port()}")
    received: list[tuple[str, bytes, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id,
                                  protocol=mqtt.MQTTv5)
        self.client.reconnect_delay_set(0.1, 0.5)
        self.client.on_connect = lambda c, u, f, r, p: c.subscribe(self.topic_filter, 1)
        self.client.on_message = self._on_message
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 600  # the broker keeps commands while we are away
        self.client.connect("127.0.0.1", self.port, clean_start=False, properties=props)
        self.client.loop_start()

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self.received.append((msg.topic, bytes(msg.payload), msg.properties))

    def snapshot(self) -> list[tuple[str, bytes, Any]]:
        return list(self.received)

    def commands(self) -> list[dict[str, Any]]:
        return [orjson.loads(body) for _, body, _ in self.snapshot()]

    def wait_for(self, count: int, timeout: float = 20.0) -> None:
        wait_until(lambda: len(self.received) >= count, timeout, f"{count} commands at the device")

    def reply(self, topic: str, payload: bytes, correlation: bytes) -> None:
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.CorrelationData = correlation
        self.client.publish(topic, payload, qos=1, properties=props).wait_for_publish(10)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def user_properties(props: Any) -> dict[str, str]:
    return dict(getattr(props, "UserProperty", None) or [])


async def cloud_for(name: str, tag: str, tmp: Path,
                    request: pytest.FixtureRequest) -> AsyncIterator[Cloud]:
    cloud = await make_cloud(name, tag, tmp, request)
    try:
        yield cloud
    finally:
        for close in reversed(cloud.cleanup):
            await close()


def now_plus(seconds: float) -> str:
    return f"{time.time() + seconds:.3f}"


__all__ = ["BACKENDS", "Cloud", "Command", "Device", "cloud_for", "free_port", "now_plus",
           "user_properties"]
