"""The Pub/Sub uplink against Google's own Pub/Sub fake (pstest, cloud.google.com/go/pubsub/v2).

What the contract suite does not show: messages as a Pub/Sub subscriber sees them
(attributes, ordering keys), per-key order through an ordered subscription, a failed
publish pausing its ordering key and the key resuming, a message over the service's size
limit refused while the rest flow (also through the forwarder, which dead-letters it), the
service's own dead-letter policy, depth and purge refused honestly, and an outage of the
fake in the middle of a forwarder drain with nothing lost.

Every test uses a project id of its own, so tests on the shared fake never meet.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from gateway.config import Config, ForwarderConfig, QueueConfig, StoreConfig, load_config
from gateway.errors import MessageRejected, NotSupportedError, RetryableError, UplinkUnavailable
from gateway.forwarder import UPLINK_QUEUE, Forwarder
from gateway.message import ATTR_MESSAGE_ID, ATTR_MQTT_TOPIC, QueueMessage, new_message_id
from gateway.queue.registry import create_backend
from gateway.store.records import NewMessage
from gateway.store.store import Store
from gateway.uplinks.pubsub.settings import MAX_REQUEST_BYTES, PubSubSettings
from gateway.uplinks.pubsub.uplink import (
    ATTR_DLQ_REASON,
    ATTR_DLQ_SOURCE,
    PubSubQueue,
)
from tests.pubsub_server import FakeAdmin, PubSubFake, pubsub_fake

pytestmark = pytest.mark.integration


def settings_for(**overrides: Any) -> PubSubSettings:
    base = PubSubSettings(gcp_project_id=f"it-{uuid.uuid4().hex[:8]}", gcp_publish_timeout=5.0,
                          gcp_request_timeout=5.0, gcp_batch_max_latency=0.005)
    return replace(base, **overrides)


@pytest.fixture
def settings(pubsub_emulator: PubSubFake) -> PubSubSettings:
    return settings_for()


@pytest.fixture
async def uplink(settings: PubSubSettings) -> AsyncIterator[PubSubQueue]:
    async with PubSubQueue(settings, dlq_name=f"dlq-{uuid.uuid4().hex[:8]}") as queue:
        yield queue


@pytest.fixture
async def admin(pubsub_emulator: PubSubFake, settings: PubSubSettings) -> AsyncIterator[FakeAdmin]:
    view = FakeAdmin(pubsub_emulator.host, settings.gcp_project_id)
    yield view
    view.close()


@pytest.fixture
def topic() -> str:
    return f"it-{uuid.uuid4().hex[:12]}"


def sensor(device: str, n: int, **extra: str) -> QueueMessage:
    msg = QueueMessage(new_message_id(), f'{{"device":"{device}","n":{n}}}'.encode(),
                       {ATTR_MQTT_TOPIC: f"sensors/{device}/temp", **extra})
    msg.attributes[ATTR_MESSAGE_ID] = msg.id
    return msg


def number(body: bytes) -> int:
    return int(body.split(b'"n":')[1].rstrip(b"}"))


async def pull(admin: FakeAdmin, subscription: str, at_least: int = 1, **kw: Any) -> list[Any]:
    return await asyncio.to_thread(admin.pull, subscription, at_least=at_least, **kw)


# -- publishing ---------------------------------------------------------------------------

async def test_messages_carry_id_topic_attributes_and_the_ordering_key(
        uplink: PubSubQueue, admin: FakeAdmin, topic: str) -> None:
    batch = [sensor("dev-1", 0, unit="C"), sensor("dev-2", 0)]
    results = await uplink.publish_batch(topic, batch)
    assert [r.message_id for r in results] == [m.id for m in batch]
    assert all(r.ok for r in results), results
    # the uplink created the topic and, because it did, the subscription consume() reads
    got = {r.message.attributes[ATTR_MESSAGE_ID]: r.message
           for r in await pull(admin, f"{topic}-openhqm", 2)}
    assert set(got) == {m.id for m in batch}
    first = got[batch[0].id]
    assert bytes(first.data) == batch[0].body
    assert dict(first.attributes) == {ATTR_MESSAGE_ID: batch[0].id,
                                      ATTR_MQTT_TOPIC: "sensors/dev-1/temp", "unit": "C"}
    assert first.ordering_key == "sensors/dev-1/temp"
    assert got[batch[1].id].ordering_key == "sensors/dev-2/temp"


async def test_ordering_key_template_and_no_ordering(pubsub_emulator: PubSubFake,
                                                     topic: str) -> None:
    for template, expected in (("{topic[1]}", "dev-7"), ("", "")):
        settings = settings_for(gcp_ordering_key=template)
        view = FakeAdmin(pubsub_emulator.host, settings.gcp_project_id)
        try:
            async with PubSubQueue(settings) as queue:
                assert (queue.ordering is None) == (template == "")
                assert (await queue.publish_batch(topic, [sensor("dev-7", 0)]))[0].ok
            (received,) = await pull(view, f"{topic}-openhqm")
            assert received.message.ordering_key == expected
        finally:
            view.close()


async def test_one_key_keeps_its_order_through_an_ordered_subscription(
        uplink: PubSubQueue, topic: str) -> None:
    devices = [f"dev-{i}" for i in range(3)]
    batch = [sensor(d, n) for n in range(12) for d in devices]
    assert all(r.ok for r in await uplink.publish_batch(topic, batch))
    seen: dict[str, list[int]] = defaultdict(list)
    done = asyncio.Event()

    async def handler(msg: QueueMessage) -> None:
        seen[msg.topic].append(number(msg.body))
        assert await uplink.acknowledge(msg.id)
        if sum(map(len, seen.values())) == len(batch):
            done.set()

    consumer = asyncio.create_task(uplink.consume(topic, handler, batch_size=10,
                                                  wait_time_seconds=0.5))
    try:
        await asyncio.wait_for(done.wait(), 20)
    finally:
        consumer.cancel()
        await asyncio.gather(consumer, return_exceptions=True)
    assert {t: n for t, n in seen.items()} == {f"sensors/{d}/temp": list(range(12))
                                               for d in devices}


async def test_attributes_named_like_publish_arguments_arrive_in_order(
        uplink: PubSubQueue, topic: str) -> None:
    # MQTT 5 user properties become attributes; "topic" or "timeout" must not break publish()
    odd = sensor("dev-1", 1, topic="a user property", timeout="5", data="d")
    batch = [sensor("dev-1", 0), odd, sensor("dev-1", 2), sensor("dev-2", 0)]
    assert all(r.ok for r in await uplink.publish_batch(topic, batch))
    collector = Collector()
    consumer = asyncio.create_task(uplink.consume(topic, collector, wait_time_seconds=0.3))
    try:
        order = []
        for _ in batch:
            msg = await collector.next()
            if msg.topic == "sensors/dev-1/temp":
                order.append(number(msg.body))
            if msg.id == odd.id:
                expected = {k: v for k, v in odd.attributes.items() if k != ATTR_MESSAGE_ID}
                assert msg.attributes == expected
                assert {k: msg.attributes[k] for k in ("topic", "timeout", "data")} == {
                    "topic": "a user property", "timeout": "5", "data": "d"}
            assert await uplink.acknowledge(msg.id)
    finally:
        consumer.cancel()
        await asyncio.gather(consumer, return_exceptions=True)
    assert order == [0, 1, 2]


async def test_a_message_over_the_size_limit_fails_alone(uplink: PubSubQueue, admin: FakeAdmin,
                                                         topic: str) -> None:
    huge = QueueMessage(new_message_id(), b"x" * (MAX_REQUEST_BYTES + 1),
                        {ATTR_MQTT_TOPIC: "sensors/dev-1/temp"})
    long_attribute = sensor("dev-1", 99, note="y" * 2000)
    batch = [sensor("dev-1", 0), huge, sensor("dev-1", 1), long_attribute, sensor("dev-1", 2)]
    results = await uplink.publish_batch(topic, batch)
    assert [r.ok for r in results] == [True, False, True, False, True]
    assert isinstance(results[1].error, MessageRejected)
    assert "10000000" in str(results[1].error)
    assert isinstance(results[3].error, MessageRejected)
    # the same ordering key was not paused by the refusals: everything else arrived
    got = await pull(admin, f"{topic}-openhqm", 3)
    assert sorted(number(bytes(r.message.data)) for r in got) == [0, 1, 2]


async def test_a_failed_publish_pauses_its_key_which_resumes_afterwards(
        uplink: PubSubQueue, admin: FakeAdmin, topic: str) -> None:
    # The fake's gRPC server takes requests up to 4 MiB (the real service: 10 MB), so a
    # 5 MB message fails at the service (ResourceExhausted) and pauses its ordering key.
    big = sensor("dev-1", 0)
    big.body = b"z" * 5_000_000
    batch = [big, sensor("dev-1", 1), sensor("dev-2", 0)]
    results = await uplink.publish_batch(topic, batch)
    assert isinstance(results[0].error, RetryableError)
    assert not isinstance(results[0].error, UplinkUnavailable)
    follower = results[1].error
    assert isinstance(follower, RetryableError) and follower.code == "OrderingKeyPaused"
    assert results[2].ok  # another key is not affected
    # the key was resumed: the retry of the follower goes through
    assert (await uplink.publish_batch(topic, [batch[1]]))[0].ok
    got = await pull(admin, f"{topic}-openhqm", 2)
    assert sorted(r.message.attributes[ATTR_MESSAGE_ID] for r in got) == sorted(
        [batch[1].id, batch[2].id])


async def test_delay_is_refused_and_priority_travels_as_an_attribute(
        uplink: PubSubQueue, admin: FakeAdmin, topic: str) -> None:
    with pytest.raises(NotSupportedError):
        await uplink.publish(topic, b"later", delay_seconds=1)
    mid = await uplink.publish(topic, b"urgent", priority=7)
    (received,) = await pull(admin, f"{topic}-openhqm")
    assert received.message.attributes["openhqm_priority"] == "7"
    assert received.message.attributes[ATTR_MESSAGE_ID] == mid


# -- consuming ----------------------------------------------------------------------------

class Collector:
    def __init__(self) -> None:
        self.received: asyncio.Queue[QueueMessage] = asyncio.Queue()

    async def __call__(self, msg: QueueMessage) -> None:
        await self.received.put(msg)

    async def next(self, timeout: float = 10.0) -> QueueMessage:
        return await asyncio.wait_for(self.received.get(), timeout)


async def test_ack_nack_and_reject_to_the_dead_letter_topic(uplink: PubSubQueue, admin: FakeAdmin,
                                                            topic: str) -> None:
    await admin_create_dlq(admin, uplink.dlq_name)
    ids = [await uplink.publish(topic, f"m{i}".encode(), attributes={"k": str(i)})
           for i in range(3)]
    collector = Collector()
    consumer = asyncio.create_task(uplink.consume(topic, collector, wait_time_seconds=0.5))
    try:
        first = {m.id: m for m in [await collector.next() for _ in range(3)]}
        assert set(first) == set(ids)
        assert all(m.retry_count == 0 and m.timestamp > 0 for m in first.values())
        assert await uplink.acknowledge(ids[0]) is True
        assert await uplink.acknowledge(ids[0]) is False
        assert await uplink.reject(ids[1], requeue=True, reason="later") is True
        again = await collector.next()
        assert (again.id, again.body, again.retry_count) == (ids[1], b"m1", 1)
        assert await uplink.reject(ids[2], requeue=False, reason="cannot parse") is True
        assert await uplink.acknowledge(ids[1]) is True
        await asyncio.sleep(0.8)
        assert collector.received.empty()  # neither the acked nor the dead-lettered returns
    finally:
        consumer.cancel()
        await asyncio.gather(consumer, return_exceptions=True)
    (dead,) = await pull(admin, "dlq-view")
    attributes = dict(dead.message.attributes)
    assert bytes(dead.message.data) == b"m2"
    assert attributes[ATTR_MESSAGE_ID] == ids[2] and attributes["k"] == "2"
    assert attributes[ATTR_DLQ_REASON] == "cannot parse"
    assert attributes[ATTR_DLQ_SOURCE] == uplink.subscription_path(topic)


async def admin_create_dlq(admin: FakeAdmin, dlq: str) -> None:
    """The dead-letter topic with a subscription of the test's own, to read it."""
    await asyncio.to_thread(admin.create, dlq, "dlq-view")


