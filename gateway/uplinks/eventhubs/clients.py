"""Building the SDK's clients from the settings: connection string or Azure AD credential.

``azure_eventhubs_credential: default_azure_credential`` uses azure-identity's async
DefaultAzureCredential (managed identity, workload identity, environment variables, Azure
CLI login) against ``azure_eventhubs_fully_qualified_namespace``. azure-identity is imported
only when that option is chosen; without it the uplink cannot be built (ConfigError naming
the key, so ``config check`` fails). Constructing a client does no I/O.
"""

from __future__ import annotations

import importlib
from typing import Any
from urllib.parse import urlparse

from azure.eventhub.aio import EventHubConsumerClient, EventHubProducerClient

from gateway.errors import ConfigError
from gateway.uplinks.eventhubs.settings import EventHubsSettings


def connection_fields(connection_string: str) -> dict[str, str]:
    """'Key=Value;...' as a dict with lower-case keys (the SDK parses it the same way)."""
    fields: dict[str, str] = {}
    for part in connection_string.split(";"):
        key, sep, value = part.partition("=")
        if sep and key.strip():
            fields[key.strip().lower()] = value.strip()
    return fields


def namespace_of(settings: EventHubsSettings) -> str:
    """The namespace host (with a port when one is given): names the checkpoint directory."""
    if settings.azure_eventhubs_credential != "connection_string":
        return settings.azure_eventhubs_fully_qualified_namespace
    endpoint = connection_fields(settings.azure_eventhubs_connection_string).get("endpoint", "")
    return urlparse(endpoint).netloc or endpoint


def entity_path(settings: EventHubsSettings) -> str:
    if settings.azure_eventhubs_credential != "connection_string":
        return ""
    return connection_fields(settings.azure_eventhubs_connection_string).get("entitypath", "")


def load_credential(settings: EventHubsSettings) -> Any:
    """The Azure AD credential object, or None for the connection string."""
    if settings.azure_eventhubs_credential == "connection_string":
        return None
    try:
        identity = importlib.import_module("azure.identity.aio")
    except ImportError:
        raise ConfigError("queue.azure_eventhubs_credential", settings.azure_eventhubs_credential,
                          "needs the azure-identity package (pip install azure-identity); "
                          "it is not part of the eventhubs extra") from None
    return identity.DefaultAzureCredential()


class ClientFactory:
    def __init__(self, settings: EventHubsSettings, credential: Any) -> None:
        self.settings = settings
        self.credential = credential
        self.common: dict[str, Any] = {
            "retry_total": settings.azure_eventhubs_retry_total,
            "retry_backoff_factor": 0.5, "retry_backoff_max": 5.0,
        }

    def producer(self, hub: str) -> EventHubProducerClient:
        s = self.settings
        try:
            if self.credential is None:
                return EventHubProducerClient.from_connection_string(
                    s.azure_eventhubs_connection_string, eventhub_name=hub, **self.common)
            return EventHubProducerClient(
                fully_qualified_namespace=s.azure_eventhubs_fully_qualified_namespace,
                eventhub_name=hub, credential=self.credential, **self.common)
        except ValueError as exc:
            raise self._bad(exc) from None

    def consumer(self, hub: str) -> EventHubConsumerClient:
        s = self.settings
        try:
            if self.credential is None:
                return EventHubConsumerClient.from_connection_string(
                    s.azure_eventhubs_connection_string, s.azure_eventhubs_consumer_group,
                    eventhub_name=hub, **self.common)
            return EventHubConsumerClient(
                fully_qualified_namespace=s.azure_eventhubs_fully_qualified_namespace,
                eventhub_name=hub, consumer_group=s.azure_eventhubs_consumer_group,
                credential=self.credential, **self.common)
        except ValueError as exc:
            raise self._bad(exc) from None

    def _bad(self, exc: ValueError) -> ConfigError:
        if self.credential is None:
            return ConfigError("queue.azure_eventhubs_connection_string",
                               self.settings.azure_eventhubs_connection_string, str(exc))
        return ConfigError("queue.azure_eventhubs_fully_qualified_namespace",
                           self.settings.azure_eventhubs_fully_qualified_namespace, str(exc))

    async def close(self) -> None:
        close = getattr(self.credential, "close", None)
        if close is not None:
            await close()
