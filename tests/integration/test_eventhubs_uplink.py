"""The Event Hubs uplink against the AMQP 1.0 Event Hubs test server (tests/eventhubs_server),
spoken to by the real azure-eventhub SDK.

What the contract suite does not show: the events as a cloud consumer sees them (body,
application properties, message id, partition keys and partitions, order), partial failure
inside one batch (refused by the uplink and by the service), checkpoints surviving a
restart of the uplink without skipping an unacknowledged event, the DLQ hub, and an outage
of the service under the running gateway daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import urllib.request
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway.errors import MessageRejected, PermanentError, RetryableError, UplinkUnavailable
from gateway.message import ATTR_MESSAGE_ID, ATTR_MQTT_TOPIC, QueueMessage, new_message_id
from gateway.queue.interface import PublishResult
from gateway.uplinks.eventhubs.checkpoints import CheckpointFile
from gateway.uplinks.eventhubs.settings import EventHubsSettings
from gateway.uplinks.eventhubs.uplink import (
    PROP_DLQ_REASON,
    PROP_DLQ_SOURCE,
    PROP_RETRY_COUNT,
    EventHubsQueue,
)
from tests.eventhubs_server import EventHubsServer, StoredEvent
from tests.gateway_process import GatewayProcess, Publisher, gateway_config
from tests.servers import IN_CI, ServerProcess, free_port, wait_until

pytestmark = pytest.mark.integration


def new_hub(server: EventHubsServer, partitions: int = 2) -> str:
    name = f"it-{uuid.uuid4().hex[:10]}"
    server.add_hub(name, partitions)
    return name


def make_uplink(server: EventHubsServer, state_dir: Path, hub: str, **overrides: Any) -> EventHubsQueue:
    settings = EventHubsSettings(**{
        "azure_eventhubs_connection_string": server.connection_string(),
        "azure_eventhubs_name": hub, "azure_eventhubs_send_timeout": 5.0,
        "azure_eventhubs_request_timeout": 5.0, **overrides})
    return EventHubsQueue(settings, state_dir=str(state_dir))


@pytest.fixture
def hub(eventhubs_server: EventHubsServer) -> str:
    return new_hub(eventhubs_server)


@pytest.fixture
async def uplink(eventhubs_server: EventHubsServer, hub: str,
                 tmp_path: Path) -> AsyncIterator[EventHubsQueue]:
    async with make_uplink(eventhubs_server, tmp_path, hub) as queue:
        yield queue


class Received:
    """consume() in a task; delivered messages land in a queue for the test to take."""

    def __init__(self, queue: EventHubsQueue, hub: str) -> None:
        self.queue, self.hub = queue, hub
        self.messages: asyncio.Queue[QueueMessage] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Received:
        self.task = asyncio.create_task(self.queue.consume(self.hub, self.messages.put,
                                                           wait_time_seconds=0.2))
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.task is not None
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task

    async def take(self, count: int, timeout: float = 10.0) -> list[QueueMessage]:
        async with asyncio.timeout(timeout):
            return [await self.messages.get() for _ in range(count)]

    async def quiet(self, seconds: float = 0.5) -> None:
        await asyncio.sleep(seconds)
        assert self.messages.empty(), self.messages.get_nowait()


def msg(topic: str, body: bytes, **attrs: str) -> QueueMessage:
    return QueueMessage(new_message_id(), body, {ATTR_MQTT_TOPIC: topic, **attrs})


# -- what a cloud consumer receives ---------------------------------------------------------

async def test_events_carry_body_id_topic_attributes_and_the_topic_as_partition_key(
        uplink: EventHubsQueue, eventhubs_server: EventHubsServer, hub: str) -> None:
    batch = [msg(f"site/dev-{i % 3}/temp", orjson.dumps({"n": i}), mqtt_qos="1",
                 content_type="application/json") for i in range(9)]
    batch.append(msg("site/dev-9/raw", bytes(range(256))))
    results = await uplink.publish_batch(hub, batch)
    assert [r.message_id for r in results] == [m.id for m in batch]
    assert all(r.ok for r in results), [r.error for r in results]
    events = eventhubs_server.wait_for_events(hub, len(batch))
    by_id = {e.properties[ATTR_MESSAGE_ID]: e for e in events}
    assert set(by_id) == {m.id for m in batch}
    for m in batch:
        event = by_id[m.id]
        assert event.body == m.body
        assert event.properties == {ATTR_MESSAGE_ID: m.id, **m.attributes}
        assert event.message_id == m.id
        assert event.partition_key == m.topic
        assert event.content_type == m.attributes.get("content_type")
    partitions: dict[str, set[str]] = defaultdict(set)
    for event in events:
        partitions[event.partition_key or ""].add(event.partition_id)
    assert all(len(p) == 1 for p in partitions.values())  # one key, one partition
    for key in partitions:
        ordered = [orjson.loads(e.body)["n"] for e in sorted(events, key=lambda e: e.sequence_number)
                   if e.partition_key == key and e.body.startswith(b"{")]
        assert ordered == sorted(ordered)  # in the order they were given, per key


async def test_partition_key_template_over_topic_levels(
        eventhubs_server: EventHubsServer, hub: str, tmp_path: Path) -> None:
    async with make_uplink(eventhubs_server, tmp_path, hub,
                           azure_eventhubs_partition_key="dev-{topic[1]}") as queue:
        batch = [msg("s/a/temp", b"1"), msg("s/a/hum", b"2"), msg("s/b/temp", b"3")]
        assert all(r.ok for r in await queue.publish_batch(hub, batch))
    events = eventhubs_server.wait_for_events(hub, 3)
    assert {e.properties[ATTR_MESSAGE_ID]: e.partition_key for e in events} == {
        batch[0].id: "dev-a", batch[1].id: "dev-a", batch[2].id: "dev-b"}


async def test_the_request_queue_goes_to_the_named_hub(
        eventhubs_server: EventHubsServer, hub: str, tmp_path: Path) -> None:
    async with make_uplink(eventhubs_server, tmp_path, hub) as queue:
        mid = await queue.publish("openhqm-requests", b"to the hub")
    assert [e.properties[ATTR_MESSAGE_ID] for e in eventhubs_server.wait_for_events(hub, 1)] == [mid]


# -- partial failure ------------------------------------------------------------------------

async def test_an_event_over_the_hub_limit_fails_alone_and_the_rest_keep_order(
        tmp_path: Path) -> None:
    server = EventHubsServer({}, port=free_port(), max_message_size=4096)
    server.start()
    try:
        hub = new_hub(server, 1)
        async with make_uplink(server, tmp_path, hub) as queue:
            batch = [msg("s/a", f"m{i}".encode() * (i * 60)) for i in range(8)]
            batch.insert(4, msg("s/a", b"x" * 5000))
            results = await queue.publish_batch(hub, batch)
            assert [r.ok for r in results] == [True] * 4 + [False] + [True] * 4
            assert isinstance(results[4].error, MessageRejected)
            assert "larger than the hub" in str(results[4].error)
        events = server.wait_for_events(hub, 8)
        assert [e.properties[ATTR_MESSAGE_ID] for e in events] == [
            m.id for i, m in enumerate(batch) if i != 4]
        assert [e.body for e in events] == [m.body for i, m in enumerate(batch) if i != 4]
    finally:
        server.stop()


async def test_a_batch_the_service_refuses_as_too_large_is_split_to_reject_one(
        uplink: EventHubsQueue, eventhubs_server: EventHubsServer, hub: str) -> None:
    # The SDK's producer client sends once more by itself, on a fresh link, after any
    # EventHubError: each refused send_batch costs two refusals. Four = the batch, then its
    # first event alone.
    eventhubs_server.reject_next_sends(hub, 4, condition="amqp:link:message-size-exceeded",
                                       description="The received message exceeds the limit")
    batch = [msg("s/a", f"m{i}".encode()) for i in range(4)]
    results = await uplink.publish_batch(hub, batch)
    # the batch was refused, then its first event alone: only that one is rejected
    assert [r.ok for r in results] == [False, True, True, True]
    assert isinstance(results[0].error, MessageRejected)
    assert "exceeds the limit" in str(results[0].error)
    events = eventhubs_server.wait_for_events(hub, 3)
    assert [e.properties[ATTR_MESSAGE_ID] for e in events] == [m.id for m in batch[1:]]


async def test_a_busy_service_is_retryable_not_a_rejection(
        uplink: EventHubsQueue, eventhubs_server: EventHubsServer, hub: str) -> None:
    eventhubs_server.reject_next_sends(hub, 2, condition="com.microsoft:server-busy")
    batch = [msg("s/a", b"1"), msg("s/b", b"2")]
    results = await uplink.publish_batch(hub, batch)
    assert type(results[0].error) is RetryableError
    assert results[1].ok  # another key goes on
    assert await uplink.publish_batch(hub, batch[:1]) == [PublishResult(batch[0].id)]  # later: fine


async def test_a_missing_hub_is_unavailable_not_a_rejection(
        eventhubs_server: EventHubsServer, hub: str, tmp_path: Path) -> None:
    async with make_uplink(eventhubs_server, tmp_path, hub, azure_eventhubs_retry_total=0) as queue:
        results = await queue.publish_batch(f"no-such-{uuid.uuid4().hex[:6]}", [msg("s/a", b"1")])
    assert isinstance(results[0].error, UplinkUnavailable)  # buffered until the hub exists


# -- consuming, checkpoints, dead letters ---------------------------------------------------

async def test_checkpoints_survive_a_restart_and_never_skip_an_unacknowledged_event(
        eventhubs_server: EventHubsServer, tmp_path: Path) -> None:
    hub = new_hub(eventhubs_server, 1)
    batch = [msg("s/a", f"e{i}".encode()) for i in range(6)]
    async with make_uplink(eventhubs_server, tmp_path, hub) as queue:
        assert all(r.ok for r in await queue.publish_batch(hub, batch))
        assert await queue.get_queue_depth(hub) == 6
        async with Received(queue, hub) as received:
            got = await received.take(6)
            assert [m.id for m in got] == [m.id for m in batch]
            for i in (0, 1, 3, 5):  # out of order, with 2 and 4 still in flight
                assert await queue.acknowledge(batch[i].id) is True
        assert await queue.get_queue_depth(hub) == 4  # the checkpoint stops before e2
    file = CheckpointFile.for_hub(str(tmp_path), f"127.0.0.1:{eventhubs_server.port}", hub,
                                  "$Default")
    assert {pid: cp.sequence_number for pid, cp in file.load().items()} == {"0": 1}

    async with make_uplink(eventhubs_server, tmp_path, hub) as queue:  # a restarted gateway
        assert await queue.get_queue_depth(hub) == 4
        async with Received(queue, hub) as received:
            again = await received.take(4)
            assert [m.id for m in again] == [m.id for m in batch[2:]]  # at-least-once
            await received.quiet()
            for m in again:
                assert await queue.acknowledge(m.id) is True
        assert await queue.get_queue_depth(hub) == 0
    assert file.load()["0"].sequence_number == 5


async def test_an_acknowledge_whose_checkpoint_cannot_be_written_stays_in_flight(
        uplink: EventHubsQueue, hub: str, monkeypatch: pytest.MonkeyPatch) -> None:
    mid = await uplink.publish(hub, b"once", attributes={ATTR_MQTT_TOPIC: "s/a"})
    real_save = CheckpointFile.save
    calls: list[int] = []

    def save(self: CheckpointFile, partition_id: str, checkpoint: Any) -> None:
        calls.append(checkpoint.sequence_number)
        if len(calls) == 1:
            raise RetryableError("disk full (injected)")
        real_save(self, partition_id, checkpoint)
    monkeypatch.setattr(CheckpointFile, "save", save)
    async with Received(uplink, hub) as received:
        assert [m.id for m in await received.take(1)] == [mid]
        with pytest.raises(RetryableError, match="injected"):
            await uplink.acknowledge(mid)
        assert await uplink.acknowledge(mid) is True  # still in flight: the retry checkpoints
        assert await uplink.acknowledge(mid) is False
    assert calls == [0, 0]
    assert await uplink.get_queue_depth(hub) == 0


async def test_reject_to_the_dlq_hub_and_requeue_to_the_end_of_the_hub(
        eventhubs_server: EventHubsServer, hub: str, tmp_path: Path) -> None:
    dlq = new_hub(eventhubs_server, 1)
    async with make_uplink(eventhubs_server, tmp_path, hub, azure_eventhubs_dlq_name=dlq) as queue:
        bad, retry = msg("s/a", b"bad", k="v"), msg("s/a", b"again")
        assert all(r.ok for r in await queue.publish_batch(hub, [bad, retry]))
        async with Received(queue, hub) as received:
            assert {m.id for m in await received.take(2)} == {bad.id, retry.id}
            assert await queue.reject(bad.id, requeue=False, reason="unparseable") is True
            assert await queue.reject(retry.id, requeue=True, reason="later") is True
            (copy,) = await received.take(1)
            assert (copy.id, copy.body, copy.retry_count) == (retry.id, b"again", 1)
            assert await queue.acknowledge(retry.id) is True
        assert await queue.get_queue_depth(hub) == 0
    (dead,) = eventhubs_server.wait_for_events(dlq, 1)
    assert dead.body == b"bad" and dead.partition_key == "s/a"
    assert dead.properties[ATTR_MESSAGE_ID] == bad.id and dead.properties["k"] == "v"
    assert dead.properties[PROP_DLQ_REASON] == "unparseable"
    assert dead.properties[PROP_DLQ_SOURCE].startswith(f"{hub}/")
    requeued = [e for e in eventhubs_server.events(hub) if PROP_RETRY_COUNT in e.properties]
    assert [(e.properties[ATTR_MESSAGE_ID], e.partition_key) for e in requeued] == [(retry.id, "s/a")]


# -- checkpoints in Azure Blob Storage (Azurite) ------------------------------------------

AZURITE = (Path(__file__).resolve().parents[2] / ".cache" / "azurite" / "node_modules" / ".bin"
           / "azurite-blob")
#: Azurite's well-known development account (public, documented by Microsoft)
DEV_ACCOUNT = "devstoreaccount1"
DEV_KEY = ("Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/"
           "K1SZFPTOtr/KBHBeksoGMGw==")


def _port_open(port: int) -> bool:
    import socket
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Azurite's blob service on a free loopback port (scripts/provision/eventhubs.sh), one
    for this module; yields its storage connection string. Tests use their own containers."""
    if not AZURITE.exists():
        message = "azurite is not installed (bash scripts/provision/eventhubs.sh)"
        if IN_CI:
            pytest.fail(f"CI must run integration tests: {message}")
        pytest.skip(message)
    workdir = tmp_path_factory.mktemp("azurite")
    port = free_port()
    server = ServerProcess("azurite", [str(AZURITE), "--blobHost", "127.0.0.1", "--blobPort",
                                       str(port), "--location", str(workdir), "--silent",
                                       "--skipApiVersionCheck"],
                           workdir, port, lambda s: _port_open(s.port))
    server.start(timeout=30)
    try:
        yield (f"DefaultEndpointsProtocol=http;AccountName={DEV_ACCOUNT};AccountKey={DEV_KEY};"
               f"BlobEndpoint=http://127.0.0.1:{port}/{DEV_ACCOUNT};")
    finally:
        server.stop(signal.SIGKILL)  # an emulator with nothing to keep; SIGTERM takes 10 s


