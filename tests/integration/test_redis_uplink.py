"""Redis-specific behaviour of the Redis Streams uplink, against a real redis-server.

The generic promises are in tests/contract/; here: the entry layout on the wire, one
pipeline per batch, MAXLEN trimming, recovery of pending entries (own and other
consumers'), the dead-letter stream, depth from the group's lag, outages and WRONGTYPE.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator, Awaitable
from dataclasses import replace
from typing import Any, TypeVar

import orjson
import pytest
import redis.asyncio as aioredis
from redis.asyncio.connection import Connection as AsyncConnection

from gateway.config import parse_config
from gateway.errors import MessageRejected, NotSupportedError, PermanentError, UplinkUnavailable
from gateway.message import QueueMessage, new_message_id
from gateway.queue.registry import create_backend
from gateway.uplinks.redis.settings import RedisSettings
from gateway.uplinks.redis.uplink import RedisStreamsQueue
from tests.servers import ServerProcess

pytestmark = pytest.mark.integration

T = TypeVar("T")
STREAM = "sensors"
DLQ = "sensors-dlq"


async def within(call: Awaitable[T], seconds: float = 10.0) -> T:
    return await asyncio.wait_for(call, seconds)


def settings_for(server: ServerProcess, **overrides: Any) -> RedisSettings:
    base = RedisSettings(redis_url=f"redis://127.0.0.1:{server.port}/0",
                         redis_socket_timeout=2.0)
    return replace(base, **overrides)


@contextlib.asynccontextmanager
async def uplink(server: ServerProcess, consumer: str = "gw-a",
                 **overrides: Any) -> AsyncIterator[RedisStreamsQueue]:
    queue = RedisStreamsQueue(settings_for(server, **overrides), dlq_name=DLQ,
                              consumer_name=consumer)
    await within(queue.connect())
    try:
        yield queue
    finally:
        await queue.disconnect()


@pytest.fixture
async def raw(redis: ServerProcess) -> AsyncIterator[aioredis.Redis]:
    """A plain client to look at what the uplink wrote."""
    client = aioredis.Redis(host="127.0.0.1", port=redis.port)
    try:
        yield client
    finally:
        await client.aclose()


@contextlib.asynccontextmanager
async def consuming(queue: RedisStreamsQueue, stream: str = STREAM, batch_size: int = 10
                    ) -> AsyncIterator[asyncio.Queue[QueueMessage]]:
    received: asyncio.Queue[QueueMessage] = asyncio.Queue()

    async def handler(msg: QueueMessage) -> None:
        await received.put(msg)

    task = asyncio.create_task(queue.consume(stream, handler, batch_size, 0.2))
    try:
        yield received
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await within(task, 5)


def batch_of(count: int, size: int = 16) -> list[QueueMessage]:
    return [QueueMessage(new_message_id(), bytes([i % 256]) * size, {"n": str(i)}, 1700000000.5)
            for i in range(count)]


# -- publishing ---------------------------------------------------------------------------

async def test_entry_layout_is_the_documented_one(redis: ServerProcess,
                                                  raw: aioredis.Redis) -> None:
    async with uplink(redis) as q:
        mid = await within(q.publish(STREAM, b"\x00\xffraw", priority=3,
                                     attributes={"mqtt_topic": "a/b"}, message_id="m-1"))
    assert mid == "m-1"
    ((_, fields),) = await raw.xrange(STREAM)
    assert set(fields) == {b"id", b"body", b"attributes", b"timestamp", b"priority"}
    assert fields[b"id"] == b"m-1"
    assert fields[b"body"] == b"\x00\xffraw"
    assert orjson.loads(fields[b"attributes"]) == {"mqtt_topic": "a/b"}
    assert float(fields[b"timestamp"]) > 1.7e9
    assert fields[b"priority"] == b"3"


async def test_publish_batch_is_one_pipeline_in_input_order(
        redis: ServerProcess, raw: aioredis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    async with uplink(redis) as q:
        writes: list[int] = []
        real_send = AsyncConnection.send_packed_command

        async def counting_send(conn: AsyncConnection, command: Any, check_health: bool = True,
                                ) -> None:
            writes.append(sum(bytes(part).count(b"$4\r\nXADD\r\n") for part in command))
            await real_send(conn, command, check_health)

        monkeypatch.setattr(AsyncConnection, "send_packed_command", counting_send)
        batch = batch_of(500)
        results = await within(q.publish_batch(STREAM, batch))
    assert writes == [500]  # one write carries the whole batch: one round trip
    assert all(r.ok for r in results)
    assert [r.message_id for r in results] == [m.id for m in batch]
    entries = await raw.xrange(STREAM)
    assert [f[b"id"].decode() for _, f in entries] == [m.id for m in batch]
    assert float(entries[0][1][b"timestamp"]) == 1700000000.5  # the message's own time


async def test_maxlen_trims_the_stream_approximately(redis: ServerProcess,
                                                     raw: aioredis.Redis) -> None:
    async with uplink(redis, redis_maxlen=100) as q:
        for _ in range(10):
            assert all(r.ok for r in await within(q.publish_batch(STREAM, batch_of(100))))
        await within(q.publish(STREAM, b"single"))
    length = await raw.xlen(STREAM)
    assert 100 <= length < 300, length  # '~' trims whole nodes, never below MAXLEN


async def test_delay_is_not_supported(redis: ServerProcess) -> None:
    async with uplink(redis) as q:
        with pytest.raises(NotSupportedError):
            await within(q.publish(STREAM, b"later", delay_seconds=5))


async def test_wrongtype_key_rejects_its_messages_not_the_connection(
        redis: ServerProcess, raw: aioredis.Redis) -> None:
    await raw.set("not-a-stream", "plain string")
    async with uplink(redis) as q:
        with pytest.raises(MessageRejected) as caught:
            await within(q.publish("not-a-stream", b"x"))
        assert caught.value.code == "WRONGTYPE"
        results = await within(q.publish_batch("not-a-stream", batch_of(3)))
        assert all(isinstance(r.error, MessageRejected) for r in results)
        # one bad message in a batch to a good stream fails alone
        good = batch_of(2)
        bad = QueueMessage(new_message_id(), b"bad", {1: "x"})  # type: ignore[dict-item]
        results = await within(q.publish_batch(STREAM, [good[0], bad, good[1]]))
        assert [r.ok for r in results] == [True, False, True]
        assert isinstance(results[1].error, MessageRejected)
        assert await within(q.health_check()) is True
    assert await raw.xlen(STREAM) == 2


# -- consuming and settling ---------------------------------------------------------------

async def test_ack_deletes_the_entry_by_default(redis: ServerProcess,
                                                raw: aioredis.Redis) -> None:
    async with uplink(redis) as q:
        mid = await within(q.publish(STREAM, b"x"))
        async with consuming(q) as received:
            msg = await within(received.get())
            assert msg.raw_message is not None and msg.raw_message[0] == STREAM
            assert await within(q.acknowledge(mid)) is True
    assert await raw.xlen(STREAM) == 0
    assert (await raw.xpending(STREAM, "openhqm-gateway"))["pending"] == 0


async def test_ack_keeps_history_when_delete_is_off(redis: ServerProcess,
                                                    raw: aioredis.Redis) -> None:
    async with uplink(redis, redis_delete_acked=False) as q:
        await within(q.publish_batch(STREAM, batch_of(3)))
        async with consuming(q) as received:
            first = await within(received.get())
            assert await within(q.acknowledge(first.id)) is True
            assert await within(q.get_queue_depth(STREAM)) == 2
    assert await raw.xlen(STREAM) == 3


async def test_own_pending_entries_are_redelivered_after_a_restart(redis: ServerProcess) -> None:
    async with uplink(redis, consumer="gw-a") as q:
        mid = await within(q.publish(STREAM, b"unsettled"))
        async with consuming(q) as received:
            assert (await within(received.get())).id == mid
        # disconnect without acknowledging: the entry stays pending under "gw-a"
    async with uplink(redis, consumer="gw-a") as q, consuming(q) as received:
        msg = await within(received.get(), 3)
        assert msg.id == mid
        assert msg.retry_count == 1
        assert await within(q.acknowledge(mid)) is True
        assert await within(q.get_queue_depth(STREAM)) == 0


async def test_xautoclaim_takes_over_a_stale_entry_of_another_consumer(
        redis: ServerProcess, raw: aioredis.Redis) -> None:
    async with uplink(redis, consumer="crashed") as q:
        mid = await within(q.publish(STREAM, b"orphan"))
        async with consuming(q) as received:
            assert (await within(received.get())).id == mid
    async with uplink(redis, consumer="survivor", redis_claim_idle=0.3) as q, \
            consuming(q) as received:
        msg = await within(received.get(), 5)
        assert msg.id == mid
        assert msg.body == b"orphan"
        assert msg.retry_count >= 1
        pending = await raw.xpending_range(STREAM, "openhqm-gateway", "-", "+", 10)
        assert [p["consumer"] for p in pending] == [b"survivor"]
        assert await within(q.acknowledge(mid)) is True
    assert (await raw.xpending(STREAM, "openhqm-gateway"))["pending"] == 0


async def test_requeue_appends_a_copy_with_retry_count(redis: ServerProcess,
                                                       raw: aioredis.Redis) -> None:
    async with uplink(redis) as q:
        mid = await within(q.publish(STREAM, b"again", attributes={"k": "v"}))
        async with consuming(q) as received:
            await within(received.get())
            assert await within(q.reject(mid, requeue=True, reason="later")) is True
            again = await within(received.get())
            assert (again.id, again.body, again.attributes) == (mid, b"again", {"k": "v"})
            assert again.retry_count == 1
            ((_, fields),) = await raw.xrange(STREAM)  # the old entry is gone
            assert fields[b"retry_count"] == b"1"
            assert await within(q.acknowledge(mid)) is True


async def test_reject_moves_the_entry_to_the_dead_letter_stream(
        redis: ServerProcess, raw: aioredis.Redis) -> None:
    async with uplink(redis) as q:
        mid = await within(q.publish(STREAM, b"\x01bad", attributes={"a": "1"}))
        async with consuming(q) as received:
            msg = await within(received.get())
            assert await within(q.reject(mid, requeue=False, reason="schema mismatch")) is True
        assert await within(q.get_queue_depth(STREAM)) == 0
    assert await raw.xlen(STREAM) == 0
    ((_, dead),) = await raw.xrange(DLQ)
    assert dead[b"id"] == mid.encode()
    assert dead[b"body"] == b"\x01bad"
    assert orjson.loads(dead[b"attributes"]) == {"a": "1"}
    assert dead[b"reason"] == b"schema mismatch"
    assert dead[b"source_stream"] == STREAM.encode()
    assert msg.raw_message is not None
    assert dead[b"source_entry_id"] == msg.raw_message[1].encode()


async def test_a_dead_letter_stream_of_the_wrong_type_loses_nothing(
        redis: ServerProcess, raw: aioredis.Redis) -> None:
    await raw.set(DLQ, "occupied")
    async with uplink(redis) as q:
        mid = await within(q.publish(STREAM, b"precious"))
        async with consuming(q) as received:
            await within(received.get())
            with pytest.raises(PermanentError):
                await within(q.reject(mid, requeue=False, reason="x"))
            # still in flight here and still pending in Redis: it can be settled otherwise
            assert await within(q.get_queue_depth(STREAM)) == 1
            assert await within(q.acknowledge(mid)) is True
    assert await raw.xlen(STREAM) == 0


# -- depth, purge, configuration ----------------------------------------------------------

async def test_depth_is_lag_plus_pending(redis: ServerProcess, raw: aioredis.Redis) -> None:
    async with uplink(redis) as q:
        assert await within(q.get_queue_depth(STREAM)) == 0  # no stream at all
        await within(q.publish_batch(STREAM, batch_of(5)))
        assert await within(q.get_queue_depth(STREAM)) == 5  # no group yet: XLEN
        async with consuming(q, batch_size=2) as received:
            first, second = await within(received.get()), await within(received.get())
            groups = await raw.xinfo_groups(STREAM)
            assert groups[0]["pending"] + groups[0]["lag"] == 5
            assert await within(q.get_queue_depth(STREAM)) == 5
            assert await within(q.acknowledge(first.id)) is True
            assert await within(q.acknowledge(second.id)) is True
            assert await within(q.get_queue_depth(STREAM)) == 3
        # another group's consumer reading the stream changes nothing for ours
        await raw.xgroup_create(STREAM, "cloud-workers", id="0")
        await raw.xreadgroup("cloud-workers", "w1", {STREAM: ">"}, count=10)
        assert await within(q.get_queue_depth(STREAM)) == 3


async def test_depth_counts_when_redis_cannot_tell_the_lag(redis: ServerProcess,
                                                           raw: aioredis.Redis) -> None:
    async with uplink(redis) as q:
        await within(q.publish_batch(STREAM, batch_of(4)))
        await within(q.create_queue(STREAM))
        # deleting an undelivered entry leaves a tombstone ahead of the group: lag is unknown
        last_id = (await raw.xrevrange(STREAM, count=1))[0][0]
        await raw.xdel(STREAM, last_id)
        assert (await raw.xinfo_groups(STREAM))[0]["lag"] is None
        assert await within(q.get_queue_depth(STREAM)) == 3


async def test_purge_clears_backlog_and_pending(redis: ServerProcess) -> None:
    async with uplink(redis) as q:
        await within(q.publish_batch(STREAM, batch_of(6)))
        async with consuming(q, batch_size=2) as received:
            await within(received.get())
            assert await within(q.purge_queue(STREAM)) == 6
            assert await within(q.get_queue_depth(STREAM)) == 0
        async with consuming(q) as received:
            mid = await within(q.publish(STREAM, b"fresh"))
            assert (await within(received.get())).id == mid


async def test_from_config_reads_the_queue_section() -> None:
    config = parse_config({
        "gateway": {"id": "edge-7"},
        "queue": {"type": "redis", "redis_url": "redis://127.0.0.1:1/0", "redis_maxlen": 50,
                  "dlq_name": "edge-dlq", "redis_claim_idle": "2s"},
    }, "<test>")
    queue = create_backend(config)
    assert isinstance(queue, RedisStreamsQueue)
    assert (queue.consumer, queue.dlq_name, queue.settings.redis_maxlen) == ("edge-7",
                                                                             "edge-dlq", 50)
    assert queue.settings.redis_claim_idle == 2.0
    with pytest.raises(UplinkUnavailable):  # nothing listens on port 1
        await within(queue.connect())


# -- outages ------------------------------------------------------------------------------

async def test_outage_mid_batch_gives_results_and_publishing_resumes_after_restart(
        redis: ServerProcess, raw: aioredis.Redis) -> None:
    assert redis.proc is not None
    before = batch_of(10)
    async with uplink(redis) as q:
        assert all(r.ok for r in await within(q.publish_batch(STREAM, before)))
        # freeze the server while a big batch is on the wire: the pipeline times out
        redis.proc.send_signal(signal.SIGSTOP)
        try:
            results = await within(q.publish_batch(STREAM, batch_of(5000, 256)), 15)
        finally:
            redis.proc.send_signal(signal.SIGCONT)
        assert len(results) == 5000
        assert all(isinstance(r.error, UplinkUnavailable) for r in results)
        redis.stop()
        results = await within(q.publish_batch(STREAM, batch_of(3)))
        assert all(isinstance(r.error, UplinkUnavailable) for r in results)
        with pytest.raises(UplinkUnavailable):
            await within(q.publish(STREAM, b"down"))
        assert await within(q.health_check()) is False
        redis.start()
        assert await within(q.health_check()) is True
        assert all(r.ok for r in await within(q.publish_batch(STREAM, batch_of(2))))
    # the AOF kept the first batch across the restart; the frozen batch may or may not
    # have landed (nothing sent into an outage is trusted: it is sent again)
    kept = [f[b"id"].decode() for _, f in await raw.xrange(STREAM, count=10)]
    assert kept == [m.id for m in before]
    assert 12 <= await raw.xlen(STREAM) <= 5012


async def test_consume_rides_out_a_restart(redis: ServerProcess) -> None:
    async with uplink(redis) as q, consuming(q) as received:
        first = await within(q.publish(STREAM, b"before"))
        assert (await within(received.get())).id == first
        assert await within(q.acknowledge(first)) is True
        redis.restart()
        second = await within(q.publish(STREAM, b"after"))
        assert (await within(received.get(), 15)).id == second
        assert await within(q.acknowledge(second)) is True