async def test_the_services_dead_letter_policy(pubsub_emulator: PubSubFake, topic: str) -> None:
    settings = settings_for(gcp_dead_letter_max_attempts=5)
    dlq = f"dlq-{uuid.uuid4().hex[:8]}"
    view = FakeAdmin(pubsub_emulator.host, settings.gcp_project_id)
    try:
        async with PubSubQueue(settings, dlq_name=dlq) as queue:
            await admin_create_dlq(view, dlq)
            assert await queue.create_queue(topic) is True
            mid = await queue.publish(topic, b"poison")
            collector = Collector()
            consumer = asyncio.create_task(queue.consume(topic, collector, wait_time_seconds=0.3))
            try:
                counts = []
                for _ in range(5):
                    msg = await collector.next()
                    counts.append(msg.retry_count)
                    assert await queue.reject(mid, requeue=True)
                assert counts == [0, 1, 2, 3, 4]  # the service's delivery attempt - 1
                (dead,) = await pull(view, "dlq-view", timeout=10)
                assert dead.message.attributes[ATTR_MESSAGE_ID] == mid
                assert collector.received.empty()
            finally:
                consumer.cancel()
                await asyncio.gather(consumer, return_exceptions=True)
    finally:
        view.close()


async def test_depth_and_purge_are_refused_and_seek_clears_the_backlog(
        uplink: PubSubQueue, topic: str) -> None:
    assert await uplink.create_queue(topic) is True
    assert await uplink.create_queue(topic) is False
    for i in range(3):
        await uplink.publish(topic, f"old{i}".encode())
    with pytest.raises(NotSupportedError):
        await uplink.get_queue_depth(topic)
    with pytest.raises(NotSupportedError):
        await uplink.purge_queue(topic)
    await uplink.seek_to_now(topic)
    fresh = await uplink.publish(topic, b"new")
    collector = Collector()
    consumer = asyncio.create_task(uplink.consume(topic, collector, wait_time_seconds=0.3))
    try:
        assert (await collector.next()).id == fresh
        await asyncio.sleep(0.8)
        assert collector.received.empty()
    finally:
        consumer.cancel()
        await asyncio.gather(consumer, return_exceptions=True)
    assert await uplink.delete_queue(topic) is True
    assert await uplink.delete_queue(topic) is False


