"""aiokafka exceptions -> the gateway's error tree. Nothing above the adapter sees aiokafka.

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
