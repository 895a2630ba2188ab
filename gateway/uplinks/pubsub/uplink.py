"""``type: gcp_pubsub``: Google Cloud Pub/Sub (and its emulators) through google-cloud-pubsub.

How MessageQueueInterface maps onto Pub/Sub (queue name = topic id; a name starting with
``projects/`` is a full topic path):

- publish/publish_batch: ``publisher`` hands every message to the library's batching
  publisher with the gateway message id, the MQTT topic and all attributes as Pub/Sub
  attributes, and the ordering key ``gcp_ordering_key`` renders, and awaits the futures
  without blocking the loop; each message gets its own outcome (see that module). Topics
  are created on first use when ``gcp_auto_create`` is on; a topic the uplink created gets
  its subscription at once, since Pub/Sub drops what reaches a topic without one.
- consume: synchronous pull of the subscription ``gcp_subscription`` names (up to
  min(batch_size, gcp_max_messages) per pull; the service decides how long an empty pull
  waits, the deadline is wait_time_seconds + 5 s), in the uplink's small thread pool. A
  message stays in flight until acknowledge (ack) or reject; requeue = nack (ack deadline
  0), so Pub/Sub redelivers it. reject(requeue=False) publishes a copy to the topic
  ``queue.dlq_name`` with ``openhqm_dlq_reason`` and ``openhqm_dlq_source``, then acks the
  original. retry_count = the service's delivery attempt - 1 when the subscription has a
  dead-letter policy (only then does Pub/Sub count), otherwise how often this client has
  seen the message.
- get_queue_depth: NotSupportedError. The Pub/Sub API does not report a backlog (only
  Cloud Monitoring's num_undelivered_messages metric does, and emulators have none).
- create/delete: topic plus its subscription. purge_queue: NotSupportedError (a seek
  removes the backlog but cannot say how many messages it removed); ``seek_to_now`` is the
  purge without a count.
- No delayed delivery (delay_seconds > 0 raises NotSupportedError) and no priorities (a
  non-zero priority travels as the attribute ``openhqm_priority``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future as ConcurrentFuture
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Self, TypeVar

from google.api_core import exceptions as gexc

from gateway.config import Config
from gateway.errors import (
    ConfigError,
    MessageRejected,
    NotSupportedError,
    QueueError,
    UplinkUnavailable,
)
from gateway.message import ATTR_MESSAGE_ID, Body, QueueMessage
from gateway.queue.inflight import InFlight
from gateway.queue.interface import Handler, MessageQueueInterface, PublishResult
from gateway.queue.keys import KeyTemplate
from gateway.uplinks.pubsub.clients import Clients, build_clients
from gateway.uplinks.pubsub.errors import BACKEND, translate
from gateway.uplinks.pubsub.publisher import (
    GRACE,
    MAX_ATTRIBUTE_VALUE_BYTES,
    Publisher,
    check_message,
)
from gateway.uplinks.pubsub.settings import PubSubSettings, check_settings

log = logging.getLogger("gateway.uplinks.pubsub")

ATTR_PRIORITY = "openhqm_priority"
ATTR_DLQ_REASON = "openhqm_dlq_reason"
ATTR_DLQ_SOURCE = "openhqm_dlq_source"
_THREADS = 4
_MIN_BACKOFF, _MAX_BACKOFF = 0.2, 5.0
_REMEMBERED_DELIVERIES = 10_000
_PULL_ROOM = 5.0  # seconds beyond wait_time_seconds before a pull is cut off
_CREATE_OPTIONS = {"subscription", "ack_deadline", "dead_letter_max_attempts"}
R = TypeVar("R")


@dataclass(eq=False, slots=True)
class _InFlight:
    subscription: str
    ack_id: str
    server_id: str
    message: QueueMessage


class PubSubQueue(MessageQueueInterface):
    backend_name = BACKEND
    #: the service acknowledges a message once it stored it
    durable_acks = True

    def __init__(self, settings: PubSubSettings, *, dlq_name: str = "openhqm-dlq") -> None:
        check_settings(settings)
        self.settings = settings
        self.dlq_name = dlq_name
        template = settings.gcp_ordering_key
        self.ordering = KeyTemplate.parse(template, "queue.gcp_ordering_key") if template else None
        self._clients: Clients | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._known_topics: set[str] = set()
        self._in_flight: InFlight[_InFlight] = InFlight(lambda r: (r.subscription, r.server_id))
        self._deliveries: OrderedDict[tuple[str, str], int] = OrderedDict()
        self._publisher = Publisher(self.ordering, settings.gcp_publish_timeout, self._call)

    @classmethod
    def from_config(cls, config: Config) -> Self:
        settings = config.queue.settings
        if not isinstance(settings, PubSubSettings):
            raise ConfigError("queue.type", config.queue.type,
                              "the gcp_pubsub uplink needs the gcp_pubsub settings", config.source)
        return cls(settings, dlq_name=config.queue.dlq_name)

    # -- connection ---------------------------------------------------------------------

    def _require(self) -> Clients:
        if self._clients is None:
            raise UplinkUnavailable("not connected", backend=BACKEND)
        return self._clients

    async def _call(self, what: str, fn: Callable[[], R]) -> R:
        """Run a blocking library call in the uplink's threads; translate what it raises."""
        future = self._submit_call(what, fn)
        try:
            return await asyncio.wrap_future(future)
        except Exception as exc:
            raise translate(exc, what) from exc

    def _submit_call(self, what: str, fn: Callable[[], R]) -> ConcurrentFuture[R]:
        executor = self._executor
        if executor is None:
            raise UplinkUnavailable(f"{what}: not connected", backend=BACKEND)
        try:
            return executor.submit(fn)
        except RuntimeError as exc:  # shut down by a disconnect in the meantime
            raise UplinkUnavailable(f"{what}: {exc}", backend=BACKEND) from exc

    @property
    def target(self) -> str:
        emulator = self.settings.gcp_emulator_host or os.environ.get("PUBSUB_EMULATOR_HOST", "")
        return f"{emulator} (emulator)" if emulator else "pubsub.googleapis.com:443"

    async def connect(self) -> None:
        if self._clients is not None:
            return
        executor = ThreadPoolExecutor(max_workers=_THREADS, thread_name_prefix="pubsub")
        build = functools.partial(build_clients, self.settings, self.ordering is not None)
        try:
            clients = await asyncio.wrap_future(executor.submit(build))
        except ConfigError:
            executor.shutdown(wait=False)
            raise
        except Exception as exc:
            executor.shutdown(wait=False)
            raise UplinkUnavailable(f"connect: {exc}", backend=BACKEND) from exc
        self._clients, self._executor = clients, executor
        try:
            await self._probe()
        except BaseException:
            await self.disconnect()
            raise
        # the forwarder says "connected" (or "back"), once; this is the detail
        log.debug("gcp_pubsub: connected to %s, project %s",
                  clients.emulator or "Google Cloud", clients.project)

    async def _probe(self) -> None:
        """One real round trip. An answer 'not allowed' still proves the service is reachable
        and the credentials authenticate: a publisher-only account may not list topics."""
        clients = self._require()
        request = {"project": f"projects/{clients.project}", "page_size": 1}
        try:
            await self._call("connect", lambda: clients.publisher.list_topics(
                request=request, retry=None, timeout=self.settings.gcp_request_timeout))
        except UplinkUnavailable as exc:
            if exc.code != "PermissionDenied":
                raise
        except QueueError as exc:
            raise UplinkUnavailable(str(exc), backend=BACKEND, code=exc.code) from exc

    async def disconnect(self) -> None:
        clients, executor = self._clients, self._executor
        self._clients = self._executor = None
        self._in_flight.clear()
        self._known_topics.clear()
        if clients is None or executor is None:
            return
        loop = asyncio.get_running_loop()
        try:  # sends what is still batched (one attempt each), accepts nothing more
            await loop.run_in_executor(executor, clients.publisher.stop)
        except Exception as exc:
            log.debug("gcp_pubsub: stopping the publisher: %s", exc)
        pending = [asyncio.wrap_future(f) for f in list(self._publisher.outstanding)]
        if pending:  # answered or failed within one publish timeout; closing earlier would
            # make the library's batch threads fail on a closed channel
            await asyncio.wait(pending, timeout=self.settings.gcp_publish_timeout + GRACE)
        await loop.run_in_executor(executor, clients.close)
        executor.shutdown(wait=False, cancel_futures=True)

    async def health_check(self) -> bool:
        if self._clients is None:
            return False
        try:
            await self._probe()
        except QueueError as exc:
            log.debug("gcp_pubsub health check failed: %s", exc)
            return False
        return True

    # -- names --------------------------------------------------------------------------

    def topic_path(self, queue_name: str) -> str:
        if queue_name.startswith("projects/"):
            return queue_name
        return f"projects/{self._require().project}/topics/{queue_name}"

    def subscription_path(self, queue_name: str) -> str:
        topic_id = queue_name.rsplit("/", 1)[-1]
        name = self.settings.gcp_subscription.replace("{queue}", topic_id)
        if name.startswith("projects/"):
            return name
        return f"projects/{self._require().project}/subscriptions/{name}"

    # -- publishing ---------------------------------------------------------------------

    async def publish(self, queue_name: str, message: Body, priority: int = 0,
                      attributes: dict[str, str] | None = None, delay_seconds: float = 0, *,
                      message_id: str | None = None) -> str:
        if delay_seconds > 0:
            raise NotSupportedError(BACKEND, "delay_seconds", "Pub/Sub has no delayed delivery")
        return await self._publish_one(queue_name, message, priority, attributes,
                                       message_id=message_id, priority_attribute=ATTR_PRIORITY)

    async def publish_batch(self, queue_name: str,
                            messages: Sequence[QueueMessage]) -> list[PublishResult]:
        if not messages:
            return []
        try:
            clients = self._require()
            topic = await self._ensure_topic(queue_name)
        except QueueError as exc:
            return [PublishResult(m.id, exc) for m in messages]
        errors = await self._publisher.publish_batch(clients.publisher, topic, messages)
        if any(e is not None and e.code == "NotFound" for e in errors):
            self._known_topics.discard(topic)  # deleted under us: ensure it again next time
        return [PublishResult(m.id, e) for m, e in zip(messages, errors, strict=True)]

    async def _ensure_topic(self, queue_name: str) -> str:
        topic = self.topic_path(queue_name)
        if topic in self._known_topics or not self.settings.gcp_auto_create:
            return topic
        try:
            created = await self._create_topic(topic)
        except UplinkUnavailable as exc:
            if exc.code != "PermissionDenied":
                raise
            log.info("gcp_pubsub: not allowed to create %s; assuming it exists", topic)
            created = False
        if created:  # without a subscription Pub/Sub drops what is published
            await self._create_subscription(queue_name)
        self._known_topics.add(topic)
        return topic

    # -- consuming ----------------------------------------------------------------------

    async def consume(self, queue_name: str, handler: Handler, batch_size: int = 10,
                      wait_time_seconds: float = 1.0) -> None:
        limit = max(1, min(batch_size, self.settings.gcp_max_messages))
        backoff, ready = _MIN_BACKOFF, False
        subscription = self.subscription_path(queue_name)
        while True:
            self._require()  # raises UplinkUnavailable once disconnected
            try:
                if not ready:
                    await self._ensure_subscription(queue_name)
                    ready = True
                received = await self._pull(subscription, limit, wait_time_seconds)
                backoff = _MIN_BACKOFF
            except UplinkUnavailable as exc:
                level = logging.WARNING if backoff == _MIN_BACKOFF else logging.DEBUG
                log.log(level, "gcp_pubsub: consuming %s paused: %s; retrying in %.1fs",
                        subscription, exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF)
                ready = ready and exc.code != "NotFound"
                continue
            for received_message in received:
                await self._dispatch(subscription, received_message, handler)

    async def _ensure_subscription(self, queue_name: str) -> None:
        if not self.settings.gcp_auto_create:
            return
        await self._ensure_topic(queue_name)
        try:
            await self._create_subscription(queue_name)
        except UplinkUnavailable as exc:
            if exc.code != "PermissionDenied":
                raise

    async def _pull(self, subscription: str, limit: int, wait: float) -> list[Any]:
        clients = self._require()
        request = {"subscription": subscription, "max_messages": limit}

        def pull() -> list[Any]:
            # The service decides how long a pull waits for messages. A deadline that cuts
            # it off can lose the answer after the service handed messages out, and they
            # then wait out their ack deadline; so the deadline leaves it room.
            try:
                response = clients.subscriber.pull(request=request, retry=None,
                                                   timeout=wait + _PULL_ROOM)
            except gexc.DeadlineExceeded:
                return []  # nothing arrived
            return list(response.received_messages)

        future = self._submit_call(f"pull {subscription}", pull)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            # The pull may still return messages nobody will handle: hand them back at once
            # instead of letting them wait out their ack deadline.
            future.add_done_callback(functools.partial(self._release_orphans, clients,
                                                       subscription))
            raise
        except Exception as exc:
            raise translate(exc, f"pull {subscription}") from exc

    def _release_orphans(self, clients: Clients, subscription: str,
                         future: ConcurrentFuture[list[Any]]) -> None:
        if future.cancelled() or future.exception() is not None or not future.result():
            return
        ack_ids = [m.ack_id for m in future.result()]
        try:  # runs in the thread that finished the pull
            clients.subscriber.modify_ack_deadline(
                request={"subscription": subscription, "ack_ids": ack_ids,
                         "ack_deadline_seconds": 0},
                retry=None, timeout=self.settings.gcp_request_timeout)
        except Exception as exc:
            log.debug("gcp_pubsub: could not hand back %d messages: %s", len(ack_ids), exc)

    async def _dispatch(self, subscription: str, received: Any, handler: Handler) -> None:
        server_id = str(received.message.message_id)
        held = self._in_flight.get((subscription, server_id))
        if held is not None:  # redelivered after its ack deadline while still ours
            held.ack_id = received.ack_id
            return
        seen = self._count_delivery(subscription, server_id)
        attempt = int(received.delivery_attempt or 0)
        record = _InFlight(subscription, received.ack_id, server_id,
                           _to_message(received, attempt - 1 if attempt > 0 else seen - 1))
        self._in_flight.track(record.message.id, record)
        try:
            await handler(record.message)
        except Exception as exc:  # the handler's failure is the message's outcome
            if not self._in_flight.untrack(record.message.id, record):
                return  # the handler settled it before raising
            log.warning("gcp_pubsub: handler failed for %s: %s; requeueing",
                        record.message.id, exc)
            try:
                await self._modack(record, 0)
            except QueueError as nack_error:  # it comes back after its ack deadline anyway
                log.warning("gcp_pubsub: nack failed: %s", nack_error)

    def _count_delivery(self, subscription: str, server_id: str) -> int:
        key = (subscription, server_id)
        count = self._deliveries.pop(key, 0) + 1
        self._deliveries[key] = count
        while len(self._deliveries) > _REMEMBERED_DELIVERIES:
            self._deliveries.popitem(last=False)
        return count

    # -- settling -----------------------------------------------------------------------

    async def acknowledge(self, message_id: str) -> bool:
        async def ack(record: _InFlight) -> bool:
            await self._ack(record)
            return True

        return await self._in_flight.settle(message_id, ack)

    async def reject(self, message_id: str, requeue: bool = True, reason: str = "") -> bool:
        async def move(record: _InFlight) -> bool:
            if requeue:
                await self._modack(record, 0)
            else:
                await self._dead_letter(record, reason)
                await self._ack(record)
            return True

        return await self._in_flight.settle(message_id, move)

    async def _ack(self, record: _InFlight) -> None:
        subscriber = self._require().subscriber
        request = {"subscription": record.subscription, "ack_ids": [record.ack_id]}
        await self._call("acknowledge", lambda: subscriber.acknowledge(
            request=request, retry=None, timeout=self.settings.gcp_request_timeout))
        self._deliveries.pop((record.subscription, record.server_id), None)

    async def _modack(self, record: _InFlight, seconds: int) -> None:
        subscriber = self._require().subscriber
        request = {"subscription": record.subscription, "ack_ids": [record.ack_id],
                   "ack_deadline_seconds": seconds}
        await self._call("modify_ack_deadline", lambda: subscriber.modify_ack_deadline(
            request=request, retry=None, timeout=self.settings.gcp_request_timeout))

    async def _dead_letter(self, record: _InFlight, reason: str) -> None:
        clients = self._require()
        topic = await self._ensure_topic(self.dlq_name)
        msg = record.message
        attrs = {**msg.attributes, ATTR_MESSAGE_ID: msg.id,
                 ATTR_DLQ_REASON: _clip(reason), ATTR_DLQ_SOURCE: _clip(record.subscription)}
        refused = check_message(msg.body, attrs, "")
        if refused is not None:
            raise MessageRejected(f"dead-letter copy: {refused}", backend=BACKEND)
        try:
            future = clients.publisher.publish(topic, msg.body, retry=None,
                                               timeout=self.settings.gcp_publish_timeout, **attrs)
            async with asyncio.timeout(self.settings.gcp_publish_timeout + GRACE):
                await asyncio.wrap_future(future)
        except TimeoutError as exc:
            raise UplinkUnavailable(f"dead-letter to {topic}: no answer", backend=BACKEND) from exc
        except Exception as exc:
            raise translate(exc, f"dead-letter to {topic}") from exc
        self._deliveries.pop((record.subscription, record.server_id), None)

    # -- administration -----------------------------------------------------------------

    async def get_queue_depth(self, queue_name: str) -> int:
        raise NotSupportedError(
            BACKEND, "get_queue_depth",
            "the Pub/Sub API does not report a subscription's backlog (only Cloud "
            "Monitoring's subscription/num_undelivered_messages metric does)")

    async def create_queue(self, queue_name: str, **kwargs: Any) -> bool:
        unknown = set(kwargs) - _CREATE_OPTIONS
        if unknown:
            raise NotSupportedError(BACKEND, f"create_queue({', '.join(sorted(unknown))})",
                                    f"Pub/Sub topics here take {', '.join(sorted(_CREATE_OPTIONS))}")
        topic = self.topic_path(queue_name)
        created = await self._create_topic(topic)
        self._known_topics.add(topic)
        if not kwargs.get("subscription", True):
            return created
        sub_created = await self._create_subscription(
            queue_name, ack_deadline=kwargs.get("ack_deadline"),
            dead_letter_max_attempts=kwargs.get("dead_letter_max_attempts"))
        return created or sub_created

    async def _create_topic(self, topic: str) -> bool:
        publisher = self._require().publisher
        try:
            await self._call(f"create topic {topic}", lambda: publisher.create_topic(
                request={"name": topic}, retry=None, timeout=self.settings.gcp_request_timeout))
        except QueueError as exc:
            if exc.code == "AlreadyExists":
                return False
            raise
        return True

    async def _create_subscription(self, queue_name: str, *, ack_deadline: float | None = None,
                                   dead_letter_max_attempts: int | None = None) -> bool:
        s = self.settings
        subscriber = self._require().subscriber
        name, topic = self.subscription_path(queue_name), self.topic_path(queue_name)
        request: dict[str, Any] = {
            "name": name, "topic": topic,
            "ack_deadline_seconds": int(ack_deadline or s.gcp_ack_deadline),
            "enable_message_ordering": self.ordering is not None,
        }
        attempts = (s.gcp_dead_letter_max_attempts if dead_letter_max_attempts is None
                    else dead_letter_max_attempts)
        dlq_topic = self.topic_path(self.dlq_name)
        if attempts > 0 and dlq_topic != topic:
            await self._ensure_topic(self.dlq_name)  # the policy needs the topic to exist
            request["dead_letter_policy"] = {"dead_letter_topic": dlq_topic,
                                             "max_delivery_attempts": attempts}
        try:
            await self._call(f"create subscription {name}", lambda: subscriber.create_subscription(
                request=request, retry=None, timeout=s.gcp_request_timeout))
        except QueueError as exc:
            if exc.code == "AlreadyExists":
                return False
            raise
        return True

    async def delete_queue(self, queue_name: str) -> bool:
        clients = self._require()
        subscription, topic = self.subscription_path(queue_name), self.topic_path(queue_name)
        timeout = self.settings.gcp_request_timeout
        sub_deleted = await self._delete(f"delete subscription {subscription}", lambda: (
            clients.subscriber.delete_subscription(
                request={"subscription": subscription}, retry=None, timeout=timeout)))
        self._forget_subscription(subscription)
        topic_deleted = await self._delete(f"delete topic {topic}", lambda: (
            clients.publisher.delete_topic(request={"topic": topic}, retry=None, timeout=timeout)))
        self._known_topics.discard(topic)
        return sub_deleted or topic_deleted

    async def _delete(self, what: str, call: Callable[[], Any]) -> bool:
        try:
            await self._call(what, call)
        except UplinkUnavailable as exc:
            if exc.code == "NotFound":
                return False
            raise
        return True

    def _forget_subscription(self, subscription: str) -> None:
        self._in_flight.forget(lambda r: r.subscription == subscription)

    async def purge_queue(self, queue_name: str) -> int:
        raise NotSupportedError(
            BACKEND, "purge_queue",
            "a Pub/Sub seek clears a subscription's backlog but cannot say how many messages "
            "it removed; PubSubQueue.seek_to_now() purges without a count")

    async def seek_to_now(self, queue_name: str) -> None:
        """Mark everything published to the queue's subscription until now as acknowledged
        (a seek to the current time): the purge, without a count."""
        subscriber = self._require().subscriber
        subscription = self.subscription_path(queue_name)
        request = {"subscription": subscription, "time": datetime.now(UTC)}
        await self._call(f"seek {subscription}", lambda: subscriber.seek(
            request=request, retry=None, timeout=self.settings.gcp_request_timeout))
        self._forget_subscription(subscription)


def _to_message(received: Any, retry_count: int) -> QueueMessage:
    message = received.message
    attributes = {str(k): str(v) for k, v in message.attributes.items()}
    message_id = attributes.pop(ATTR_MESSAGE_ID, "") or str(message.message_id)
    published = message.publish_time
    timestamp = published.timestamp() if published else 0.0
    return QueueMessage(message_id, bytes(message.data), attributes, timestamp,
                        max(retry_count, 0), received)


def _clip(text: str, limit: int = MAX_ATTRIBUTE_VALUE_BYTES) -> str:
    return text.encode()[:limit].decode("utf-8", "ignore")
