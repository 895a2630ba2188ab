"""The downlink behind the real daemon, against every backend's real server or fake
(tests/integration/downlink_clouds.py): redis, kafka, SQS on moto and on ElasticMQ, Pub/Sub on
pstest, the Event Hubs test server, a cloud mosquitto, the example file plugin.

For each backend:

1. **Acknowledged only after the local PUBACK.** The daemon reaches the local mosquitto through
   a proxy that holds the broker's replies: the command reaches the broker (the device gets
   it) but its PUBACK waits. For a second the gateway reports it received and not delivered,
   and the backend still holds it unacknowledged (its depth; Pub/Sub and MQTT cannot tell a
   depth, so there the daemon is killed with -9 while the PUBACK waits and the restarted
   daemon gets the command again from the backend). Once the PUBACK flows the backend's depth
   drops to 0.
2. **In order per key.** 45 commands for 3 devices (the key: the device) arrive on each
   device's local topic, each once, in the order they were published for that device; the
   gateway counts 45 more received and delivered, nothing expired or dead-lettered.
3. **Request/response** (redis, kafka, mqtt): a command with a correlation id and a response
   topic reaches the device with MQTT 5 correlation data and response topic; the device's
   reply comes back up through the ingress and reaches the backend with the same
   ``correlation_id`` attribute.
"""

from __future__ import annotations

import asyncio
import time
import urllib.request
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.faultproxy import FaultProxy
from tests.gateway_process import GatewayProcess, gateway_config
from tests.integration.downlink_clouds import (
    BACKENDS,
    Cloud,
    Command,
    Device,
    cloud_for,
    user_properties,
)
from tests.servers import ServerProcess, wait_until

pytestmark = pytest.mark.integration

DEVICES = ("d0", "d1", "d2")
#: the commands each device gets in the ordering phase
PER_DEVICE = 15


@pytest.fixture
def tag() -> str:
    return uuid.uuid4().hex[:8]


@pytest.fixture
async def cloud(request: pytest.FixtureRequest, tag: str, tmp_path: Path) -> AsyncIterator[Cloud]:
    async for made in cloud_for(request.param, tag, tmp_path, request):
        yield made


@pytest.fixture
def proxy(mosquitto: ServerProcess) -> Iterator[FaultProxy]:
    with FaultProxy(mosquitto.port, lifetime=600) as fault:
        yield fault


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as resp:
        body: bytes = resp.read()
    return body


def status(gw: GatewayProcess) -> dict[str, Any]:
    data: dict[str, Any] = orjson.loads(fetch(f"{gw.http_url()}/status.json"))
    return data


def downlink(gw: GatewayProcess) -> dict[str, Any]:
    (stats,) = status(gw)["snapshot"]["downlinks"]
    return dict(stats)


async def wait(check: Any, timeout: float, what: str) -> None:
    await asyncio.to_thread(wait_until, check, timeout, what)


async def wait_depth(cloud: Cloud, expected: int, timeout: float = 20.0) -> None:
    assert cloud.depth is not None
    deadline = time.monotonic() + timeout
    while (depth := await cloud.depth()) != expected:
        if time.monotonic() > deadline:
            raise AssertionError(f"{cloud.name}: depth {depth}, expected {expected}")
        await asyncio.sleep(0.2)


def start(tmp_path: Path, port: int, cloud: Cloud) -> GatewayProcess:
    """The daemon; a restart keeps its config (its gateway id names its consumers)."""
    config = tmp_path / "gateway.yaml"
    if not config.exists():
        gateway_config(tmp_path, port, f"gw/{cloud.tag}", cloud.queue)
    gw = GatewayProcess(config, tmp_path, env=cloud.env)
    gw.start()
    return gw


@pytest.mark.parametrize("cloud", BACKENDS, indirect=True)
async def test_commands_arrive_in_order_and_are_acknowledged_after_the_puback(
        tmp_path: Path, mosquitto: ServerProcess, proxy: FaultProxy, cloud: Cloud) -> None:
    device = Device(mosquitto.port, f"dl/{cloud.tag}/#")
    gw = start(tmp_path, proxy.port, cloud)
    try:
        gw = await _ack_after_puback(tmp_path, gw, cloud, device, proxy)
        await _in_order_per_key(gw, cloud, device)
        if cloud.uplinked is not None:
            await _reply_correlated(gw, cloud, device)
        assert "ERROR" not in gw.log(), gw.log()
        assert gw.stop() == 0
    finally:
        device.close()
        gw.stop()


