"""A small AMQP 1.0 server that stands in for Azure Event Hubs in tests.

The real ``azure-eventhub`` SDK (pure-Python AMQP stack) sends to and receives from it with a
``UseDevelopmentEmulator=true`` connection string (plain TCP on a loopback port). The codec
and server are written for this test tree: codec.py (AMQP types), frames.py (framing,
performatives, messages), connection.py (SASL, sessions, links), nodes.py ($cbs,
$management, hubs, partitions), store.py (events in memory), server.py (thread + listener).
"""

from tests.eventhubs_server.server import EventHubsServer
from tests.eventhubs_server.store import StoredEvent

__all__ = ["EventHubsServer", "StoredEvent"]
