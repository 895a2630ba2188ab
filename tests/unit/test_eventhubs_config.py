"""Event Hubs uplink configuration: the seed's keys and env overrides, checks that fail
`config check`, and the choice between the connection string and Azure AD (azure-identity)."""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

import pytest

from gateway.config import load_config
from gateway.errors import ConfigError
from gateway.queue.registry import create_backend
from gateway.uplinks.eventhubs.settings import EventHubsSettings
from gateway.uplinks.eventhubs.uplink import EventHubsQueue

STORAGE = ("DefaultEndpointsProtocol=https;AccountName=edge;AccountKey=a2V5;"
           "EndpointSuffix=core.windows.net")
CONN = ("Endpoint=sb://ns-1.servicebus.windows.net/;SharedAccessKeyName=send;"
        "SharedAccessKey=c2VjcmV0;EntityPath=telemetry")


def test_seed_keys_and_env_overrides_build_the_uplink(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text("gateway:\n  state_dir: /srv/state\nqueue:\n  type: azure_eventhubs\n"
                    f"  azure_eventhubs_connection_string: \"{CONN}\"\n"
                    "  azure_eventhubs_name: openhqm\n"
                    "  azure_eventhubs_consumer_group: \"$Default\"\n")
    env = {"OPENHQM_QUEUE__AZURE_EVENTHUBS_CONSUMER_GROUP": "workers",
           "OPENHQM_QUEUE__AZURE_EVENTHUBS_PARTITION_KEY": "{topic[1]}",
           "OPENHQM_QUEUE__AZURE_EVENTHUBS_SEND_TIMEOUT": "5s",
           "OPENHQM_QUEUE__AZURE_EVENTHUBS_DLQ_NAME": "dead"}
    cfg = load_config(str(path), env)
    backend = create_backend(cfg)
    assert isinstance(backend, EventHubsQueue)
    s = backend.settings
    assert s.azure_eventhubs_connection_string == CONN
    assert (s.azure_eventhubs_name, s.azure_eventhubs_consumer_group) == ("openhqm", "workers")
    assert s.azure_eventhubs_send_timeout == 5.0 and s.azure_eventhubs_dlq_name == "dead"
    assert backend.hub_for("openhqm-requests") == "openhqm"  # the request queue -> the hub
    assert backend.hub_for("alarms") == "alarms"  # routes name hubs directly
    assert backend.namespace == "ns-1.servicebus.windows.net"
    assert backend.state_dir == "/srv/state"
    assert backend.clients.credential is None


def test_without_a_name_the_entity_path_is_the_hub() -> None:
    queue = EventHubsQueue(EventHubsSettings(azure_eventhubs_connection_string=CONN),
                           state_dir="/tmp/x")
    assert queue.hub_for("openhqm-requests") == "telemetry"


def test_connection_string_is_masked_in_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        EventHubsQueue(EventHubsSettings(azure_eventhubs_connection_string="SharedAccessKey=abc"),
                       state_dir=str(tmp_path))
    assert "abc" not in str(info.value)
    assert "queue.azure_eventhubs_connection_string" in str(info.value)


@pytest.mark.parametrize(("overrides", "key"), [
    ({"azure_eventhubs_checkpoint_store": "Endpoint=sb://not-storage/"},
     "queue.azure_eventhubs_checkpoint_store"),
    ({"azure_eventhubs_checkpoint_store": STORAGE, "azure_eventhubs_checkpoint_container": "Bad_Name"},
     "queue.azure_eventhubs_checkpoint_container"),
    ({"azure_eventhubs_connection_string": ""}, "queue.azure_eventhubs_connection_string"),
    ({"azure_eventhubs_partition_key": "{nope}"}, "queue.azure_eventhubs_partition_key"),
    ({"azure_eventhubs_partition_key": "{topic"}, "queue.azure_eventhubs_partition_key"),
    ({"azure_eventhubs_consumer_group": ""}, "queue.azure_eventhubs_consumer_group"),
    ({"azure_eventhubs_send_timeout": 0.0}, "queue.azure_eventhubs_send_timeout"),
    ({"azure_eventhubs_prefetch": 0}, "queue.azure_eventhubs_prefetch"),
    ({"azure_eventhubs_credential": "default_azure_credential"},
     "queue.azure_eventhubs_fully_qualified_namespace"),
    ({"azure_eventhubs_credential": "default_azure_credential",
      "azure_eventhubs_fully_qualified_namespace": "sb://ns.servicebus.windows.net/"},
     "queue.azure_eventhubs_fully_qualified_namespace"),
])
def test_bad_settings_name_the_key(tmp_path: Path, overrides: dict[str, Any], key: str) -> None:
    settings = EventHubsSettings(**{"azure_eventhubs_connection_string": CONN, **overrides})
    with pytest.raises(ConfigError) as info:
        EventHubsQueue(settings, state_dir=str(tmp_path))
    assert info.value.key == key
    assert "a2V5" not in str(info.value) and "c2VjcmV0" not in str(info.value)  # keys hidden


def test_the_seed_checkpoint_store_key_selects_blob_checkpoints(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text("queue:\n  type: azure_eventhubs\n"
                    f"  azure_eventhubs_connection_string: \"{CONN}\"\n"
                    f"  azure_eventhubs_checkpoint_store: \"{STORAGE}\"\n")
    env = {"OPENHQM_QUEUE__AZURE_EVENTHUBS_CHECKPOINT_CONTAINER": "edge-checkpoints"}
    backend = create_backend(load_config(str(path), env))
    assert isinstance(backend, EventHubsQueue)
    assert backend.settings.azure_eventhubs_checkpoint_store == STORAGE
    assert backend.settings.azure_eventhubs_checkpoint_container == "edge-checkpoints"


def test_blob_checkpoints_without_their_package_are_a_config_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "azure.eventhub.extensions.checkpointstoreblobaio", None)
    with pytest.raises(ConfigError, match="azure-eventhub-checkpointstoreblob-aio") as info:
        EventHubsQueue(EventHubsSettings(azure_eventhubs_connection_string=CONN,
                                         azure_eventhubs_checkpoint_store=STORAGE),
                       state_dir=str(tmp_path))  # building it: what `config check` does
    assert info.value.key == "queue.azure_eventhubs_checkpoint_store"
    assert "AccountKey" not in str(info.value)  # the connection string stays hidden


AAD: dict[str, Any] = {"azure_eventhubs_credential": "default_azure_credential",
       "azure_eventhubs_fully_qualified_namespace": "ns-2.servicebus.windows.net"}


def test_azure_ad_without_azure_identity_is_a_config_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "azure.identity", None)  # import fails as if absent
    monkeypatch.setitem(sys.modules, "azure.identity.aio", None)
    with pytest.raises(ConfigError, match="azure-identity") as info:
        EventHubsQueue(EventHubsSettings(**AAD), state_dir=str(tmp_path))
    assert info.value.key == "queue.azure_eventhubs_credential"


