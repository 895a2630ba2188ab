"""``type: kafka``: Apache Kafka (and Kafka-compatible endpoints such as Azure Event Hubs).

How MessageQueueInterface maps onto Kafka (queue name = topic):

- publish/publish_batch: see ``publisher`` (librdkafka through confluent-kafka; consume
  and the admin calls use aiokafka). Every record carries the gateway message id,
  the MQTT topic and all attributes as headers; its key comes from ``kafka_message_key``.
  The producer is idempotent with acks=all by default.
- consume: one consumer per topic in ``kafka_consumer_group``, auto-commit off. A message
  stays in flight until acknowledge or reject; the group's committed offset of a partition
  only moves past messages that are settled (``offsets``), so a crash redelivers anything
  not acknowledged. acknowledge = commit after handling.
- reject(requeue=True) re-publishes the record at the end of its topic (same key, headers,
  ``openhqm_retry_count`` + 1) and commits past the original; reject(requeue=False) does the
  same into the dead-letter topic ``queue.dlq_name`` with ``openhqm_dlq_reason``. A record
  is committed past only after its copy was acknowledged by the broker.
- get_queue_depth = consumer lag: high watermark - max(committed, log start) per partition.
- create/delete through the admin API; purge = delete records up to the high watermark,
  returning how many were removed. Kafka has no delayed delivery: publish with
  delay_seconds > 0 raises NotSupportedError. It does not order by priority either; a
  non-zero priority travels as the header ``openhqm_priority`` for consumers to use.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Self, TypeVar

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener
from aiokafka import errors as ke
from aiokafka.admin import AIOKafkaAdminClient, NewTopic, RecordsToDelete
from aiokafka.helpers import create_ssl_context
from aiokafka.structs import TopicPartition
from confluent_kafka import KafkaException

from gateway.config import Config
from gateway.errors import (
    ConfigError,
    NotSupportedError,
    UplinkUnavailable,
)
from gateway.message import ATTR_MESSAGE_ID, Body, QueueMessage
from gateway.queue.interface import Handler, MessageQueueInterface, PublishResult
from gateway.queue.keys import KeyTemplate
from gateway.queue.offsets import PartitionOffsets
from gateway.uplinks.kafka.errors import BACKEND, translate
from gateway.uplinks.kafka.publisher import Headers, Publisher
from gateway.uplinks.kafka.settings import KafkaSettings

log = logging.getLogger("gateway.uplinks.kafka")

HEADER_RETRY_COUNT = "openhqm_retry_count"
HEADER_PRIORITY = "openhqm_priority"
HEADER_LAST_ERROR = "openhqm_last_error"
HEADER_DLQ_REASON = "openhqm_dlq_reason"
HEADER_DLQ_SOURCE = "openhqm_dlq_source"
_REWRITTEN = {HEADER_RETRY_COUNT, HEADER_LAST_ERROR, HEADER_DLQ_REASON, HEADER_DLQ_SOURCE}
_CREATE_OPTIONS = {"partitions", "replication_factor", "config"}
_KAFKA_ERRORS = (ke.KafkaError, OSError)
R = TypeVar("R")


@dataclass(eq=False)
class _Subscription:
    topic: str
    consumer: AIOKafkaConsumer
    offsets: dict[TopicPartition, PartitionOffsets] = field(default_factory=dict)
    commit_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    fetch_lock: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass(eq=False)
class _InFlight:
    sub: _Subscription
    tp: TopicPartition
    offset: int
    key: bytes | None
    message: QueueMessage


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    """Keeps in-flight bookkeeping right when the group moves partitions."""

    def __init__(self, uplink: KafkaQueue, sub: _Subscription) -> None:
        self.uplink, self.sub = uplink, sub

    async def on_partitions_revoked(self, revoked: Any) -> None:
        for tp in revoked:
            await self.uplink._commit(self.sub, tp, quiet=True)

    async def on_partitions_assigned(self, assigned: Any) -> None:
        kept = set(assigned)
        for tp in list(self.sub.offsets):
            if tp not in kept:  # another member owns it now and will redeliver
                del self.sub.offsets[tp]
                self.uplink._drop_in_flight(self.sub, tp)
            elif self.sub.offsets[tp].next_offset >= 0:  # still ours: skip what is in flight
                self.sub.consumer.seek(tp, self.sub.offsets[tp].next_offset)


class KafkaQueue(MessageQueueInterface):
    backend_name = BACKEND

    def __init__(self, settings: KafkaSettings, *, client_id: str = "openhqm-gateway",
                 dlq_name: str = "openhqm-dlq") -> None:
        self.settings = settings
        self.client_id = settings.kafka_client_id or client_id
        self.dlq_name = dlq_name
        self.key = KeyTemplate.parse(settings.kafka_message_key)
        _check_settings(settings)
        self._admin: AIOKafkaAdminClient | None = None
        self._probe: AIOKafkaConsumer | None = None
        self._publisher: Publisher | None = None
        self._subs: dict[str, _Subscription] = {}
        self._in_flight: dict[str, list[_InFlight]] = {}

    @classmethod
    def from_config(cls, config: Config) -> Self:
        settings: KafkaSettings = config.queue.settings
        return cls(settings, client_id=f"openhqm-gateway-{config.gateway_id}",
                   dlq_name=config.queue.dlq_name)

    # -- connections --------------------------------------------------------------------

    def _common(self) -> dict[str, Any]:
        s = self.settings
        servers = s.kafka_bootstrap_servers
        if isinstance(servers, str):
            servers = [part.strip() for part in servers.split(",") if part.strip()]
        options: dict[str, Any] = {
            "bootstrap_servers": servers, "client_id": self.client_id,
            "request_timeout_ms": int(s.kafka_request_timeout * 1000),
            "security_protocol": s.kafka_security_protocol,
        }
        if s.kafka_security_protocol.startswith("SASL"):
            options.update(sasl_mechanism=s.kafka_sasl_mechanism,
                           sasl_plain_username=s.kafka_sasl_username,
                           sasl_plain_password=s.kafka_sasl_password)
        if s.kafka_security_protocol.endswith("SSL"):
            options["ssl_context"] = self._ssl_context()
        return options

    def _ssl_context(self) -> Any:
        s = self.settings
        try:
            context = create_ssl_context(cafile=s.kafka_ssl_ca_file, certfile=s.kafka_ssl_cert_file,
                                         keyfile=s.kafka_ssl_key_file,
                                         password=s.kafka_ssl_key_password)
        except OSError as exc:
            raise ConfigError("queue.kafka_ssl_ca_file", s.kafka_ssl_ca_file,
                              f"cannot load the TLS files: {exc}") from None
        context.check_hostname = s.kafka_ssl_check_hostname
        return context

    def producer_config(self) -> dict[str, Any]:
        """The librdkafka properties of the producer (docs/uplinks/kafka.md has the table)."""
        s = self.settings
        servers = s.kafka_bootstrap_servers
        if not isinstance(servers, str):
            servers = ",".join(servers)
        conf: dict[str, Any] = {
            "bootstrap.servers": ",".join(p.strip() for p in servers.split(",") if p.strip()),
            "client.id": self.client_id,
            "security.protocol": s.kafka_security_protocol,
            "acks": s.kafka_acks,
            "enable.idempotence": s.kafka_enable_idempotence,
            "compression.type": s.kafka_compression,
            "linger.ms": s.kafka_linger * 1000,
            "batch.size": s.kafka_batch_size,
            "message.max.bytes": s.kafka_max_request_size,
            "request.timeout.ms": int(s.kafka_request_timeout * 1000),
            "socket.timeout.ms": int(s.kafka_request_timeout * 1000),
            "message.timeout.ms": max(1, int(s.kafka_delivery_timeout * 1000)),
            "partitioner": "murmur2_random",
            "allow.auto.create.topics": False,
            "reconnect.backoff.max.ms": 1000,
            "logger": logging.getLogger("gateway.uplinks.kafka.librdkafka"),
        }
        if s.kafka_security_protocol.startswith("SASL"):
            conf.update({"sasl.mechanism": s.kafka_sasl_mechanism,
                         "sasl.username": s.kafka_sasl_username or "",
                         "sasl.password": s.kafka_sasl_password or ""})
        if s.kafka_security_protocol.endswith("SSL"):
            conf["ssl.ca.location"] = s.kafka_ssl_ca_file or "probe"
            if s.kafka_ssl_cert_file:
                conf["ssl.certificate.location"] = s.kafka_ssl_cert_file
            if s.kafka_ssl_key_file:
                conf["ssl.key.location"] = s.kafka_ssl_key_file
            if s.kafka_ssl_key_password:
                conf["ssl.key.password"] = s.kafka_ssl_key_password
            conf["ssl.endpoint.identification.algorithm"] = (
                "https" if s.kafka_ssl_check_hostname else "none")
        return conf

    def _new_publisher(self) -> Publisher:
        s = self.settings
        try:
            return Publisher(
                self.producer_config(), self.key, max_request_size=s.kafka_max_request_size,
                delivery_timeout=s.kafka_delivery_timeout,
                metadata_timeout=min(s.kafka_request_timeout, s.kafka_delivery_timeout),
                create_topic=self.create_queue if s.kafka_auto_create_topics else None)
        except KafkaException as exc:  # librdkafka refused the configuration
            raise ConfigError("queue.kafka_*", "", f"the Kafka producer refused its "
                              f"configuration: {exc.args[0]}") from None

    async def connect(self) -> None:
        if self._publisher is not None:
            return
        s = self.settings
        common = self._common()
        admin = AIOKafkaAdminClient(**common)
        probe = AIOKafkaConsumer(**common, group_id=None, enable_auto_commit=False)
        try:
            async with asyncio.timeout(s.kafka_request_timeout):
                await admin.start()
                await probe.start()
        except (*_KAFKA_ERRORS, TimeoutError) as exc:
            await _close_quietly(admin, probe)
            raise translate(exc, "connect") from exc
        except BaseException:
            await _close_quietly(admin, probe)
            raise
        try:
            publisher = self._new_publisher()
        except BaseException:
            await _close_quietly(admin, probe)
            raise
        self._admin, self._probe, self._publisher = admin, probe, publisher
        if s.kafka_create_topics:
            for topic in s.kafka_topics:
                await self.create_queue(topic)

    async def _renew_producer(self) -> None:
        """Replace a producer that lost its idempotence state (a fatal librdkafka error)."""
        old = self._publisher
        log.warning("kafka: replacing the producer after a fatal error")
        self._publisher = self._new_publisher()
        if old is not None:
            self._publisher.topics |= old.topics
            await old.close(0.0)

    async def disconnect(self) -> None:
        subs, self._subs = list(self._subs.values()), {}
        self._in_flight.clear()
        for sub in subs:
            await _close_quietly(sub.consumer)
        publisher, self._publisher = self._publisher, None
        if publisher is not None:
            await publisher.close(self.settings.kafka_delivery_timeout)
        admin, probe = self._admin, self._probe
        self._admin = self._probe = None
        await _close_quietly(admin, probe)

    def _require(self) -> tuple[Publisher, AIOKafkaAdminClient, AIOKafkaConsumer]:
        if self._publisher is None or self._admin is None or self._probe is None:
            raise UplinkUnavailable("not connected", backend=BACKEND)
        return self._publisher, self._admin, self._probe

    async def health_check(self) -> bool:
        if self._admin is None:
            return False
        try:
            async with asyncio.timeout(min(self.settings.kafka_request_timeout, 10.0)):
                await self._admin.describe_cluster()
        except (*_KAFKA_ERRORS, TimeoutError) as exc:
            log.debug("kafka health check failed: %s", exc)
            return False
        return True

    # -- publishing ---------------------------------------------------------------------

    async def publish(self, queue_name: str, message: Body, priority: int = 0,
                      attributes: dict[str, str] | None = None, delay_seconds: float = 0, *,
                      message_id: str | None = None) -> str:
        if delay_seconds > 0:
            raise NotSupportedError(BACKEND, "delay_seconds", "Kafka has no delayed delivery")
        return await self._publish_one(queue_name, message, priority, attributes,
                                       message_id=message_id, priority_attribute=HEADER_PRIORITY)

    async def publish_batch(self, queue_name: str,
                            messages: Sequence[QueueMessage]) -> list[PublishResult]:
        if not messages:
            return []
        if self._publisher is None:
            error = UplinkUnavailable("not connected", backend=BACKEND)
            return [PublishResult(m.id, error) for m in messages]
        if self._publisher.broken:
            try:
                await self._renew_producer()
            except UplinkUnavailable as exc:
                return [PublishResult(m.id, exc) for m in messages]
        return await self._publisher.publish_batch(queue_name, messages)

    # -- consuming ----------------------------------------------------------------------

    async def consume(self, queue_name: str, handler: Handler, batch_size: int = 10,
                      wait_time_seconds: float = 1.0) -> None:
        sub = await self._subscription(queue_name)
        while True:
            async with sub.fetch_lock:
                try:
                    fetched = await sub.consumer.getmany(
                        timeout_ms=int(wait_time_seconds * 1000), max_records=batch_size)
                except _KAFKA_ERRORS as exc:
                    raise translate(exc, f"consume {queue_name}") from exc
            for tp, records in fetched.items():
                for record in records:
                    if tp not in sub.consumer.assignment():
                        break  # revoked while we handled earlier records
                    msg = self._track(sub, tp, record)
                    await self._handle(handler, msg)

    async def _handle(self, handler: Handler, msg: QueueMessage) -> None:
        try:
            await handler(msg)
        except Exception as exc:
            log.warning("kafka: handler failed for %s: %s; requeueing", msg.id, exc)
            await self.reject(msg.id, requeue=True,
                              reason=f"handler raised {type(exc).__name__}: {exc}")

    async def _subscription(self, topic: str) -> _Subscription:
        sub = self._subs.get(topic)
        if sub is not None:
            return sub
        self._require()
        s = self.settings
        consumer = AIOKafkaConsumer(
            **self._common(), group_id=s.kafka_consumer_group, enable_auto_commit=False,
            auto_offset_reset=s.kafka_auto_offset_reset,
            session_timeout_ms=int(s.kafka_session_timeout * 1000),
            heartbeat_interval_ms=max(100, int(s.kafka_session_timeout * 1000 / 3)))
        sub = _Subscription(topic, consumer)
        consumer.subscribe([topic], listener=_Rebalance(self, sub))
        try:
            await asyncio.wait_for(consumer.start(), s.kafka_request_timeout)
        except (*_KAFKA_ERRORS, TimeoutError) as exc:
            await _close_quietly(consumer)
            raise translate(exc, f"join group {s.kafka_consumer_group}") from exc
        self._subs[topic] = sub
        return sub

    def _track(self, sub: _Subscription, tp: TopicPartition, record: Any) -> QueueMessage:
        attrs = {k: (v or b"").decode("utf-8", "replace") for k, v in record.headers or ()}
        retries = attrs.pop(HEADER_RETRY_COUNT, "0")
        attrs.pop(HEADER_LAST_ERROR, None)
        msg_id = attrs.pop(ATTR_MESSAGE_ID, "") or f"{tp.topic}-{tp.partition}-{record.offset}"
        msg = QueueMessage(msg_id, record.value or b"", attrs, record.timestamp / 1000.0,
                           int(retries) if retries.isdigit() else 0, record)
        sub.offsets.setdefault(tp, PartitionOffsets()).delivered(record.offset)
        self._in_flight.setdefault(msg_id, []).append(
            _InFlight(sub, tp, record.offset, record.key, msg))
        return msg

    def _take(self, message_id: str) -> _InFlight | None:
        entries = self._in_flight.get(message_id)
        if not entries:
            return None
        entry = entries.pop(0)
        if not entries:
            del self._in_flight[message_id]
        return entry

    def _drop_in_flight(self, sub: _Subscription, tp: TopicPartition) -> None:
        for msg_id in list(self._in_flight):
            kept = [e for e in self._in_flight[msg_id] if not (e.sub is sub and e.tp == tp)]
            if kept:
                self._in_flight[msg_id] = kept
            else:
                del self._in_flight[msg_id]

    async def acknowledge(self, message_id: str) -> bool:
        entry = self._take(message_id)
        if entry is None:
            return False
        await self._settle(entry)
        return True

    async def reject(self, message_id: str, requeue: bool = True, reason: str = "") -> bool:
        entry = self._take(message_id)
        if entry is None:
            return False
        target = entry.sub.topic if requeue else self.dlq_name
        headers = _copy_headers(entry, requeue, reason)
        try:
            await self._send_copy(target, entry.key, entry.message.body, headers)
        except BaseException:
            self._in_flight.setdefault(message_id, []).insert(0, entry)  # still ours
            raise
        await self._settle(entry)
        return True

    async def _send_copy(self, topic: str, key: bytes | None, body: bytes, headers: Headers) -> None:
        publisher, _, _ = self._require()
        await publisher.send_one(topic, key, body, headers)

    async def _settle(self, entry: _InFlight) -> None:
        offsets = entry.sub.offsets.get(entry.tp)
        if offsets is None:
            return  # the partition moved to another consumer; it will redeliver
        offsets.settle(entry.offset)
        await self._commit(entry.sub, entry.tp)

    async def _commit(self, sub: _Subscription, tp: TopicPartition, quiet: bool = False) -> None:
        async with sub.commit_lock:
            offsets = sub.offsets.get(tp)
            position = offsets.committable() if offsets is not None else None
            if offsets is None or position is None:
                return
            try:
                await sub.consumer.commit({tp: position})
            except (ke.CommitFailedError, ke.IllegalStateError) as exc:
                log.info("kafka: commit for %s lost to a rebalance (%s); it may be redelivered",
                         tp, exc)
                return
            except _KAFKA_ERRORS as exc:
                if quiet:
                    log.warning("kafka: commit for %s failed: %s", tp, exc)
                    return
                raise translate(exc, f"commit {tp.topic}[{tp.partition}]") from exc
            offsets.committed = position

    # -- topics -------------------------------------------------------------------------

    async def _partitions(self, topic: str) -> list[TopicPartition]:
        """The topic's partitions; [] when it does not exist. Asks for all topics on purpose:
        a metadata request naming a missing topic makes an auto-creating broker create it."""
        _, admin, _ = self._require()
        described = await self._retrying(lambda: admin.describe_topics(None), "list topics")
        for entry in described:
            if entry["topic"] == topic and entry["error_code"] == 0:
                return sorted(TopicPartition(topic, p["partition"]) for p in entry["partitions"])
        return []

    async def _watermarks(self, tps: list[TopicPartition]) -> tuple[dict[Any, int], dict[Any, int]]:
        _, _, probe = self._require()
        try:
            async with asyncio.timeout(self.settings.kafka_request_timeout):
                begin = await probe.beginning_offsets(tps)
                end = await probe.end_offsets(tps)
        except (*_KAFKA_ERRORS, TimeoutError) as exc:
            raise translate(exc, "list offsets") from exc
        return begin, end

    async def _retrying(self, call: Callable[[], Awaitable[R]], what: str) -> R:
        """Retry Kafka's transient errors (coordinator loading, leader moving) for a while."""
        delay = 0.05
        deadline = time.monotonic() + self.settings.kafka_request_timeout
        while True:
            try:
                return await call()
            except ke.KafkaError as exc:
                if not exc.retriable or time.monotonic() + delay > deadline:
                    raise translate(exc, what) from exc
            except OSError as exc:
                raise translate(exc, what) from exc
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def get_queue_depth(self, queue_name: str) -> int:
        tps = await self._partitions(queue_name)
        if not tps:
            return 0
        begin, end = await self._watermarks(tps)
        _, admin, _ = self._require()
        committed = await self._retrying(
            lambda: admin.list_consumer_group_offsets(self.settings.kafka_consumer_group,
                                                      partitions=tps),
            "consumer group offsets")
        lag = 0
        for tp in tps:
            done = committed[tp].offset if tp in committed else -1
            lag += max(0, end[tp] - max(begin[tp], done))
        return lag

    async def create_queue(self, queue_name: str, **kwargs: Any) -> bool:
        unknown = set(kwargs) - _CREATE_OPTIONS
        if unknown:
            raise NotSupportedError(BACKEND, f"create_queue({', '.join(sorted(unknown))})",
                                    "Kafka topics take partitions, replication_factor, config")
        s = self.settings
        topic = NewTopic(queue_name, int(kwargs.get("partitions", s.kafka_topic_partitions)),
                         int(kwargs.get("replication_factor", s.kafka_replication_factor)),
                         topic_configs={k: str(v) for k, v in (kwargs.get("config") or {}).items()})
        _, admin, _ = self._require()
        try:
            response = await admin.create_topics([topic])
        except _KAFKA_ERRORS as exc:
            raise translate(exc, f"create topic {queue_name}") from exc
        code, text = _topic_error(response.topic_errors, queue_name)
        if code == ke.TopicAlreadyExistsError.errno:
            return False
        if code:
            raise translate(ke.for_code(code)(text), f"create topic {queue_name}")
        return True

    async def delete_queue(self, queue_name: str) -> bool:
        _, admin, probe = self._require()
        sub = self._subs.pop(queue_name, None)
        if sub is not None:  # a subscribed consumer would keep asking for the topic
            self._forget(sub)
            await _close_quietly(sub.consumer)
        if self._publisher is not None:
            self._publisher.forget_topic(queue_name)
        untrack = getattr(getattr(probe, "_client", None), "set_topics", None)
        if untrack is not None:  # the offsets probe tracks topics it looked at, too
            untrack([])
        try:
            response = await admin.delete_topics([queue_name])
        except _KAFKA_ERRORS as exc:
            raise translate(exc, f"delete topic {queue_name}") from exc
        code, text = _topic_error(response.topic_error_codes, queue_name)
        if code == ke.UnknownTopicOrPartitionError.errno:
            return False
        if code:
            raise translate(ke.for_code(code)(text), f"delete topic {queue_name}")
        return True

    def _forget(self, sub: _Subscription) -> None:
        for tp in list(sub.offsets):
            self._drop_in_flight(sub, tp)
        sub.offsets.clear()

    async def purge_queue(self, queue_name: str) -> int:
        tps = await self._partitions(queue_name)
        if not tps:
            return 0
        begin, end = await self._watermarks(tps)
        targets = {tp: RecordsToDelete(end[tp]) for tp in tps if end[tp] > begin[tp]}
        if not targets:
            return 0
        _, admin, _ = self._require()
        try:
            await admin.delete_records(targets)
        except _KAFKA_ERRORS as exc:
            raise translate(exc, f"purge {queue_name}") from exc
        sub = self._subs.get(queue_name)
        if sub is not None:
            self._forget(sub)
        return sum(end[tp] - begin[tp] for tp in targets)


