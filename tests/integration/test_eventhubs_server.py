"""The test Event Hubs server (tests/eventhubs_server/) against the real azure-eventhub SDK.

Every test asserts what the server stored or delivered, event by event, so a server that
accepted and dropped, reordered or mislabelled events fails here before any uplink test.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import socket
import struct
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.eventhubs_server import EventHubsServer
from tests.eventhubs_server.codec import Symbol, UInt, decode
from tests.eventhubs_server.frames import (
    AMQP_HEADER,
    FRAME_SASL,
    SASL_HEADER,
    encode_frame,
    parse_frame,
)
from tests.servers import IN_CI, free_port

pytestmark = pytest.mark.integration

if not IN_CI:  # CI installs the test extra; there a missing SDK must fail, not skip
    pytest.importorskip("azure.eventhub")
from azure.eventhub import EventData  # noqa: E402
from azure.eventhub.aio import EventHubConsumerClient, EventHubProducerClient  # noqa: E402
from azure.eventhub.exceptions import EventDataSendError, EventHubError  # noqa: E402

_names = itertools.count()


def new_hub(server: EventHubsServer, partitions: int = 2) -> str:
    name = f"hub-{uuid.uuid4().hex[:8]}-{next(_names)}"
    server.add_hub(name, partitions)
    return name


def producer(server: EventHubsServer, hub: str, **kwargs: Any) -> EventHubProducerClient:
    return EventHubProducerClient.from_connection_string(
        server.connection_string(hub), retry_total=kwargs.pop("retry_total", 1),
        retry_backoff_factor=0.1, **kwargs)


async def receive(server: EventHubsServer, hub: str, partition: str, count: int,
                  **position: Any) -> list[Any]:
    """Receive exactly ``count`` events (waits a little longer to catch extra ones)."""
    got: list[Any] = []
    enough = asyncio.Event()

    async def on_event(_context: Any, event: Any) -> None:
        got.append(event)
        if len(got) >= count:
            enough.set()

    client = EventHubConsumerClient.from_connection_string(
        server.connection_string(hub), consumer_group="$Default",
        load_balancing_interval=0.2)  # else receive() returns up to 30 s after close()
    async with client:
        task = asyncio.create_task(client.receive(on_event, partition_id=partition, **position))
        await asyncio.wait_for(enough.wait(), 10)
        await asyncio.sleep(0.3)  # an extra, unwanted event would arrive now
    await task
    return got


@pytest.fixture
async def hub(eventhubs_server: EventHubsServer) -> AsyncIterator[str]:
    yield new_hub(eventhubs_server)


async def test_one_event_is_stored_exactly(eventhubs_server: EventHubsServer, hub: str) -> None:
    event = EventData(b"\x00payload\xff")
    event.properties = {"gateway-id": "g-1", "mqtt-topic": "sensors/a", "n": 7}
    event.content_type = "application/octet-stream"
    event.message_id = "m-1"
    event.correlation_id = "c-1"
    async with producer(eventhubs_server, hub) as client:
        await client.send_event(event, partition_key="sensors/a")
    [stored] = eventhubs_server.events(hub)
    assert stored.body == b"\x00payload\xff"
    assert stored.properties == {"gateway-id": "g-1", "mqtt-topic": "sensors/a", "n": 7}
    assert stored.partition_key == "sensors/a"
    assert (stored.message_id, stored.correlation_id) == ("m-1", "c-1")
    assert stored.content_type == "application/octet-stream"
    assert (stored.sequence_number, stored.offset) == (0, 0)
    assert abs(stored.enqueued_time - datetime.now(UTC)) < timedelta(seconds=5)
    assert any(token.endswith(f"/{hub}") for token in eventhubs_server.cbs_tokens)


async def test_batch_with_key_lands_in_one_partition_in_order(
        eventhubs_server: EventHubsServer, hub: str) -> None:
    async with producer(eventhubs_server, hub) as client:
        batch = await client.create_batch(partition_key="device-7")
        for i in range(3):
            event = EventData(f"event {i}".encode())
            event.properties = {"i": i, "kind": "reading"}
            batch.add(event)
        await client.send_batch(batch)
        again = await client.create_batch(partition_key="device-7")
        again.add(EventData(b"event 3"))
        await client.send_batch(again)
    stored = eventhubs_server.events(hub)
    assert [e.body for e in stored] == [b"event 0", b"event 1", b"event 2", b"event 3"]
    assert [e.properties for e in stored[:3]] == [{"i": i, "kind": "reading"} for i in range(3)]
    assert {e.partition_id for e in stored} == {stored[0].partition_id}  # the key decides
    assert [e.sequence_number for e in stored] == [0, 1, 2, 3]
    assert {e.partition_key for e in stored} == {"device-7"}
    offsets = [e.offset for e in stored]
    assert offsets == sorted(set(offsets))


async def test_partition_id_and_round_robin(eventhubs_server: EventHubsServer, hub: str) -> None:
    async with producer(eventhubs_server, hub) as client:
        batch = await client.create_batch(partition_id="1")
        batch.add(EventData(b"to one"))
        await client.send_batch(batch)
        for body in (b"a", b"b"):
            await client.send_event(EventData(body))
    assert eventhubs_server.events(hub, "1")[0].body == b"to one"
    spread = {e.body: e.partition_id for e in eventhubs_server.events(hub)}
    assert spread[b"a"] != spread[b"b"]  # round robin over the two partitions


async def test_hub_and_partition_properties(eventhubs_server: EventHubsServer, hub: str) -> None:
    async with producer(eventhubs_server, hub) as client:
        hub_props = await client.get_eventhub_properties()
        empty = await client.get_partition_properties("0")
        for body in (b"x", b"y"):
            await client.send_event(EventData(body), partition_id="0")
        filled = await client.get_partition_properties("0")
    assert hub_props["eventhub_name"] == hub
    assert hub_props["partition_ids"] == ["0", "1"]
    assert abs(hub_props["created_at"] - datetime.now(UTC)) < timedelta(minutes=5)
    assert empty["is_empty"] is True
    assert empty["last_enqueued_sequence_number"] == -1
    assert filled["is_empty"] is False
    assert filled["beginning_sequence_number"] == 0
    assert filled["last_enqueued_sequence_number"] == 1
    last = eventhubs_server.events(hub, "0")[-1]
    assert filled["last_enqueued_offset"] == str(last.offset)
    assert filled["last_enqueued_time_utc"] == last.enqueued_time


async def test_receive_from_start_and_from_a_sequence_number(
        eventhubs_server: EventHubsServer, hub: str) -> None:
    async with producer(eventhubs_server, hub) as client:
        for i in range(5):
            event = EventData(f"r{i}".encode())
            event.properties = {"i": i}
            await client.send_event(event, partition_id="0")
    stored = eventhubs_server.events(hub, "0")

    everything, after_two, from_two = await asyncio.gather(
        receive(eventhubs_server, hub, "0", 5, starting_position="-1"),
        receive(eventhubs_server, hub, "0", 2, starting_position=2),
        receive(eventhubs_server, hub, "0", 3, starting_position=2,
                starting_position_inclusive=True))
    assert [e.body_as_str() for e in everything] == [f"r{i}" for i in range(5)]
    assert [e.sequence_number for e in everything] == [0, 1, 2, 3, 4]
    assert [e.offset for e in everything] == [str(e.offset) for e in stored]
    assert [e.enqueued_time for e in everything] == [e.enqueued_time for e in stored]
    assert [e.properties for e in everything] == [{b"i": i} for i in range(5)]
    assert [e.sequence_number for e in after_two] == [3, 4]
    assert [e.sequence_number for e in from_two] == [2, 3, 4]


async def test_receiver_gets_new_events_and_partition_key(
        eventhubs_server: EventHubsServer, hub: str) -> None:
    async with producer(eventhubs_server, hub) as client:
        await client.send_event(EventData(b"before"), partition_key="live-key")
        [before] = eventhubs_server.events(hub)
        pending = asyncio.create_task(receive(
            eventhubs_server, hub, before.partition_id, 2, starting_position="@latest"))
        # the receiver is attached before the events exist
        await asyncio.to_thread(eventhubs_server.wait_for_receivers, hub, before.partition_id)
        await client.send_event(EventData(b"live-0"), partition_key="live-key")
        batch = await client.create_batch(partition_key="live-key")
        batch.add(EventData(b"live-1"))
        await client.send_batch(batch)
        got = await pending
    assert [e.body_as_str() for e in got] == ["live-0", "live-1"]
    assert [e.partition_key for e in got] == [b"live-key", b"live-key"]
    assert [e.sequence_number for e in got] == [1, 2]


async def test_too_large_event_is_refused(eventhubs_server: EventHubsServer, hub: str) -> None:
    async with producer(eventhubs_server, hub) as client:
        # the SDK sends it; the server rejects it with amqp:link:message-size-exceeded
        with pytest.raises(EventDataSendError, match="message larger than 1048576 bytes"):
            await client.send_event(EventData(b"x" * (1024 * 1024 + 1)))
        batch = await client.create_batch()
        assert batch.max_size_in_bytes == 1024 * 1024  # from the attach's max-message-size
        await client.send_event(EventData(b"small"))
    assert [e.body for e in eventhubs_server.events(hub)] == [b"small"]


async def test_rejected_send_raises_and_stores_nothing(
        eventhubs_server: EventHubsServer, hub: str) -> None:
    # the SDK retries a rejection with amqp:internal-error: reject every attempt
    eventhubs_server.reject_next_sends(hub, 3, "amqp:internal-error", "test rejection")
    async with producer(eventhubs_server, hub, retry_total=2) as client:
        with pytest.raises(EventHubError, match="test rejection"):
            await client.send_event(EventData(b"refused"))
        await client.send_event(EventData(b"accepted"))
    assert [e.body for e in eventhubs_server.events(hub)] == [b"accepted"]


async def test_unknown_hub_and_partition_fail(eventhubs_server: EventHubsServer,
                                              hub: str) -> None:
    async with producer(eventhubs_server, "no-such-hub", retry_total=0) as client:
        with pytest.raises(EventHubError, match="no-such-hub"):
            await client.send_event(EventData(b"lost"))
        with pytest.raises(EventHubError, match=r"404.*no event hub 'no-such-hub'"):
            await client.get_eventhub_properties()
    async with producer(eventhubs_server, hub, retry_total=0) as client:
        with pytest.raises(EventHubError, match="has no partition '7'"):
            await client.get_partition_properties("7")
    assert eventhubs_server.events(hub) == []


# The SDK does not close the socket of the connection the outage broke (checked: the
# unclosed transport is the client's, not the server's); its ResourceWarning is not ours.
@pytest.mark.filterwarnings("ignore::ResourceWarning",
                            "ignore::pytest.PytestUnraisableExceptionWarning")
async def test_outage_then_reconnect_loses_nothing() -> None:
    server = EventHubsServer({"outage": 1}, port=free_port())
    server.start()
    try:
        async with producer(server, "outage", retry_total=5) as client:
            await client.send_event(EventData(b"before"))
            accepted = server.connections_accepted
            server.stop()
            server.start()
            await client.send_event(EventData(b"after"))
        assert [e.body for e in server.wait_for_events("outage", 2)] == [b"before", b"after"]
        assert server.connections_accepted > accepted
    finally:
        server.stop()
        gc.collect()  # the leaked client socket warns now, under this test's filter


async def test_wait_for_events_names_what_is_missing(eventhubs_server: EventHubsServer,
                                                     hub: str) -> None:
    with pytest.raises(TimeoutError, match="2 events, have 0"):
        await asyncio.to_thread(eventhubs_server.wait_for_events, hub, 2, 0.2)


async def test_large_event_and_enqueued_time_position(eventhubs_server: EventHubsServer,
                                                      hub: str) -> None:
    big = bytes(range(256)) * 1200  # 300 KB: several AMQP frames each way
    async with producer(eventhubs_server, hub) as client:
        await client.send_event(EventData(b"old"), partition_id="0")
        await asyncio.sleep(0.05)
        await client.send_event(EventData(big), partition_id="0")
    old, new = eventhubs_server.events(hub, "0")
    assert new.body == big
    assert new.enqueued_time > old.enqueued_time
    [got] = await receive(eventhubs_server, hub, "0", 1, starting_position=old.enqueued_time)
    assert got.body_as_str(encoding="latin-1").encode("latin-1") == big
    assert got.sequence_number == 1


async def test_higher_owner_level_takes_the_partition(eventhubs_server: EventHubsServer,
                                                      hub: str) -> None:
    errors: list[Exception] = []

    async def on_error(_context: Any, error: Exception) -> None:
        errors.append(error)

    async def ignore(_context: Any, _event: Any) -> None:
        pass

    first = EventHubConsumerClient.from_connection_string(
        eventhubs_server.connection_string(hub), consumer_group="$Default",
        load_balancing_interval=0.2)
    async with first:
        task = asyncio.create_task(first.receive(
            ignore, partition_id="0", owner_level=0, on_error=on_error,
            starting_position="@latest"))
        assert await asyncio.to_thread(eventhubs_server.wait_for_receivers, hub, "0") == [0]
        assert errors == []
        async with producer(eventhubs_server, hub) as client:
            pending = asyncio.create_task(receive(
                eventhubs_server, hub, "0", 1, starting_position="-1", owner_level=1))
            await client.send_event(EventData(b"for the owner"), partition_id="0")
            [got] = await pending

    await task
    assert got.body_as_str() == "for the owner"
    assert any("owner level" in str(error) for error in errors), errors


def _exchange(server: EventHubsServer, data: bytes) -> bytes:
    """Send raw bytes, return everything the server answers until it closes."""
    with socket.create_connection((server.host, server.port), timeout=5) as sock:
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received


def test_not_amqp_gets_the_amqp_header_and_a_closed_socket(
        eventhubs_server: EventHubsServer) -> None:
    assert _exchange(eventhubs_server, b"GET / HTTP/1.1\r\n\r\n") == AMQP_HEADER


def test_other_sasl_mechanisms_are_refused(eventhubs_server: EventHubsServer) -> None:
    plain = encode_frame(0, "sasl-init", [Symbol("PLAIN"), b"\0user\0pass", None],
                         frame_type=FRAME_SASL)
    answer = _exchange(eventhubs_server, SASL_HEADER + plain)
    assert answer.startswith(SASL_HEADER)
    frames = answer[len(SASL_HEADER):]
    first = parse_frame(frames[:8], frames[8:struct.unpack(">I", frames[:4])[0]])
    assert first.name == "sasl-mechanisms"
    assert list(first.fields[0]) == ["ANONYMOUS"]
    rest = frames[struct.unpack(">I", frames[:4])[0]:]
    outcome = parse_frame(rest[:8], rest[8:])
    assert (outcome.name, outcome.fields[0]) == ("sasl-outcome", 3)  # sys-perm


def test_heartbeats_keep_an_idle_client_alive(eventhubs_server: EventHubsServer) -> None:
    """A client announcing idle-time-out 200 ms gets empty frames at least twice as often."""
    with (socket.create_connection((eventhubs_server.host, eventhubs_server.port),
                                   timeout=5) as sock, sock.makefile("rb") as stream):
        sock.sendall(AMQP_HEADER + encode_frame(
            0, "open", ["raw-client", None, UInt(65536), None, UInt(200)]))
        assert stream.read(8) == AMQP_HEADER

        def next_frame() -> Any:
            header = stream.read(8)
            return parse_frame(header, stream.read(struct.unpack(">I", header[:4])[0] - 8))

        header = stream.read(8)
        raw_open = decode(stream.read(struct.unpack(">I", header[:4])[0] - 8))
        assert raw_open.descriptor == 0x10  # open, with every field written (no trimming)
        assert raw_open.value == ["eventhubs-test-server", None, 64 * 1024, 255] + [None] * 6
        started = time.monotonic()
        assert [next_frame().name for _ in range(3)] == [None, None, None]  # empty frames
        assert time.monotonic() - started < 1.0
