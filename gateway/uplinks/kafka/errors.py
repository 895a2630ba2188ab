"""Kafka client errors -> the gateway's error tree. Nothing above the adapter sees them.

``translate`` handles aiokafka's exceptions (consumer, admin), ``translate_rd`` the error
codes of librdkafka (confluent-kafka: the producer). The same mapping for both:

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

from aiokafka import errors as ke
from confluent_kafka import KafkaError

from gateway.errors import MessageRejected, QueueError, RetryableError, UplinkUnavailable

BACKEND = "kafka"

_UNAVAILABLE: tuple[type[BaseException], ...] = (
    ke.KafkaConnectionError, ke.NodeNotReadyError, ke.NoBrokersAvailable,
    ke.KafkaTimeoutError, ke.RequestTimedOutError, ke.NotLeaderForPartitionError,
    ke.LeaderNotAvailableError, ke.BrokerNotAvailableError, ke.NotEnoughReplicasError,
    ke.NotEnoughReplicasAfterAppendError, ke.KafkaUnavailableError,
    ke.MetadataEmptyBrokerList, ke.GroupCoordinatorNotAvailableError,
    ke.NotCoordinatorForGroupError, ke.GroupLoadInProgressError, ke.NotControllerError,
    ke.AuthenticationFailedError, ke.SaslAuthenticationFailed,
    ke.UnsupportedSaslMechanismError, ke.IllegalSaslStateError,
    ke.AuthenticationMethodNotSupported, ke.ProducerClosed,
    ConnectionError, TimeoutError, OSError,
)

#: the broker refused this record itself; sending it again fails the same way
RECORD_REJECTED: tuple[type[BaseException], ...] = (
    ke.MessageSizeTooLargeError, ke.RecordListTooLargeError, ke.RecordTooLargeError,
    ke.CorruptRecordException, ke.InvalidTimestampError, ke.UnsupportedForMessageFormatError,
    ke.InvalidTopicError, ke.InvalidRequiredAcksError, ke.PolicyViolationError,
)

_NOT_ALLOWED: tuple[type[BaseException], ...] = (
    ke.TopicAuthorizationFailedError, ke.ClusterAuthorizationFailedError,
)


def describe(exc: BaseException) -> str:
    """The broker's words: error name, Kafka error code and its documented meaning."""
    if isinstance(exc, ke.BrokerResponseError):
        text = f"{exc.message} (Kafka error {exc.errno})"
        detail = " ".join(str(a) for a in exc.args if a)
        if detail:
            text += f": {detail}"
        if exc.description:
            text += f" - {exc.description}"
        return text
    return str(exc) or type(exc).__name__


def _code(exc: BaseException) -> str:
    if isinstance(exc, ke.BrokerResponseError):
        return str(exc.message)
    return type(exc).__name__


def translate(exc: BaseException, what: str = "") -> QueueError:
    """The gateway error for an aiokafka (or socket) exception. ``what`` names the call."""
    if isinstance(exc, QueueError):
        return exc
    prefix = f"{what}: " if what else ""
    text = prefix + describe(exc)
    code = _code(exc)
    if isinstance(exc, _UNAVAILABLE):
        return UplinkUnavailable(text, backend=BACKEND, code=code)
    if isinstance(exc, RECORD_REJECTED):
        return MessageRejected(f"broker refused the message: {text}", backend=BACKEND,
                               code=code)
    if isinstance(exc, _NOT_ALLOWED):
        return MessageRejected(f"not authorized: {text}", backend=BACKEND, code=code)
    return RetryableError(text, backend=BACKEND, code=code)


# -- librdkafka (confluent-kafka) error codes ------------------------------------------------

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
    KafkaError.KAFKA_STORAGE_ERROR, KafkaError._FATAL,
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
