"""Publishing one batch through google-cloud-pubsub's batching publisher, one outcome each.

- Every message becomes one ``PublisherClient.publish`` call with the gateway message id and
  all attributes as Pub/Sub attributes and its rendered ordering key; the returned futures
  (concurrent.futures) are awaited with ``asyncio.wrap_future``, never with ``.result()``.
- A message the service would refuse (``check_message``) is refused before sending, so it
  neither fails a publish request of others nor pauses its ordering key.
- Every request is one attempt (``retry=None``, ``gcp_publish_timeout``): the forwarder does
  the retrying, so an outage does not pile messages up inside the library.
- A failed publish pauses its ordering key in the library. The later messages of that key
  fail with it: unavailable when the first failure was, else retryable. After the batch the
  keys that failed are resumed (``resume_publish``) so the next attempt can go.
- A message with an attribute named like one of ``publish()``'s own keyword arguments goes in
  a request of its own (``_publish_alone``), without overtaking a message of its key.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Future as ConcurrentFuture
from typing import Any, TypeVar

from google.pubsub_v1 import PublisherClient as GapicPublisherClient

from gateway.errors import MessageRejected, QueueError, RetryableError, UplinkUnavailable
from gateway.message import ATTR_MESSAGE_ID, QueueMessage
from gateway.queue.keys import KeyTemplate
from gateway.uplinks.pubsub.errors import BACKEND, translate
from gateway.uplinks.pubsub.settings import MAX_REQUEST_BYTES

#: the service's limits (https://cloud.google.com/pubsub/quotas#resource_limits)
MAX_ATTRIBUTES = 100
MAX_ATTRIBUTE_KEY_BYTES = 256
MAX_ATTRIBUTE_VALUE_BYTES = 1024
#: on top of gcp_publish_timeout before a publish counts as unanswered
GRACE = 2.0
#: attribute names google-cloud-pubsub's publish() takes as its own keyword arguments
_RESERVED = frozenset({"topic", "data", "ordering_key", "retry", "timeout"})

R = TypeVar("R")
#: runs a blocking call off the event loop, translating what it raises
BlockingCall = Callable[[str, Callable[[], Any]], Awaitable[Any]]
#: a message handed to the library (its future), refused (the error) or already accepted
_Submitted = asyncio.Future[Any] | QueueError | None


class Publisher:
    def __init__(self, ordering: KeyTemplate | None, timeout: float, call: BlockingCall) -> None:
        self.ordering = ordering
        self.timeout = timeout
        self._call = call
        #: library futures not finished yet; disconnect waits for them before closing
        self.outstanding: set[ConcurrentFuture[Any]] = set()

    def ordering_key(self, msg: QueueMessage) -> str:
        if self.ordering is None:
            return ""
        key = self.ordering.render(msg)
        return key.decode("utf-8") if key else ""

    async def publish_batch(self, client: Any, topic: str,
                            messages: Sequence[QueueMessage]) -> list[QueueError | None]:
        """One error (None = accepted) per message, in order. ``client`` is the library's
        PublisherClient."""
        keys = [self.ordering_key(m) for m in messages]
        submitted: list[_Submitted] = []
        failed_alone: set[str] = set()
        for msg, key in zip(messages, keys, strict=True):
            if key and key in failed_alone:
                submitted.append(_paused(key, "an earlier message of the key failed"))
            elif _RESERVED.isdisjoint(msg.attributes):
                submitted.append(self._submit(client, topic, msg, key))
            else:
                outcome = await self._publish_alone(client, topic, msg, key,
                                                    earlier=submitted, keys=keys)
                submitted.append(outcome)
                if outcome is not None and key:
                    failed_alone.add(key)
        waiting = [f for f in submitted if isinstance(f, asyncio.Future)]
        if waiting:
            _, late = await asyncio.wait(waiting, timeout=self.timeout + GRACE)
            for future in late:
                future.cancel()  # only our view of it: the library still finishes the request
        errors = _outcomes(submitted, keys, self.timeout)
        if self.ordering is not None:
            _resume(client, topic, {k for k, e in zip(keys, errors, strict=True) if e and k})
        return errors

    def _submit(self, client: Any, topic: str, msg: QueueMessage, key: str) -> _Submitted:
        attrs = {**msg.attributes, ATTR_MESSAGE_ID: msg.id}
        refused = check_message(msg.body, attrs, key)
        if refused is not None:
            return MessageRejected(refused, backend=BACKEND, code="TooLarge")
        try:
            future: ConcurrentFuture[Any] = client.publish(
                topic, msg.body, ordering_key=key, retry=None, timeout=self.timeout, **attrs)
        except Exception as exc:
            return translate(exc, "publish", per_message=True)
        self.outstanding.add(future)
        future.add_done_callback(self.outstanding.discard)
        return asyncio.wrap_future(future)

    async def _publish_alone(self, client: Any, topic: str, msg: QueueMessage, key: str, *,
                             earlier: list[_Submitted], keys: list[str]) -> _Submitted:
        """A message with an attribute named ``topic``, ``timeout``, ... (MQTT 5 user
        properties can be) cannot go through the library's publish(); it goes in a request
        of its own, once everything before it was answered and only when no earlier message
        of its ordering key failed, so it never overtakes one."""
        attrs = {**msg.attributes, ATTR_MESSAGE_ID: msg.id}
        refused = check_message(msg.body, attrs, key)
        if refused is not None:
            return MessageRejected(refused, backend=BACKEND, code="TooLarge")
        pending = [f for f in earlier if isinstance(f, asyncio.Future)]
        if pending:
            await asyncio.wait(pending, timeout=self.timeout + GRACE)
        if key and any(k == key and _failed(f)
                       for f, k in zip(earlier, keys[:len(earlier)], strict=True)):
            return _paused(key, "an earlier message of the key failed")
        request = {"topic": topic, "messages": [
            {"data": msg.body, "attributes": attrs, "ordering_key": key}]}
        try:
            await self._call("publish", lambda: GapicPublisherClient.publish(
                client, request=request, retry=None, timeout=self.timeout))
        except QueueError as exc:
            return exc
        return None


def _resume(client: Any, topic: str, keys: set[str]) -> None:
    """Let the library publish these ordering keys again after a failure paused them."""
    for key in keys:
        # RuntimeError: not paused (the failure happened before the library's sequencer)
        with contextlib.suppress(RuntimeError, ValueError):
            client.resume_publish(topic, key)


def check_message(body: bytes, attributes: dict[str, str], ordering_key: str) -> str | None:
    """Why the service would refuse this message, or None."""
    if len(attributes) > MAX_ATTRIBUTES:
        return f"{len(attributes)} attributes; Pub/Sub allows {MAX_ATTRIBUTES}"
    size = len(body) + len(ordering_key.encode())
    for key, value in attributes.items():
        if not isinstance(key, str) or not isinstance(value, str):
            return f"attribute {key!r} is not a string pair"
        key_bytes, value_bytes = len(key.encode()), len(value.encode())
        if not 0 < key_bytes <= MAX_ATTRIBUTE_KEY_BYTES or key.startswith("goog"):
            return f"attribute name {key[:40]!r}... is not allowed (1..256 bytes, not 'goog*')"
        if value_bytes > MAX_ATTRIBUTE_VALUE_BYTES:
            return (f"attribute {key!r} is {value_bytes} bytes; Pub/Sub allows "
                    f"{MAX_ATTRIBUTE_VALUE_BYTES}")
        size += key_bytes + value_bytes
    if size > MAX_REQUEST_BYTES:
        return f"message is {size} bytes; Pub/Sub accepts at most {MAX_REQUEST_BYTES}"
    return None


def _failed(outcome: _Submitted) -> bool:
    if outcome is None or isinstance(outcome, QueueError):
        return outcome is not None
    return not outcome.done() or outcome.cancelled() or outcome.exception() is not None


def _paused(key: str, why: str) -> RetryableError:
    return RetryableError(f"publish: ordering key {key!r} paused: {why}", backend=BACKEND,
                          code="OrderingKeyPaused")


def _outcomes(submitted: list[_Submitted], keys: list[str],
              timeout: float) -> list[QueueError | None]:
    """One error (or None) per message. A failure pauses its ordering key: the later
    messages of that key fail with it, as unavailable when the first failure was, else as
    retryable."""
    first_failure: dict[str, QueueError] = {}
    errors: list[QueueError | None] = []
    for future, key in zip(submitted, keys, strict=True):
        if future is None or isinstance(future, QueueError):
            errors.append(future)
            continue
        if future.cancelled():
            errors.append(UplinkUnavailable(f"publish: no answer within {timeout}s",
                                            backend=BACKEND))
            continue
        exc = future.exception()
        if exc is None:
            errors.append(None)
            continue
        cause = first_failure.get(key) if key else None
        if cause is not None:
            why = f"an earlier message of the key failed ({cause})"
            errors.append(UplinkUnavailable(f"publish: ordering key {key!r} paused: {why}",
                                            backend=BACKEND, code="OrderingKeyPaused")
                          if isinstance(cause, UplinkUnavailable) else _paused(key, why))
            continue
        error = translate(exc, "publish", per_message=True)
        if key:
            first_failure[key] = error
        errors.append(error)
    return errors