async def create_container(connection_string: str, name: str) -> Any:
    """A BlobCheckpointStore on ``name``, after creating that container (operators do this
    in Azure; the gateway does not create storage resources)."""
    from azure.eventhub.extensions.checkpointstoreblobaio import BlobCheckpointStore

    store = BlobCheckpointStore.from_connection_string(connection_string, name)
    await store._container_client.create_container()
    return store


async def test_blob_checkpoints_survive_a_restart_in_the_sdk_layout(
        eventhubs_server: EventHubsServer, azurite: str, tmp_path: Path) -> None:
    hub = new_hub(eventhubs_server, 1)
    container = f"gw-{uuid.uuid4().hex[:12]}"
    store = await create_container(azurite, container)
    blob = {"azure_eventhubs_checkpoint_store": azurite,
            "azure_eventhubs_checkpoint_container": container}
    namespace = f"127.0.0.1:{eventhubs_server.port}"
    batch = [msg("s/a", f"e{i}".encode()) for i in range(4)]
    try:
        async with make_uplink(eventhubs_server, tmp_path / "one", hub, **blob) as queue:
            assert all(r.ok for r in await queue.publish_batch(hub, batch))
            async with Received(queue, hub) as received:
                assert [m.id for m in await received.take(4)] == [m.id for m in batch]
                for i in (0, 1, 3):  # e2 stays in flight
                    assert await queue.acknowledge(batch[i].id) is True
            assert await queue.get_queue_depth(hub) == 2
        checkpoints = await store.list_checkpoints(namespace, hub, "$Default")
        assert [(c["partition_id"], c["sequence_number"]) for c in checkpoints] == [("0", 1)]
        assert not (tmp_path / "one" / "eventhubs" / "checkpoints").exists()  # not in a file

        # another gateway (another state directory) continues from the blob checkpoints
        async with make_uplink(eventhubs_server, tmp_path / "two", hub, **blob) as queue:
            assert await queue.get_queue_depth(hub) == 2
            async with Received(queue, hub) as received:
                again = await received.take(2)
                assert [m.id for m in again] == [batch[2].id, batch[3].id]
                for m in again:
                    assert await queue.acknowledge(m.id) is True
            assert await queue.get_queue_depth(hub) == 0
        checkpoints = await store.list_checkpoints(namespace, hub, "$Default")
        assert [(c["partition_id"], c["sequence_number"]) for c in checkpoints] == [("0", 3)]
    finally:
        await store.close()


