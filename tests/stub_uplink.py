"""An in-memory uplink for unit tests of the forwarder and service: it records what it was
given and fails on command. It is a test double for *our* interface, not for a server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any

from gateway.errors import MessageRejected, NotSupportedError, QueueError, UplinkUnavailable
from gateway.message import Body, QueueMessage, encode_body, new_message_id
from gateway.queue.interface import Handler, MessageQueueInterface, PublishResult


class StubUplink(MessageQueueInterface):
    backend_name = "stub"

    def __init__(self) -> None:
        self.published: list[tuple[str, QueueMessage]] = []
        #: (monotonic time, size) of each publish_batch call that was not refused as down
        self.calls: list[tuple[float, int]] = []
        self.down = False
        self.connects = 0
        #: returns an error for a message, or None to accept it
        self.fail: Callable[[QueueMessage], QueueError | None] = lambda m: None
        #: seconds each publish_batch takes (a slow uplink)
        self.delay = 0.0
        #: what the stub says of its acknowledgements (write-avoidance's default)
        self.durable_acks = False

    async def connect(self) -> None:
        if self.down:
            raise UplinkUnavailable("stub is down", backend="stub")
        self.connects += 1

    async def disconnect(self) -> None:
        return None

    async def publish(self, queue_name: str, message: Body, priority: int = 0,
                      attributes: dict[str, str] | None = None, delay_seconds: float = 0, *,
                      message_id: str | None = None) -> str:
        msg = QueueMessage(message_id or new_message_id(), encode_body(message), attributes or {})
        (result,) = await self.publish_batch(queue_name, [msg])
        if result.error is not None:
            raise result.error
        return result.message_id

    async def publish_batch(self, queue_name: str,
                            messages: Sequence[QueueMessage]) -> list[PublishResult]:
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.down:
            error = UplinkUnavailable("stub is down", backend="stub")
            return [PublishResult(m.id, error) for m in messages]
        self.calls.append((time.monotonic(), len(messages)))
        results = []
        for m in messages:
            error = self.fail(m)
            if error is None:
                self.published.append((queue_name, m))
            results.append(PublishResult(m.id, error))
        return results

    def bodies(self, queue_name: str | None = None) -> list[bytes]:
        return [m.body for q, m in self.published if queue_name in (None, q)]

    async def consume(self, queue_name: str, handler: Handler, batch_size: int = 10,
                      wait_time_seconds: float = 1.0) -> None:
        raise NotSupportedError("stub", "consume", "the stub only records publishes")

    async def acknowledge(self, message_id: str) -> bool:
        raise NotSupportedError("stub", "acknowledge", "the stub only records publishes")

    async def reject(self, message_id: str, requeue: bool = True, reason: str = "") -> bool:
        raise NotSupportedError("stub", "reject", "the stub only records publishes")

    async def get_queue_depth(self, queue_name: str) -> int:
        return sum(1 for q, _ in self.published if q == queue_name)

    async def health_check(self) -> bool:
        return not self.down

    async def create_queue(self, queue_name: str, **kwargs: Any) -> bool:
        raise NotSupportedError("stub", "create_queue", "queues are implicit")

    async def delete_queue(self, queue_name: str) -> bool:
        raise NotSupportedError("stub", "delete_queue", "queues are implicit")

    async def purge_queue(self, queue_name: str) -> int:
        raise NotSupportedError("stub", "purge_queue", "queues are implicit")


def reject_body(marker: bytes) -> Callable[[QueueMessage], QueueError | None]:
    def fail(m: QueueMessage) -> QueueError | None:
        return MessageRejected("poison", backend="stub") if marker in m.body else None
    return fail
