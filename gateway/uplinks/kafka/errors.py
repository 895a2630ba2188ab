"""Kafka client errors -> the gateway's error tree. Nothing above the adapter sees them.

``translate_rd`` maps the error codes of librdkafka (confluent-kafka: producer, consumer
and admin client alike):

    cannot reach / not ready / timed out / no leader / auth failed -> UplinkUnavailable
    the broker refused this record (too large, corrupt, invalid)   -> MessageRejected
    not allowed to write the topic                                 -> MessageRejected
    any other retriable broker error                               -> RetryableError
    anything else                                                  -> RetryableError

Unknown errors are retryable on purpose: the forwarder's attempt limit still dead-letters a
message that keeps failing, and a broker quirk never silently discards data.
Authentication failures count as "unavailable": nothing is wrong with the messages, the
gateway keeps buffering while an operator fixes the credentials.
"""

from __future__ import annotations

from confluent_kafka import KafkaError

from gateway.errors import MessageRejected, QueueError, RetryableError, UplinkUnavailable

BACKEND = "kafka"

_RD_UNAVAILABLE = frozenset({
    KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN, KafkaError._MSG_TIMED_OUT,
    KafkaError._TIMED_OUT, KafkaError.REQUEST_TIMED_OUT, KafkaError.NOT_LEADER_FOR_PARTITION,
    KafkaError.LEADER_NOT_AVAILABLE, KafkaError.BROKER_NOT_AVAILABLE,
    KafkaError.NOT_ENOUGH_REPLICAS, KafkaError.NOT_ENOUGH_REPLICAS_AFTER_APPEND,
    KafkaError.NETWORK_EXCEPTION, KafkaError._AUTHENTICATION,
    KafkaError.SASL_AUTHENTICATION_FAILED, KafkaError.UNSUPPORTED_SASL_MECHANISM,
    KafkaError._SSL, KafkaError._RESOLVE, KafkaError._PURGE_QUEUE,
    KafkaError._PURGE_INFLIGHT, KafkaError._DESTROY, KafkaError._UNKNOWN_TOPIC,
    KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_PARTITION,
    KafkaError.KAFKA_STORAGE_ERROR, KafkaError._FATAL, KafkaError.COORDINATOR_NOT_AVAILABLE,
    KafkaError.NOT_COORDINATOR, KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
    KafkaError.NOT_CONTROLLER, KafkaError._WAIT_COORD,
})

#: the broker refused the record (batch) itself; sending it again fails the same way
RECORD_REJECTED_CODES = frozenset({
    KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.INVALID_MSG, KafkaError.INVALID_MSG_SIZE,
    KafkaError.INVALID_TIMESTAMP, KafkaError.TOPIC_EXCEPTION, KafkaError.POLICY_VIOLATION,
    KafkaError.INVALID_REQUIRED_ACKS, KafkaError.UNSUPPORTED_FOR_MESSAGE_FORMAT,
    KafkaError.INVALID_RECORD, KafkaError.RECORD_LIST_TOO_LARGE,
})

_RD_NOT_ALLOWED = frozenset({
    KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaError.CLUSTER_AUTHORIZATION_FAILED,
})

#: Kafka's protocol names where librdkafka abbreviates (for operators searching the docs)
_PROTOCOL_NAMES = {KafkaError.MSG_SIZE_TOO_LARGE: "MESSAGE_SIZE_TOO_LARGE",
                   KafkaError.INVALID_MSG: "CORRUPT_MESSAGE",
                   KafkaError.UNKNOWN_TOPIC_OR_PART: "UNKNOWN_TOPIC_OR_PARTITION"}


def describe_rd(err: KafkaError) -> str:
    """The broker's words: librdkafka's name, Kafka's protocol name and code, the text."""
    code = err.code()
    name = _PROTOCOL_NAMES.get(code, err.name())
    if code >= 0:
        return f"{name} (Kafka error {code}): {err.str()}"
    return f"{name}: {err.str()}"


def translate_rd(err: KafkaError | object, what: str = "") -> QueueError:
    """The gateway error for a librdkafka error (a KafkaError, or what KafkaException holds)."""
    if isinstance(err, QueueError):
        return err
    if not isinstance(err, KafkaError):
        return RetryableError(f"{what}: {err}" if what else str(err), backend=BACKEND)
    prefix = f"{what}: " if what else ""
    text = prefix + describe_rd(err)
    code = err.code()
    name = _PROTOCOL_NAMES.get(code, err.name())
    if code in _RD_UNAVAILABLE or err.fatal():
        return UplinkUnavailable(text, backend=BACKEND, code=name)
    if code in RECORD_REJECTED_CODES:
        return MessageRejected(f"broker refused the message: {text}", backend=BACKEND,
                               code=name)
    if code in _RD_NOT_ALLOWED:
        return MessageRejected(f"not authorized: {text}", backend=BACKEND, code=name)
    return RetryableError(text, backend=BACKEND, code=name)
