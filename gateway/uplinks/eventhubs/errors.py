"""azure-eventhub exceptions -> the gateway's error tree. Nothing above the adapter sees them.

    ConnectError, ConnectionLostError, OperationTimeoutError, ClientClosedError,
    socket errors, timeouts, a hub that does not exist         -> UplinkUnavailable
    EventDataSendError "message-size-exceeded", EventDataError -> MessageRejected
    AuthenticationError                                        -> PermanentError naming it
    other EventDataSendError / EventHubError / anything else   -> RetryableError

AuthenticationError is permanent: retrying with the same credentials fails the same way.
The publisher never dead-letters messages for it though: a whole batch that fails for a
reason that is not the message's (see ``publisher``) is reported UplinkUnavailable, so the
gateway keeps buffering while an operator fixes the credentials.
Unknown errors are retryable on purpose: the forwarder's attempt limit still dead-letters a
message that keeps failing, and a service quirk never silently discards data.
"""

from __future__ import annotations

from azure.eventhub import exceptions as eh

from gateway.errors import (
    MessageRejected,
    PermanentError,
    QueueError,
    RetryableError,
    UplinkUnavailable,
)

BACKEND = "azure_eventhubs"

_UNAVAILABLE: tuple[type[BaseException], ...] = (
    eh.ConnectError, eh.ConnectionLostError, eh.OperationTimeoutError, eh.ClientClosedError,
    ConnectionError, TimeoutError, OSError,
)
#: conditions (after "amqp:" / "com.microsoft:") that mean the hub or namespace is missing
_MISSING = ("not-found", "entity-not-found", "entity-disabled")
_TOO_LARGE = "message-size-exceeded"


def condition(exc: BaseException) -> str:
    """The AMQP error condition the SDK recorded, e.g. 'link:message-size-exceeded'."""
    return str(getattr(exc, "error", None) or "")


def describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError) and not str(exc):
        return "no answer in time (TimeoutError)"
    text = str(getattr(exc, "message", "") or exc).strip().replace("\n", " ")
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def translate(exc: BaseException, what: str = "") -> QueueError:
    """The gateway error for an azure-eventhub (or socket) exception. ``what`` names the call."""
    if isinstance(exc, QueueError):
        return exc
    text = (f"{what}: " if what else "") + describe(exc)
    code = type(exc).__name__
    cond = condition(exc)
    lowered = f"{cond} {exc}".lower()
    if isinstance(exc, eh.AuthenticationError):
        return PermanentError(f"authentication failed ({text}); check "
                              "azure_eventhubs_connection_string / the Azure AD identity",
                              backend=BACKEND, code=code)
    if _TOO_LARGE in lowered:
        return MessageRejected(f"the hub refused the event as too large ({text})",
                               backend=BACKEND, code=cond or code)
    if isinstance(exc, eh.EventDataError):
        return MessageRejected(f"the event cannot be sent ({text})", backend=BACKEND, code=code)
    if isinstance(exc, _UNAVAILABLE) or any(word in lowered for word in _MISSING):
        return UplinkUnavailable(text, backend=BACKEND, code=cond or code)
    return RetryableError(text, backend=BACKEND, code=cond or code)
