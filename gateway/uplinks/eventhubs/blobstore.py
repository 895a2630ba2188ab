"""Checkpoints in Azure Blob Storage (``azure_eventhubs_checkpoint_store``), through
azure-eventhub-checkpointstoreblob-aio's BlobCheckpointStore.

The blobs are the SDK's own layout (``<namespace>/<hub>/<group>/checkpoint/<partition>``,
metadata ``sequencenumber`` and ``offset``), so any SDK consumer of the same hub and consumer
group reads the same positions. The container must exist (the gateway does not create
storage resources); a missing one is reported by name. The package is imported only when
the key is set; without it the uplink cannot be built (ConfigError naming the key).

Errors: storage unreachable -> UplinkUnavailable; refused credentials or a missing
container -> PermanentError; anything else -> RetryableError.
"""

from __future__ import annotations

import importlib
from typing import Any

from gateway.errors import ConfigError, PermanentError, QueueError, RetryableError, UplinkUnavailable
from gateway.uplinks.eventhubs.checkpoints import Checkpoint

BACKEND = "azure_eventhubs"
_MODULE = "azure.eventhub.extensions.checkpointstoreblobaio"


#: shown instead of the storage connection string (it holds the account key)
HIDDEN = "<hidden>"


def blob_module() -> Any:
    """The checkpoint store package; ConfigError (at `config check`) when it is missing."""
    try:
        return importlib.import_module(_MODULE)
    except ImportError:
        raise ConfigError("queue.azure_eventhubs_checkpoint_store", HIDDEN,
                          "needs the azure-eventhub-checkpointstoreblob-aio package "
                          "(the extra [eventhubs]: pip install '.[eventhubs]' from the "
                          "gateway's checkout)") from None


def open_blob_store(connection_string: str, container: str) -> Any:
    """A BlobCheckpointStore (no I/O yet)."""
    try:
        return blob_module().BlobCheckpointStore.from_connection_string(connection_string,
                                                                        container)
    except ValueError as exc:
        raise ConfigError("queue.azure_eventhubs_checkpoint_store", HIDDEN,
                          f"not a storage connection string: {exc}") from None


def _translate(exc: BaseException, what: str, container: str) -> QueueError:
    from azure.core import exceptions as az

    text = f"{what}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    if isinstance(exc, az.ClientAuthenticationError):
        return PermanentError(f"the checkpoint store refused the credentials ({text})",
                              backend=BACKEND, code=type(exc).__name__)
    if isinstance(exc, az.ResourceNotFoundError):
        return PermanentError(f"the checkpoint container {container!r} does not exist; create "
                              f"it in the storage account ({text})", backend=BACKEND,
                              code="ContainerNotFound")
    if isinstance(exc, az.ServiceRequestError | az.ServiceResponseError | OSError | TimeoutError):
        return UplinkUnavailable(f"checkpoint store unreachable ({text})", backend=BACKEND,
                                 code=type(exc).__name__)
    return RetryableError(f"checkpoint store: {text}", backend=BACKEND, code=type(exc).__name__)


class BlobCheckpoints:
    """One hub's checkpoints of one consumer group in the blob store."""

    def __init__(self, store: Any, container: str, namespace: str, hub: str, group: str) -> None:
        self.store = store
        self.container = container
        self.namespace = namespace
        self.hub = hub
        self.group = group
        self.checkpoints: dict[str, Checkpoint] = {}

    async def load(self) -> dict[str, Checkpoint]:
        try:
            found = await self.store.list_checkpoints(self.namespace, self.hub, self.group)
        except Exception as exc:
            raise _translate(exc, f"list checkpoints of {self.hub}", self.container) from exc
        self.checkpoints = {str(cp["partition_id"]): Checkpoint(int(cp["sequence_number"]),
                                                                str(cp.get("offset", "")))
                            for cp in found}
        return dict(self.checkpoints)

    async def save(self, partition_id: str, checkpoint: Checkpoint) -> None:
        try:
            await self.store.update_checkpoint({
                "fully_qualified_namespace": self.namespace, "eventhub_name": self.hub,
                "consumer_group": self.group, "partition_id": partition_id,
                "sequence_number": checkpoint.sequence_number, "offset": checkpoint.offset})
        except Exception as exc:
            raise _translate(exc, f"checkpoint {self.hub}[{partition_id}]", self.container) from exc
        self.checkpoints = {**self.checkpoints, partition_id: checkpoint}
