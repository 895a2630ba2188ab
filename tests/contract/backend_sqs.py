"""The SQS backend of the contract suite, twice: against moto (server mode) and ElasticMQ.

Each test gets its own dead-letter queue; queue names are fresh and created on first use
(``sqs_auto_create_queues``). The poison message is one the *server* refuses, never the
gateway's own size check, and both servers refuse a batch holding it as a whole, so
publish_batch must isolate it:
- moto: the hook creates the test's queue with ``MaximumMessageSize`` 1024 and returns a
  3 KiB message;
- ElasticMQ ignores a queue's MaximumMessageSize but enforces SQS's 256 KiB limit: the
  uplink's own limit is raised to 1 MiB (as for AWS queues since 2025) and the hook returns
  a 300 KiB message.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from gateway.message import QueueMessage, new_message_id
from gateway.uplinks.sqs import codec
from gateway.uplinks.sqs.settings import SqsSettings
from gateway.uplinks.sqs.uplink import SqsQueue
from tests.contract.backends import ContractTarget
from tests.integration.sqs_fixtures import elasticmq, moto_sqs
from tests.servers import ServerProcess
from tests.sqs_servers import endpoint, use_dummy_aws_credentials

__all__ = ["elasticmq", "moto_sqs", "sqs_elasticmq_backend", "sqs_moto_backend"]

POISON_LIMIT = 1024


async def _target(name: str, server: ServerProcess, *,
                  queue_size_limit: bool) -> AsyncIterator[ContractTarget]:
    dlq = f"contract-dlq-{uuid.uuid4().hex[:8]}"
    settings = SqsSettings(endpoint_url=endpoint(server), sqs_auto_create_queues=True,
                           sqs_connect_timeout=2.0, sqs_read_timeout=10.0, sqs_max_attempts=1,
                           sqs_max_message_size=1024 * 1024)
    queue = SqsQueue(settings, request_queue_name=f"contract-req-{uuid.uuid4().hex[:8]}",
                     dlq_name=dlq)

    async def poison(queue_name: str) -> QueueMessage:
        if queue_size_limit:
            await queue.create_queue(queue_name, MaximumMessageSize=POISON_LIMIT)
            return QueueMessage(new_message_id(), b"p" * (POISON_LIMIT * 3))
        return QueueMessage(new_message_id(), b"p" * (300 * 1024))

    async def dead_letters(queue_name: str) -> list[tuple[str, str]]:
        url = await queue.queue_url(dlq, create=False)
        reply = await queue.client.receive_message(
            QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1,
            MessageAttributeNames=["All"])
        messages = [codec.decode(raw) for raw in reply.get("Messages") or []]
        return [(m.id, m.attributes[codec.ATTR_DLQ_REASON]) for m in messages
                if m.attributes.get(codec.ATTR_DLQ_SOURCE) == queue_name]

    await queue.connect()
    try:
        yield ContractTarget(name, queue, poison, dead_letters=dead_letters)
    finally:
        await queue.disconnect()


@pytest.fixture
async def sqs_moto_backend(moto_sqs: ServerProcess,
                           monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[ContractTarget]:
    use_dummy_aws_credentials(monkeypatch)
    async for target in _target("sqs_moto", moto_sqs, queue_size_limit=True):
        yield target


@pytest.fixture
async def sqs_elasticmq_backend(elasticmq: ServerProcess,
                                monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[ContractTarget]:
    use_dummy_aws_credentials(monkeypatch)
    async for target in _target("sqs_elasticmq", elasticmq, queue_size_limit=False):
        yield target
