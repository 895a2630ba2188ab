"""The background side of consume(): one EventHubConsumerClient per consume() call, one
``receive_batch`` task per partition, feeding batches into a small asyncio queue.

Each partition starts at the first sequence number this client has not handed out yet
(its checkpoint + 1 after a restart; ``-1``, the start of the retention, without one). The
queue holds at most a couple of batches, so a slow handler slows the receivers down instead
of piling events up in memory. The SDK reconnects by itself after errors; they are logged
and kept in ``last_error``. An SDK restart may deliver events again: consume() drops what
it already handed out, by sequence number.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from azure.eventhub import EventData
from azure.eventhub.aio import EventHubConsumerClient

from gateway.errors import QueueError
from gateway.message import encode_body
from gateway.uplinks.eventhubs.errors import translate

log = logging.getLogger("gateway.uplinks.eventhubs")

_LOG_EVERY = 30.0  # seconds between repeated receive-error log lines


class Receiver:
    def __init__(self, client: EventHubConsumerClient, hub: str, starts: dict[str, int | None],
                 *, batch_size: int, prefetch: int) -> None:
        self.client = client
        self.hub = hub
        self.starts = starts
        self.batch_size = batch_size
        self.prefetch = max(prefetch, batch_size)
        self.batches: asyncio.Queue[tuple[str, list[EventData]]] = asyncio.Queue(
            maxsize=max(2, len(starts)))
        self.tasks: list[asyncio.Task[None]] = []
        self.last_error: QueueError | None = None
        self._logged_at = 0.0

    def start(self) -> None:
        for partition_id, start in self.starts.items():
            self.tasks.append(asyncio.create_task(self._receive(partition_id, start),
                                                  name=f"eventhubs-receive-{self.hub}-{partition_id}"))

    async def _receive(self, partition_id: str, start: int | None) -> None:
        position: int | str = "-1" if start is None else start
        await self.client.receive_batch(
            self._on_batch, partition_id=partition_id, starting_position=position,
            starting_position_inclusive=start is not None, max_batch_size=self.batch_size,
            prefetch=self.prefetch, on_error=self._on_error)

    async def _on_batch(self, context: Any, events: list[EventData]) -> None:
        if events:
            await self.batches.put((str(context.partition_id), events))

    async def _on_error(self, context: Any, error: Exception) -> None:
        self.last_error = translate(error, f"receive from {self.hub}")
        now = time.monotonic()
        if now - self._logged_at >= _LOG_EVERY:
            self._logged_at = now
            log.warning("eventhubs: %s (partition %s); the SDK keeps reconnecting",
                        self.last_error, getattr(context, "partition_id", "?"))

    def failed(self) -> BaseException | None:
        """What a receive task died of (it should only end when the client closes)."""
        for task in self.tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                return task.exception()
        return None

    async def close(self, timeout: float) -> None:
        try:
            async with asyncio.timeout(timeout):
                await self.client.close()
        except Exception as exc:
            log.debug("eventhubs: closing the consumer: %s", exc)
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


def text(value: Any) -> str:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", "replace")
    return str(value)


def event_body(event: EventData) -> bytes:
    body = event.body
    if isinstance(body, bytes):
        return body
    if isinstance(body, str):
        return body.encode("utf-8")
    parts: Any = body  # a list of data sections for a multi-section event
    try:
        return b"".join(bytes(part) for part in parts)
    except TypeError:
        return encode_body(str(body))
