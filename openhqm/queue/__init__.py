"""``openhqm.queue``: the seed's package path, re-exporting the gateway's queue contract."""

from gateway.message import QueueMessage
from gateway.queue.interface import MessageQueueInterface, PublishResult

__all__ = ["MessageQueueInterface", "PublishResult", "QueueMessage"]
