"""The seed document's custom handler example, pasted as a user pastes it, behind the real
daemon: its import line, its ``publish`` signature (no ``message_id``), its config keys.

The seed leaves two things to the user: the client library (``my_queue_library``, here a
small fake that appends to a file) and "Implement other methods...". Both are filled in
below; the seed's own lines are kept verbatim. Its YAML passes ``option2``, which its class
does not take: that is named by ``config check`` (and works once removed).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import orjson
import pytest

from tests.gateway_process import REPO, GatewayProcess, Publisher, gateway_config
from tests.servers import ServerProcess, wait_until

pytestmark = pytest.mark.integration

SEED_HANDLER = '''\
# mycompany/queues/custom_handler.py
from openhqm.queue.interface import MessageQueueInterface, QueueMessage

class MyCustomQueue(MessageQueueInterface):
    def __init__(self, connection_string: str, option1: str):
        self.connection_string = connection_string
        self.option1 = option1
        self.client = None
    
    async def connect(self) -> None:
        # Connect to your queue
        self.client = await my_queue_library.connect(self.connection_string)
    
    async def publish(self, queue_name, message, priority=0, attributes=None, delay_seconds=0):
        # Publish message
        message_id = await self.client.send(queue_name, message)
        return message_id
    
    # Implement other methods...
'''  # noqa: W293 - the seed's blank lines carry its indentation

OTHER_METHODS = '''\
    async def disconnect(self) -> None:
        self.client = None

    async def consume(self, queue_name, handler, batch_size=10, wait_time_seconds=1.0):
        raise NotImplementedError

    async def acknowledge(self, message_id):
        return False

    async def reject(self, message_id, requeue=True, reason=""):
        return False

    async def get_queue_depth(self, queue_name):
        return 0

    async def health_check(self):
        return self.client is not None

    async def create_queue(self, queue_name, **kwargs):
        return False

    async def delete_queue(self, queue_name):
        return False

    async def purge_queue(self, queue_name):
        return 0
'''

#: the user's client library: every send appends a line to $MYQUEUE_JOURNAL
MY_QUEUE_LIBRARY = '''\
import json
import os


class Client:
    def __init__(self, url):
        self.url = url

    async def send(self, queue_name, message):
        with open(os.environ["MYQUEUE_JOURNAL"], "ab") as fh:
            fh.write(json.dumps({"queue": queue_name, "body": message.decode()}).encode() + b"\\n")
        return "sent"


async def connect(url):
    return Client(url)
'''

SEED_YAML = '''\
queue:
  type: custom
  custom_module: "mycompany.queues.custom_handler"
  custom_class: "MyCustomQueue"
  custom_config:
    connection_string: "myqueue://localhost:5672"
    option1: "value1"
    option2: "value2"
'''


def user_code(tmp: Path, *, with_library: bool) -> Path:
    """The user's package as the seed lays it out; returns the directory for PYTHONPATH."""
    root = tmp / "usercode"
    package = root / "mycompany" / "queues"
    package.mkdir(parents=True)
    for directory in (root / "mycompany", package):
        (directory / "__init__.py").write_text("")
    handler = SEED_HANDLER.replace("    # Implement other methods...\n", OTHER_METHODS)
    if with_library:  # the one line the seed leaves out: importing its client library
        handler = handler.replace("QueueMessage\n", "QueueMessage\nimport my_queue_library\n", 1)
        (root / "my_queue_library.py").write_text(MY_QUEUE_LIBRARY)
    (package / "custom_handler.py").write_text(handler)
    return root


def env_for(code: Path, journal: Path) -> dict[str, str]:
    return {"PYTHONPATH": os.pathsep.join([str(REPO), str(code)]),
            "MYQUEUE_JOURNAL": str(journal)}


def config_check(config: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("OPENHQM_")}
    return subprocess.run([sys.executable, "-m", "gateway", "config", "check", "-c", str(config)],
                          cwd=REPO, env={**base, **env}, capture_output=True, text=True,
                          timeout=60, check=False)


