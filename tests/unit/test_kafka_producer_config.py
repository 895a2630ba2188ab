"""The Kafka uplink's settings -> librdkafka properties, and librdkafka errors -> the gateway's
error tree. No broker: librdkafka itself checks the properties (Producer() refuses unknown
names and bad values), and the error codes are the library's own."""

from __future__ import annotations

import pytest
from confluent_kafka import KafkaError, Producer

from gateway.errors import ConfigError, MessageRejected, RetryableError, UplinkUnavailable
from gateway.uplinks.kafka.errors import translate_rd
from gateway.uplinks.kafka.settings import KafkaSettings
from gateway.uplinks.kafka.uplink import KafkaQueue


def test_every_key_maps_onto_a_librdkafka_property_it_accepts() -> None:
    settings = KafkaSettings(
        kafka_bootstrap_servers=["h1:9093", " h2:9093"], kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism="SCRAM-SHA-512", kafka_sasl_username="u", kafka_sasl_password="p",
        kafka_ssl_check_hostname=False, kafka_compression="zstd", kafka_linger=0.02,
        kafka_batch_size=64 * 1024, kafka_max_request_size=2 * 1024**2,
        kafka_request_timeout=7.0, kafka_delivery_timeout=12.5)
    conf = KafkaQueue(settings, client_id="gw-1").producer_config()
    assert conf["bootstrap.servers"] == "h1:9093,h2:9093"
    assert conf["client.id"] == "gw-1"
    assert (conf["acks"], conf["enable.idempotence"]) == ("all", True)
    assert conf["compression.type"] == "zstd"
    assert conf["linger.ms"] == pytest.approx(20.0)
    assert conf["batch.size"] == 64 * 1024
    assert conf["message.max.bytes"] == 2 * 1024**2
    assert conf["request.timeout.ms"] == 7000
    assert conf["message.timeout.ms"] == 12500
    assert conf["partitioner"] == "murmur2_random"  # keyed records land where Java puts them
    assert (conf["sasl.mechanism"], conf["sasl.username"], conf["sasl.password"]) == (
        "SCRAM-SHA-512", "u", "p")
    assert conf["ssl.endpoint.identification.algorithm"] == "none"
    assert conf["ssl.ca.location"] == "probe"  # no CA file: the system's trusted CAs
    Producer(conf).flush(0)  # librdkafka accepts every property and value


def test_acks_one_without_idempotence() -> None:
    conf = KafkaQueue(KafkaSettings(kafka_acks="1", kafka_enable_idempotence=False)
                      ).producer_config()
    assert (conf["acks"], conf["enable.idempotence"]) == ("1", False)
    assert "sasl.mechanism" not in conf and "ssl.ca.location" not in conf
    Producer(conf).flush(0)


def test_idempotence_needs_acks_all() -> None:
    with pytest.raises(ConfigError, match="kafka_acks"):
        KafkaQueue(KafkaSettings(kafka_acks="1"))


@pytest.mark.parametrize(("code", "kind", "name"), [
    (KafkaError.MSG_SIZE_TOO_LARGE, MessageRejected, "MESSAGE_SIZE_TOO_LARGE"),
    (KafkaError.INVALID_RECORD, MessageRejected, "INVALID_RECORD"),
    (KafkaError.TOPIC_AUTHORIZATION_FAILED, MessageRejected, "TOPIC_AUTHORIZATION_FAILED"),
    (KafkaError._MSG_TIMED_OUT, UplinkUnavailable, "_MSG_TIMED_OUT"),
    (KafkaError._TRANSPORT, UplinkUnavailable, "_TRANSPORT"),
    (KafkaError._ALL_BROKERS_DOWN, UplinkUnavailable, "_ALL_BROKERS_DOWN"),
    (KafkaError.NOT_ENOUGH_REPLICAS, UplinkUnavailable, "NOT_ENOUGH_REPLICAS"),
    (KafkaError.SASL_AUTHENTICATION_FAILED, UplinkUnavailable, "SASL_AUTHENTICATION_FAILED"),
    (KafkaError.UNKNOWN_TOPIC_OR_PART, UplinkUnavailable, "UNKNOWN_TOPIC_OR_PARTITION"),
    (KafkaError.INVALID_PRODUCER_EPOCH, RetryableError, "INVALID_PRODUCER_EPOCH"),
])
def test_librdkafka_errors_translate(code: int, kind: type, name: str) -> None:
    error = translate_rd(KafkaError(code), "produce to t")
    assert type(error) is kind
    assert error.code == name
    assert name in str(error) and "produce to t" in str(error)


def test_a_fatal_error_is_unavailable_whatever_its_code() -> None:
    error = translate_rd(KafkaError(KafkaError.INVALID_PRODUCER_EPOCH, fatal=True))
    assert isinstance(error, UplinkUnavailable)
