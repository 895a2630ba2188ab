"""The Kafka uplink over SASL_SSL (what Confluent Cloud, MSK and Event Hubs' Kafka endpoint
speak) against the session's real broker: its SASL_SSL listener has a certificate made for
this run. One client configuration reaches the producer, the consumer and the admin client,
so each of them is exercised over TLS here."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest

from gateway.errors import ConfigError, UplinkUnavailable
from gateway.message import ATTR_MESSAGE_ID, ATTR_MQTT_TOPIC, QueueMessage, new_message_id
from gateway.uplinks.kafka.settings import KafkaSettings
from gateway.uplinks.kafka.uplink import KafkaQueue
from tests.certs import make_certs
from tests.kafka_server import SASL_PASSWORD, SASL_USER, KafkaBroker

pytestmark = pytest.mark.integration


def tls_settings(broker: KafkaBroker, ca: Path, **overrides: object) -> KafkaSettings:
    base = {"kafka_bootstrap_servers": f"127.0.0.1:{broker.ssl_port}",
            "kafka_security_protocol": "SASL_SSL", "kafka_sasl_mechanism": "PLAIN",
            "kafka_sasl_username": SASL_USER, "kafka_sasl_password": SASL_PASSWORD,
            "kafka_ssl_ca_file": str(ca), "kafka_consumer_group": f"tls-{uuid.uuid4().hex[:8]}",
            "kafka_request_timeout": 10.0, "kafka_delivery_timeout": 8.0,
            "kafka_session_timeout": 6.0}
    return KafkaSettings(**{**base, **overrides})  # type: ignore[arg-type]


def message(n: int) -> QueueMessage:
    mid = new_message_id()
    return QueueMessage(mid, b'{"n":%d}' % n,
                        {ATTR_MESSAGE_ID: mid, ATTR_MQTT_TOPIC: f"sensors/dev-{n % 3}/temp"})


async def test_sasl_ssl_publishes_consumes_and_administers(kafka_broker: KafkaBroker) -> None:
    assert kafka_broker.certs is not None
    topic = f"tls-{uuid.uuid4().hex[:12]}"
    sent = [message(n) for n in range(20)]
    queue = KafkaQueue(tls_settings(kafka_broker, kafka_broker.certs.ca))
    async with queue:
        assert await queue.health_check()  # admin client
        assert await queue.create_queue(topic, partitions=2) is True
        results = await queue.publish_batch(topic, sent)  # producer
        assert all(r.ok for r in results), {str(r.error) for r in results if not r.ok}
        assert await queue.get_queue_depth(topic) == len(sent)
        got: asyncio.Queue[QueueMessage] = asyncio.Queue()

        async def handler(msg: QueueMessage) -> None:
            await got.put(msg)
        task = asyncio.create_task(queue.consume(topic, handler, batch_size=50,
                                                 wait_time_seconds=0.2))  # consumer
        async with asyncio.timeout(30):
            received = [await got.get() for _ in sent]
        for msg in received:
            assert await queue.acknowledge(msg.id)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert sorted(m.body for m in received) == sorted(m.body for m in sent)
        assert await queue.get_queue_depth(topic) == 0
        assert await queue.delete_queue(topic) is True


async def test_a_certificate_from_another_ca_is_unavailable_not_accepted(
        kafka_broker: KafkaBroker, tmp_path: Path) -> None:
    stranger = make_certs(tmp_path / "other-ca", ca_name="someone-else")
    queue = KafkaQueue(tls_settings(kafka_broker, stranger.ca, kafka_request_timeout=4.0))
    with pytest.raises(UplinkUnavailable):
        await queue.connect()
    assert await queue.health_check() is False


async def test_a_missing_ca_file_names_the_key(kafka_broker: KafkaBroker, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"ssl\.ca\.location") as info:
        await KafkaQueue(tls_settings(kafka_broker, tmp_path / "nope.crt")).connect()
    assert info.value.key == "queue.kafka_ssl_ca_file"
    assert info.value.value == str(tmp_path / "nope.crt")
