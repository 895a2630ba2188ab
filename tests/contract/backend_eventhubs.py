"""The Event Hubs backend of the contract suite, against the session's Event Hubs server
(tests/eventhubs_server, a real AMQP 1.0 server the azure-eventhub SDK talks to).

Each fresh queue name is a new hub of two partitions on that server; the uplink's
checkpoints and local dead-letter file live in the test's own state directory. The poison
message is one over the hub's maximum message size, which the uplink refuses by itself
without failing its batch.

Event Hubs are created and deleted in Azure, not by clients, and cannot be purged, so
create/delete/purge raise NotSupportedError: the contract test that calls them is a strict
xfail with ``raises=NotSupportedError`` (everything it checks before must pass, the call
itself must raise exactly NotSupportedError, and a pass would fail the test).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.errors import NotSupportedError
from gateway.message import QueueMessage, new_message_id
from gateway.uplinks.eventhubs.checkpoints import read_dead_letters
from gateway.uplinks.eventhubs.settings import EventHubsSettings
from gateway.uplinks.eventhubs.uplink import EventHubsQueue
from tests.contract.backends import ContractTarget
from tests.eventhubs_server import EventHubsServer
from tests.integration.eventhubs_fixtures import eventhubs_server

__all__ = ["eventhubs_backend", "eventhubs_server"]

PARTITIONS = 2
MAX_MESSAGE_SIZE = 1024 * 1024  # the server's default
NEEDS_ADMIN = {"test_create_delete_and_purge_report_what_they_changed"}


@dataclass
class EventHubsTarget(ContractTarget):
    server: EventHubsServer | None = None

    def fresh_queue_name(self) -> str:
        name = f"contract-{uuid.uuid4().hex[:12]}"
        assert self.server is not None
        self.server.add_hub(name, PARTITIONS)  # hubs exist before clients use them, as in Azure
        return name


@pytest.fixture
async def eventhubs_backend(eventhubs_server: EventHubsServer, tmp_path: Path,
                            request: pytest.FixtureRequest) -> AsyncIterator[ContractTarget]:
    if request.node.originalname in NEEDS_ADMIN:
        request.applymarker(pytest.mark.xfail(
            raises=NotSupportedError, strict=True,
            reason="Event Hubs are created, deleted and purged in Azure, not by clients"))
    home = f"contract-home-{uuid.uuid4().hex[:8]}"
    eventhubs_server.add_hub(home, PARTITIONS)
    settings = EventHubsSettings(
        azure_eventhubs_connection_string=eventhubs_server.connection_string(),
        azure_eventhubs_name=home, azure_eventhubs_send_timeout=5.0,
        azure_eventhubs_request_timeout=5.0)
    state_dir = str(tmp_path)
    queue = EventHubsQueue(settings, state_dir=state_dir)

    async def poison(queue_name: str) -> QueueMessage:
        return QueueMessage(new_message_id(), b"p" * (MAX_MESSAGE_SIZE + 1))

    async def dead_letters(queue_name: str) -> list[tuple[str, str]]:
        return [(d["message_id"], d["reason"]) for d in read_dead_letters(state_dir)
                if d["hub"] == queue_name]

    await queue.connect()
    try:
        yield EventHubsTarget("eventhubs", queue, poison, dead_letters=dead_letters,
                              server=eventhubs_server)
    finally:
        await queue.disconnect()
