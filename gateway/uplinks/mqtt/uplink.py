"""``type: mqtt``: an uplink to a cloud MQTT broker (AWS IoT Core, Azure IoT Hub, HiveMQ,
EMQX, mosquitto, ...) over paho-mqtt 2.x, with TLS and MQTT 5 user properties.

What a cloud subscriber receives, per message:

    topic        mqtt_topic_template rendered ({queue}/{topic} by default)
    payload      the exact bytes the sensor sent
    QoS          queue.mqtt_qos
    user properties (MQTT 5)
                 openhqm_message_id (the same on every retry: deduplicate by it), every
                 attribute (mqtt_topic, ...), openhqm_uplink = the gateway id (marks a
                 message this gateway uplinked), openhqm_retry_count on re-published copies,
                 openhqm_reason / openhqm_source_topic on dead letters
    content type the content_type attribute, when there is one (MQTT 5)

With MQTT 3.1.1 there are no properties: only topic and payload travel.

Delivery: publish_batch hands the whole batch to paho at once (in order; at most
``mqtt_max_inflight`` unacknowledged on the wire) and resolves each message by its own
PUBACK (QoS 1) or PUBCOMP (QoS 2): reason code 0 or 0x10 (no matching subscribers: the
broker took it) is accepted, a refusal (not authorized, topic invalid, packet too large,
payload format invalid) is MessageRejected for that message, quota exceeded and other
failures are RetryableError. A lost connection makes that message and every later one
UplinkUnavailable (a later success is not reported either, so per-topic order survives the
re-send). QoS 0 is fire and forget: accepted once paho wrote it to the socket. The
publishing connection uses a clean session: the gateway's store is the durable part.

Consume (for tools and tests; the gateway only publishes) subscribes with a persistent
session (client id + "-sub", session expiry ``mqtt_session_expiry``) and paho's manual
acknowledgement, at QoS 1/2 only:

- acknowledge = send the PUBACK/PUBREC now; the broker then forgets the message.
- reject(requeue=True): MQTT cannot ask the broker to redeliver within a session, so the
  message is re-published to the same topic with openhqm_retry_count + 1 and then
  acknowledged. Every subscriber of that topic receives the copy.
- reject(requeue=False): re-published to the dead-letter topic (the template rendered for
  queue.dlq_name) with openhqm_reason, then acknowledged.
- Messages received before a restart and not acknowledged are redelivered by the broker
  (persistent session); they count a retry.
- MQTT keeps nothing for a subscription that does not exist yet: ``subscribe_session``
  subscribes the session without consuming, before anything is published.
- MQTT 5 properties of a received message become attributes: response topic
  (``response_topic``), correlation data (``correlation_id``, or ``correlation_data_base64``
  when not UTF-8) and message expiry (``expires_at``: the receipt time plus the remaining
  interval the broker sent, UNIX seconds). A message from a plain MQTT client (not a gateway's
  uplink: no ``openhqm_uplink``) that has no ``mqtt_topic`` gets the part of its topic the
  template's ``{topic}`` matched: ``down/{queue}/{topic}`` consumed for ``cmd`` turns
  ``down/cmd/devices/d1/set`` into ``mqtt_topic`` = ``devices/d1/set`` (the downlink's local
  topic; gateway/downlink/).

Not supported (NotSupportedError): get_queue_depth (MQTT has no way to ask), create_queue,
delete_queue, purge_queue (topics are not created or deleted; a broker's queued session
messages cannot be listed or removed), delay_seconds, priority, consume at QoS 0 (such a
message cannot be acknowledged).

Loop guard: on the ingress broker, a template whose topics an ingress subscription matches
is refused at start (gateway/uplinks/mqtt/template.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Self

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway.errors import (
    ConfigError,
    MessageRejected,
    NotSupportedError,
    QueueError,
    RetryableError,
    UplinkUnavailable,
)
from gateway.message import (
    ATTR_CONTENT_TYPE,
    ATTR_EXPIRES_AT,
    ATTR_MESSAGE_ID,
    ATTR_MQTT_TOPIC,
    ATTR_RESPONSE_TOPIC,
    Body,
    QueueMessage,
    correlation_attributes,
    encode_body,
    new_message_id,
)
from gateway.queue.interface import Handler, MessageQueueInterface, PublishResult
from gateway.uplinks.mqtt.link import BACKEND, Link, LinkOptions, Outcome
from gateway.uplinks.mqtt.settings import MqttUplinkSettings
from gateway.uplinks.mqtt.template import (
    check_template,
    refuse_loops,
    render,
    same_broker,
    subscription_filter,
    topic_part,
)

if TYPE_CHECKING:
    from gateway.config import Config

log = logging.getLogger(__name__)

PROP_UPLINK = "openhqm_uplink"
PROP_RETRY = "openhqm_retry_count"
PROP_REASON = "openhqm_reason"
PROP_SOURCE = "openhqm_source_topic"
PROP_TIMESTAMP = "openhqm_timestamp"
HEALTH_QUEUE = "openhqm-health"
_GATEWAY_PROPS = {ATTR_MESSAGE_ID, PROP_UPLINK, PROP_RETRY, PROP_TIMESTAMP}

# PUBACK/PUBREC reason codes that refuse this one message for good
_REFUSED = {0x87: "not authorized", 0x90: "topic name invalid", 0x95: "packet too large",
            0x99: "payload format invalid", 0x83: "implementation specific error"}
_ACCEPTED = {0x00, 0x10}  # success; no matching subscribers (the broker still took it)
_BACKOFF = (0.2, 5.0)


def outcome_error(outcome: Outcome) -> QueueError | None:
    code, text = outcome
    if code in _ACCEPTED:
        return None
    if code in _REFUSED:
        return MessageRejected(f"the broker refused it: {text}", backend=BACKEND, code=hex(code))
    if code < 0:  # paho refused to send it (payload too large for MQTT)
        return MessageRejected(f"not sent: {text}", backend=BACKEND, code=str(-code))
    return RetryableError(f"the broker did not take it: {text}", backend=BACKEND, code=hex(code))


@dataclass(slots=True)
class _Received:
    message: mqtt.MQTTMessage
    link: Link
    queue_name: str
    #: what the handler was given (reject re-sends it with the same attributes)
    converted: QueueMessage


class MqttQueue(MessageQueueInterface):
    backend_name = BACKEND

    def __init__(self, settings: MqttUplinkSettings | None = None, *, gateway_id: str = "gateway",
                 dlq_name: str = "openhqm-dlq") -> None:
        self.settings = settings or MqttUplinkSettings()
        check_template(self.settings.mqtt_topic_template)
        if self.settings.mqtt_max_inflight < 1:
            raise ConfigError("queue.mqtt_max_inflight", self.settings.mqtt_max_inflight,
                              "must be at least 1")
        self.gateway_id = gateway_id
        self.dlq_name = dlq_name
        self.client_id = self.settings.mqtt_client_id or f"openhqm-gateway-{gateway_id}-uplink"
        self._link: Link | None = None
        #: connect() was called and disconnect() was not: a lost link is re-opened on use
        self._wanted = False
        self._window = asyncio.Semaphore(self.settings.mqtt_max_inflight)
        self._in_flight: dict[str, _Received] = {}

    @classmethod
    def from_config(cls, config: Config) -> Self:
        settings = config.queue.settings
        if not isinstance(settings, MqttUplinkSettings):
            raise ConfigError("queue.type", config.queue.type,
                              "the mqtt uplink needs the mqtt settings", config.source)
        check_template(settings.mqtt_topic_template, config.source)
        ingress = config.ingress
        if same_broker(settings.mqtt_broker_host, settings.mqtt_broker_port,
                       ingress.host, ingress.port):
            destinations = {config.queue.request_queue_name,
                            *(r.destination for r in config.forwarder.routes)}
            refuse_loops(settings.mqtt_topic_template, sorted(destinations), config.gateway_id,
                         [s.topic for s in ingress.subscriptions], config.source)
        if not settings.mqtt_client_id and config.client_suffix:  # one of several uplinks
            settings = dataclasses.replace(settings, mqtt_client_id=(
                f"openhqm-gateway-{config.gateway_id}-uplink{config.client_suffix}"))
        return cls(settings, gateway_id=config.gateway_id, dlq_name=config.queue.dlq_name)

    # -- connection -------------------------------------------------------------------------

    @property
    def target(self) -> str:
        scheme = "mqtts" if self.settings.mqtt_tls else "mqtt"
        return f"{scheme}://{self.settings.mqtt_broker_host}:{self.settings.mqtt_broker_port}"

    async def connect(self) -> None:
        self._wanted = True
        await self._open()

    async def _open(self) -> None:
        if self._link is not None and self._link.up:
            return
        old, self._link = self._link, None
        if old is not None:
            await old.close()
        link = Link(self.settings, LinkOptions(self.client_id, clean_start=True))
        await link.open()
        self._link = link

    async def disconnect(self) -> None:
        self._wanted = False
        link, self._link = self._link, None
        if link is not None:
            await link.close()

    async def health_check(self) -> bool:
        """A real round trip: an empty QoS 1 message to the template rendered for the queue
        "openhqm-health" (a topic space the gateway may publish to by configuration); True
        only when the broker acknowledged it."""
        link = self._link
        if link is None or not link.up:
            return False
        topic = render(self.settings.mqtt_topic_template, HEALTH_QUEUE, "health", self.gateway_id)
        try:
            future = link.publish(topic, b"", 1, False, None)
            outcome = await asyncio.wait_for(future, self.settings.mqtt_timeout)
        except (QueueError, ValueError, TimeoutError):
            return False
        return outcome_error(outcome) is None

    def _require_link(self) -> Link:
        link = self._link
        if link is None or not link.up:
            raise UplinkUnavailable("not connected", backend=BACKEND)
        return link

    # -- publishing -------------------------------------------------------------------------

    def _properties(self, msg: QueueMessage, extra: dict[str, str] | None) -> Properties | None:
        if self.settings.mqtt_protocol != "5":
            return None
        attributes = msg.attributes
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        pairs = [(ATTR_MESSAGE_ID, msg.id), (PROP_UPLINK, self.gateway_id),
                 (PROP_TIMESTAMP, repr(msg.timestamp or time.time()))]
        pairs += [(k, v) for k, v in attributes.items() if k not in _GATEWAY_PROPS]
        pairs += list((extra or {}).items())
        props.UserProperty = pairs
        if attributes.get(ATTR_CONTENT_TYPE):
            props.ContentType = attributes[ATTR_CONTENT_TYPE]
        return props

    def _send(self, link: Link, queue_name: str, msg: QueueMessage,
              extra: dict[str, str] | None = None,
              topic: str | None = None) -> asyncio.Future[Outcome]:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in msg.attributes.items()):
            raise MessageRejected("attributes must map strings to strings", backend=BACKEND)
        target = topic or render(self.settings.mqtt_topic_template, queue_name, msg.topic,
                                 self.gateway_id)
        try:
            future = link.publish(target, msg.body, self.settings.mqtt_qos,
                                  self.settings.mqtt_retain, self._properties(msg, extra))
        except ValueError as exc:  # paho: a topic with wildcards, or empty
            raise MessageRejected(f"topic {target!r}: {exc}", backend=BACKEND) from None
        # the window slot is free once the broker answered, or the link failed it
        future.add_done_callback(lambda _: self._window.release())
        return future

    async def _confirmed(self, future: asyncio.Future[Outcome]) -> QueueError | None:
        try:
            outcome = await asyncio.wait_for(future, self.settings.mqtt_timeout)
        except TimeoutError:
            return UplinkUnavailable(f"no acknowledgement within {self.settings.mqtt_timeout}s",
                                     backend=BACKEND)
        except UplinkUnavailable as exc:
            return exc
        return outcome_error(outcome)

    async def publish(self, queue_name: str, message: Body, priority: int = 0,
                      attributes: dict[str, str] | None = None, delay_seconds: float = 0, *,
                      message_id: str | None = None) -> str:
        if delay_seconds > 0:
            raise NotSupportedError(BACKEND, "delay_seconds", "MQTT has no delayed delivery")
        if priority:
            raise NotSupportedError(BACKEND, "priority", "MQTT delivers in order, unranked")
        msg = QueueMessage(message_id or new_message_id(), encode_body(message),
                           dict(attributes or {}), time.time())
        [result] = await self.publish_batch(queue_name, [msg])
        if result.error is not None:
            raise result.error
        return msg.id

    async def publish_batch(self, queue_name: str,
                            messages: Sequence[QueueMessage]) -> list[PublishResult]:
        try:
            if self._wanted:  # the connection dropped since the last batch: open a new one
                await self._open()
            link = self._require_link()
        except UplinkUnavailable as exc:
            return [PublishResult(m.id, exc) for m in messages]
        waits: list[asyncio.Task[QueueError | None] | QueueError] = []
        try:
            for msg in messages:
                await self._window.acquire()
                try:
                    future = self._send(link, queue_name, msg)
                except QueueError as exc:
                    self._window.release()
                    waits.append(exc)
                    if isinstance(exc, UplinkUnavailable):
                        break
                    continue
                waits.append(asyncio.ensure_future(self._confirmed(future)))
            return await self._collect(messages, waits)
        finally:
            for wait in waits:
                if isinstance(wait, asyncio.Task) and not wait.done():
                    wait.cancel()

    async def _collect(self, messages: Sequence[QueueMessage],
                       waits: list[asyncio.Task[QueueError | None] | QueueError]) -> list[PublishResult]:
        results: list[PublishResult] = []
        down: UplinkUnavailable | None = None
        for msg, wait in zip(messages, waits, strict=False):
            error = wait if isinstance(wait, QueueError) else await wait
            if down is None and isinstance(error, UplinkUnavailable):
                down = error
            results.append(PublishResult(msg.id, down or error))
        down = down or UplinkUnavailable("connection lost", backend=BACKEND)
        results += [PublishResult(m.id, down) for m in messages[len(results):]]
        return results

    # -- consuming --------------------------------------------------------------------------

    async def consume(self, queue_name: str, handler: Handler, batch_size: int = 10,
                      wait_time_seconds: float = 1.0) -> None:
        if self.settings.mqtt_qos == 0:
            raise NotSupportedError(BACKEND, "consume at QoS 0",
                                    "a QoS 0 message cannot be acknowledged")
        topic_filter = self._filter(queue_name)
        backoff = _BACKOFF[0]
        while True:
            subscribed: list[bool] = []  # the session got as far as its subscription
            try:
                await self._consume_session(queue_name, topic_filter, handler, subscribed)
            except UplinkUnavailable as exc:
                if subscribed:  # it ran until now: a new outage, reported once
                    backoff = _BACKOFF[0]
                level = logging.WARNING if backoff == _BACKOFF[0] else logging.DEBUG
                log.log(level, "consuming %s paused: %s; retrying in %.1fs", queue_name, exc,
                        backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _BACKOFF[1])

    def _session_options(self) -> LinkOptions:
        return LinkOptions(f"{self.client_id}-sub", clean_start=False,
                           session_expiry=self.settings.mqtt_session_expiry, manual_ack=True)

    def _filter(self, queue_name: str) -> str:
        try:
            return subscription_filter(self.settings.mqtt_topic_template, queue_name,
                                       self.gateway_id)
        except ValueError as exc:
            raise NotSupportedError(BACKEND, "consume", str(exc)) from None

    async def subscribe_session(self, queue_name: str) -> None:
        """Make consume()'s persistent session subscribe to ``queue_name`` now, without
        consuming: from then on the broker keeps what is published there until consume()
        takes it (within ``mqtt_session_expiry``). MQTT keeps nothing for a subscription
        that does not exist yet, so a consumer must subscribe before messages are sent."""
        if self.settings.mqtt_qos == 0:
            raise NotSupportedError(BACKEND, "subscribe_session",
                                    "a QoS 0 subscription keeps nothing for a session")
        link = Link(self.settings, self._session_options())
        await link.open()
        try:
            await self._subscribe(link, self._filter(queue_name))
        finally:
            await link.close()

    async def _subscribe(self, link: Link, topic_filter: str) -> None:
        reasons = await link.subscribe(topic_filter, self.settings.mqtt_qos)
        if any(r.is_failure for r in reasons):
            raise UplinkUnavailable(f"subscription to {topic_filter} refused: {reasons}",
                                    backend=BACKEND)

    async def _consume_session(self, queue_name: str, topic_filter: str, handler: Handler,
                               subscribed: list[bool]) -> None:
        inbox: asyncio.Queue[mqtt.MQTTMessage] = asyncio.Queue()
        link = Link(self.settings, self._session_options(), on_message=inbox.put_nowait)
        await link.open()
        try:
            await self._subscribe(link, topic_filter)
            subscribed.append(True)
            while True:
                if not link.up:
                    raise link.lost or UplinkUnavailable("connection lost", backend=BACKEND)
                try:
                    async with asyncio.timeout(1.0):  # wakes up to notice a lost link
                        raw = await inbox.get()
                except TimeoutError:
                    continue
                await self._deliver(raw, link, queue_name, handler)
        finally:
            self._forget(link)
            await link.close()

    async def _deliver(self, raw: mqtt.MQTTMessage, link: Link, queue_name: str,
                       handler: Handler) -> None:
        msg = _to_message(raw, topic_part(self.settings.mqtt_topic_template, queue_name,
                                          self.gateway_id, raw.topic))
        self._in_flight[msg.id] = _Received(raw, link, queue_name, msg)
        try:
            await handler(msg)
        except Exception as exc:  # the handler's failure is the message's outcome
            if msg.id in self._in_flight:
                await self.reject(msg.id, requeue=True, reason=str(exc))

    def _forget(self, link: Link) -> None:
        for mid in [k for k, r in self._in_flight.items() if r.link is link]:
            del self._in_flight[mid]  # the broker redelivers them in the next session

    async def acknowledge(self, message_id: str) -> bool:
        received = self._in_flight.pop(message_id, None)
        if received is None:
            return False
        received.link.ack(received.message.mid, received.message.qos)
        return True

    async def reject(self, message_id: str, requeue: bool = True, reason: str = "") -> bool:
        received = self._in_flight.get(message_id)
        if received is None:
            return False
        msg = received.converted
        if requeue:
            extra = {PROP_RETRY: str(msg.retry_count + 1)}
            topic = received.message.topic
        else:
            extra = {PROP_REASON: reason, PROP_SOURCE: received.message.topic,
                     PROP_RETRY: str(msg.retry_count)}
            topic = render(self.settings.mqtt_topic_template, self.dlq_name, msg.topic or
                           received.queue_name, self.gateway_id)
        link = self._require_link()
        await self._window.acquire()
        try:
            future = self._send(link, received.queue_name, msg, extra, topic)
        except QueueError:
            self._window.release()
            raise
        error = await self._confirmed(future)
        if error is not None:
            raise error
        if self._in_flight.get(message_id) is received:  # the copy may be back already
            del self._in_flight[message_id]
        received.link.ack(received.message.mid, received.message.qos)
        return True

    # -- what MQTT cannot do ----------------------------------------------------------------

    async def get_queue_depth(self, queue_name: str) -> int:
        raise NotSupportedError(BACKEND, "get_queue_depth",
                                "MQTT has no way to ask a broker how many messages wait")

    async def create_queue(self, queue_name: str, **kwargs: Any) -> bool:
        raise NotSupportedError(BACKEND, "create_queue",
                                "MQTT topics exist as they are used; there is nothing to create")

    async def delete_queue(self, queue_name: str) -> bool:
        raise NotSupportedError(BACKEND, "delete_queue",
                                "MQTT topics cannot be deleted; a session's queued messages "
                                "cannot be removed by another client")

    async def purge_queue(self, queue_name: str) -> int:
        raise NotSupportedError(BACKEND, "purge_queue",
                                "MQTT cannot list or remove messages queued for subscribers")


def _to_message(raw: mqtt.MQTTMessage, local_topic: str | None = None) -> QueueMessage:
    props: dict[str, str] = {}
    properties = getattr(raw, "properties", None)
    user = getattr(properties, "UserProperty", None) or []
    for key, value in user:
        props[str(key)] = str(value)
    _request_response(properties, props)
    if PROP_UPLINK not in props and ATTR_MQTT_TOPIC not in props and local_topic:
        props[ATTR_MQTT_TOPIC] = local_topic  # from a plain client, not a gateway's uplink
    message_id = props.pop(ATTR_MESSAGE_ID, "") or f"mqtt-{raw.topic}-{raw.mid}"
    retry = props.pop(PROP_RETRY, "0")
    props.pop(PROP_UPLINK, None)
    stamp = props.pop(PROP_TIMESTAMP, "")
    retry_count = int(retry) if retry.isdigit() else 0
    if raw.dup:
        retry_count += 1
    try:
        timestamp = float(stamp) if stamp else time.time()
    except ValueError:
        timestamp = time.time()
    return QueueMessage(message_id, bytes(raw.payload), props, timestamp, retry_count, raw)


def _request_response(properties: Any, attributes: dict[str, str]) -> None:
    """MQTT 5 response topic, correlation data and message expiry as attributes."""
    if properties is None:
        return
    response_topic = getattr(properties, "ResponseTopic", None)
    if response_topic:
        attributes[ATTR_RESPONSE_TOPIC] = str(response_topic)
    correlation = getattr(properties, "CorrelationData", None)
    if correlation is not None:
        attributes.update(correlation_attributes(bytes(correlation)))
    expiry = getattr(properties, "MessageExpiryInterval", None)
    if isinstance(expiry, int):
        attributes[ATTR_EXPIRES_AT] = f"{time.time() + expiry:.3f}"
