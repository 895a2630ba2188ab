"""Custom uplinks: the example plugin end to end behind the real daemon, and the loader's checks.

End to end: sensors -> mosquitto -> ``python -m gateway run`` -> examples/openhqm-file-uplink,
once through its entry point (``queue.type: jsonl_file``) and once through ``type: custom``
with ``custom_module``/``custom_class``/``custom_config``; the journal must then hold every
acknowledged message once, in per-topic order, with its id and topic.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway.config import load_config, parse_config
from gateway.errors import ConfigError
from gateway.message import Body
from gateway.queue.interface import Handler, MessageQueueInterface
from gateway.queue.registry import create_backend
from tests.contract.backend_custom import PLUGIN_TYPE, require_file_plugin
from tests.gateway_process import GatewayProcess, Publisher, gateway_config
from tests.servers import ServerProcess, wait_until

pytestmark = pytest.mark.integration

MODULE = __name__


@pytest.fixture(autouse=True)
def _plugin() -> None:
    require_file_plugin()


def _queue_section(route: str, directory: Path, queue_name: str) -> dict[str, Any]:
    options = {"directory": str(directory), "fsync": False}
    if route == "entry_point":
        return {"type": PLUGIN_TYPE, "request_queue_name": queue_name, **options}
    return {"type": "custom", "request_queue_name": queue_name,
            "custom_module": "openhqm_file_uplink", "custom_class": "FileQueue",
            "custom_config": options}


@pytest.mark.parametrize("route", ["entry_point", "custom_module"])
def test_sensor_messages_reach_the_plugin_in_order(tmp_path: Path, mosquitto: ServerProcess,
                                                   route: str) -> None:
    from openhqm_file_uplink import pending_messages

    root = f"custom/{uuid.uuid4().hex[:8]}"
    outbox, queue_name = tmp_path / "outbox", f"q-{uuid.uuid4().hex[:8]}"
    config = gateway_config(tmp_path, mosquitto.port, root,
                            _queue_section(route, outbox, queue_name))
    gw = GatewayProcess(config, tmp_path)
    gw.start()
    pub = Publisher(mosquitto.port)
    try:
        topics = [f"{root}/dev{i}/temp" for i in range(3)]
        sent = [orjson.dumps({"topic": t, "n": n}) for n in range(100) for t in topics]
        for body in sent:
            pub.publish(orjson.loads(body)["topic"], body)
        pub.wait_all_acked(len(sent))
        wait_until(lambda: len(pending_messages(outbox, queue_name)) >= len(sent), 20,
                   "every message in the journal")
        assert gw.stop() == 0
    finally:
        pub.close()
        gw.stop()
    got = pending_messages(outbox, queue_name)
    assert sorted(m.body for m in got) == sorted(sent)  # each once: nothing lost or doubled
    last: dict[str, int] = defaultdict(lambda: -1)
    for msg in got:
        body = orjson.loads(msg.body)
        assert msg.attributes["mqtt_topic"] == body["topic"]
        assert msg.attributes["openhqm_message_id"] == msg.id
        assert body["n"] > last[body["topic"]], "per-topic order"
        last[body["topic"]] = body["n"]


def test_plugin_keys_are_checked_and_converted_like_built_in_keys(tmp_path: Path) -> None:
    env = {"OPENHQM_QUEUE__TYPE": PLUGIN_TYPE, "OPENHQM_QUEUE__DIRECTORY": str(tmp_path),
           "OPENHQM_QUEUE__MAX_MESSAGE_BYTES": "2048", "OPENHQM_QUEUE__FSYNC": "no"}
    cfg = load_config(None, env)
    assert (cfg.queue.settings.max_message_bytes, cfg.queue.settings.fsync) == (2048, False)
    queue: Any = create_backend(cfg)
    assert type(queue).__name__ == "FileQueue"
    assert (queue.max_message_bytes, queue.fsync, queue.directory) == (2048, False, tmp_path)
    with pytest.raises(ConfigError) as err:
        load_config(None, {**env, "OPENHQM_QUEUE__MAX_BYTES": "1"})
    assert err.value.key == "queue.max_bytes"
    assert "directory" in err.value.reason  # the known keys are listed
    with pytest.raises(ConfigError) as err:
        load_config(None, {**env, "OPENHQM_QUEUE__MAX_MESSAGE_BYTES": "lots"})
    assert err.value.key == "queue.max_message_bytes"
    with pytest.raises(ConfigError) as err:
        load_config(None, {"OPENHQM_QUEUE__TYPE": PLUGIN_TYPE})
    assert (err.value.key, err.value.reason) == ("queue.directory", "required by FileQueue")


def test_unknown_type_lists_installed_plugins() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"queue": {"type": "nosuchqueue"}}, "test")
    assert err.value.key == "queue.type"
    assert f"installed plugins: {PLUGIN_TYPE}" in err.value.reason


# -- type: custom: what the loader refuses, each naming its key --------------------------

class NotAQueue:
    def __init__(self, directory: str) -> None:
        self.directory = directory


class HalfAQueue(MessageQueueInterface):
    async def connect(self) -> None:
        return None


class KwargsQueue(MessageQueueInterface):
    def __init__(self, **options: Any) -> None:
        self.options = options

    async def connect(self) -> None: ...
    async def disconnect(self) -> None: ...
    async def publish(self, queue_name: str, message: Body, priority: int = 0,
                      attributes: dict[str, str] | None = None, delay_seconds: float = 0, *,
                      message_id: str | None = None) -> str:
        return ""
    async def consume(self, queue_name: str, handler: Handler, batch_size: int = 10,
                      wait_time_seconds: float = 1.0) -> None: ...
    async def acknowledge(self, message_id: str) -> bool:
        return False
    async def reject(self, message_id: str, requeue: bool = True, reason: str = "") -> bool:
        return False
    async def get_queue_depth(self, queue_name: str) -> int:
        return 0
    async def health_check(self) -> bool:
        return False
    async def create_queue(self, queue_name: str, **kwargs: Any) -> bool:
        return False
    async def delete_queue(self, queue_name: str) -> bool:
        return False
    async def purge_queue(self, queue_name: str) -> int:
        return 0


def _custom(module: str, cls: str, options: dict[str, Any]) -> ConfigError:
    cfg = parse_config({"queue": {"type": "custom", "custom_module": module, "custom_class": cls,
                                  "custom_config": options}}, "test.yaml")
    with pytest.raises(ConfigError) as err:
        create_backend(cfg)
    return err.value


@pytest.mark.parametrize(("module", "cls", "options", "key", "fragment"), [
    ("mycompany.no_such_module", "X", {}, "queue.custom_module", "no module named 'mycompany'"),
    ("", "X", {}, "queue.custom_module", "needs the module"),
    ("openhqm_file_uplink", "NoSuchClass", {}, "queue.custom_class", "has no attribute"),
    (MODULE, "NotAQueue", {}, "queue.custom_class", "not a subclass of"),
    (MODULE, "HalfAQueue", {}, "queue.custom_class", "abstract methods acknowledge, consume"),
    (MODULE, "KwargsQueue", {}, "queue.custom_class", "**kwargs"),
    ("openhqm_file_uplink", "FileQueue", {"directory": "/tmp/x", "colour": "red"},
     "queue.custom_config.colour", "unknown key"),
    ("openhqm_file_uplink", "FileQueue", {}, "queue.custom_config.directory", "required"),
    ("openhqm_file_uplink", "FileQueue", {"directory": "/tmp/x", "max_message_bytes": 0},
     "queue.custom_config", "refused its options: ValueError"),
])
def test_custom_loader_refusals_name_the_key(module: str, cls: str, options: dict[str, Any],
                                             key: str, fragment: str) -> None:
    error = _custom(module, cls, options)
    assert error.key == key
    assert fragment in error.reason
    assert error.source == "test.yaml"


def test_custom_config_from_env_json_builds_the_class(tmp_path: Path) -> None:
    cfg = load_config(None, {
        "OPENHQM_QUEUE__TYPE": "custom", "OPENHQM_QUEUE__CUSTOM_MODULE": "openhqm_file_uplink",
        "OPENHQM_QUEUE__CUSTOM_CLASS": "FileQueue",
        "OPENHQM_QUEUE__CUSTOM_CONFIG": orjson.dumps({"directory": str(tmp_path),
                                                      "max_message_bytes": "512"}).decode()})
    queue: Any = create_backend(cfg)
    assert (queue.directory, queue.max_message_bytes) == (tmp_path, 512)