async def _ack_after_puback(tmp_path: Path, gw: GatewayProcess, cloud: Cloud, device: Device,
                            proxy: FaultProxy) -> GatewayProcess:
    """The daemon that runs afterwards (a restarted one for a backend without a depth)."""
    first = Command("d0", -1)
    proxy.set_mode("hold_replies")
    await cloud.send([first])
    await wait(lambda: len(device.received) == 1, 30, "the first command at the device")
    await asyncio.sleep(1.0)
    stats = downlink(gw)
    assert (stats["received"], stats["delivered"]) == (1, 0), stats
    if cloud.depth is not None:
        assert await cloud.depth() == 1  # the backend still holds it: not acknowledged
        proxy.set_mode("up")
        await wait(lambda: downlink(gw)["delivered"] == 1, 20, "the PUBACK, then the ack")
        await wait_depth(cloud, 0)
        return gw
    # No depth to read (Pub/Sub, MQTT): crash while the PUBACK waits; the backend must hand
    # the command to the restarted daemon, so it had not been acknowledged.
    gw.kill()
    proxy.set_mode("up")
    restarted = start(tmp_path, proxy.port, cloud)
    await wait(lambda: len(device.received) == 2, 20 + cloud.redelivery_after,
               "the command again, from the backend")
    again = device.snapshot()
    assert again[0][1] == again[1][1] == first.body
    assert user_properties(again[1][2])["openhqm_message_id"] == first.message_id
    await wait(lambda: downlink(restarted)["delivered"] == 1, 20, "delivered after the restart")
    return restarted


async def _in_order_per_key(gw: GatewayProcess, cloud: Cloud, device: Device) -> None:
    before = len(device.received)
    base = downlink(gw)
    commands = [Command(d, n) for n in range(PER_DEVICE) for d in DEVICES]
    await cloud.send(commands)
    await wait(lambda: len(device.received) >= before + len(commands), 60, "every command")
    await asyncio.sleep(0.3)  # nothing more (no duplicate) arrives
    got = device.snapshot()[before:]
    assert len(got) == len(commands)
    seen: dict[str, list[int]] = defaultdict(list)
    for topic, body, props in got:
        data = orjson.loads(body)
        assert topic == f"dl/{cloud.tag}/{data['device']}/cmd"
        assert user_properties(props)["device"] == data["device"]
        seen[data["device"]].append(data["n"])
    assert seen == {d: list(range(PER_DEVICE)) for d in DEVICES}  # each once, in order
    await wait(lambda: downlink(gw)["delivered"] == base["delivered"] + len(commands), 20,
               "every command acknowledged")
    stats = downlink(gw)
    assert stats["received"] - base["received"] == len(commands)
    assert (stats["expired"], stats["dead_lettered"], stats["settle_failures"]) == (0, 0, 0)
    assert stats["state"] == "online"
    if cloud.depth is not None:
        await wait_depth(cloud, 0)
    metrics = fetch(f"{gw.http_url()}/metrics").decode()
    assert f'openhqm_gateway_downlink_delivered_total{{uplink="default"}} {stats["delivered"]}' \
        in metrics
    assert 'openhqm_gateway_downlink_state{uplink="default",state="online"} 1' in metrics


async def _reply_correlated(gw: GatewayProcess, cloud: Cloud, device: Device) -> None:
    assert cloud.uplinked is not None
    before = len(device.received)
    correlation = f"req-{uuid.uuid4().hex[:6]}".encode()
    reply_topic = f"gw/{cloud.tag}/reply/d1"
    await cloud.send([Command("d1", 99, response_topic=reply_topic, correlation=correlation)])
    await wait(lambda: len(device.received) > before, 20, "the request at the device")
    _, body, props = device.snapshot()[before]
    assert orjson.loads(body)["n"] == 99
    assert props.CorrelationData == correlation and props.ResponseTopic == reply_topic
    device.reply(props.ResponseTopic, b'{"ok": true}', props.CorrelationData)

    async def replies() -> list[dict[str, str]]:
        return [a for a in await cloud.uplinked() if a.get("mqtt_topic") == reply_topic]

    deadline = time.monotonic() + 20
    while not (found := await replies()):
        assert time.monotonic() < deadline, "the reply never reached the backend"
        await asyncio.sleep(0.3)
    assert found[0]["correlation_id"] == correlation.decode()
