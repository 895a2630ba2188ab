"""``type: kafka``: Apache Kafka (and Kafka-compatible endpoints such as Azure Event Hubs).

How MessageQueueInterface maps onto Kafka (queue name = topic):

- One client library: librdkafka through confluent-kafka for publishing (``publisher``),
  consuming (``consumer``) and the admin calls (``admin``), so TLS and SASL are configured
  once (``client_config``) and behave the same everywhere.
- publish/publish_batch: every record carries the gateway message id, the MQTT topic and
  all attributes as headers; its key comes from ``kafka_message_key``. The producer is
  idempotent with acks=all by default.
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

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Self

from confluent_kafka import KafkaError, KafkaException, Message

from gateway.config import Config
from gateway.errors import ConfigError, NotSupportedError, QueueError, UplinkUnavailable
from gateway.message import ATTR_MESSAGE_ID, Body, QueueMessage
from gateway.queue.interface import Handler, MessageQueueInterface, PublishResult
from gateway.queue.keys import KeyTemplate
from gateway.uplinks.kafka.admin import Admin, Partition
from gateway.uplinks.kafka.consumer import Subscription
from gateway.uplinks.kafka.errors import BACKEND
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
#: seconds disconnect() lets the producer send what it still holds
CLOSE_FLUSH = 1.0
#: librdkafka property (as its errors name it) -> the setting it comes from
_PROPERTY_KEYS = {"ssl.ca.location": "kafka_ssl_ca_file",
                  "ssl.certificate.location": "kafka_ssl_cert_file",
                  "ssl.key.location": "kafka_ssl_key_file",
                  "ssl.key.password": "kafka_ssl_key_password",
                  "sasl.": "kafka_sasl_mechanism",
                  "bootstrap.servers": "kafka_bootstrap_servers"}


@dataclass(eq=False)
class _InFlight:
    sub: Subscription
    partition: Partition
    offset: int
    key: bytes | None
    message: QueueMessage


class KafkaQueue(MessageQueueInterface):
    backend_name = BACKEND

    def __init__(self, settings: KafkaSettings, *, client_id: str = "openhqm-gateway",
                 dlq_name: str = "openhqm-dlq") -> None:
        self.settings = settings
        self.client_id = settings.kafka_client_id or client_id
        self.dlq_name = dlq_name
        self.key = KeyTemplate.parse(settings.kafka_message_key)
        _check_settings(settings)
        self._admin: Admin | None = None
        self._publisher: Publisher | None = None
        self._subs: dict[str, Subscription] = {}
        self._in_flight: dict[str, list[_InFlight]] = {}

    @property
    def durable_acks(self) -> bool:  # type: ignore[override]
        """acks=all: every in-sync replica has the record when the broker acknowledges it."""
        return self.settings.kafka_acks == "all"

    @classmethod
    def from_config(cls, config: Config) -> Self:
        settings: KafkaSettings = config.queue.settings
        return cls(settings, client_id=f"openhqm-gateway-{config.gateway_id}",
                   dlq_name=config.queue.dlq_name)

    # -- client configuration -------------------------------------------------------------

    def client_config(self) -> dict[str, Any]:
        """The librdkafka properties every client shares: brokers, identity, TLS, SASL
        (docs/uplinks/kafka.md has the table)."""
        s = self.settings
        servers = s.kafka_bootstrap_servers
        if not isinstance(servers, str):
            servers = ",".join(servers)
        conf: dict[str, Any] = {
            "bootstrap.servers": ",".join(p.strip() for p in servers.split(",") if p.strip()),
            "client.id": self.client_id,
            "security.protocol": s.kafka_security_protocol,
            "socket.timeout.ms": int(s.kafka_request_timeout * 1000),
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

    def producer_config(self) -> dict[str, Any]:
        """The producer's librdkafka properties: the shared ones plus batching, acks,
        idempotence, compression, timeouts."""
        s = self.settings
        return {
            **self.client_config(),
            "acks": s.kafka_acks,
            "enable.idempotence": s.kafka_enable_idempotence,
            "compression.type": s.kafka_compression,
            "linger.ms": s.kafka_linger * 1000,
            "batch.size": s.kafka_batch_size,
            "message.max.bytes": s.kafka_max_request_size,
            "request.timeout.ms": int(s.kafka_request_timeout * 1000),
            "message.timeout.ms": max(1, int(s.kafka_delivery_timeout * 1000)),
            "partitioner": "murmur2_random",
            "allow.auto.create.topics": False,
        }

    def consumer_config(self) -> dict[str, Any]:
        s = self.settings
        session_ms = int(s.kafka_session_timeout * 1000)
        return {
            **self.client_config(),
            "group.id": s.kafka_consumer_group,
            "enable.auto.commit": False,
            "auto.offset.reset": s.kafka_auto_offset_reset,
            "session.timeout.ms": session_ms,
            "heartbeat.interval.ms": max(100, session_ms // 3),
            "allow.auto.create.topics": False,
            "enable.partition.eof": False,
        }

    def _new_publisher(self) -> Publisher:
        s = self.settings
        try:
            return Publisher(
                self.producer_config(), self.key, max_request_size=s.kafka_max_request_size,
                delivery_timeout=s.kafka_delivery_timeout,
                metadata_timeout=min(s.kafka_request_timeout, s.kafka_delivery_timeout),
                create_topic=self.create_queue if s.kafka_auto_create_topics else None)
        except KafkaException as exc:  # librdkafka refused the configuration
            raise self._refused(exc, "producer") from None

    def _refused(self, exc: KafkaException, client: str) -> ConfigError:
        """librdkafka refused a configuration (a TLS file it cannot read, a bad value): the
        error names the setting behind the property it complains about."""
        err = exc.args[0] if exc.args else exc
        text = err.str() if isinstance(err, KafkaError) else str(err)
        for prop, key in _PROPERTY_KEYS.items():
            if prop in text:
                return ConfigError(f"queue.{key}", getattr(self.settings, key),
                                   f"the Kafka {client} refused it: {text}")
        return ConfigError("queue.kafka_*", "", f"the Kafka {client} refused its "
                           f"configuration: {text}")

    # -- connections ------------------------------------------------------------------------

    @property
    def target(self) -> str:
        servers = self.settings.kafka_bootstrap_servers
        return servers if isinstance(servers, str) else ",".join(servers)

    async def connect(self) -> None:
        if self._publisher is not None:
            return
        try:
            admin = Admin(self.client_config(), self.settings.kafka_request_timeout)
        except KafkaException as exc:
            raise self._refused(exc, "admin client") from None
        publisher = self._new_publisher()
        try:
            # UplinkUnavailable when no broker answers, within a second when they refuse
            # connections (the producer hears "all brokers are down"), else at the timeout
            await publisher.until_reachable(admin.describe_cluster())
        except BaseException:
            await publisher.close(0.0)
            raise
        self._admin, self._publisher = admin, publisher
        if self.settings.kafka_create_topics:
            for topic in self.settings.kafka_topics:
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
            await sub.close()
        publisher, self._publisher = self._publisher, None
        if publisher is not None:
            # Records still in the producer belong to batches that ended without their
            # reports: they are in the gateway's store. Waiting longer only saves duplicates,
            # and with the brokers down it would hold up a shutdown.
            await publisher.close(min(self.settings.kafka_delivery_timeout, CLOSE_FLUSH))
        self._admin = None

    def _require(self) -> tuple[Publisher, Admin]:
        if self._publisher is None or self._admin is None:
            raise UplinkUnavailable("not connected", backend=BACKEND)
        return self._publisher, self._admin

    async def health_check(self) -> bool:
        if self._admin is None:
            return False
        try:
            await self._admin.describe_cluster(min(self.settings.kafka_request_timeout, 10.0))
        except QueueError as exc:
            log.debug("kafka health check failed: %s", exc)
            return False
        return True

    # -- publishing -------------------------------------------------------------------------

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

    # -- consuming --------------------------------------------------------------------------

    async def consume(self, queue_name: str, handler: Handler, batch_size: int = 10,
                      wait_time_seconds: float = 1.0) -> None:
        sub = self._subscription(queue_name)
        while True:
            await sub.fill(batch_size, wait_time_seconds)
            while sub.backlog:
                record = sub.backlog[0]
                partition = (record.topic() or queue_name, record.partition() or 0)
                # tracked and taken off the backlog with no await between: a cancellation
                # cannot lose it
                msg = self._track(sub, partition, record) if partition in sub.assigned else None
                sub.backlog.popleft()
                if msg is not None:  # else revoked while earlier records were handled
                    await self._handle(handler, msg)

    async def _handle(self, handler: Handler, msg: QueueMessage) -> None:
        try:
            await handler(msg)
        except Exception as exc:
            log.warning("kafka: handler failed for %s: %s; requeueing", msg.id, exc)
            await self.reject(msg.id, requeue=True,
                              reason=f"handler raised {type(exc).__name__}: {exc}")

    def _subscription(self, topic: str) -> Subscription:
        sub = self._subs.get(topic)
        if sub is None:
            self._require()
            try:
                sub = Subscription.start(topic, self.consumer_config(), self._drop_in_flight)
            except KafkaException as exc:
                raise self._refused(exc, "consumer") from None
            self._subs[topic] = sub
        return sub

    def _track(self, sub: Subscription, partition: Partition, record: Message) -> QueueMessage:
        attrs = {k: v.decode("utf-8", "replace") if isinstance(v, bytes) else (v or "")
                 for k, v in _header_pairs(record)}
        retries = attrs.pop(HEADER_RETRY_COUNT, "0")
        attrs.pop(HEADER_LAST_ERROR, None)
        offset = record.offset() or 0
        msg_id = attrs.pop(ATTR_MESSAGE_ID, "") or f"{partition[0]}-{partition[1]}-{offset}"
        _, timestamp_ms = record.timestamp()
        value = record.value()
        key = record.key()
        msg = QueueMessage(msg_id, value if isinstance(value, bytes) else b"", attrs,
                           max(timestamp_ms, 0) / 1000.0,
                           int(retries) if retries.isdigit() else 0, record)
        sub.delivered(partition, offset)
        self._in_flight.setdefault(msg_id, []).append(
            _InFlight(sub, partition, offset, key if isinstance(key, bytes) else None, msg))
        return msg

    def _take(self, message_id: str) -> _InFlight | None:
        entries = self._in_flight.get(message_id)
        if not entries:
            return None
        entry = entries.pop(0)
        if not entries:
            del self._in_flight[message_id]
        return entry

    def _drop_in_flight(self, sub: Subscription, partitions: list[Partition]) -> None:
        gone = set(partitions)
        for msg_id in list(self._in_flight):
            kept = [e for e in self._in_flight[msg_id]
                    if not (e.sub is sub and e.partition in gone)]
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
            publisher, _ = self._require()
            await publisher.send_one(target, entry.key, entry.message.body, headers)
        except BaseException:
            self._in_flight.setdefault(message_id, []).insert(0, entry)  # still ours
            raise
        await self._settle(entry)
        return True

    async def _settle(self, entry: _InFlight) -> None:
        offsets = entry.sub.offsets.get(entry.partition)
        if offsets is None:
            return  # the partition moved to another consumer; it will redeliver
        offsets.settle(entry.offset)
        await entry.sub.commit(entry.partition)

    # -- topics -----------------------------------------------------------------------------

    async def get_queue_depth(self, queue_name: str) -> int:
        _, admin = self._require()
        partitions = await admin.partitions(queue_name)
        if not partitions:
            return 0
        begin, end = await admin.watermarks(partitions)
        committed = await admin.committed(self.settings.kafka_consumer_group, partitions)
        return sum(max(0, end[p] - max(begin[p], committed.get(p, -1))) for p in partitions)

    async def create_queue(self, queue_name: str, **kwargs: Any) -> bool:
        unknown = set(kwargs) - _CREATE_OPTIONS
        if unknown:
            raise NotSupportedError(BACKEND, f"create_queue({', '.join(sorted(unknown))})",
                                    "Kafka topics take partitions, replication_factor, config")
        s = self.settings
        _, admin = self._require()
        return await admin.create_topic(
            queue_name, int(kwargs.get("partitions", s.kafka_topic_partitions)),
            int(kwargs.get("replication_factor", s.kafka_replication_factor)),
            {k: str(v) for k, v in (kwargs.get("config") or {}).items()})

    async def delete_queue(self, queue_name: str) -> bool:
        _, admin = self._require()
        sub = self._subs.pop(queue_name, None)
        if sub is not None:  # a subscribed consumer would keep asking for the topic
            self._forget(sub)
            await sub.close()
        if self._publisher is not None:
            self._publisher.forget_topic(queue_name)
        return await admin.delete_topic(queue_name)

    def _forget(self, sub: Subscription) -> None:
        self._drop_in_flight(sub, list(sub.offsets))
        sub.offsets.clear()

    async def purge_queue(self, queue_name: str) -> int:
        _, admin = self._require()
        partitions = await admin.partitions(queue_name)
        if not partitions:
            return 0
        begin, end = await admin.watermarks(partitions)
        targets = {p: end[p] for p in partitions if end[p] > begin[p]}
        if not targets:
            return 0
        await admin.delete_records(targets)
        sub = self._subs.get(queue_name)
        if sub is not None:
            self._forget(sub)
        return sum(end[p] - begin[p] for p in targets)


def _header_pairs(record: Message) -> list[tuple[str, str | bytes | None]]:
    headers = record.headers()
    if headers is None:
        return []
    return list(headers.items()) if isinstance(headers, dict) else list(headers)


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
        topic, partition = entry.partition
        headers.append((HEADER_DLQ_SOURCE, f"{topic}/{partition}/{entry.offset}".encode()))
    return headers
