"""The seed's queue contract and the registry that maps ``queue.type`` to a backend."""

from gateway.queue.interface import Handler, MessageQueueInterface, PublishResult

__all__ = ["Handler", "MessageQueueInterface", "PublishResult"]
