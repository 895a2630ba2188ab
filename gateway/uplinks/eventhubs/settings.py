"""Settings of ``type: azure_eventhubs``: the seed's four keys verbatim, plus what real use needs.

Every key sits flat under ``queue:`` with the ``azure_eventhubs_`` prefix like the seed's
own keys, so each has an environment override ``OPENHQM_QUEUE__AZURE_EVENTHUBS_<KEY>``.
Imports no SDK. docs/uplinks/eventhubs.md explains each key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Literal

from gateway.errors import ConfigError
from gateway.queue.keys import KeyTemplate
from gateway.settings import DURATION, secret_connection_string

_CONTAINER = re.compile(r"[a-z0-9](?:[a-z0-9]|-(?=[a-z0-9])){2,62}")
Credential = Literal["connection_string", "default_azure_credential"]


@dataclass(frozen=True, slots=True)
class EventHubsSettings:
    #: "Endpoint=sb://<namespace>.servicebus.windows.net/;SharedAccessKeyName=...;
    #: SharedAccessKey=...[;EntityPath=<hub>]"
    azure_eventhubs_connection_string: str = secret_connection_string("")
    #: the hub the gateway forwards to: queue.request_queue_name maps to this hub ('' = the
    #: connection string's EntityPath, else request_queue_name itself). Any other queue name
    #: (forwarder routes, the API) is a hub name as it is.
    azure_eventhubs_name: str = ""
    #: consume() reads as this consumer group; checkpoints are kept per group
    azure_eventhubs_consumer_group: str = "$Default"
    #: a storage account connection string: checkpoints go to Azure Blob Storage (the SDK's
    #: blob layout, shared with SDK consumers of the same group). Unset = a checkpoint file
    #: in gateway.state_dir
    azure_eventhubs_checkpoint_store: str | None = secret_connection_string(None)
    #: the blob container of the checkpoints (it must exist)
    azure_eventhubs_checkpoint_container: str = "openhqm-checkpoints"

    #: how the gateway authenticates: the connection string's shared access key, or Azure AD
    #: through azure-identity's DefaultAzureCredential (managed identity, workload identity,
    #: environment, Azure CLI) with azure_eventhubs_fully_qualified_namespace
    azure_eventhubs_credential: Credential = "connection_string"
    #: "<namespace>.servicebus.windows.net" (Azure AD only)
    azure_eventhubs_fully_qualified_namespace: str = ""
    #: the partition key of every event: {topic}, {topic[N]}, {attr:NAME}, {id} as for
    #: kafka_message_key. Equal keys go to the same partition, in order. '' = no key (the
    #: service spreads batches over the partitions)
    azure_eventhubs_partition_key: str = "{topic}"
    #: reject(requeue=False) sends the event to this hub; '' = the local dead-letter file
    #: <gateway.state_dir>/eventhubs/dead-letters.jsonl
    azure_eventhubs_dlq_name: str = ""
    #: one send (create_batch + send_batch) may take this long; then the batch is reported
    #: unavailable and stays buffered
    azure_eventhubs_send_timeout: Annotated[float, DURATION] = 20.0
    #: connect, management requests (hub and partition properties), health checks
    azure_eventhubs_request_timeout: Annotated[float, DURATION] = 10.0
    #: the SDK's own retries of one operation (the forwarder retries batches anyway)
    azure_eventhubs_retry_total: int = 1
    #: events the consumer fetches ahead per partition
    azure_eventhubs_prefetch: int = 300


def check_settings(s: EventHubsSettings) -> None:
    """What can be checked without the SDK or the network; ConfigError naming the key."""
    if s.azure_eventhubs_checkpoint_store is not None:
        if "blobendpoint=" not in s.azure_eventhubs_checkpoint_store.lower() and \
                "accountname=" not in s.azure_eventhubs_checkpoint_store.lower():
            raise ConfigError("queue.azure_eventhubs_checkpoint_store", "<hidden>",
                              "not a storage account connection string "
                              "(DefaultEndpointsProtocol=https;AccountName=...;AccountKey=...)")
        if not _CONTAINER.fullmatch(s.azure_eventhubs_checkpoint_container):
            raise ConfigError("queue.azure_eventhubs_checkpoint_container",
                              s.azure_eventhubs_checkpoint_container,
                              "a blob container name: 3-63 of a-z, 0-9 and '-'")
    if s.azure_eventhubs_credential == "connection_string":
        if not s.azure_eventhubs_connection_string:
            raise ConfigError("queue.azure_eventhubs_connection_string", "",
                              "required (or set azure_eventhubs_credential: "
                              "default_azure_credential with azure_eventhubs_fully_qualified_namespace)")
        if "endpoint=" not in s.azure_eventhubs_connection_string.lower():
            raise ConfigError("queue.azure_eventhubs_connection_string",
                              s.azure_eventhubs_connection_string,
                              "not an Event Hubs connection string (no Endpoint=sb://...)")
    else:
        namespace = s.azure_eventhubs_fully_qualified_namespace
        if not namespace or "/" in namespace or ";" in namespace:
            raise ConfigError("queue.azure_eventhubs_fully_qualified_namespace", namespace,
                              "required with default_azure_credential: "
                              "'<namespace>.servicebus.windows.net' (a host name, no scheme)")
    if not s.azure_eventhubs_consumer_group:
        raise ConfigError("queue.azure_eventhubs_consumer_group", "", "must not be empty")
    KeyTemplate.parse(s.azure_eventhubs_partition_key, "queue.azure_eventhubs_partition_key")
    for key, value in (("azure_eventhubs_send_timeout", s.azure_eventhubs_send_timeout),
                       ("azure_eventhubs_request_timeout", s.azure_eventhubs_request_timeout)):
        if value <= 0:
            raise ConfigError(f"queue.{key}", value, "must be positive")
    if s.azure_eventhubs_retry_total < 0:
        raise ConfigError("queue.azure_eventhubs_retry_total", s.azure_eventhubs_retry_total,
                          "must be 0 or more")
    if s.azure_eventhubs_prefetch < 1:
        raise ConfigError("queue.azure_eventhubs_prefetch", s.azure_eventhubs_prefetch,
                          "must be at least 1")