# -- configuration ------------------------------------------------------------------------

def test_seed_keys_and_env_overrides_build_the_uplink(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text("queue:\n  type: gcp_pubsub\n  gcp_project_id: my-gcp-project\n"
                    "  gcp_credentials_path: /path/to/service-account.json\n"
                    "  gcp_max_messages: 10\n  gcp_ordering_key: '{topic[1]}'\n")
    env = {"OPENHQM_QUEUE__GCP_MAX_MESSAGES": "25",
           "OPENHQM_QUEUE__GCP_EMULATOR_HOST": "127.0.0.1:8085",
           "OPENHQM_QUEUE__GCP_BATCH_MAX_BYTES": "2MB",
           "OPENHQM_QUEUE__GCP_PUBLISH_TIMEOUT": "15s"}
    backend = create_backend(load_config(str(path), env))
    assert isinstance(backend, PubSubQueue)
    s = backend.settings
    assert (s.gcp_project_id, s.gcp_credentials_path) == ("my-gcp-project",
                                                          "/path/to/service-account.json")
    assert (s.gcp_max_messages, s.gcp_emulator_host) == (25, "127.0.0.1:8085")
    assert (s.gcp_batch_max_bytes, s.gcp_publish_timeout) == (2 * 1024**2, 15.0)
    assert backend.ordering is not None and backend.ordering.template == "{topic[1]}"
    assert backend.dlq_name == "openhqm-dlq"


async def test_the_emulator_host_setting_works_without_the_environment_variable(
        pubsub_fake_server: PubSubFake, monkeypatch: pytest.MonkeyPatch, topic: str) -> None:
    monkeypatch.delenv("PUBSUB_EMULATOR_HOST", raising=False)
    settings = settings_for(gcp_emulator_host=pubsub_fake_server.host)
    async with PubSubQueue(settings) as queue:
        assert await queue.health_check() is True
        assert await queue.publish(topic, b"via the setting")


# -- an outage in the middle of a drain ---------------------------------------------------

async def eventually(check: Callable[[], Awaitable[bool]], timeout: float) -> None:
    """Poll ``check`` (a test helper: the forwarder exposes counters, not events)."""
    async with asyncio.timeout(timeout):
        while True:
            if await check():
                return
            await asyncio.sleep(0.05)


async def feed(store: Store, devices: list[str], sent: dict[str, int], rounds: int) -> None:
    for _ in range(rounds):
        batch = []
        for d in devices:
            batch.append(NewMessage(new_message_id(), f"sensors/{d}/temp",
                                    f'{{"device":"{d}","n":{sent[d]}}}'.encode()))
            sent[d] += 1
        await store.append(UPLINK_QUEUE, batch)
        await asyncio.sleep(0.002)


@pytest.fixture
def own_fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[PubSubFake]:
    fake = pubsub_fake(tmp_path / "pstest")
    fake.start()
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", fake.host)
    yield fake
    fake.stop()


async def test_an_outage_of_the_fake_mid_drain_loses_nothing(own_fake: PubSubFake,
                                                            tmp_path: Path, topic: str) -> None:
    settings = settings_for(gcp_auto_create=False, gcp_publish_timeout=2.0,
                            gcp_ordering_key="{topic[1]}")
    config = Config(
        store=StoreConfig(path=str(tmp_path / "store.db"), commit_interval_ms=5),
        forwarder=ForwarderConfig(batch_size=100, retry_min_delay=0.2, retry_max_delay=1.0,
                                  publish_timeout=6.0),
        queue=QueueConfig(type="gcp_pubsub", request_queue_name=topic, settings=settings))
    store = Store(config.store_path, config.store)
    await store.open()
    uplink = PubSubQueue.from_config(config)
    forwarder = Forwarder(store, uplink, config)
    devices = [f"dev-{i}" for i in range(6)]
    sent = dict.fromkeys(devices, 0)
    admin = FakeAdmin(own_fake.host, settings.gcp_project_id)
    received: list[Any] = []
    runner: asyncio.Task[None] | None = None
    try:
        await asyncio.to_thread(admin.create, topic, "view")
        runner = asyncio.create_task(forwarder.run())
        await feed(store, devices, sent, 30)
        first = sum(sent.values())

        async def delivered(count: int) -> bool:
            return forwarder.stats.delivered >= count
        await eventually(lambda: delivered(first), 20)
        received += await pull(admin, "view", first)  # the fake forgets them when it stops
        await asyncio.to_thread(own_fake.stop)
        await feed(store, devices, sent, 30)  # the gateway keeps accepting while it is down
        await asyncio.sleep(1.5)
        assert forwarder.stats.state in ("backing_off", "connecting")
        assert forwarder.stats.delivered == first
        assert forwarder.stats.errors_by_kind.get("UplinkUnavailable", 0) >= 1
        assert await uplink.health_check() is False
        batch = [sensor("dev-x", 0)]
        assert isinstance((await uplink.publish_batch(topic, batch))[0].error, UplinkUnavailable)
        await asyncio.to_thread(own_fake.start)  # same port, empty
        await asyncio.to_thread(admin.create, topic, "view")
        await feed(store, devices, sent, 10)
        total = sum(sent.values())

        async def drained() -> bool:
            return forwarder.stats.delivered >= total and await store.depth(UPLINK_QUEUE) == 0
        await eventually(drained, 30)
        assert forwarder.stats.dead_lettered == 0
        assert await uplink.health_check() is True
        received += await pull(admin, "view", total - first)
    finally:
        forwarder.stop()
        if runner is not None:
            await runner
        await uplink.disconnect()
        await store.close()
        admin.close()
    numbers: dict[str, set[int]] = defaultdict(set)
    for r in received:  # a duplicate is allowed (at least once), a gap is not
        numbers[r.message.ordering_key].add(number(bytes(r.message.data)))
    assert numbers == {d: set(range(sent[d])) for d in devices}