async def test_a_missing_checkpoint_container_is_named(
        eventhubs_server: EventHubsServer, azurite: str, hub: str, tmp_path: Path) -> None:
    async with make_uplink(eventhubs_server, tmp_path, hub,
                           azure_eventhubs_checkpoint_store=azurite,
                           azure_eventhubs_checkpoint_container="nowhere") as queue:
        with pytest.raises(PermanentError, match="container 'nowhere' does not exist"):
            await queue.get_queue_depth(hub)


# -- an outage under the running gateway daemon ---------------------------------------------

@pytest.fixture
def own_server() -> Iterator[EventHubsServer]:
    server = EventHubsServer({}, port=free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()


def uplink_state(gw: GatewayProcess) -> str:
    with urllib.request.urlopen(f"{gw.http_url()}/status.json", timeout=5) as resp:
        return str(orjson.loads(resp.read())["snapshot"]["uplinks"][0]["state"])


def first_numbers(events: list[StoredEvent]) -> dict[str, list[int]]:
    """Per MQTT topic, message numbers in partition order, duplicates dropped
    (at-least-once allows a duplicate; a gap or a reordering is a failure)."""
    seen: set[str] = set()
    numbers: dict[str, list[int]] = defaultdict(list)
    for event in sorted(events, key=lambda e: (e.partition_id, e.sequence_number)):
        mid = event.properties[ATTR_MESSAGE_ID]
        if mid not in seen:
            seen.add(mid)
            numbers[event.properties[ATTR_MQTT_TOPIC]].append(orjson.loads(event.body)["n"])
    return numbers


def test_service_outage_under_the_daemon_loses_nothing_and_keeps_per_topic_order(
        tmp_path: Path, mosquitto: ServerProcess, own_server: EventHubsServer) -> None:
    hub = new_hub(own_server, 2)
    root = f"eh/{uuid.uuid4().hex[:8]}"
    queue = {"type": "azure_eventhubs",
             "azure_eventhubs_connection_string": own_server.connection_string(),
             "azure_eventhubs_name": hub, "azure_eventhubs_send_timeout": "2s",
             "azure_eventhubs_request_timeout": "2s"}
    gw = GatewayProcess(gateway_config(tmp_path, mosquitto.port, root, queue), tmp_path)
    gw.start()
    pub = Publisher(mosquitto.port)
    topics = [f"{root}/dev{i}/temp" for i in range(4)]
    sent = [(t, orjson.dumps({"n": n})) for n in range(150) for t in topics]
    try:
        for topic, body in sent[:200]:
            pub.publish(topic, body)
        pub.wait_all_acked(200)
        wait_until(lambda: len(own_server.events(hub)) >= 100, 20, "events before the outage")
        own_server.stop()  # abrupt: connections drop, stored events stay
        for topic, body in sent[200:450]:
            pub.publish(topic, body)
        pub.wait_all_acked(450)
        wait_until(lambda: uplink_state(gw) != "online", 20, "the gateway noticing the outage")
        assert gw.status()["uplinks"]["default"]["depth"] > 0  # buffered meanwhile
        own_server.start()  # same port
        for topic, body in sent[450:]:
            pub.publish(topic, body)
        pub.wait_all_acked(len(sent))
        wait_until(lambda: len({e.properties[ATTR_MESSAGE_ID] for e in own_server.events(hub)})
                   >= len(sent), 45, "every message in the hub")
        wait_until(lambda: uplink_state(gw) == "online", 20, "the uplink back online")
        status = gw.status()["uplinks"]["default"]
        assert status["dead_letter"] == 0 and status["dropped"] == {}
        assert gw.stop() == 0
        assert "azure.eventhub" not in gw.log()  # the SDK's chatter stays below WARNING
    finally:
        pub.close()
        if gw.proc is not None:
            gw.kill()
    numbers = first_numbers(own_server.events(hub))
    assert sum(len(n) for n in numbers.values()) == len(sent)
    for topic in topics:
        assert numbers[topic] == list(range(150)), topic