class FakeCredential:
    """Stands in for azure.identity.aio.DefaultAzureCredential; no token is ever asked for
    because nothing here connects."""

    closed = False

    async def get_token(self, *scopes: str, **kwargs: Any) -> Any:
        raise AssertionError("no I/O expected")

    async def close(self) -> None:
        self.closed = True


async def test_azure_ad_uses_default_azure_credential_and_the_namespace(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = types.ModuleType("azure.identity.aio")
    module.DefaultAzureCredential = FakeCredential  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "azure.identity.aio", module)
    queue = EventHubsQueue(EventHubsSettings(**AAD, azure_eventhubs_name="hub-x"),
                           state_dir=str(tmp_path))
    credential = queue.clients.credential
    assert isinstance(credential, FakeCredential)
    producer = queue.clients.producer("hub-x")
    assert producer._address.hostname == "ns-2.servicebus.windows.net"
    assert producer.eventhub_name == "hub-x"
    assert producer._credential is credential
    consumer = queue.clients.consumer("hub-x")
    assert consumer._credential is credential
    assert queue.namespace == "ns-2.servicebus.windows.net"
    await producer.close()
    await consumer.close()
    await queue.clients.close()
    assert credential.closed


def test_the_connection_string_does_not_import_azure_identity(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "azure.identity", None)
    monkeypatch.setitem(sys.modules, "azure.identity.aio", None)
    queue = EventHubsQueue(EventHubsSettings(azure_eventhubs_connection_string=CONN),
                           state_dir=str(tmp_path))
    assert queue.clients.credential is None


async def test_admin_operations_are_not_supported(tmp_path: Path) -> None:
    from gateway.errors import NotSupportedError

    queue = EventHubsQueue(EventHubsSettings(azure_eventhubs_connection_string=CONN),
                           state_dir=str(tmp_path))
    for call in (queue.create_queue("h"), queue.delete_queue("h"), queue.purge_queue("h")):
        with pytest.raises(NotSupportedError, match="managed in Azure") as info:
            await call
        assert info.value.backend == "azure_eventhubs"
    with pytest.raises(NotSupportedError):
        await queue.publish("h", b"x", delay_seconds=1)
