"""A custom handler written from the seed document: its import line and its ``publish``
signature work; a handler the gateway cannot call fails ``config check`` with the reason; the
uplink is named by its class, never "abstract". (A programming error in a handler at run
time: tests/unit/test_uplink_state.py.)"""

from __future__ import annotations

from typing import Any

import pytest

from gateway.config import parse_config
from gateway.errors import ConfigError
from gateway.message import ATTR_MESSAGE_ID
from gateway.queue.interface import MessageQueueInterface
from gateway.queue.registry import create_backend
from openhqm.queue.interface import QueueMessage as SeedQueueMessage

MODULE = __name__


class SeedStyleQueue(MessageQueueInterface):
    """The seed's handler, its methods completed: ``publish`` has the seed's signature."""

    instances: list[SeedStyleQueue] = []  # noqa: RUF012 - the test reads what was built

    def __init__(self, connection_string: str, option1: str) -> None:
        self.connection_string = connection_string
        self.option1 = option1
        self.calls: list[tuple[str, bytes, dict[str, str]]] = []
        self.broken: type[Exception] | None = None
        SeedStyleQueue.instances.append(self)

    async def connect(self) -> None:
        return None

    async def disconnect(self) -> None:
        return None

    async def publish(self, queue_name, message, priority=0, attributes=None,  # type: ignore[no-untyped-def,override]
                      delay_seconds=0):
        if self.broken is not None:
            raise self.broken("the handler's own bug")
        self.calls.append((queue_name, message, dict(attributes or {})))
        return f"backend-{len(self.calls)}"

    async def consume(self, queue_name: str, handler: Any, batch_size: int = 10,
                      wait_time_seconds: float = 1.0) -> None: ...
    async def acknowledge(self, message_id: str) -> bool:
        return False
    async def reject(self, message_id: str, requeue: bool = True, reason: str = "") -> bool:
        return False
    async def get_queue_depth(self, queue_name: str) -> int:
        return 0
    async def health_check(self) -> bool:
        return True
    async def create_queue(self, queue_name: str, **kwargs: Any) -> bool:
        return False
    async def delete_queue(self, queue_name: str) -> bool:
        return False
    async def purge_queue(self, queue_name: str) -> int:
        return 0


def seed_config(cls: str = "SeedStyleQueue", **options: Any) -> Any:
    return parse_config({"queue": {
        "type": "custom", "custom_module": MODULE, "custom_class": cls,
        "custom_config": options or {"connection_string": "myqueue://localhost:5672",
                                     "option1": "value1"}}}, "test.yaml")


def test_the_seed_import_line_gives_the_gateways_classes() -> None:
    from gateway.message import QueueMessage
    from openhqm.queue.interface import MessageQueueInterface as SeedInterface

    assert SeedInterface is MessageQueueInterface
    assert SeedQueueMessage is QueueMessage


async def test_a_publish_without_message_id_gets_the_id_as_an_attribute() -> None:
    queue = create_backend(seed_config())
    assert isinstance(queue, SeedStyleQueue)
    messages = [SeedQueueMessage(f"id-{i}", b"m%d" % i, {"mqtt_topic": "s/1"}) for i in range(3)]
    results = await queue.publish_batch("requests", messages)
    assert [r.ok for r in results] == [True, True, True]
    assert [(q, body) for q, body, _ in queue.calls] == [("requests", b"m0"), ("requests", b"m1"),
                                                          ("requests", b"m2")]
    assert [attrs[ATTR_MESSAGE_ID] for _, _, attrs in queue.calls] == ["id-0", "id-1", "id-2"]
    assert all(attrs["mqtt_topic"] == "s/1" for _, _, attrs in queue.calls)


def test_a_handler_without_backend_name_is_named_by_its_class() -> None:
    queue = create_backend(seed_config())
    assert queue.backend_name == "SeedStyleQueue"
    assert "abstract" not in {queue.backend_name, SeedStyleQueue.backend_name}


def test_an_option_the_class_does_not_take_is_named() -> None:
    """The seed's YAML passes option2, which the seed's class does not take."""
    with pytest.raises(ConfigError) as err:
        create_backend(seed_config(connection_string="myqueue://localhost:5672",
                                   option1="value1", option2="value2"))
    assert err.value.key == "queue.custom_config.option2"
    assert "connection_string, option1" in err.value.reason


class SyncPublish(SeedStyleQueue):
    def publish(self, queue_name, message, priority=0, attributes=None,  # type: ignore[no-untyped-def,override]
                delay_seconds=0):
        return "x"


class NoAttributes(SeedStyleQueue):
    async def publish(self, queue_name, message):  # type: ignore[no-untyped-def,override]
        return "x"


class ConnectNeedsArgument(SeedStyleQueue):
    async def connect(self, url: str) -> None:  # type: ignore[override]
        return None


class BadBatch(SeedStyleQueue):
    async def publish_batch(self, messages):  # type: ignore[no-untyped-def,override]
        return []


@pytest.mark.parametrize(("cls", "fragment"), [
    ("SyncPublish", "publish must be 'async def'"),
    ("NoAttributes", "unexpected keyword argument 'attributes'"),
    ("ConnectNeedsArgument", "await uplink.connect() would fail"),
    ("BadBatch", "await uplink.publish_batch(queue_name, messages) would fail"),
])
def test_a_handler_the_gateway_cannot_call_fails_config_check(cls: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        create_backend(seed_config(cls))
    assert err.value.key == "queue.custom_class"
    assert f"the gateway cannot call {cls}" in err.value.reason
    assert fragment in err.value.reason
