"""The downlink's decisions, against an in-memory backend and a scriptable broker
(tests/fake_broker.py): acknowledged only after the PUBACK, refusals retried then
dead-lettered, expiry, a broker outage held out, a lost PUBACK republished, stopping leaves
the command in hand unsettled. Real backends and mosquitto: tests/integration/test_downlink*.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from gateway.config import Config, parse_config
from gateway.downlink.downlink import Downlink
from gateway.errors import NotSupportedError
from gateway.message import Body, QueueMessage, new_message_id
from gateway.queue.interface import Handler, MessageQueueInterface
from tests.fake_broker import FakeBroker


@dataclass
class Event:
    what: str  # "ack", "requeue", "dead"
    message_id: str
    reason: str = ""
    at: float = 0.0


@dataclass
class MemoryQueue(MessageQueueInterface):
    """A backend double: a list of commands, handed out one at a time in order, settled by
    acknowledge/reject; every settlement is recorded with its loop time."""

    backlog: list[QueueMessage] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    in_flight: dict[str, QueueMessage] = field(default_factory=dict)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    backend_name = "memory"

    def add(self, body: bytes, **attributes: str) -> QueueMessage:
        msg = QueueMessage(new_message_id(), body, dict(attributes), time.time())
        self.backlog.append(msg)
        self.arrived.set()
        return msg

    async def connect(self) -> None:
        return None

    async def disconnect(self) -> None:
        self.backlog[:0] = list(self.in_flight.values())  # redelivered after a reconnect
        self.in_flight.clear()

    async def consume(self, queue_name: str, handler: Handler, batch_size: int = 10,
                      wait_time_seconds: float = 1.0) -> None:
        while True:
            if not self.backlog:
                self.arrived.clear()
                await self.arrived.wait()
                continue
            msg = self.backlog.pop(0)
            self.in_flight[msg.id] = msg
            await handler(msg)

    def _record(self, what: str, message_id: str, reason: str = "") -> bool:
        msg = self.in_flight.pop(message_id, None)
        if msg is None:
            return False
        self.events.append(Event(what, message_id, reason, asyncio.get_running_loop().time()))
        if what == "requeue":
            msg.retry_count += 1
            self.backlog.append(msg)
            self.arrived.set()
        return True

    async def acknowledge(self, message_id: str) -> bool:
        return self._record("ack", message_id)

    async def reject(self, message_id: str, requeue: bool = True, reason: str = "") -> bool:
        return self._record("requeue" if requeue else "dead", message_id, reason)

    async def publish(self, queue_name: str, message: Body, priority: int = 0,
                      attributes: dict[str, str] | None = None, delay_seconds: float = 0, *,
                      message_id: str | None = None) -> str:
        raise NotSupportedError("memory", "publish", "commands are added with add()")

    async def get_queue_depth(self, queue_name: str) -> int:
        return len(self.backlog) + len(self.in_flight)

    async def health_check(self) -> bool:
        return True

    async def create_queue(self, queue_name: str, **kwargs: Any) -> bool:
        return False

    async def delete_queue(self, queue_name: str) -> bool:
        return False

    async def purge_queue(self, queue_name: str) -> int:
        return 0

    def what(self) -> list[tuple[str, str]]:
        return [(e.what, e.message_id) for e in self.events]


def config(port: int, **downlink: Any) -> Config:
    return parse_config({
        "gateway": {"id": "gw"},
        "ingress": {"port": port, "subscriptions": [{"topic": "sensors/#"}],
                    "reconnect_min_delay": "50ms", "reconnect_max_delay": "100ms"},
        "queue": {"type": "redis", "downlink": {
            "enabled": True, "topic_template": "devices/{device}/cmd", "retry_delay": "10ms",
            "retry_max_delay": "20ms", "max_attempts": 3, **downlink}}}, "test")


@pytest.fixture
async def broker() -> AsyncIterator[FakeBroker]:
    fake = await FakeBroker().start()
    try:
        yield fake
    finally:
        await fake.stop()


class Running:
    def __init__(self, cfg: Config, queue: MemoryQueue) -> None:
        self.downlink = Downlink(cfg, queue)
        self.queue = queue
        self.task = asyncio.create_task(self.downlink.run())

    async def stop(self) -> None:
        self.downlink.stop()
        await asyncio.wait_for(self.task, 5)


async def until(check: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


async def test_acknowledged_only_after_the_puback_and_in_order(broker: FakeBroker) -> None:
    queue = MemoryQueue()
    run = Running(config(broker.port), queue)
    try:
        broker.hold()
        first = queue.add(b"reboot", device="d1", correlation_id="req-1",
                          response_topic="replies/d1", color="red")
        await until(lambda: len(broker.received) == 1)
        await asyncio.sleep(0.2)
        assert queue.events == []  # the broker has it, the PUBACK has not come: not acked
        broker.release()
        await until(lambda: queue.what() == [("ack", first.id)])
        assert queue.events[0].at >= broker.acks_sent[0][0]
        later = [queue.add(b"%d" % n, device=f"d{n % 2}") for n in range(20)]
        await until(lambda: len(queue.events) == 21)
    finally:
        await run.stop()
    assert queue.what()[1:] == [("ack", m.id) for m in later]
    assert [r.publish.payload for r in broker.received] == [b"reboot"] + [m.body for m in later]
    pub = broker.received[0].publish
    assert (pub.topic, pub.qos, pub.retain) == ("devices/d1/cmd", 1, False)
    assert broker.received[0].client_id == "openhqm-gateway-gw-downlink"
    props = pub.properties
    assert props is not None
    assert props.correlation_data == b"req-1" and props.response_topic == "replies/d1"
    assert props.message_expiry_interval is None
    assert dict(props.user_properties) == {"openhqm_message_id": first.id, "device": "d1",
                                           "color": "red"}
    stats = run.downlink.stats
    assert (stats.received, stats.delivered, stats.dead_lettered) == (21, 21, 0)


async def test_a_refusal_is_retried_then_dead_lettered_with_the_reason(broker: FakeBroker) -> None:
    broker.reason_for = lambda topic: 0x87 if topic == "devices/locked/cmd" else 0
    queue = MemoryQueue()
    run = Running(config(broker.port), queue)
    try:
        bad = queue.add(b"x", device="locked")
        await until(lambda: any(e.what == "dead" for e in queue.events))
        good = queue.add(b"y", device="open")
        await until(lambda: ("ack", good.id) in queue.what())
    finally:
        await run.stop()
    assert queue.what()[:3] == [("requeue", bad.id), ("requeue", bad.id), ("dead", bad.id)]
    assert queue.events[2].reason == ("gave up after 3 attempts: the local broker refused it: "
                                      "not authorized (0x87)")
    stats = run.downlink.stats
    assert (stats.retried, stats.dead_lettered, stats.delivered) == (2, 1, 1)


async def test_an_invalid_topic_refusal_and_an_unroutable_command_go_to_the_dlq_at_once(
        broker: FakeBroker) -> None:
    broker.reason_for = lambda topic: 0x90
    queue = MemoryQueue()
    run = Running(config(broker.port), queue)
    try:
        refused = queue.add(b"x", device="d1")
        no_device = queue.add(b"y", other="z")
        slashed = queue.add(b"z", device="a/b")
        await until(lambda: len(queue.events) == 3)
    finally:
        await run.stop()
    assert [(e.what, e.message_id) for e in queue.events] == [
        ("dead", refused.id), ("dead", no_device.id), ("dead", slashed.id)]
    assert "topic name invalid (0x90)" in queue.events[0].reason
    assert "attribute 'device'" in queue.events[1].reason
    assert "may not contain /" in queue.events[2].reason
    assert len(broker.received) == 1  # the unroutable ones never reached the broker


async def test_expired_commands_are_dropped_and_the_rest_carry_their_remaining_lifetime(
        broker: FakeBroker) -> None:
    queue = MemoryQueue()
    run = Running(config(broker.port), queue)
    try:
        old = queue.add(b"late", device="d1", expires_at=str(time.time() - 1))
        soon = queue.add(b"soon", device="d1", expires_at=str(time.time() + 0.5))
        fresh = queue.add(b"fresh", device="d1", expires_at=str(time.time() + 30.9))
        await until(lambda: len(queue.events) == 3)
    finally:
        await run.stop()
    assert queue.what() == [("ack", old.id), ("ack", soon.id), ("ack", fresh.id)]
    assert [r.publish.payload for r in broker.received] == [b"fresh"]
    props = broker.received[0].publish.properties
    assert props is not None and props.message_expiry_interval in (29, 30)
    assert "expires_at" not in dict(props.user_properties)
    assert (run.downlink.stats.expired, run.downlink.stats.delivered) == (2, 1)


async def test_a_broker_outage_holds_the_command_and_expiry_still_applies(
        broker: FakeBroker) -> None:
    queue = MemoryQueue()
    port = broker.port
    await broker.stop()
    run = Running(config(port), queue)
    try:
        doomed = queue.add(b"doomed", device="d1", expires_at=str(time.time() + 1.5))
        await until(lambda: queue.events != [], timeout=5)
        assert queue.what() == [("ack", doomed.id)]  # expired while waiting: dropped
        assert run.downlink.snapshot().state == "local_broker_down"
        held = queue.add(b"held", device="d1")
        await asyncio.sleep(0.5)
        assert queue.in_flight == {held.id: held}  # taken, not settled, nothing else taken
        restarted = await FakeBroker(port=port).start()
        try:
            await until(lambda: ("ack", held.id) in queue.what())
            assert [r.publish.payload for r in restarted.received] == [b"held"]
            assert run.downlink.snapshot().state == "online"
        finally:
            await run.stop()
            await restarted.stop()
    finally:
        if not run.task.done():
            await run.stop()
    assert run.downlink.stats.expired == 1 and run.downlink.stats.delivered == 1


async def test_a_connection_lost_before_the_puback_publishes_again(broker: FakeBroker) -> None:
    drops = {"n": 1}

    def drop_once(topic: str) -> bool:
        drops["n"] -= 1
        return drops["n"] >= 0

    broker.drop_on = drop_once
    queue = MemoryQueue()
    run = Running(config(broker.port), queue)
    try:
        msg = queue.add(b"again", device="d1")
        await until(lambda: queue.what() == [("ack", msg.id)])
    finally:
        await run.stop()
    assert [r.publish.payload for r in broker.received] == [b"again", b"again"]
    assert run.downlink.stats.republished == 1 and broker.connects == 2


async def test_stopping_leaves_a_waiting_command_unsettled(broker: FakeBroker) -> None:
    queue = MemoryQueue()
    broker.hold()
    run = Running(config(broker.port), queue)
    msg = queue.add(b"x", device="d1")
    await until(lambda: len(broker.received) == 1)
    started = time.monotonic()
    await run.stop()
    assert time.monotonic() - started < 3.0
    assert queue.events == []  # no PUBACK came: the backend delivers it again
    await queue.disconnect()
    assert [m.id for m in queue.backlog] == [msg.id]


def test_several_uplinks_each_have_their_downlink_with_their_own_client_ids() -> None:
    """Under uplinks:, each uplink's downlink is its own task with its own keys in errors and
    client ids that differ (two clients with one id throw each other off a broker)."""
    from gateway.config import validate
    from gateway.errors import ConfigError
    from gateway.service import Gateway

    def uplink(n: int, **downlink: Any) -> dict[str, Any]:
        return {"type": "mqtt", "mqtt_broker_host": "127.0.0.1", "mqtt_broker_port": 1,
                "request_queue_name": f"up-{n}", "response_queue_name": f"cmd-{n}",
                "downlink": {"enabled": True, "topic_template": "devices/{device}/cmd",
                             **downlink}}

    raw = {"ingress": {"subscriptions": [{"topic": "sensors/#", "qos": 1}]},
           "uplinks": {"alarms": uplink(1), "telemetry": uplink(2)}}
    cfg = parse_config(raw, "<test>")
    validate(cfg)
    gw = Gateway(cfg)
    assert set(gw.downlinks) == {"alarms", "telemetry"}
    ids = {d.publisher.client_id for d in gw.downlinks.values()}
    ids |= {d.backend.client_id for d in gw.downlinks.values()}
    ids |= {b.client_id for b in gw.uplinks.values()}
    assert len(ids) == 6, ids
    with pytest.raises(ConfigError) as caught:
        validate(parse_config({**raw, "uplinks": {"alarms": uplink(1, max_attempts=0)}},
                              "<test>"))
    assert "uplinks.alarms.downlink.max_attempts" in str(caught.value)


def test_an_uplinks_downlink_is_reached_from_the_environment() -> None:
    from gateway.config import load_config

    cfg = load_config(None, {
        "OPENHQM_UPLINKS__A__TYPE": "redis", "OPENHQM_UPLINKS__A__RESPONSE_QUEUE_NAME": "cmds",
        "OPENHQM_UPLINKS__A__DOWNLINK__ENABLED": "true",
        "OPENHQM_UPLINKS__A__DOWNLINK__TOPIC_TEMPLATE": "devices/{device}/cmd",
        "OPENHQM_INGRESS__SUBSCRIPTIONS": '[{"topic": "sensors/#", "qos": 1}]'})
    (a,) = cfg.uplinks
    assert (a.name, a.queue.downlink.enabled, a.queue.downlink.topic_template) == (
        "a", True, "devices/{device}/cmd")
