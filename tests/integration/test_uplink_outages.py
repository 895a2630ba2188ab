"""Every backend, behind the real daemon, when its server goes away or was never there.

For each uplink (redis, kafka, sqs, gcp_pubsub, azure_eventhubs, mqtt) with a real server the
test owns (the session's Kafka broker, stopped and started again):

- an outage reads as two lines in the log: one WARNING when it starts ("uplink X
  unavailable: <reason>"), one when it ends ("uplink X back after ..."); no ERROR, and no
  client-library record at all (their detail is DEBUG);
- SIGTERM during an outage exits 0 within about a second (STOP_BUDGET), and every message the
  broker acknowledged is either delivered or back in the store (nothing in flight, nothing
  dead-lettered);
- a wrong address (a port nothing listens on) is named in a WARNING within a few seconds of
  start, and stopping then is as quick.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.gateway_process import GatewayProcess, Publisher, gateway_config
from tests.servers import ServerProcess, free_port, mosquitto_server, redis_server, wait_until

pytestmark = pytest.mark.integration

#: SIGTERM to exit while the uplink's server is gone: "about a second" plus process teardown
STOP_BUDGET = 3.0
BACKENDS = ["redis", "kafka", "sqs", "gcp_pubsub", "azure_eventhubs", "mqtt"]
LOG_LINE = re.compile(r"^\S+ \S+ (?P<level>[A-Z]+) +(?P<logger>[\w.]+): (?P<message>.*)$")


@dataclass
class Backend:
    name: str
    #: the ``queue:`` section for the live server
    queue: dict[str, Any]
    take_away: Callable[[], None]
    bring_back: Callable[[], None]
    env: dict[str, str] = field(default_factory=dict)


def _redis(tmp: Path, request: pytest.FixtureRequest) -> tuple[Backend, Callable[[], None]]:
    server = redis_server(tmp / "redis")
    server.start()
    queue = {"type": "redis", "redis_url": f"redis://127.0.0.1:{server.port}/0",
             "redis_socket_timeout": "2s"}
    return Backend("redis", queue, server.stop, server.start), server.stop


def _kafka(tmp: Path, request: pytest.FixtureRequest) -> tuple[Backend, Callable[[], None]]:
    broker = request.getfixturevalue("kafka_broker")

    def bring_back() -> None:
        broker.spawn()  # same port, same data directory
        broker.wait_started()

    def cleanup() -> None:  # the session's broker: others need it running
        if not broker.running:
            bring_back()

    queue = {"type": "kafka", "kafka_bootstrap_servers": broker.bootstrap,
             "kafka_delivery_timeout": "10s", "kafka_request_timeout": "10s"}
    return Backend("kafka", queue, broker.stop, bring_back), cleanup


def _sqs(tmp: Path, request: pytest.FixtureRequest) -> tuple[Backend, Callable[[], None]]:
    from tests.sqs_servers import DUMMY_AWS_ENV, endpoint, moto_sqs_server

    server = moto_sqs_server(tmp / "moto")
    server.start(30)
    queue = {"type": "sqs", "endpoint_url": endpoint(server), "sqs_auto_create_queues": True,
             "sqs_connect_timeout": "1s", "sqs_read_timeout": "3s"}
    return (Backend("sqs", queue, server.stop, lambda: server.start(30), dict(DUMMY_AWS_ENV)),
            server.stop)


def _pubsub(tmp: Path, request: pytest.FixtureRequest) -> tuple[Backend, Callable[[], None]]:
    from tests.pubsub_server import pubsub_fake

    fake = pubsub_fake(tmp / "pstest")
    fake.start()
    queue = {"type": "gcp_pubsub", "gcp_project_id": "outages", "gcp_emulator_host": fake.host,
             "gcp_publish_timeout": "3s", "gcp_request_timeout": "2s"}
    return Backend("gcp_pubsub", queue, fake.stop, fake.start), fake.stop


def _eventhubs(tmp: Path, request: pytest.FixtureRequest) -> tuple[Backend, Callable[[], None]]:
    from tests.eventhubs_server import EventHubsServer

    server = EventHubsServer({}, port=free_port())
    server.start()
    hub = f"it-{uuid.uuid4().hex[:10]}"
    server.add_hub(hub, 1)
    queue = {"type": "azure_eventhubs",
             "azure_eventhubs_connection_string": server.connection_string(),
             "azure_eventhubs_name": hub, "azure_eventhubs_send_timeout": "3s",
             "azure_eventhubs_request_timeout": "2s"}
    return Backend("azure_eventhubs", queue, server.stop, server.start), server.stop


def _mqtt(tmp: Path, request: pytest.FixtureRequest) -> tuple[Backend, Callable[[], None]]:
    cloud = mosquitto_server(tmp / "cloud")
    cloud.start()
    queue = {"type": "mqtt", "mqtt_broker_host": "127.0.0.1", "mqtt_broker_port": cloud.port,
             "mqtt_topic_template": "up/{topic}", "mqtt_timeout": "3s"}
    return Backend("mqtt", queue, cloud.stop, cloud.start), cloud.stop


MAKERS = {"redis": _redis, "kafka": _kafka, "sqs": _sqs, "gcp_pubsub": _pubsub,
          "azure_eventhubs": _eventhubs, "mqtt": _mqtt}


@pytest.fixture
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    made, cleanup = MAKERS[request.param](tmp_path, request)
    try:
        yield made
    finally:
        cleanup()


def dead_address(name: str) -> dict[str, Any]:
    """The ``queue:`` section of each backend pointed at a port nothing listens on."""
    port = free_port()
    return {
        "redis": {"type": "redis", "redis_url": f"redis://127.0.0.1:{port}/0"},
        "kafka": {"type": "kafka", "kafka_bootstrap_servers": f"127.0.0.1:{port}"},
        "sqs": {"type": "sqs", "endpoint_url": f"http://127.0.0.1:{port}"},
        "gcp_pubsub": {"type": "gcp_pubsub", "gcp_project_id": "outages",
                       "gcp_emulator_host": f"127.0.0.1:{port}"},
        "azure_eventhubs": {"type": "azure_eventhubs", "azure_eventhubs_name": "hub",
                            "azure_eventhubs_connection_string":
                                f"Endpoint=sb://127.0.0.1:{port};SharedAccessKeyName=k;"
                                "SharedAccessKey=c2VjcmV0;UseDevelopmentEmulator=true"},
        "mqtt": {"type": "mqtt", "mqtt_broker_host": "127.0.0.1", "mqtt_broker_port": port},
    }[name] | {"_port": port}


@dataclass
class Line:
    level: str
    logger: str
    message: str


def lines(gw: GatewayProcess, since: int = 0) -> list[Line]:
    out = []
    for text in gw.log().splitlines()[since:]:
        match = LOG_LINE.match(text)
        if match:
            out.append(Line(match["level"], match["logger"], match["message"]))
    return out


def warnings_and_errors(gw: GatewayProcess, since: int) -> list[Line]:
    return [ln for ln in lines(gw, since) if ln.level in ("WARNING", "ERROR", "CRITICAL")]


def stop_timed(gw: GatewayProcess) -> float:
    started = time.monotonic()
    assert gw.stop(timeout=30) == 0
    return time.monotonic() - started


@pytest.fixture
def mosquitto_ingress(tmp_path: Path) -> Iterator[ServerProcess]:
    server = mosquitto_server(tmp_path / "ingress")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_an_outage_is_two_lines_and_stopping_during_one_takes_a_second(
        tmp_path: Path, mosquitto_ingress: ServerProcess, backend: Backend) -> None:
    root = f"out/{uuid.uuid4().hex[:8]}"
    queue = {**backend.queue, "request_queue_name": f"q-{uuid.uuid4().hex[:8]}"}
    gw = GatewayProcess(gateway_config(tmp_path, mosquitto_ingress.port, root, queue), tmp_path,
                        env=backend.env)
    gw.start()
    pub = Publisher(mosquitto_ingress.port)
    sent = 0

    def publish(n: int, spread: float = 0.0) -> None:
        nonlocal sent
        for _ in range(n):
            pub.publish(f"{root}/dev{sent % 3}/t", b'{"n": %d}' % sent)
            sent += 1
            time.sleep(spread / n)
        pub.wait_all_acked(sent)

    def delivered() -> int:
        return int(gw.status()["uplinks"]["default"]["delivered_total"])

    def said(fragment: str, since: int) -> bool:
        return any(fragment in ln.message for ln in lines(gw, since))

    try:
        publish(20)
        wait_until(lambda: delivered() == 20, 30, "the first messages delivered")
        mark = len(gw.log().splitlines())
        backend.take_away()
        publish(30, spread=3.0)  # the gateway keeps taking messages meanwhile
        wait_until(lambda: said(f"uplink {backend.name} unavailable", mark), 20, "the outage noted")
        backend.bring_back()
        wait_until(lambda: delivered() == 50, 60, "the catch-up")
        wait_until(lambda: said(f"uplink {backend.name} back after", mark), 10, "'back' logged")
        said_then = warnings_and_errors(gw, mark)
        assert [ln.logger for ln in said_then] == ["gateway.forwarder"] * 2, said_then
        assert said_then[0].message.startswith(f"uplink {backend.name} unavailable")
        assert said_then[1].message.startswith(f"uplink {backend.name} back after")
        library = [ln for ln in lines(gw, mark) if not ln.logger.startswith("gateway.")
                   or ln.logger.endswith((".librdkafka", ".paho"))]
        assert library == [], library

        mark = len(gw.log().splitlines())
        backend.take_away()
        publish(10)
        wait_until(lambda: said(f"uplink {backend.name} unavailable", mark), 20, "outage 2")
        took = stop_timed(gw)
        assert took < STOP_BUDGET, f"SIGTERM took {took:.1f}s with the server gone"
    finally:
        pub.close()
        gw.stop()
    uplink = gw.status()["uplinks"]["default"]
    assert uplink["depth"] + uplink["delivered_total"] == sent  # delivered, or in the store
    assert (uplink["dead_letter"], uplink["in_flight"] or 0) == (0, 0)


@pytest.mark.parametrize("name", BACKENDS)
def test_a_wrong_address_is_named_within_seconds(tmp_path: Path, mosquitto_ingress: ServerProcess,
                                                 name: str) -> None:
    queue = dead_address(name)
    port = queue.pop("_port")
    env = {}
    if name == "sqs":
        from tests.sqs_servers import DUMMY_AWS_ENV

        env = dict(DUMMY_AWS_ENV)
    gw = GatewayProcess(gateway_config(tmp_path, mosquitto_ingress.port, "wrong", queue,
                                       forwarder={"publish_timeout": "30s"}), tmp_path, env=env)
    gw.start()
    started = time.monotonic()
    try:
        wait_until(lambda: any(str(port) in ln.message for ln in warnings_and_errors(gw, 0)), 8,
                   "a warning naming the address")
        named_after = time.monotonic() - started
        took = stop_timed(gw)
    finally:
        gw.stop()
    (warning,) = warnings_and_errors(gw, 0)
    assert warning.level == "WARNING" and warning.message.startswith(f"uplink {name} "), warning
    assert named_after < 7.0 and took < STOP_BUDGET, (named_after, took)
