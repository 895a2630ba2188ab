"""Compatibility names for handlers written from the OpenHQM seed document.

The seed's custom handler example starts with
``from openhqm.queue.interface import MessageQueueInterface, QueueMessage``; this package
makes that line work in the gateway. It re-exports the gateway's own classes and adds
nothing: new code imports from ``gateway`` (``from gateway import MessageQueueInterface``).
"""
