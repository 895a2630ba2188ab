"""Gateway identity (issue #18): ``gateway.id`` (default the host name) travels as the
``openhqm_gateway_id`` attribute on every message the store hands to an uplink, and key
templates can use it as ``{gateway_id}``."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from gateway.config import GATEWAY_ID_MAX, StoreConfig, effective_config, load_config
from gateway.errors import ConfigError
from gateway.ingress.mqtt import RESERVED_ATTRIBUTES
from gateway.message import (
    ATTR_GATEWAY_ID,
    ATTR_MESSAGE_ID,
    ATTR_MQTT_QOS,
    ATTR_MQTT_TOPIC,
    QueueMessage,
    new_message_id,
)
from gateway.queue.keys import KeyTemplate
from gateway.store import NewMessage, Settlement, Store
from gateway.store.frames import FROM_MQTT

Q = "default"
GID = "gw-unit-7"


# -- config -------------------------------------------------------------------------------

def test_the_default_is_the_host_name() -> None:
    cfg = load_config(None, {})
    assert cfg.gateway.id == ""
    assert cfg.gateway_id == socket.gethostname()
    assert effective_config(cfg)["gateway"]["id"] == socket.gethostname()  # config check shows it


def test_the_file_and_the_environment_set_it(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text("gateway:\n  id: gw-file\n")
    assert load_config(str(path), {}).gateway_id == "gw-file"
    assert load_config(str(path), {"OPENHQM_GATEWAY__ID": "gw-env"}).gateway_id == "gw-env"
    assert load_config(None, {"OPENHQM_GATEWAY__ID": "gw-env"}).gateway_id == "gw-env"


@pytest.mark.parametrize("value", ["x" * (GATEWAY_ID_MAX + 1), "gw\x01bell", " gw", "gw\n",
                                   "gw\ttab"])
def test_a_bad_id_is_a_config_error_naming_key_and_value(value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, {"OPENHQM_GATEWAY__ID": value})
    assert info.value.key == "gateway.id"
    assert repr(value)[1:-1][:40] in str(info.value) or value[:40] in str(info.value)
    assert "printable" in str(info.value)


def test_the_longest_and_unicode_ids_are_fine() -> None:
    assert load_config(None, {"OPENHQM_GATEWAY__ID": "g" * GATEWAY_ID_MAX}).gateway_id == (
        "g" * GATEWAY_ID_MAX)
    assert load_config(None, {"OPENHQM_GATEWAY__ID": "Halle 3 / Süd"}).gateway_id == (
        "Halle 3 / Süd")


# -- the store's stamp ----------------------------------------------------------------------

def from_ingress(topic: str, body: bytes) -> NewMessage:
    """As the ingress's fast path offers it: a derived id, flags, no attributes of its own
    (so its attributes are its frame's shared template)."""
    return NewMessage("", topic, body, {}, time.time(), mqtt_flags=FROM_MQTT | 1)


def with_attributes(topic: str, body: bytes, **attrs: str) -> NewMessage:
    return NewMessage(new_message_id(), topic, body,
                      {ATTR_MQTT_TOPIC: topic, ATTR_MQTT_QOS: "1", **attrs}, time.time())


async def open_store(path: Path, stamp: dict[str, str] | None) -> Store:
    store = Store(str(path), StoreConfig(), stamp=stamp)
    await store.open()
    return store


async def test_every_handed_out_message_carries_the_stamp(tmp_path: Path) -> None:
    store = await open_store(tmp_path / "s.db", {ATTR_GATEWAY_ID: GID})
    await store.append(Q, [from_ingress("s/a", b"1"), from_ingress("s/a", b"2"),
                           with_attributes("s/b", b"3", device="d3"),
                           with_attributes("s/c", b"4", **{ATTR_GATEWAY_ID: "spoofed"})])
    leased = await store.lease(Q, 10)
    assert [m.attributes[ATTR_GATEWAY_ID] for m in leased] == [GID] * 4  # the gateway's wins
    one, two, three, _ = leased
    assert one.shape is two.shape and isinstance(one.shape, dict)
    assert one.shape[ATTR_GATEWAY_ID] == GID  # in the shared template: no per-message work
    assert one.attributes == {ATTR_MQTT_TOPIC: "s/a", ATTR_MQTT_QOS: "1",
                              ATTR_GATEWAY_ID: GID, ATTR_MESSAGE_ID: one.id}
    assert three.attributes["device"] == "d3"
    assert ATTR_GATEWAY_ID not in three.stored_attributes  # never written to the file

    # a retried message comes back from the parked table: still stamped, not stored stamped
    await store.settle(Settlement(retry=[(m.seq, 0.0, "try again") for m in leased]))
    again = await store.lease(Q, 10)
    assert [m.payload for m in again] == [b"1", b"2", b"3", b"4"]
    assert all(m.seq < 0 for m in again)
    assert [m.attributes[ATTR_GATEWAY_ID] for m in again] == [GID] * 4
    assert all(ATTR_GATEWAY_ID not in m.stored_attributes for m in again[:3])
    assert again[3].stored_attributes[ATTR_GATEWAY_ID] == "spoofed"  # as stored, not shown
    await store.settle(Settlement(dead=[(again[3].seq, "no")]))
    (dead,) = await store.list_dead(Q)
    assert dead.attributes.get(ATTR_GATEWAY_ID) == "spoofed"  # as stored: the stamp is not
    await store.close()

    # the id is the running gateway's, not the one that stored the message
    store = await open_store(tmp_path / "s.db", {ATTR_GATEWAY_ID: "renamed"})
    await store.settle(Settlement())
    assert {m.attributes[ATTR_GATEWAY_ID] for m in await store.lease(Q, 10)} == {"renamed"}
    await store.close()


async def test_a_store_without_a_stamp_adds_nothing(tmp_path: Path) -> None:
    store = await open_store(tmp_path / "s.db", None)
    await store.append(Q, [from_ingress("s/a", b"1"), with_attributes("s/b", b"2", k="v")])
    assert all(ATTR_GATEWAY_ID not in m.attributes for m in await store.lease(Q, 10))
    await store.close()


def test_a_device_cannot_set_it() -> None:
    assert ATTR_GATEWAY_ID in RESERVED_ATTRIBUTES  # a user property of that name is dropped


# -- key templates ----------------------------------------------------------------------------

def test_gateway_id_placeholder() -> None:
    msg = QueueMessage("id-1", b"", {ATTR_MQTT_TOPIC: "s/dev-3/t", ATTR_GATEWAY_ID: GID})
    template = KeyTemplate.parse("{gateway_id}/{topic[1]}")
    assert template.render(msg) == f"{GID}/dev-3".encode()
    assert not template.topic_only  # it reads an attribute: not cached by topic alone
    assert KeyTemplate.parse("{gateway_id}").render(QueueMessage("i", b"")) is None
