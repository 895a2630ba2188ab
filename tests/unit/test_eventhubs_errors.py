"""azure-eventhub exceptions -> the gateway's error tree, using the SDK's own classes."""

from __future__ import annotations

import pytest
from azure.eventhub import exceptions as eh

from gateway.errors import (
    MessageRejected,
    PermanentError,
    QueueError,
    RetryableError,
    UplinkUnavailable,
)
from gateway.uplinks.eventhubs.errors import translate


class Condition(Exception):
    """What the SDK passes as ``details``: an AMQP error with a condition and description."""

    def __init__(self, condition: bytes, description: bytes) -> None:
        super().__init__(description)
        self.condition = condition
        self.description = description


def send_error(condition: bytes, description: bytes = b"refused") -> eh.EventDataSendError:
    return eh.EventDataSendError("send failed", Condition(condition, description))


@pytest.mark.parametrize("exc", [
    eh.ConnectError("cannot connect"),
    eh.ConnectionLostError("connection lost"),
    eh.OperationTimeoutError("timed out"),
    eh.ClientClosedError("closed"),
    ConnectionRefusedError(111, "refused"),
    TimeoutError(),
    eh.EventHubError("no hub", Condition(b"amqp:not-found", b"The messaging entity could not be found")),
])
def test_unreachable_is_uplink_unavailable(exc: BaseException) -> None:
    error = translate(exc, "send to hub-a")
    assert type(error) is UplinkUnavailable
    assert error.backend == "azure_eventhubs"
    assert str(error).startswith("[azure_eventhubs] send to hub-a: ")


def test_message_size_exceeded_is_a_rejection_of_the_message() -> None:
    exc = send_error(b"amqp:link:message-size-exceeded", b"The received message exceeds 1 MB")
    assert exc.error == "link:message-size-exceeded"
    error = translate(exc)
    assert type(error) is MessageRejected
    assert error.code == "link:message-size-exceeded"
    assert "too large" in str(error)


def test_event_data_error_is_a_rejection() -> None:
    assert type(translate(eh.EventDataError("bad event"))) is MessageRejected


def test_authentication_failure_is_permanent_and_named() -> None:
    error = translate(eh.AuthenticationError("CBS token rejected"))  # a ConnectError subclass
    assert type(error) is PermanentError
    assert error.code == "AuthenticationError"
    assert "authentication failed" in str(error) and "AuthenticationError" in str(error)


@pytest.mark.parametrize("exc", [
    send_error(b"com.microsoft:server-busy", b"busy"),
    eh.EventHubError("something else"),
    RuntimeError("an SDK bug"),
])
def test_everything_else_is_retryable(exc: BaseException) -> None:
    error = translate(exc)
    assert type(error) is RetryableError
    assert isinstance(error, QueueError)


def test_server_busy_keeps_its_condition_as_code() -> None:
    assert translate(send_error(b"com.microsoft:server-busy")).code == "server-busy"


def test_gateway_errors_pass_through() -> None:
    original = MessageRejected("x", backend="azure_eventhubs")
    assert translate(original) is original


def test_checkpoint_store_errors() -> None:
    from azure.core import exceptions as az

    from gateway.uplinks.eventhubs.blobstore import _translate

    missing = _translate(az.ResourceNotFoundError("ContainerNotFound"), "list", "edge-cp")
    assert type(missing) is PermanentError and "container 'edge-cp' does not exist" in str(missing)
    refused = _translate(az.ClientAuthenticationError("bad signature"), "save", "c")
    assert type(refused) is PermanentError and "refused the credentials" in str(refused)
    assert type(_translate(az.ServiceRequestError("connection refused"), "save", "c")) is UplinkUnavailable
    assert type(_translate(az.HttpResponseError("500"), "save", "c")) is RetryableError
