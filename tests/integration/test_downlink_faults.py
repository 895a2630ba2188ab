"""Downlink faults behind the real daemon, with Redis Streams as the backend and the real
mosquitto as the local broker:

- the local broker down for 30 s, then back: every command published meanwhile reaches its
  device, in order, nothing lost; a command whose expiry passed during the outage is dropped
  and counted, never delivered late; one with time left carries its remaining lifetime as the
  MQTT 5 message expiry; the outage is one WARNING when it starts and one when it ends; the
  status page's downlink card says so while it lasts (headless Chromium);
- kill -9 of the daemon in the middle of 1,000 commands: after the restart every command
  reaches its device, in order; the duplicates the device sees are few (at most the batch
  the backend had handed out) and each one was counted by the gateway as a redelivery;
- a command the broker refuses (an ACL: PUBACK 0x87) is retried, then lands in the backend's
  dead-letter stream with the reason, while the next command goes through.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.chromium import dump_dom, parse_dom
from tests.gateway_process import GatewayProcess, gateway_config
from tests.integration.downlink_clouds import Cloud, Command, Device, cloud_for, now_plus
from tests.integration.test_downlink import downlink, start, wait, wait_depth
from tests.servers import ServerProcess, mosquitto_server, require_binary

pytestmark = pytest.mark.integration

OUTAGE = 30.0
DEVICES = ("d0", "d1", "d2")


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[ServerProcess]:
    """The local broker, with persistence that works as root too (tests/servers.py keeps it the
    test's user): a device's persistent session must survive the broker's restart, or commands
    published before the device reconnects find no subscriber."""
    server = mosquitto_server(tmp_path / "mosquitto")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def cloud(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Cloud]:
    async for made in cloud_for("redis", uuid.uuid4().hex[:8], tmp_path, request):
        yield made


def in_order(commands: list[dict[str, Any]]) -> dict[str, list[int]]:
    """Per device, the numbers in the order they first arrived (repeats left out)."""
    seen: dict[str, list[int]] = defaultdict(list)
    for c in commands:
        if c["n"] not in seen[c["device"]]:
            seen[c["device"]].append(c["n"])
    return dict(seen)


async def test_local_broker_down_for_30s_loses_nothing_and_delivers_nothing_late(
        tmp_path: Path, mosquitto: ServerProcess, cloud: Cloud) -> None:
    browser = require_binary("chromium", "apt-get install chromium")
    device = Device(mosquitto.port, f"dl/{cloud.tag}/#")
    gw = start(tmp_path, mosquitto.port, cloud)
    try:
        await cloud.send([Command(d, n) for n in range(3) for d in DEVICES])
        device.wait_for(9)
        mosquitto.stop()
        down_at = time.monotonic()
        during = [Command(d, n) for n in range(3, 20) for d in DEVICES]
        doomed = Command("d1", 100, extra={"expires_at": now_plus(5)})
        lasting = Command("d2", 101, extra={"expires_at": now_plus(120)})
        await cloud.send([*during[:20], doomed, *during[20:], lasting])
        await wait(lambda: downlink(gw)["state"] == "local_broker_down", 15, "the outage seen")
        card = parse_dom(dump_dom(browser, tmp_path / "profile", f"{gw.http_url()}/")).text
        assert card["updated"].startswith("live, updated ")  # the page's script ran
        assert card["d0-state"] == "local broker unreachable"
        assert card["d0-delivered"] == "9" and card["d0-received"] in {"9", "10"}
        assert card["d0-source"] == f"redis {cloud.source}"
        await asyncio.sleep(max(0.0, OUTAGE - (time.monotonic() - down_at)))
        assert len(device.received) == 9  # nothing could go while the broker was away
        mosquitto.start()
        device.wait_for(9 + len(during) + 1, timeout=60)
        await wait_depth(cloud, 0)
        stats = downlink(gw)
        assert gw.stop() == 0
    finally:
        device.close()
        gw.stop()
    got = device.commands()
    assert {"device": "d1", "n": 100} not in got  # expired during the outage: never delivered
    assert len(got) == 9 + len(during) + 1  # the rest: each exactly once
    order = in_order(got)
    assert order["d0"] == order["d1"] == list(range(20))
    assert order["d2"] == [*range(20), 101]
    _, _, props = device.snapshot()[-1]
    assert 80 <= props.MessageExpiryInterval <= 120  # the remaining lifetime, in seconds
    assert (stats["expired"], stats["delivered"], stats["dead_lettered"]) == (1, 61, 0)
    lines = [ln for ln in gw.log().splitlines() if "gateway.downlink" in ln and "WARNING" in ln]
    assert len(lines) == 2, lines
    assert "cannot reach the local broker" in lines[0] and "back after 3" in lines[1], lines


async def test_kill_9_mid_downlink_loses_nothing_and_counts_the_duplicates(
        tmp_path: Path, mosquitto: ServerProcess, cloud: Cloud) -> None:
    device = Device(mosquitto.port, f"dl/{cloud.tag}/#")
    total = 1000
    gw = start(tmp_path, mosquitto.port, cloud)
    restarted: GatewayProcess | None = None
    try:
        sending = asyncio.create_task(cloud.send(
            [Command(DEVICES[n % 3], n // 3) for n in range(total)]))
        await wait(lambda: len(device.received) >= 300, 30, "300 commands delivered")
        gw.kill()  # mid-downlink: the backend has handed out a batch, some of it delivered
        killed_at = len(device.received)
        await sending
        restarted = start(tmp_path, mosquitto.port, cloud)
        await wait(lambda: len({body for _, body, _ in device.snapshot()}) >= total, 60,
                   "every command after the restart")
        await wait_depth(cloud, 0)  # every command acknowledged, so counted as delivered
        stats = downlink(restarted)
        assert restarted.stop() == 0
    finally:
        device.close()
        gw.stop()
        if restarted is not None:
            restarted.stop()
    got = device.commands()
    duplicates = len(got) - total
    order = in_order(got)
    assert order == {d: list(range(len(order[d]))) for d in DEVICES}
    assert sum(len(v) for v in order.values()) == total  # nothing lost
    # What the device saw twice was handed out before the crash and not yet acknowledged:
    # at most one fetch (downlink.batch_size), and the gateway counted each as a redelivery.
    assert 0 <= duplicates <= 10, duplicates
    assert stats["redelivered"] >= duplicates, (stats, duplicates)
    # everything the restarted daemon took, it delivered (the device's count at the kill
    # lags the broker's, so it bounds nothing)
    assert stats["received"] == stats["delivered"] > 0, stats
    print(f"kill -9 after {killed_at} of {total} commands: {duplicates} duplicates, "
          f"{stats['redelivered']} counted as redelivered")


async def test_a_command_the_broker_refuses_ends_in_the_dead_letter_stream_with_the_reason(
        tmp_path: Path, cloud: Cloud) -> None:
    # mosquitto with an ACL: the gateway may publish commands to device d0 only; d9's are
    # refused (PUBACK 0x87). max_attempts 2: one retry, then the backend's dead-letter stream.
    broker = acl_broker(tmp_path / "local-broker", cloud.tag)
    broker.start()
    cloud.queue["downlink"] |= {"max_attempts": 2}
    gateway_config(tmp_path, broker.port, f"gw/{cloud.tag}", cloud.queue,
                   ingress={"username": "gw", "password": "pw"})
    device = Device(broker.port, f"dl/{cloud.tag}/#")
    gw = start(tmp_path, broker.port, cloud)
    try:
        refused, fine = Command("d9", 1), Command("d0", 2)
        await cloud.send([refused, fine])
        device.wait_for(1)
        await wait(lambda: downlink(gw)["dead_lettered"] == 1, 20, "the dead letter")
        await wait_depth(cloud, 0)
        stats = downlink(gw)
        assert gw.stop() == 0
        dead = await dead_letters(cloud, "openhqm-dlq")
    finally:
        device.close()
        gw.stop()
        broker.stop()
    assert device.commands() == [{"device": "d0", "n": 2}]  # the other one never got through
    assert (stats["retried"], stats["dead_lettered"], stats["delivered"]) == (1, 1, 1)
    assert dead == [(refused.message_id, "gave up after 2 attempts: the local broker refused "
                                         "it: not authorized (0x87)")]
    assert "WARNING gateway.downlink: downlink: command " in gw.log().replace("  ", " ")


def acl_broker(workdir: Path, tag: str) -> ServerProcess:
    """mosquitto where anyone may read dl/#, and the user gw may use gw/# and publish to
    dl/<tag>/d0/cmd only."""
    passwd = require_binary("mosquitto_passwd", "apt-get install mosquitto")
    workdir.mkdir()
    (workdir / "passwords").write_text("")
    subprocess.run([passwd, "-b", str(workdir / "passwords"), "gw", "pw"], check=True,
                   timeout=30, capture_output=True)
    (workdir / "acl").write_text(f"topic read dl/#\n\nuser gw\ntopic readwrite gw/#\n"
                                 f"topic write dl/{tag}/d0/cmd\n")
    for name in ("passwords", "acl"):
        (workdir / name).chmod(0o644)
    # mosquitto_server keeps the test's user: the user mosquitto could not read these files
    return mosquitto_server(workdir, extra_conf=f"password_file {workdir / 'passwords'}\n"
                                                f"acl_file {workdir / 'acl'}\n")


async def dead_letters(cloud: Cloud, stream: str) -> list[tuple[str, str]]:
    from redis.asyncio import Redis

    client = Redis.from_url(cloud.queue["redis_url"])
    try:
        entries = await client.xrange(stream)
    finally:
        await client.aclose()
    return [(f[b"id"].decode(), f[b"reason"].decode()) for _, f in entries]
