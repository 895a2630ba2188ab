"""Settings of ``type: kafka``: the seed's three keys verbatim, plus what real deployments need.

Every key sits flat under ``queue:`` with the ``kafka_`` prefix, like the seed's own keys,
so each has an environment override ``OPENHQM_QUEUE__KAFKA_<KEY>``. Imports no SDK.
docs/uplinks/kafka.md explains each key and has an Azure Event Hubs example.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

from gateway.settings import DURATION, SIZE, secret

SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]
Compression = Literal["none", "gzip", "lz4", "zstd"]


@dataclass(frozen=True, slots=True)
class KafkaSettings:
    #: "host:port,host:port" or a list
    kafka_bootstrap_servers: str | list[str] = "localhost:9092"
    #: consumer group of consume(); its committed offsets are what get_queue_depth measures
    kafka_consumer_group: str = "openhqm-workers"
    #: topics the gateway expects to exist; connect() creates the missing ones when
    #: kafka_create_topics is true (the seed lists them; the uplink never needs them listed)
    kafka_topics: list[str] = field(default_factory=list)
    kafka_create_topics: bool = False
    #: publishing to a topic that does not exist creates it through the admin API
    #: (kafka_topic_partitions, kafka_replication_factor); a broker that refuses (no CREATE
    #: permission) is fine when the topic exists. Off: a missing topic is UplinkUnavailable.
    kafka_auto_create_topics: bool = True
    #: '' = "openhqm-gateway-<gateway.id>"
    kafka_client_id: str = ""

    kafka_security_protocol: SecurityProtocol = "PLAINTEXT"
    #: used with SASL_PLAINTEXT and SASL_SSL
    kafka_sasl_mechanism: SaslMechanism = "PLAIN"
    kafka_sasl_username: str | None = None
    kafka_sasl_password: str | None = secret(None)
    #: PEM files for SSL / SASL_SSL; no CA file = the system's trusted CAs
    kafka_ssl_ca_file: str | None = None
    kafka_ssl_cert_file: str | None = None
    kafka_ssl_key_file: str | None = None
    kafka_ssl_key_password: str | None = secret(None)
    #: verify that the broker's certificate names the host (turn off for testing only)
    kafka_ssl_check_hostname: bool = True

    #: producer compression; lz4 and zstd need their codec packages (see the docs)
    kafka_compression: Compression = "none"
    #: "all" waits for every in-sync replica; the idempotent producer requires "all"
    kafka_acks: Literal["all", "1", "0"] = "all"
    kafka_enable_idempotence: bool = True
    #: how long the producer waits to fill a batch
    kafka_linger: Annotated[float, DURATION] = 0.005
    #: bytes per partition batch (the producer's max_batch_size)
    kafka_batch_size: Annotated[int, SIZE] = 512 * 1024
    #: a bigger message is rejected by the gateway itself (the broker has its own limit,
    #: message.max.bytes / the topic's max.message.bytes)
    kafka_max_request_size: Annotated[int, SIZE] = 1024 * 1024
    #: the record key, which picks the partition: one key = one partition = kept order.
    #: Placeholders: {topic} (the MQTT topic), {topic[N]} (its Nth level, 0-based;
    #: negative counts from the end), {attr:NAME} (a message attribute), {id}.
    #: '' = no key (the producer spreads messages; no order across partitions).
    kafka_message_key: str = "{topic}"

    #: one request to the broker (produce, metadata, admin)
    kafka_request_timeout: Annotated[float, DURATION] = 30.0
    #: publish_batch waits this long for the broker's acknowledgements; what is still
    #: unacknowledged then is reported UplinkUnavailable (the producer keeps retrying it,
    #: and a re-publish of the same message id joins that attempt instead of duplicating it)
    kafka_delivery_timeout: Annotated[float, DURATION] = 20.0
    #: create_queue defaults
    kafka_topic_partitions: int = 1
    kafka_replication_factor: int = 1
    #: consumer: where a group without committed offsets starts
    kafka_auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    kafka_session_timeout: Annotated[float, DURATION] = 10.0
