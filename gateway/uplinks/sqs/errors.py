"""botocore / aiohttp exceptions -> the gateway's error tree. Nothing above the adapter sees them.

    unreachable, timed out, throttled, 5xx, no or rejected credentials,
    not allowed, queue missing                            -> UplinkUnavailable
    this message is invalid or too large                  -> MessageRejected (per message)
    invalid request that is not about one message         -> PermanentError
    an operation the server does not implement            -> NotSupportedError
    anything else                                         -> RetryableError

Permission, credential and missing-queue failures count as "unavailable": nothing is wrong
with the messages, so the gateway keeps buffering while an operator fixes IAM or the queue.
A whole call throttled is "unavailable" too (back off, no attempt counted); one *entry*
of a batch that failed is judged by SQS's own ``SenderFault`` flag (see ``entry_error``).

Error codes arrive in two spellings (the query protocol's ``AWS.SimpleQueueService.X`` and
the JSON protocol's short names); ``error_code`` normalises them to the short form.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

import aiohttp
from botocore import exceptions as bexc  # type: ignore[import-untyped]

from gateway.errors import (
    MessageRejected,
    NotSupportedError,
    PermanentError,
    QueueError,
    RetryableError,
    UplinkUnavailable,
)

BACKEND = "sqs"
_PREFIX = "AWS.SimpleQueueService."

#: the queue does not exist (both spellings reduce to these)
MISSING_QUEUE = frozenset({"NonExistentQueue", "QueueDoesNotExist"})
#: the receipt handle is stale: the message is no longer in flight for us
STALE_RECEIPT = frozenset({"ReceiptHandleIsInvalid", "InvalidReceiptHandle",
                           "MessageNotInflight"})
THROTTLED = frozenset({"Throttling", "ThrottlingException", "RequestThrottled",
                       "RequestLimitExceeded", "TooManyRequestsException", "OverLimit",
                       "KMS.ThrottlingException", "SlowDown"})
AUTH = frozenset({"AccessDenied", "AccessDeniedException", "InvalidClientTokenId",
                  "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
                  "ExpiredTokenException", "UnrecognizedClientException",
                  "InvalidSecurity", "MissingAuthenticationToken", "RequestExpired",
                  "IncompleteSignature", "AuthFailure", "OptInRequired"})
#: a request refused for what it carries: in a batch call, one of its entries is at fault
INVALID_CONTENT = frozenset({"InvalidParameterValue", "InvalidAttributeValue",
                             "InvalidMessageContents", "MessageTooLong",
                             "BatchRequestTooLong", "InvalidAttributeName",
                             "UnsupportedOperation", "MissingParameter",
                             "InvalidParameterCombination", "ValidationError",
                             "KMS.DisabledException", "KMS.InvalidStateException",
                             "KMS.NotFoundException", "KMS.AccessDeniedException"})
NOT_IMPLEMENTED = frozenset({"InvalidAction", "NotImplemented", "UnknownOperationException"})

_UNREACHABLE: tuple[type[BaseException], ...] = (
    bexc.EndpointConnectionError, bexc.ConnectTimeoutError, bexc.ReadTimeoutError,
    bexc.ConnectionClosedError, bexc.HTTPClientError, bexc.NoCredentialsError,
    bexc.PartialCredentialsError, bexc.CredentialRetrievalError, bexc.MetadataRetrievalError,
    bexc.TokenRetrievalError, aiohttp.ClientError, TimeoutError, ConnectionError, OSError,
)


def error_code(exc: bexc.ClientError) -> str:
    code = str(exc.response.get("Error", {}).get("Code", "") or "")
    return code.removeprefix(_PREFIX)


def error_text(exc: bexc.ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Message", "") or exc)


def http_status(exc: bexc.ClientError) -> int:
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    return int(status or 0)


def translate(exc: BaseException, operation: str, *, per_message: bool = False) -> QueueError:
    """The gateway error for what the SDK raised. ``operation`` names the call;
    ``per_message`` says the call carried one message, so an invalid request is its fault."""
    if isinstance(exc, QueueError):
        return exc
    if isinstance(exc, bexc.ClientError):
        return _client_error(exc, operation, per_message)
    text = f"{operation}: {type(exc).__name__}: {exc}" if str(exc) else \
        f"{operation}: {type(exc).__name__}"
    if isinstance(exc, _UNREACHABLE):
        return UplinkUnavailable(text, backend=BACKEND, code=type(exc).__name__)
    if isinstance(exc, bexc.ParamValidationError):
        cls = MessageRejected if per_message else PermanentError
        return cls(text, backend=BACKEND, code="ParamValidationError")
    return RetryableError(text, backend=BACKEND, code=type(exc).__name__)


def _client_error(exc: bexc.ClientError, operation: str, per_message: bool) -> QueueError:
    code, status = error_code(exc), http_status(exc)
    text = f"{operation}: {code}: {error_text(exc)}"
    if code in THROTTLED or code in AUTH or code in MISSING_QUEUE or status >= 500 \
            or status in (401, 403, 429):
        return UplinkUnavailable(text, backend=BACKEND, code=code)
    if code in NOT_IMPLEMENTED:
        return NotSupportedError(BACKEND, operation, f"the server does not implement it ({code})")
    if code in INVALID_CONTENT:
        cls = MessageRejected if per_message else PermanentError
        return cls(text, backend=BACKEND, code=code)
    return RetryableError(text, backend=BACKEND, code=code)


def entry_error(code: str, message: str, sender_fault: bool) -> QueueError:
    """One failed entry of SendMessageBatch: SQS says whether the sender is at fault."""
    code = code.removeprefix(_PREFIX)
    text = f"{code}: {message}" if message else code
    if sender_fault and code not in THROTTLED:
        return MessageRejected(text, backend=BACKEND, code=code)
    return RetryableError(text, backend=BACKEND, code=code)


def is_missing_queue(exc: BaseException) -> bool:
    return isinstance(exc, bexc.ClientError) and error_code(exc) in MISSING_QUEUE


@contextlib.contextmanager
def boundary(operation: str, *, per_message: bool = False) -> Iterator[None]:
    """Translate what the SDK raises inside the block; cancellation passes through."""
    try:
        yield
    except asyncio.CancelledError:
        raise
    except QueueError:
        raise
    except (bexc.BotoCoreError, bexc.ClientError, aiohttp.ClientError, OSError,
            TimeoutError) as exc:
        raise translate(exc, operation, per_message=per_message) from exc
