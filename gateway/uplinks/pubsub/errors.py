"""google-cloud-pubsub exceptions -> the gateway's error tree. Nothing above the adapter sees them.

    unreachable, timed out, no credentials accepted, not allowed, topic missing
                                                   -> UplinkUnavailable
    this message is invalid or too large           -> MessageRejected (per message)
    invalid request (not about one message)        -> PermanentError
    quota exhausted, paused ordering key, other    -> RetryableError

Permission and authentication failures count as "unavailable": nothing is wrong with the
messages, so the gateway keeps buffering while an operator fixes IAM or the credentials. A
missing topic (auto-create off, or deleted under us) is "unavailable" for the same reason.
Unknown errors are retryable on purpose: the forwarder's attempt limit still dead-letters a
message that keeps failing, and a service quirk never silently discards data.
"""

from __future__ import annotations

from google.api_core import exceptions as gexc
from google.auth import exceptions as auth_exc
from google.cloud.pubsub_v1.publisher import exceptions as pub_exc

from gateway.errors import (
    MessageRejected,
    PermanentError,
    QueueError,
    RetryableError,
    UplinkUnavailable,
)

BACKEND = "gcp_pubsub"

_UNAVAILABLE: tuple[type[BaseException], ...] = (
    gexc.ServiceUnavailable, gexc.DeadlineExceeded, gexc.RetryError, gexc.Unauthenticated,
    gexc.PermissionDenied, gexc.NotFound, gexc.Cancelled, gexc.InternalServerError,
    auth_exc.RefreshError, auth_exc.TransportError, ConnectionError, TimeoutError, OSError,
)
_INVALID: tuple[type[BaseException], ...] = (
    gexc.InvalidArgument, gexc.FailedPrecondition, gexc.OutOfRange,
    pub_exc.MessageTooLargeError,
)


def describe(exc: BaseException) -> str:
    if isinstance(exc, gexc.GoogleAPICallError):
        return f"{type(exc).__name__}: {exc.message}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def translate(exc: BaseException, what: str, *, per_message: bool = False) -> QueueError:
    """The gateway error for what the client library raised. ``what`` names the call;
    ``per_message`` says the error concerns one message (publish), not the service."""
    if isinstance(exc, QueueError):
        return exc
    text = f"{what}: {describe(exc)}"
    code = type(exc).__name__
    if isinstance(exc, _INVALID):
        cls = MessageRejected if per_message else PermanentError
        return cls(text, backend=BACKEND, code=code)
    if isinstance(exc, _UNAVAILABLE):
        return UplinkUnavailable(text, backend=BACKEND, code=code)
    if isinstance(exc, ValueError | TypeError):
        if per_message:  # the library refused the data or an attribute of this message
            return MessageRejected(text, backend=BACKEND, code=code)
        # outside publish() the library raises ValueError for a closed channel
        return UplinkUnavailable(text, backend=BACKEND, code=code)
    if isinstance(exc, RuntimeError) and "stopped" in str(exc):
        return UplinkUnavailable(text, backend=BACKEND, code=code)
    return RetryableError(text, backend=BACKEND, code=code)
