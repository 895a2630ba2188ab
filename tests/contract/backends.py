"""Backend fixtures for the contract suite: each yields a connected ContractTarget.

``ContractTarget`` carries the backend plus what only the backend can provide:

- ``poison(queue_name)``: a message this backend refuses on its own (so publish_batch must
  fail it alone), or None when the backend refuses nothing per message (the partial-failure
  test is then skipped with ``poison_reason``);
- ``dead_letters(queue_name)``: (message id, reason) of what reject(requeue=False) moved to
  the dead-letter destination, or None when the backend cannot show it.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gateway.message import QueueMessage, new_message_id
from gateway.queue.interface import MessageQueueInterface
from tests.servers import ServerProcess

PoisonHook = Callable[[str], Awaitable[QueueMessage | None]]
DeadLetterHook = Callable[[str], Awaitable[list[tuple[str, str]]]]


@dataclass
class ContractTarget:
    name: str
    queue: MessageQueueInterface
    poison: PoisonHook | None = None
    poison_reason: str = "this backend refuses no single message"
    dead_letters: DeadLetterHook | None = None

    def fresh_queue_name(self) -> str:
        return f"contract-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def redis_backend(redis: ServerProcess) -> AsyncIterator[ContractTarget]:
    from gateway.uplinks.redis.settings import RedisSettings
    from gateway.uplinks.redis.uplink import RedisStreamsQueue

    dlq = f"contract-dlq-{uuid.uuid4().hex[:8]}"
    settings = RedisSettings(redis_url=f"redis://127.0.0.1:{redis.port}/0",
                             redis_socket_timeout=5.0)
    queue = RedisStreamsQueue(settings, dlq_name=dlq, consumer_name="contract")

    async def poison(queue_name: str) -> QueueMessage:
        # Attributes must be a mapping of strings; a non-string key cannot be encoded, and
        # the adapter must refuse that one message without failing its batch.
        bad_attributes: Any = {1: "not a string key"}
        return QueueMessage(new_message_id(), b"poison", bad_attributes)

    async def dead_letters(queue_name: str) -> list[tuple[str, str]]:
        entries = await queue.client.xrange(dlq)
        return [(f[b"id"].decode(), f[b"reason"].decode()) for _, f in entries
                if f.get(b"source_stream") == queue_name.encode()]

    await queue.connect()
    try:
        yield ContractTarget("redis", queue, poison, dead_letters=dead_letters)
    finally:
        await queue.disconnect()


@pytest.fixture
async def sqlite_backend(tmp_path: Path) -> AsyncIterator[ContractTarget]:
    from gateway.config import StoreConfig
    from gateway.store.backend import SqliteQueue

    max_bytes = 64 * 1024
    queue = SqliteQueue(str(tmp_path / "store.db"), StoreConfig(max_bytes=max_bytes), name="sqlite")

    async def poison(queue_name: str) -> QueueMessage:
        return QueueMessage(new_message_id(), b"p" * (max_bytes + 1))

    async def dead_letters(queue_name: str) -> list[tuple[str, str]]:
        return [(d.id, d.reason) for d in await queue.store.list_dead(queue_name)]

    await queue.connect()
    try:
        yield ContractTarget("sqlite", queue, poison, "", dead_letters)
    finally:
        await queue.disconnect()
