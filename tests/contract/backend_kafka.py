"""The Kafka backend of the contract suite, against the session's real broker.

Each test gets its own consumer group and dead-letter topic; queue names are fresh topics
the uplink creates on first use. The poison message is one the *broker* refuses: the hook
creates the test's topic with a small ``max.message.bytes`` and returns a message above
it (below the producer's own limit), so publish_batch must isolate it from its batch.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from gateway.message import QueueMessage, new_message_id
from gateway.uplinks.kafka.settings import KafkaSettings
from gateway.uplinks.kafka.uplink import HEADER_DLQ_REASON, HEADER_DLQ_SOURCE, KafkaQueue
from tests.contract.backends import ContractTarget
from tests.integration.kafka_fixtures import kafka_broker
from tests.kafka_read import read_all
from tests.kafka_server import KafkaBroker

__all__ = ["kafka_backend", "kafka_broker"]

POISON_LIMIT = 4096


@pytest.fixture
async def kafka_backend(kafka_broker: KafkaBroker) -> AsyncIterator[ContractTarget]:
    suffix = uuid.uuid4().hex[:8]
    dlq = f"contract-dlq-{suffix}"
    settings = KafkaSettings(kafka_bootstrap_servers=kafka_broker.bootstrap,
                             kafka_consumer_group=f"contract-{suffix}",
                             kafka_request_timeout=10.0, kafka_delivery_timeout=8.0,
                             kafka_session_timeout=6.0, kafka_linger=0.0)
    queue = KafkaQueue(settings, client_id="contract", dlq_name=dlq)

    async def poison(queue_name: str) -> QueueMessage:
        await queue.create_queue(queue_name, config={"max.message.bytes": str(POISON_LIMIT)})
        return QueueMessage(new_message_id(), b"p" * (POISON_LIMIT * 3))

    async def dead_letters(queue_name: str) -> list[tuple[str, str]]:
        records = await read_all(kafka_broker.bootstrap, dlq)
        headers = [{k: v.decode() for k, v in r.headers} for r in records]
        return [(h["openhqm_message_id"], h[HEADER_DLQ_REASON]) for h in headers
                if h.get(HEADER_DLQ_SOURCE, "").startswith(f"{queue_name}/")]

    await queue.connect()
    try:
        yield ContractTarget("kafka", queue, poison, dead_letters=dead_letters)
    finally:
        await queue.disconnect()
