"""The custom-uplink route in the contract suite: the example plugin (examples/openhqm-file-uplink)
loaded the way the daemon loads it, through ``queue.type: jsonl_file`` (its entry point) and
create_backend, so the suite checks the plugin and the loader together.

The plugin must be installed (scripts/provision/custom-uplink.sh does it for CI); without
it the fixture skips locally and fails when CI=true.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from importlib.metadata import entry_points
from pathlib import Path

import orjson
import pytest

from gateway.config import parse_config
from gateway.message import QueueMessage, new_message_id
from gateway.queue.registry import create_backend
from tests.contract.backends import ContractTarget
from tests.servers import IN_CI

__all__ = ["custom_backend", "require_file_plugin"]

PLUGIN_TYPE = "jsonl_file"
INSTALL_HINT = "pip install -e examples/openhqm-file-uplink (scripts/provision/custom-uplink.sh)"
MAX_BYTES = 4096


def require_file_plugin() -> None:
    if not any(ep.name == PLUGIN_TYPE for ep in entry_points(group="openhqm_gateway.queues")):
        message = f"the example plugin is not installed: {INSTALL_HINT}"
        if IN_CI:
            pytest.fail(f"CI must run the custom uplink tests: {message}")
        pytest.skip(message)


@pytest.fixture
async def custom_backend(tmp_path: Path) -> AsyncIterator[ContractTarget]:
    require_file_plugin()
    directory = tmp_path / "outbox"
    config = parse_config({"queue": {"type": PLUGIN_TYPE, "directory": str(directory),
                                     "fsync": "false", "max_message_bytes": MAX_BYTES,
                                     "dead_letter_queue": "contract-dead"}}, "contract")
    queue = create_backend(config)

    async def poison(queue_name: str) -> QueueMessage:
        return QueueMessage(new_message_id(), b"p" * (MAX_BYTES + 1))

    async def dead_letters(queue_name: str) -> list[tuple[str, str]]:
        path = directory / "contract-dead.jsonl"
        records = [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]
        return [(r["id"], r["reason"]) for r in records
                if r["op"] == "put" and r.get("source_queue") == queue_name]

    await queue.connect()
    try:
        yield ContractTarget("custom", queue, poison, dead_letters=dead_letters)
    finally:
        await queue.disconnect()