def _check_settings(s: KafkaSettings) -> None:
    if s.kafka_enable_idempotence and s.kafka_acks != "all":
        raise ConfigError("queue.kafka_acks", s.kafka_acks,
                          "the idempotent producer needs acks 'all'; set "
                          "kafka_enable_idempotence: false to use 1 or 0")
    if s.kafka_batch_size > s.kafka_max_request_size:
        raise ConfigError("queue.kafka_batch_size", s.kafka_batch_size,
                          "must not exceed kafka_max_request_size")
    if s.kafka_security_protocol.startswith("SASL") and not s.kafka_sasl_username:
        raise ConfigError("queue.kafka_sasl_username", s.kafka_sasl_username,
                          f"needed with kafka_security_protocol {s.kafka_security_protocol}")


def _copy_headers(entry: _InFlight, requeue: bool, reason: str) -> Headers:
    msg = entry.message
    headers: Headers = [(ATTR_MESSAGE_ID, msg.id.encode())]
    headers.extend((k, v.encode()) for k, v in msg.attributes.items()
                   if k not in _REWRITTEN and k != ATTR_MESSAGE_ID)
    if requeue:
        headers.append((HEADER_RETRY_COUNT, str(msg.retry_count + 1).encode()))
        if reason:
            headers.append((HEADER_LAST_ERROR, reason.encode()))
    else:
        headers.append((HEADER_RETRY_COUNT, str(msg.retry_count).encode()))
        headers.append((HEADER_DLQ_REASON, reason.encode()))
        headers.append((HEADER_DLQ_SOURCE, f"{entry.tp.topic}/{entry.tp.partition}/"
                        f"{entry.offset}".encode()))
    return headers


def _topic_error(entries: Any, topic: str) -> tuple[int, str]:
    for entry in entries:
        if entry[0] == topic:
            return int(entry[1]), str(entry[2]) if len(entry) > 2 and entry[2] else ""
    return 0, ""


async def _close_quietly(*clients: Any) -> None:
    for client in clients:
        if client is None:
            continue
        close = client.close if isinstance(client, AIOKafkaAdminClient) else client.stop
        with contextlib.suppress(*_KAFKA_ERRORS, TimeoutError):
            await close()