def seed_queue_section(queue_name: str) -> dict[str, object]:
    import yaml

    section: dict[str, object] = yaml.safe_load(SEED_YAML)["queue"]
    section["request_queue_name"] = queue_name
    return section


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def test_the_seed_yaml_verbatim_names_the_option_its_class_does_not_take(tmp_path: Path) -> None:
    code = user_code(tmp_path, with_library=True)
    config = tmp_path / "gateway.yaml"
    config.write_text(SEED_YAML)
    done = config_check(config, env_for(code, tmp_path / "journal"))
    assert done.returncode == 2, done.stdout + done.stderr
    assert "queue.custom_config.option2='value2'" in done.stderr
    assert "known keys here: connection_string, option1" in done.stderr


def test_the_seed_example_forwards_every_message(tmp_path: Path, mosquitto: ServerProcess) -> None:
    code, journal = user_code(tmp_path, with_library=True), tmp_path / "journal"
    root, queue_name = f"seed/{uuid.uuid4().hex[:8]}", "openhqm-requests"
    queue = seed_queue_section(queue_name)
    queue["custom_config"] = {"connection_string": "myqueue://localhost:5672", "option1": "value1"}
    config = gateway_config(tmp_path, mosquitto.port, root, queue)
    env = env_for(code, journal)
    checked = config_check(config, env)
    assert checked.returncode == 0, checked.stderr
    assert "custom_class: MyCustomQueue" in checked.stdout
    gw = GatewayProcess(config, tmp_path, env=env)
    gw.start()
    pub = Publisher(mosquitto.port)
    sent = [orjson.dumps({"n": n}) for n in range(30)]
    try:
        for body in sent:
            pub.publish(f"{root}/dev1/temp", body)
        pub.wait_all_acked(len(sent))
        wait_until(lambda: journal.exists() and len(journal.read_bytes().splitlines()) >= 30, 20,
                   "every message sent by the handler")
        status, metrics = get(f"{gw.http_url()}/metrics")
        assert status == 200
        assert ('openhqm_gateway_uplink_state{uplink="default",type="MyCustomQueue",'
                'state="online"} 1') in metrics
        assert "uplink MyCustomQueue connected" in gw.log()
        assert "TypeError" not in gw.log() and "abstract" not in gw.log()
        assert gw.stop() == 0
    finally:
        pub.close()
        gw.stop()
    records = [orjson.loads(line) for line in journal.read_bytes().splitlines()]
    assert [r["body"].encode() for r in records] == sent  # each once, in order
    assert {r["queue"] for r in records} == {queue_name}
    assert "uplink   default (custom (MyCustomQueue))" in gw.cli("status").stdout


def test_the_seed_handler_without_its_library_is_a_defect_on_readyz(
        tmp_path: Path, mosquitto: ServerProcess) -> None:
    """Pasted as is, the seed's connect calls an undefined my_queue_library: NameError."""
    code = user_code(tmp_path, with_library=False)
    root = f"seed/{uuid.uuid4().hex[:8]}"
    queue = seed_queue_section("openhqm-requests")
    queue["custom_config"] = {"connection_string": "myqueue://localhost:5672", "option1": "value1"}
    config = gateway_config(tmp_path, mosquitto.port, root, queue)
    gw = GatewayProcess(config, tmp_path, env=env_for(code, tmp_path / "journal"))
    gw.start()
    pub = Publisher(mosquitto.port)
    try:
        for n in range(10):
            pub.publish(f"{root}/dev1/temp", b"%d" % n)
        pub.wait_all_acked(10)
        wait_until(lambda: get(f"{gw.http_url()}/readyz")[0] == 503, 10, "not ready")
        _, body = get(f"{gw.http_url()}/readyz")
        assert "uplink MyCustomQueue has a defect: NameError: name 'my_queue_library' is not " \
               "defined" in body, body
        time.sleep(1.5)  # several retry rounds (forwarder.retry_max_delay is 1s here)
        pub.publish(f"{root}/dev1/temp", b"late")
        pub.wait_all_acked(11)
        assert gw.stop() == 0
    finally:
        pub.close()
        gw.stop()
    log = gw.log()
    assert log.count(" ERROR ") == 1, log  # the defect, with its traceback, once
    assert "Traceback" in log and "my_queue_library.connect" in log
    assert "unavailable" not in log  # not an outage
    assert gw.status()["uplinks"]["default"]["depth"] == 11  # every message still buffered
