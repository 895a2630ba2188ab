"""Settings of ``type: azure_eventhubs`` (keys as in the seed)."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.settings import secret


@dataclass(frozen=True, slots=True)
class EventHubsSettings:
    azure_eventhubs_connection_string: str = secret("")
    azure_eventhubs_name: str = ""
    azure_eventhubs_consumer_group: str = "$Default"
    azure_eventhubs_checkpoint_store: str | None = secret(None)
