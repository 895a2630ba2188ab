"""OpenHQM Edge Gateway: MQTT ingress, a durable SQLite store-and-forward queue, cloud uplinks.

The public API is what ``__all__`` lists; everything else is internal.
"""

from gateway.errors import (
    ConfigError,
    GatewayError,
    MessageRejected,
    NotSupportedError,
    PermanentError,
    QueueError,
    RetryableError,
    UplinkUnavailable,
)
from gateway.message import QueueMessage, new_message_id
from gateway.queue.interface import MessageQueueInterface, PublishResult

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "GatewayError",
    "MessageQueueInterface",
    "MessageRejected",
    "NotSupportedError",
    "PermanentError",
    "PublishResult",
    "QueueError",
    "QueueMessage",
    "RetryableError",
    "UplinkUnavailable",
    "__version__",
    "new_message_id",
]
