"""The Kafka uplink against a real Apache Kafka 3.9 broker (KRaft, one per session).

What the contract suite does not show: the records as Kafka consumers see them (headers,
keys, partitions, order), partial failure inside one batch (refused by the producer and by
the broker), committed offsets surviving a restart, lag over several partitions, SASL, and
an outage in the middle of a forwarder drain.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from gateway.config import Config, ForwarderConfig, QueueConfig, StoreConfig, load_config
from gateway.errors import MessageRejected, NotSupportedError, UplinkUnavailable
from gateway.forwarder import UPLINK_QUEUE, Forwarder
from gateway.message import ATTR_MESSAGE_ID, ATTR_MQTT_TOPIC, QueueMessage, new_message_id
from gateway.queue.registry import create_backend
from gateway.store.records import NewMessage
from gateway.store.store import Store
from gateway.uplinks.kafka.settings import KafkaSettings
from gateway.uplinks.kafka.uplink import (
    HEADER_DLQ_REASON,
    HEADER_DLQ_SOURCE,
    HEADER_RETRY_COUNT,
    KafkaQueue,
)
from tests import kafka_read
from tests.kafka_read import Record
from tests.kafka_server import SASL_PASSWORD, SASL_USER, KafkaBroker

pytestmark = pytest.mark.integration



def settings_for(broker: KafkaBroker, **overrides: Any) -> KafkaSettings:
    base = KafkaSettings(kafka_bootstrap_servers=broker.bootstrap,
                         kafka_consumer_group=f"it-{uuid.uuid4().hex[:8]}",
                         kafka_request_timeout=10.0, kafka_delivery_timeout=8.0,
                         kafka_session_timeout=6.0)
    return replace(base, **overrides)


@pytest.fixture
async def uplink(kafka_broker: KafkaBroker) -> AsyncIterator[KafkaQueue]:
    queue = KafkaQueue(settings_for(kafka_broker), dlq_name=f"it-dlq-{uuid.uuid4().hex[:8]}")
    async with queue:
        yield queue


@pytest.fixture
def topic() -> str:
    return f"it-{uuid.uuid4().hex[:12]}"


async def read_all(broker: KafkaBroker, topic: str, timeout: float = 20.0) -> list[Record]:
    """Every record of every partition of ``topic``, partition by partition, in offset order."""
    return await kafka_read.read_all(broker.bootstrap, topic, timeout)


def headers_of(record: Record) -> dict[str, str]:
    return {k: v.decode() for k, v in record.headers}


def sensor(device: str, n: int, **extra: str) -> QueueMessage:
    attrs = {ATTR_MQTT_TOPIC: f"sensors/{device}/temp", ATTR_MESSAGE_ID: "", **extra}
    msg = QueueMessage(new_message_id(), f'{{"device":"{device}","n":{n}}}'.encode(), attrs)
    msg.attributes[ATTR_MESSAGE_ID] = msg.id
    return msg


# -- publishing -----------------------------------------------------------------------------

async def test_records_carry_id_topic_attributes_as_headers_and_the_key(
        uplink: KafkaQueue, kafka_broker: KafkaBroker, topic: str) -> None:
    msg = sensor("dev-7", 1, site="plant-3", content_type="application/json")
    (result,) = await uplink.publish_batch(topic, [msg])
    assert result.ok and result.message_id == msg.id
    mid = await uplink.publish(topic, b"\x00\x01raw", attributes={"k": "v"}, message_id="fixed-id")
    assert mid == "fixed-id"
    first, second = await read_all(kafka_broker, topic)
    assert first.value == msg.body
    assert headers_of(first) == {ATTR_MESSAGE_ID: msg.id, ATTR_MQTT_TOPIC: "sensors/dev-7/temp",
                                 "site": "plant-3", "content_type": "application/json"}
    assert first.key == b"sensors/dev-7/temp"  # default template: {topic}
    assert second.value == b"\x00\x01raw"
    assert headers_of(second) == {ATTR_MESSAGE_ID: "fixed-id", "k": "v"}
    assert second.key is None  # no MQTT topic, nothing to key by


async def test_delay_is_refused_not_ignored(uplink: KafkaQueue, topic: str) -> None:
    with pytest.raises(NotSupportedError):
        await uplink.publish(topic, b"later", delay_seconds=5)


@pytest.mark.parametrize("compression", ["gzip", "lz4", "zstd"])
async def test_compressed_batches_arrive_intact(kafka_broker: KafkaBroker, topic: str,
                                                compression: str) -> None:
    # librdkafka carries every codec: no Python codec package on either side
    queue = KafkaQueue(settings_for(kafka_broker, kafka_compression=compression))
    batch = [sensor(f"dev-{i % 3}", i) for i in range(200)]
    async with queue:
        assert all(r.ok for r in await queue.publish_batch(topic, batch))
    assert sorted(r.value for r in await read_all(kafka_broker, topic)) == sorted(
        m.body for m in batch)


async def test_one_key_keeps_its_order_in_one_partition(
        kafka_broker: KafkaBroker, topic: str) -> None:
    queue = KafkaQueue(settings_for(kafka_broker, kafka_message_key="{topic[1]}",
                                    kafka_batch_size=2048))  # small: many batches per partition
    devices = [f"dev-{i}" for i in range(12)]
    async with queue:
        assert await queue.create_queue(topic, partitions=4) is True
        for round_ in range(3):
            batch = [sensor(d, round_ * 100 + n) for n in range(100) for d in devices]
            results = await queue.publish_batch(topic, batch)
            assert [r.message_id for r in results] == [m.id for m in batch]
            assert all(r.ok for r in results), {str(r.error) for r in results if not r.ok}
    records = await read_all(kafka_broker, topic)
    assert len(records) == 3 * 100 * len(devices)
    partitions: dict[bytes, set[int]] = defaultdict(set)
    sequence: dict[bytes, list[int]] = defaultdict(list)
    for record in records:
        partitions[record.key].add(record.partition)
        sequence[record.key].append(int(record.value.split(b'"n":')[1].rstrip(b"}")))
    assert set(partitions) == {d.encode() for d in devices}
    assert all(len(p) == 1 for p in partitions.values())  # one device, one partition
    assert len({p for ps in partitions.values() for p in ps}) > 1  # devices spread out
    for key, numbers in sequence.items():
        assert numbers == sorted(numbers) == list(range(300)), key


class _SmallLocalQueue(KafkaQueue):
    """librdkafka's local queue holds 64 records: produce() raises BufferError mid-batch
    (about 30 waits of 5 ms for 1,000 records here)."""

    def producer_config(self) -> dict[str, Any]:
        return {**super().producer_config(), "queue.buffering.max.messages": 64}


async def test_a_full_local_producer_queue_waits_and_keeps_order(
        kafka_broker: KafkaBroker, topic: str) -> None:
    queue = _SmallLocalQueue(settings_for(kafka_broker, kafka_message_key="{topic[1]}"))
    batch = [sensor(f"dev-{n % 4}", n) for n in range(1000)]
    async with queue:
        assert await queue.create_queue(topic, partitions=2) is True
        results = await queue.publish_batch(topic, batch)
    assert all(r.ok for r in results), {str(r.error) for r in results if not r.ok}
    sequence: dict[bytes, list[int]] = defaultdict(list)
    for record in await read_all(kafka_broker, topic):
        sequence[record.key].append(int(record.value.split(b'"n":')[1].rstrip(b"}")))
    assert {k: v for k, v in sequence.items()} == {
        f"dev-{d}".encode(): list(range(d, 1000, 4)) for d in range(4)}


async def test_a_message_over_the_producer_limit_fails_alone(
        kafka_broker: KafkaBroker, topic: str) -> None:
    queue = KafkaQueue(settings_for(kafka_broker, kafka_max_request_size=64 * 1024,
                                    kafka_batch_size=32 * 1024))
    batch = [sensor("a", 0), sensor("a", 1), QueueMessage(new_message_id(), b"x" * 100_000),
             sensor("a", 2)]
    async with queue:
        results = await queue.publish_batch(topic, batch)
    assert [r.ok for r in results] == [True, True, False, True]
    assert isinstance(results[2].error, MessageRejected)
    assert "kafka_max_request_size" in str(results[2].error)
    assert [r.value for r in await read_all(kafka_broker, topic)] == [
        batch[0].body, batch[1].body, batch[3].body]


async def test_a_message_the_broker_refuses_fails_alone_and_the_rest_keep_order(
        uplink: KafkaQueue, kafka_broker: KafkaBroker, topic: str) -> None:
    assert await uplink.create_queue(topic, partitions=2,
                                     config={"max.message.bytes": "2048"}) is True
    batch = [sensor(f"dev-{n % 2}", n) for n in range(20)]
    too_big = QueueMessage(new_message_id(), b"y" * 10_000, {ATTR_MQTT_TOPIC: "sensors/dev-0/t"})
    batch.insert(7, too_big)
    results = await uplink.publish_batch(topic, batch)
    assert [r.message_id for r in results] == [m.id for m in batch]
    assert [r.ok for r in results] == [m is not too_big for m in batch]
    error = results[7].error
    assert isinstance(error, MessageRejected)
    assert "MESSAGE_SIZE_TOO_LARGE" in str(error)  # the broker's reason, for the DLQ
    # the producer is still healthy afterwards (its sequence numbers were kept in step)
    later = [sensor("dev-0", 100 + n) for n in range(5)]
    assert all(r.ok for r in await uplink.publish_batch(topic, later))
    got = [r.value for r in await read_all(kafka_broker, topic)]
    expected = [m.body for m in batch + later if m is not too_big]
    assert sorted(got) == sorted(expected)
    for device in (b"dev-0", b"dev-1"):
        mine = [v for v in got if device in v]
        assert mine == [v for v in expected if device in v]


async def test_a_missing_topic_without_auto_create_is_unavailable_not_rejected(
        kafka_broker: KafkaBroker, topic: str) -> None:
    queue = KafkaQueue(settings_for(kafka_broker, kafka_auto_create_topics=False,
                                    kafka_delivery_timeout=2.0))
    async with queue:
        (result,) = await queue.publish_batch(topic, [sensor("d", 1)])
    assert isinstance(result.error, UplinkUnavailable)


# -- consuming ----------------------------------------------------------------------------

class Collector:
    def __init__(self) -> None:
        self.messages: asyncio.Queue[QueueMessage] = asyncio.Queue()

    async def __call__(self, msg: QueueMessage) -> None:
        await self.messages.put(msg)

    async def take(self, n: int, timeout: float = 15.0) -> list[QueueMessage]:
        async with asyncio.timeout(timeout):
            return [await self.messages.get() for _ in range(n)]


async def consuming(queue: KafkaQueue, topic: str, collector: Collector) -> asyncio.Task[None]:
    return asyncio.create_task(queue.consume(topic, collector, batch_size=50,
                                             wait_time_seconds=0.2))


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_committed_offsets_survive_a_restart_and_only_unsettled_ones_return(
        kafka_broker: KafkaBroker, topic: str) -> None:
    settings = settings_for(kafka_broker)
    sent = [sensor("d", n) for n in range(5)]
    first = KafkaQueue(settings)
    async with first:
        assert all(r.ok for r in await first.publish_batch(topic, sent))
        collector = Collector()
        task = await consuming(first, topic, collector)
        got = await collector.take(5)
        await stop(task)
        assert [m.id for m in got] == [m.id for m in sent]
        for index in (0, 1, 3):  # 2 stays in flight, 4 too
            assert await first.acknowledge(sent[index].id)
        assert await first.get_queue_depth(topic) == 3  # committed up to the first gap
    second = KafkaQueue(settings)  # a restarted gateway: same group
    async with second:
        collector = Collector()
        task = await consuming(second, topic, collector)
        again = await collector.take(3)
        await stop(task)
        # at-least-once: 3 was acknowledged but sits behind the gap, so it comes back too
        assert [m.id for m in again] == [sent[2].id, sent[3].id, sent[4].id]
        for msg in again:
            assert await second.acknowledge(msg.id)
        assert await second.get_queue_depth(topic) == 0


async def test_a_cancelled_consume_keeps_the_records_its_fetch_brought(
        kafka_broker: KafkaBroker, topic: str) -> None:
    queue = KafkaQueue(settings_for(kafka_broker))
    async with queue:
        (first,) = [sensor("d", 0)]
        assert (await queue.publish_batch(topic, [first]))[0].ok
        collector = Collector()
        task = asyncio.create_task(queue.consume(topic, collector, batch_size=50,
                                                 wait_time_seconds=2.0))
        (got,) = await collector.take(1)  # joined the group, partitions assigned
        assert await queue.acknowledge(got.id)
        await asyncio.sleep(0.3)  # the next fetch (up to 2 s) is running on its thread
        await stop(task)
        later = [sensor("d", n) for n in range(1, 6)]
        assert all(r.ok for r in await queue.publish_batch(topic, later))  # lands in it
        task = await consuming(queue, topic, collector)
        again = await collector.take(5)
        await stop(task)
    assert [m.id for m in again] == [m.id for m in later]


async def test_a_second_member_takes_a_partition_with_what_was_not_acknowledged(
        kafka_broker: KafkaBroker, topic: str) -> None:
    settings = settings_for(kafka_broker)  # one group for both members
    sent = [sensor(f"dev-{i % 8}", i) for i in range(40)]
    first, second = KafkaQueue(settings), KafkaQueue(settings)
    async with first:
        assert await first.create_queue(topic, partitions=2) is True
        assert all(r.ok for r in await first.publish_batch(topic, sent))
        partition_of = {headers_of(r)[ATTR_MESSAGE_ID]: r.partition
                        for r in await read_all(kafka_broker, topic)}
        assert set(partition_of.values()) == {0, 1}  # both partitions hold messages
        collector = Collector()
        task_a = await consuming(first, topic, collector)
        got = await collector.take(len(sent))
        acked = {m.id for m in got[::2]}
        for msg in got[::2]:
            assert await first.acknowledge(msg.id)
        async with second:
            moved = Collector()
            task_b = await consuming(second, topic, moved)
            first_of_b = await moved.take(1, timeout=30.0)  # after the group rebalanced
            taken = {partition_of[first_of_b[0].id]}
            expected = {m.id for m in sent if partition_of[m.id] in taken} - acked
            seen = {first_of_b[0].id}
            async with asyncio.timeout(20):
                while not expected <= seen:
                    seen.update(m.id for m in await moved.take(1))
            await stop(task_b)
        await stop(task_a)
        for msg in sent:
            if msg.id in acked:
                continue
            # in flight at the first member until its partition moved: no longer its to settle
            assert await first.acknowledge(msg.id) is (partition_of[msg.id] not in taken)


async def test_reject_to_the_dead_letter_topic_keeps_the_record_and_says_why(
        uplink: KafkaQueue, kafka_broker: KafkaBroker, topic: str) -> None:
    msg = sensor("dev-1", 1)
    await uplink.publish_batch(topic, [msg])
    collector = Collector()
    task = await consuming(uplink, topic, collector)
    (got,) = await collector.take(1)
    assert await uplink.reject(got.id, requeue=True, reason="later")
    (again,) = await collector.take(1)
    assert again.retry_count == 1
    assert await uplink.reject(again.id, requeue=False, reason="schema mismatch")
    await stop(task)
    (dead,) = await read_all(kafka_broker, uplink.dlq_name)
    headers = headers_of(dead)
    assert dead.value == msg.body and dead.key == b"sensors/dev-1/temp"
    assert headers[ATTR_MESSAGE_ID] == msg.id
    assert headers[ATTR_MQTT_TOPIC] == "sensors/dev-1/temp"
    assert headers[HEADER_DLQ_REASON] == "schema mismatch"
    assert headers[HEADER_DLQ_SOURCE].startswith(f"{topic}/0/")
    assert headers[HEADER_RETRY_COUNT] == "1"
    assert await uplink.get_queue_depth(topic) == 0


async def test_lag_and_purge_span_every_partition(uplink: KafkaQueue, topic: str) -> None:
    assert await uplink.create_queue(topic, partitions=3)
    batch = [sensor(f"dev-{n % 9}", n) for n in range(90)]
    assert all(r.ok for r in await uplink.publish_batch(topic, batch))
    assert await uplink.get_queue_depth(topic) == 90
    collector = Collector()
    task = await consuming(uplink, topic, collector)
    got = await collector.take(90)
    for msg in got[:40]:
        assert await uplink.acknowledge(msg.id)
    await stop(task)
    depth = await uplink.get_queue_depth(topic)
    assert 50 <= depth <= 90  # committed per partition up to its first unsettled message
    for msg in got[40:]:
        assert await uplink.acknowledge(msg.id)
    assert await uplink.get_queue_depth(topic) == 0
    assert all(r.ok for r in await uplink.publish_batch(topic, batch[:30]))
    assert await uplink.purge_queue(topic) == 120  # every record below the high watermark
    assert await uplink.get_queue_depth(topic) == 0


# -- configuration and security -------------------------------------------------------------

def test_seed_keys_and_env_overrides_build_the_uplink(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text("queue:\n  type: kafka\n  kafka_bootstrap_servers: 'k1:9092,k2:9092'\n"
                    "  kafka_consumer_group: openhqm-workers\n"
                    "  kafka_topics: [openhqm-requests]\n  kafka_compression: gzip\n"
                    "  kafka_message_key: '{topic[1]}'\n  kafka_linger: 20ms\n")
    env = {"OPENHQM_QUEUE__KAFKA_TOPICS": '["openhqm-requests","openhqm-responses"]',
           "OPENHQM_QUEUE__KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
           "OPENHQM_QUEUE__KAFKA_SASL_USERNAME": "$ConnectionString",
           "OPENHQM_QUEUE__KAFKA_SASL_PASSWORD": "Endpoint=sb://x/;SharedAccessKey=s",
           "OPENHQM_QUEUE__KAFKA_BATCH_SIZE": "256KB"}
    cfg = load_config(str(path), env)
    backend = create_backend(cfg)
    assert isinstance(backend, KafkaQueue)
    s = backend.settings
    assert s.kafka_bootstrap_servers == "k1:9092,k2:9092"
    assert s.kafka_topics == ["openhqm-requests", "openhqm-responses"]
    assert (s.kafka_security_protocol, s.kafka_sasl_mechanism) == ("SASL_SSL", "PLAIN")
    assert s.kafka_linger == pytest.approx(0.02) and s.kafka_batch_size == 256 * 1024
    assert backend.dlq_name == "openhqm-dlq"
    conf = backend.client_config()
    assert conf["bootstrap.servers"] == "k1:9092,k2:9092"
    assert (conf["sasl.mechanism"], conf["sasl.username"]) == ("PLAIN", "$ConnectionString")
    assert backend.consumer_config()["group.id"] == "openhqm-workers"


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
async def test_sasl_mechanisms(kafka_broker: KafkaBroker, topic: str, mechanism: Any) -> None:
    common = {"kafka_bootstrap_servers": f"127.0.0.1:{kafka_broker.sasl_port}",
              "kafka_security_protocol": "SASL_PLAINTEXT", "kafka_sasl_mechanism": mechanism,
              "kafka_sasl_username": SASL_USER}
    queue = KafkaQueue(settings_for(kafka_broker, **common, kafka_sasl_password=SASL_PASSWORD))
    async with queue:
        assert await queue.health_check()
        assert await queue.publish(topic, b"authenticated")
    wrong = KafkaQueue(settings_for(kafka_broker, **common, kafka_sasl_password="wrong"))
    with pytest.raises(UplinkUnavailable):
        await wrong.connect()


# -- an outage in the middle of a drain ---------------------------------------------------

async def eventually(check: Callable[[], Awaitable[bool]], timeout: float) -> None:
    """Poll ``check`` (a test helper: the forwarder exposes counters, not events)."""
    async with asyncio.timeout(timeout):
        while True:
            if await check():
                return
            await asyncio.sleep(0.05)


class Feeder:
    """Appends one numbered message per device per round, like sensors publishing."""

    def __init__(self, store: Store, devices: list[str]) -> None:
        self.store, self.devices = store, devices
        self.sent = dict.fromkeys(devices, 0)

    async def rounds(self, count: int) -> None:
        for _ in range(count):
            batch = []
            for d in self.devices:
                batch.append(NewMessage(new_message_id(), f"sensors/{d}/temp",
                                        f'{{"device":"{d}","n":{self.sent[d]}}}'.encode()))
                self.sent[d] += 1
            await self.store.append(UPLINK_QUEUE, batch)
            await asyncio.sleep(0.002)


def first_occurrences(records: list[Record]) -> dict[str, list[int]]:
    """Per key, the message numbers in partition order, duplicates dropped (at-least-once
    allows a duplicate; a gap or a reordering is a failure)."""
    seen: set[str] = set()
    numbers: dict[str, list[int]] = defaultdict(list)
    for record in records:
        mid = headers_of(record)[ATTR_MESSAGE_ID]
        if mid not in seen:
            seen.add(mid)
            numbers[record.key.decode()].append(int(record.value.split(b'"n":')[1].rstrip(b"}")))
    return numbers


async def test_broker_outage_mid_drain_loses_nothing_and_keeps_per_key_order(
        kafka_broker: KafkaBroker, topic: str, tmp_path: Path) -> None:
    settings = settings_for(kafka_broker, kafka_delivery_timeout=3.0, kafka_request_timeout=5.0,
                            kafka_message_key="{topic[1]}")
    config = Config(
        store=StoreConfig(path=str(tmp_path / "store.db"), commit_interval_ms=5),
        forwarder=ForwarderConfig(batch_size=200, retry_min_delay=0.2, retry_max_delay=1.0,
                                  publish_timeout=6.0),
        queue=QueueConfig(type="kafka", request_queue_name=topic, settings=settings))
    store = Store(config.store_path, config.store)
    await store.open()
    uplink = KafkaQueue.from_config(config)
    forwarder = Forwarder(store, uplink, config)
    feeder = Feeder(store, [f"dev-{i}" for i in range(8)])
    try:
        await uplink.connect()
        await uplink.create_queue(topic, partitions=3)
        runner = asyncio.create_task(forwarder.run())
        await feeder.rounds(250)

        async def delivered_some() -> bool:
            return forwarder.stats.delivered >= 1000
        await eventually(delivered_some, 30)
        await asyncio.to_thread(kafka_broker.stop)  # SIGTERM; the data dir stays
        await feeder.rounds(250)  # the gateway keeps accepting while the uplink is down
        await asyncio.sleep(2.0)
        assert forwarder.stats.state in ("backing_off", "connecting")
        assert await uplink.health_check() is False
        kafka_broker.spawn()  # same port, same data dir
        await asyncio.to_thread(kafka_broker.wait_started)
        await feeder.rounds(100)
        total = sum(feeder.sent.values())

        async def drained() -> bool:
            return forwarder.stats.delivered >= total and await store.depth(UPLINK_QUEUE) == 0
        await eventually(drained, 90)
        forwarder.stop()
        await runner
        assert forwarder.stats.dead_lettered == 0
        assert forwarder.stats.errors_by_kind.get("UplinkUnavailable", 0) >= 1  # it noticed
    finally:
        if not kafka_broker.running:
            kafka_broker.start()
        await uplink.disconnect()
        await store.close()
    numbers = first_occurrences(await read_all(kafka_broker, topic))
    assert sum(len(n) for n in numbers.values()) == total
    for device, sent in feeder.sent.items():
        assert numbers[device] == list(range(sent)), device
