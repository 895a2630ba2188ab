"""``openhqm.queue.interface``, as the seed's handler example imports it.

The same classes as ``gateway.queue.interface`` (``isinstance`` and ``issubclass`` agree):
a handler subclassing this MessageQueueInterface is a gateway uplink.
"""

from gateway.errors import (
    MessageRejected,
    NotSupportedError,
    QueueError,
    RetryableError,
    UplinkUnavailable,
)
from gateway.message import QueueMessage
from gateway.queue.interface import Handler, MessageQueueInterface, PublishResult

__all__ = [
    "Handler",
    "MessageQueueInterface",
    "MessageRejected",
    "NotSupportedError",
    "PublishResult",
    "QueueError",
    "QueueMessage",
    "RetryableError",
    "UplinkUnavailable",
]
