"""Event Hubs fixtures: one in-process AMQP 1.0 Event Hubs server per session.

See tests/eventhubs_server/. Tests create their own hubs (``add_hub`` with a unique name), so
they never see each other's events; a test that stops the server starts it again.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.eventhubs_server import EventHubsServer
from tests.servers import free_port


@pytest.fixture(scope="session")
def eventhubs_server() -> Iterator[EventHubsServer]:
    """The Event Hubs stand-in on a free loopback port; connect with
    ``eventhubs_server.connection_string(hub)`` (``UseDevelopmentEmulator=true``: plain TCP)."""
    server = EventHubsServer({}, port=free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()
