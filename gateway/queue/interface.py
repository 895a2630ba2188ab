"""MessageQueueInterface: the one abstraction every backend implements.

Semantics every implementation keeps (tests/contract/ checks them against each backend):

- ``connect``/``disconnect`` open and close network resources; constructors do no I/O.
  Implementations are async context managers (``async with backend: ...``).
- ``publish`` returns the message id. When the caller passes ``message_id`` (the gateway
  always does) that id is carried to the backend so consumers can deduplicate; the
  returned id is the same string. Attributes travel with the message. A ``publish``
  written to the seed's signature (no ``message_id`` parameter) is called without it; the
  gateway's id still reaches it as the attribute ``openhqm_message_id``.
- ``publish_batch`` publishes many messages to one queue and returns one PublishResult per
  input, in input order. Partial failure is normal: each result carries its own error.
  When the backend becomes unreachable part-way, the remaining results carry
  UplinkUnavailable and nothing more is attempted.
- ``consume`` runs until cancelled: it fetches up to ``batch_size`` messages at a time,
  waiting up to ``wait_time_seconds`` for them, and awaits ``handler(message)`` for each.
  A message the handler returns from stays in flight until ``acknowledge`` or ``reject``;
  a handler that raises has its message rejected with requeue.
- ``acknowledge(id)`` removes an in-flight message for good; False when no message with
  that id is in flight for this client.
- ``reject(id, requeue, reason)`` returns the message to the queue (requeue=True) or moves
  it to the dead-letter destination with the reason; False when not in flight.
- ``get_queue_depth`` is the real backlog (messages not yet acknowledged).
- ``health_check`` answers True only after a real round trip to the backend.
- ``create_queue``/``delete_queue`` return True when they changed something;
  ``purge_queue`` returns how many messages it removed.

Anything a backend cannot do raises NotSupportedError; nothing is silently skipped.

``backend_name`` names the uplink in logs, metrics and errors: the ``queue.type`` for the
built-in backends; a subclass that sets none is named by its class (never "abstract").
``target`` says where it connects (for "has not connected within 5s, trying ...").
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from functools import cache
from types import TracebackType
from typing import Any, NamedTuple, Self

from gateway.errors import QueueError, UplinkUnavailable
from gateway.message import ATTR_MESSAGE_ID, Body, QueueMessage, encode_body, new_message_id

Handler = Callable[[QueueMessage], Awaitable[None]]


class PublishResult(NamedTuple):
    """The outcome for one message of a batch: ``error`` is None when it was accepted.
    (A tuple: one is built per message of every batch, and a tuple is the cheapest object.)"""

    message_id: str
    error: QueueError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@cache
def takes_message_id(publish: Callable[..., Any]) -> bool:
    """Whether a ``publish`` accepts ``message_id=`` (the seed's signature does not)."""
    try:
        params = inspect.signature(publish).parameters.values()
    except (TypeError, ValueError):  # no signature to read: call it as the interface says
        return True
    return any(p.name == "message_id" or p.kind is inspect.Parameter.VAR_KEYWORD
               for p in params)


class MessageQueueInterface(ABC):
    #: the ``queue.type`` name, used in errors, logs and metrics; a subclass that sets none
    #: is named by its class
    backend_name: str = "abstract"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.backend_name == MessageQueueInterface.backend_name:
            cls.backend_name = cls.__name__

    #: the backend's acceptance of a message (``PublishResult.ok``) means the service stored it
    #: durably, so the gateway may acknowledge the message without writing it first
    #: (``forwarder.ack_when`` unset: write-avoidance, docs/reliability.md). False unless a
    #: backend knows better: a handler that says nothing is not trusted with it.
    durable_acks: bool = False

    @property
    def target(self) -> str:
        """Where this uplink connects (host:port, or a URL with its password masked), for
        the log lines that say it could not; '' when it cannot tell."""
        return ""

    @abstractmethod
    async def connect(self) -> None: ...

    @abstractmethod
    async def disconnect(self) -> None: ...

    @abstractmethod
    async def publish(
        self,
        queue_name: str,
        message: Body,
        priority: int = 0,
        attributes: dict[str, str] | None = None,
        delay_seconds: float = 0,
        *,
        message_id: str | None = None,
    ) -> str: ...

    async def publish_batch(
        self, queue_name: str, messages: Sequence[QueueMessage]
    ) -> list[PublishResult]:
        """Loop over ``publish``; backends override this with a real batch call. The message
        id goes as ``message_id=`` when ``publish`` takes it, and always as the attribute
        ``openhqm_message_id``."""
        results: list[PublishResult] = []
        with_id = takes_message_id(type(self).publish)
        for index, msg in enumerate(messages):
            attributes = msg.attributes
            if attributes.get(ATTR_MESSAGE_ID) != msg.id:
                attributes = {**attributes, ATTR_MESSAGE_ID: msg.id}
            try:
                if with_id:
                    await self.publish(queue_name, msg.body, attributes=attributes,
                                       message_id=msg.id)
                else:
                    await self.publish(queue_name, msg.body, attributes=attributes)
            except UplinkUnavailable as exc:
                results.extend(PublishResult(m.id, exc) for m in messages[index:])
                break
            except QueueError as exc:
                results.append(PublishResult(msg.id, exc))
            else:
                results.append(PublishResult(msg.id))
        return results

    @abstractmethod
    async def consume(
        self,
        queue_name: str,
        handler: Handler,
        batch_size: int = 10,
        wait_time_seconds: float = 1.0,
    ) -> None: ...

    @abstractmethod
    async def acknowledge(self, message_id: str) -> bool: ...

    @abstractmethod
    async def reject(self, message_id: str, requeue: bool = True, reason: str = "") -> bool: ...

    @abstractmethod
    async def get_queue_depth(self, queue_name: str) -> int: ...

    @abstractmethod
    async def health_check(self) -> bool: ...

    @abstractmethod
    async def create_queue(self, queue_name: str, **kwargs: Any) -> bool: ...

    @abstractmethod
    async def delete_queue(self, queue_name: str) -> bool: ...

    @abstractmethod
    async def purge_queue(self, queue_name: str) -> int: ...

    async def _publish_one(self, queue_name: str, message: Body, priority: int,
                           attributes: dict[str, str] | None, *, message_id: str | None,
                           priority_attribute: str) -> str:
        """``publish`` for a backend without native priorities: a batch of one message whose
        priority travels as the attribute ``priority_attribute`` for consumers to read."""
        attrs = dict(attributes or {})
        if priority:
            attrs[priority_attribute] = str(priority)
        msg = QueueMessage(message_id or new_message_id(), encode_body(message), attrs)
        (result,) = await self.publish_batch(queue_name, [msg])
        if result.error is not None:
            raise result.error
        return msg.id

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.disconnect()
