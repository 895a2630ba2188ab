"""``type: sqlite``: the local store as a MessageQueueInterface backend.

The gateway's forwarder talks to the store directly; this adapter lets the store stand in
for a cloud queue (tests, a local consumer on the device, the contract suite). Semantics:

- publish/publish_batch append with the store's durability; a message larger than
  store.max_bytes is MessageRejected; one the store refuses for space (when_full=reject_new,
  disk full) is a RetryableError naming the reason.
- consume leases up to ``batch_size`` messages (lease = store.lease) and waits for new ones
  without polling; acknowledge deletes, reject(requeue) schedules a redelivery that counts
  as an attempt (after store.max_attempts it is dead-lettered), reject(no requeue) moves the
  message to the store's dead-letter table with the reason.
- An id is "in flight" for the client that consumed it; acknowledge/reject of anything
  else answers False.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any, Self

from gateway.config import Config, StoreConfig
from gateway.errors import MessageRejected, RetryableError, StoreError, UplinkUnavailable
from gateway.message import ATTR_MQTT_TOPIC, Body, QueueMessage, encode_body, new_message_id
from gateway.queue.interface import Handler, MessageQueueInterface, PublishResult
from gateway.store.records import AppendOutcome, NewMessage, Settlement
from gateway.store.store import Store


class SqliteQueue(MessageQueueInterface):
    backend_name = "sqlite"

    def __init__(self, path: str, store_cfg: StoreConfig | None = None, *,
                 name: str = "sqlite") -> None:
        self.path = path
        self.name = name
        self._cfg = store_cfg or StoreConfig()
        self._store: Store | None = None
        self._in_flight: dict[str, tuple[str, int]] = {}  # id -> (cursor, seq)

    @classmethod
    def from_config(cls, config: Config) -> Self:
        path = config.queue.settings.sqlite_path or config.store_path
        return cls(path, config.store)

    @property
    def store(self) -> Store:
        if self._store is None:
            raise UplinkUnavailable("not connected", backend=self.backend_name)
        return self._store

    @property
    def target(self) -> str:
        return self.path

    async def connect(self) -> None:
        if self._store is not None:
            return
        store = Store(self.path, self._cfg, exclusive=False)
        try:
            await store.open()
        except StoreError as exc:
            raise UplinkUnavailable(str(exc), backend=self.backend_name) from exc
        self._store = store

    async def disconnect(self) -> None:
        store, self._store = self._store, None
        self._in_flight.clear()
        if store is not None:
            await store.close()

    def _new(self, message_id: str, body: bytes, attributes: dict[str, str], priority: int,
             delay_seconds: float) -> NewMessage:
        return NewMessage(message_id, attributes.get(ATTR_MQTT_TOPIC, ""), body,
                          dict(attributes), time.time(), priority, delay_seconds)

    def _too_large(self, body: bytes) -> MessageRejected | None:
        """A body larger than store.max_bytes could never fit, whatever is dropped."""
        if len(body) <= self._cfg.max_bytes:
            return None
        return MessageRejected(f"message of {len(body)} bytes exceeds store.max_bytes "
                               f"({self._cfg.max_bytes})", backend=self.backend_name)

    def _error(self, outcome: AppendOutcome) -> RetryableError | None:
        if outcome.durable:
            return None
        return RetryableError(f"the store refused the message ({outcome.reason})",
                              backend=self.backend_name, code=outcome.reason)

    async def _append(self, queue: str, msgs: list[NewMessage]) -> list[AppendOutcome]:
        try:
            return await self.store.append(queue, msgs)
        except StoreError as exc:
            raise UplinkUnavailable(str(exc), backend=self.backend_name) from exc

    async def publish(self, queue_name: str, message: Body, priority: int = 0,
                      attributes: dict[str, str] | None = None, delay_seconds: float = 0, *,
                      message_id: str | None = None) -> str:
        mid = message_id or new_message_id()
        body = encode_body(message)
        too_large = self._too_large(body)
        if too_large is not None:
            raise too_large
        new = self._new(mid, body, attributes or {}, priority, delay_seconds)
        (outcome,) = await self._append(queue_name, [new])
        error = self._error(outcome)
        if error is not None:
            raise error
        return mid

    async def publish_batch(self, queue_name: str,
                            messages: Sequence[QueueMessage]) -> list[PublishResult]:
        results: dict[str, PublishResult] = {}
        accepted = []
        for m in messages:
            too_large = self._too_large(m.body)
            if too_large is not None:
                results[m.id] = PublishResult(m.id, too_large)
            else:
                accepted.append(m)
        news = [self._new(m.id, m.body, m.attributes, 0, 0) for m in accepted]
        try:
            outcomes = await self._append(queue_name, news)
        except UplinkUnavailable as exc:
            return [PublishResult(m.id, exc) for m in messages]
        for m, o in zip(accepted, outcomes, strict=True):
            results[m.id] = PublishResult(m.id, self._error(o))
        return [results[m.id] for m in messages]

    async def consume(self, queue_name: str, handler: Handler, batch_size: int = 10,
                      wait_time_seconds: float = 1.0) -> None:
        while True:
            batch = await self.store.lease(queue_name, batch_size)
            if not batch:
                await self.store.wait_ready(queue_name, wait_time_seconds)
                continue
            for stored in batch:
                msg = stored.to_queue_message()
                self._in_flight[msg.id] = (queue_name, stored.seq)
                try:
                    await handler(msg)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # the handler's failure is the message's outcome
                    await self.reject(msg.id, requeue=True, reason=f"handler raised: {exc!r}")

    async def acknowledge(self, message_id: str) -> bool:
        leased = self._in_flight.pop(message_id, None)
        if leased is None:
            return False
        cursor, seq = leased
        await self.store.settle(Settlement(delivered=[seq], cursor=cursor))
        return True

    async def reject(self, message_id: str, requeue: bool = True, reason: str = "") -> bool:
        leased = self._in_flight.pop(message_id, None)
        if leased is None:
            return False
        cursor, seq = leased
        why = reason or "rejected by the consumer"
        if requeue:
            await self.store.settle(Settlement(retry=[(seq, 0.0, why)], cursor=cursor))
        else:
            await self.store.settle(Settlement(dead=[(seq, why)], cursor=cursor))
        return True

    async def get_queue_depth(self, queue_name: str) -> int:
        return await self.store.depth(queue_name)

    async def health_check(self) -> bool:
        if self._store is None:
            return False
        try:
            return await self._store.ping()
        except Exception:  # health answers, it does not raise
            return False

    async def create_queue(self, queue_name: str, **kwargs: Any) -> bool:
        return await self.store.create_queue(queue_name)

    async def delete_queue(self, queue_name: str) -> bool:
        return await self.store.delete_queue(queue_name)

    async def purge_queue(self, queue_name: str) -> int:
        return await self.store.purge(queue_name)
