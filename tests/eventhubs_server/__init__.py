"""A small AMQP 1.0 server that stands in for Azure Event Hubs in tests.

The real ``azure-eventhub`` SDK (pure-Python AMQP stack) sends to and receives from it with a
``UseDevelopmentEmulator=true`` connection string (plain TCP on a loopback port). The codec
and server are written for this test tree: codec.py (AMQP types), frames.py (framing,
performatives, messages), connection.py (SASL, sessions, links, flow control), nodes.py
($cbs, $management, hubs, partitions), store.py (events in memory), server.py (thread +
listener). ``python -m tests.eventhubs_server --port N --hub name:partitions`` runs it alone.

What it does as Event Hubs does: SASL ANONYMOUS; $cbs put-token (any token is granted, the
audiences are recorded); $management READ of hub and partition properties; sends to a hub
(partition key -> stable hash, else round robin) or to ``<hub>/Partitions/<id>``; batches
(message format 0x80013700); per-partition sequence numbers and byte offsets; receivers on
``<hub>/ConsumerGroups/<cg>/Partitions/<id>`` with the selector filter on offset, sequence
number or enqueued time (``>``/``>=``, ``-1``, ``@latest``), owner level (epoch) takeover
with ``amqp:link:stolen``, the receiver runtime metric; messages larger than
``max_message_size`` rejected with ``amqp:link:message-size-exceeded``.

What it does not do, loudly: other SASL mechanisms (sasl-outcome sys-perm), bodies other
than data sections (Rejected, ``amqp:not-implemented``), other management operations (status
501), resumed deliveries, AMQP types it does not decode (connection closed with
``amqp:not-implemented``), unknown nodes, consumer groups or partitions (``amqp:not-found``).
Not modelled at all: TLS, authorization (every token is valid), retention (events are kept
in memory until the process ends), idempotent producers, geo-replication, transactions.
"""

from tests.eventhubs_server.server import EventHubsServer
from tests.eventhubs_server.store import StoredEvent

__all__ = ["EventHubsServer", "StoredEvent"]
