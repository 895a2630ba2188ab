"""The MessageQueueInterface contract, run against every backend in CONTRACT_BACKENDS.

Each test states one promise of gateway/queue/interface.py. Every backend call is bounded
by a timeout, so a broken backend fails the test instead of hanging it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import TypeVar

import orjson
import pytest

from gateway.errors import NotSupportedError, QueueError, UplinkUnavailable
from gateway.message import QueueMessage, encode_body, new_message_id
from gateway.queue.interface import MessageQueueInterface
from tests.contract.backends import ContractTarget

T = TypeVar("T")
CALL_TIMEOUT = 10.0
QUIET = 0.6  # how long "nothing arrives" is watched for


async def within(call: Awaitable[T], seconds: float = CALL_TIMEOUT) -> T:
    return await asyncio.wait_for(call, seconds)


class Consumer:
    """Runs ``consume`` in a task; what the handler receives lands in an asyncio.Queue.

    The handler settles nothing itself unless ``fail_first`` makes it raise once per id.
    """

    def __init__(self, queue: MessageQueueInterface, queue_name: str, *, batch_size: int = 10,
                 fail_first: bool = False) -> None:
        self.queue = queue
        self.queue_name = queue_name
        self.batch_size = batch_size
        self.fail_first = fail_first
        self.received: asyncio.Queue[QueueMessage] = asyncio.Queue()
        self._failed: set[str] = set()
        self._task: asyncio.Task[None] | None = None

    async def _handle(self, msg: QueueMessage) -> None:
        await self.received.put(msg)
        if self.fail_first and msg.id not in self._failed:
            self._failed.add(msg.id)
            raise RuntimeError("handler failed on purpose")

    async def __aenter__(self) -> Consumer:
        self._task = asyncio.create_task(self.queue.consume(
            self.queue_name, self._handle, batch_size=self.batch_size, wait_time_seconds=0.2))
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def next(self, timeout: float = CALL_TIMEOUT) -> QueueMessage:
        """The next delivered message; fails when none comes or consume() died."""
        assert self._task is not None
        getter = asyncio.ensure_future(self.received.get())
        done, _ = await asyncio.wait({getter, self._task}, timeout=timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
        if getter in done:
            return getter.result()
        getter.cancel()
        if self._task in done:
            self._task.result()  # re-raises what consume() died of
            pytest.fail("consume() returned although it must run until cancelled")
        pytest.fail(f"no message delivered within {timeout}s")

    async def take(self, count: int) -> list[QueueMessage]:
        return [await self.next() for _ in range(count)]

    async def assert_quiet(self, seconds: float = QUIET) -> None:
        await asyncio.sleep(seconds)
        assert self.received.empty(), f"unexpected delivery: {self.received.get_nowait()}"


def assert_attributes(received: dict[str, str], sent: dict[str, str]) -> None:
    """Every sent attribute arrives unchanged; a backend may add only the gateway's own."""
    assert {k: received.get(k) for k in sent} == sent
    extra = set(received) - set(sent)
    assert all(k.startswith("openhqm_") for k in extra), extra


# -- publish and consume ------------------------------------------------------------------

BODIES = {
    "binary": bytes(range(256)) * 4,
    "empty": b"",
    "json": orjson.dumps({"temp": 21.5, "unit": "C", "tags": ["a", "ü"]}),
}


async def test_publish_returns_the_given_id_and_consume_yields_id_body_attributes(
        backend: ContractTarget) -> None:
    q, name = backend.queue, backend.fresh_queue_name()
    sent: dict[str, tuple[bytes, dict[str, str]]] = {}
    for kind, body in BODIES.items():
        mid = new_message_id()
        attributes = {"kind": kind, "mqtt_topic": f"sensors/{kind}", "ünïcode": "välue"}
        assert await within(q.publish(name, body, attributes=attributes, message_id=mid)) == mid
        sent[mid] = (body, attributes)
    async with Consumer(q, name) as consumer:
        got = {m.id: m for m in await consumer.take(len(sent))}
        assert set(got) == set(sent)
        for mid, (body, attributes) in sent.items():
            assert got[mid].body == body
            assert isinstance(got[mid].body, bytes)
            assert_attributes(got[mid].attributes, attributes)
            assert got[mid].timestamp > 0
            assert got[mid].retry_count == 0
            assert await within(q.acknowledge(mid)) is True


async def test_publish_without_an_id_assigns_one(backend: ContractTarget) -> None:
    q, name = backend.queue, backend.fresh_queue_name()
    mid = await within(q.publish(name, {"reading": 1}))
    assert isinstance(mid, str) and mid
    async with Consumer(q, name) as consumer:
        msg = await consumer.next()
    assert msg.id == mid
    assert msg.json() == {"reading": 1}
    assert msg.body == encode_body({"reading": 1})


async def test_delay_is_honoured_or_refused(backend: ContractTarget) -> None:
    q, name = backend.queue, backend.fresh_queue_name()
    try:
        mid = await within(q.publish(name, b"later", delay_seconds=1.0))
    except NotSupportedError:
        return  # refusing is allowed; silently ignoring the delay is not
    async with Consumer(q, name) as consumer:
        await consumer.assert_quiet(0.5)
        assert (await consumer.next()).id == mid


async def test_publish_batch_returns_one_result_per_message_in_order(
        backend: ContractTarget) -> None:
    q, name = backend.queue, backend.fresh_queue_name()
    batch = [QueueMessage(new_message_id(), f"m{i}".encode(), {"i": str(i)}) for i in range(20)]
    results = await within(q.publish_batch(name, batch))
    assert [r.message_id for r in results] == [m.id for m in batch]
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    assert await within(q.get_queue_depth(name)) == len(batch)
    async with Consumer(q, name, batch_size=7) as consumer:
        got = {m.id: m for m in await consumer.take(len(batch))}
    assert {mid: m.body for mid, m in got.items()} == {m.id: m.body for m in batch}
    for m in batch:
        assert_attributes(got[m.id].attributes, m.attributes)


async def test_publish_batch_fails_only_the_refused_message(backend: ContractTarget) -> None:
    if backend.poison is None:
        pytest.skip(f"{backend.name}: {backend.poison_reason}")
    q, name = backend.queue, backend.fresh_queue_name()
    poison = await backend.poison(name)
    if poison is None:
        pytest.skip(f"{backend.name}: {backend.poison_reason}")
    good = [QueueMessage(new_message_id(), f"good{i}".encode()) for i in range(4)]
    batch = [good[0], good[1], poison, good[2], good[3]]
    results = await within(q.publish_batch(name, batch))
    assert [r.message_id for r in results] == [m.id for m in batch]
    assert [r.ok for r in results] == [True, True, False, True, True]
    error = results[2].error
    assert isinstance(error, QueueError) and not isinstance(error, UplinkUnavailable)
    async with Consumer(q, name) as consumer:
        assert {m.id for m in await consumer.take(4)} == {m.id for m in good}
        await consumer.assert_quiet()


# -- settling -----------------------------------------------------------------------------

async def test_acknowledged_messages_are_gone_and_depth_drops(backend: ContractTarget) -> None:
    q, name = backend.queue, backend.fresh_queue_name()
    first = await within(q.publish(name, b"one", message_id=new_message_id()))
    second = await within(q.publish(name, b"two", message_id=new_message_id()))
    assert await within(q.get_queue_depth(name)) == 2
    async with Consumer(q, name) as consumer:
        assert {m.id for m in await consumer.take(2)} == {first, second}
        assert await within(q.get_queue_depth(name)) == 2  # in flight is still backlog
        assert await within(q.acknowledge(first)) is True
        assert await within(q.get_queue_depth(name)) == 1
        assert await within(q.acknowledge(first)) is False  # not in flight any more
    # a new consume() of the same client redelivers neither the acked nor the in-flight one
    async with Consumer(q, name) as consumer:
        await consumer.assert_quiet()
        third = await within(q.publish(name, b"three", message_id=new_message_id()))
        assert (await consumer.next()).id == third
        await consumer.assert_quiet(0.3)
        assert await within(q.acknowledge(second)) is True
        assert await within(q.acknowledge(third)) is True
    assert await within(q.get_queue_depth(name)) == 0


async def test_reject_with_requeue_redelivers_with_a_growing_retry_count(
        backend: ContractTarget) -> None:
    q, name = backend.queue, backend.fresh_queue_name()
    mid = await within(q.publish(name, b"again", attributes={"k": "v"},
                                 message_id=new_message_id()))
    async with Consumer(q, name) as consumer:
        counts = []
        for _ in range(3):
            msg = await consumer.next()
            assert (msg.id, msg.body) == (mid, b"again")
            assert_attributes(msg.attributes, {"k": "v"})
            counts.append(msg.retry_count)
            assert await within(q.get_queue_depth(name)) == 1
            if len(counts) < 3:
                assert await within(q.reject(mid, requeue=True, reason="try later")) is True
        assert counts[0] == 0
        assert counts[0] < counts[1] < counts[2], counts
        assert await within(q.acknowledge(mid)) is True
        await consumer.assert_quiet()
    assert await within(q.get_queue_depth(name)) == 0


async def test_a_handler_that_raises_has_its_message_requeued(backend: ContractTarget) -> None:
    q, name = backend.queue, backend.fresh_queue_name()
    mid = await within(q.publish(name, b"flaky", message_id=new_message_id()))
    async with Consumer(q, name, fail_first=True) as consumer:
        first = await consumer.next()
        second = await consumer.next()
        assert first.id == second.id == mid
        assert second.retry_count > first.retry_count
        assert await within(q.acknowledge(mid)) is True
    assert await within(q.get_queue_depth(name)) == 0


async def test_reject_without_requeue_dead_letters_the_message(backend: ContractTarget) -> None:
    q, name = backend.queue, backend.fresh_queue_name()
    mid = await within(q.publish(name, b"bad", message_id=new_message_id()))
    keep = await within(q.publish(name, b"fine", message_id=new_message_id()))
    async with Consumer(q, name) as consumer:
        assert {m.id for m in await consumer.take(2)} == {mid, keep}
        assert await within(q.reject(mid, requeue=False, reason="unparseable payload")) is True
        assert await within(q.reject(mid, requeue=False, reason="twice")) is False
        await consumer.assert_quiet()
        assert await within(q.get_queue_depth(name)) == 1
        assert await within(q.acknowledge(keep)) is True
    assert await within(q.get_queue_depth(name)) == 0
    if backend.dead_letters is not None:
        dead = await within(backend.dead_letters(name))
        assert [d[0] for d in dead] == [mid]
        assert "unparseable payload" in dead[0][1]


async def test_unknown_ids_are_not_in_flight(backend: ContractTarget) -> None:
    q, name = backend.queue, backend.fresh_queue_name()
    assert await within(q.acknowledge(new_message_id())) is False
    assert await within(q.reject(new_message_id(), requeue=True)) is False
    assert await within(q.reject(new_message_id(), requeue=False, reason="x")) is False
    # published but never consumed is not in flight either
    mid = await within(q.publish(name, b"waiting", message_id=new_message_id()))
    assert await within(q.acknowledge(mid)) is False
    assert await within(q.get_queue_depth(name)) == 1


# -- depth and administration -------------------------------------------------------------

async def test_depth_counts_the_real_backlog(backend: ContractTarget) -> None:
    q, name = backend.queue, backend.fresh_queue_name()
    assert await within(q.get_queue_depth(name)) == 0
    batch = [QueueMessage(new_message_id(), b"x") for _ in range(5)]
    assert all(r.ok for r in await within(q.publish_batch(name, batch)))
    assert await within(q.get_queue_depth(name)) == 5
    async with Consumer(q, name, batch_size=2) as consumer:
        delivered = await consumer.take(3)
        assert await within(q.get_queue_depth(name)) == 5
        for msg in delivered:
            assert await within(q.acknowledge(msg.id)) is True
        assert await within(q.get_queue_depth(name)) == 2
        for msg in await consumer.take(2):
            assert await within(q.acknowledge(msg.id)) is True
    assert await within(q.get_queue_depth(name)) == 0
    other = backend.fresh_queue_name()
    await within(q.publish(other, b"elsewhere"))
    assert await within(q.get_queue_depth(name)) == 0
    assert await within(q.get_queue_depth(other)) == 1


async def test_health_check_is_true_on_a_live_backend(backend: ContractTarget) -> None:
    assert await within(backend.queue.health_check()) is True


async def test_create_delete_and_purge_report_what_they_changed(backend: ContractTarget) -> None:
    q, name = backend.queue, backend.fresh_queue_name()
    assert await within(q.create_queue(name)) is True
    assert await within(q.create_queue(name)) is False
    assert await within(q.get_queue_depth(name)) == 0
    for i in range(3):
        await within(q.publish(name, f"p{i}".encode()))
    assert await within(q.purge_queue(name)) == 3
    assert await within(q.get_queue_depth(name)) == 0
    assert await within(q.purge_queue(name)) == 0
    async with Consumer(q, name) as consumer:
        await consumer.assert_quiet()
        mid = await within(q.publish(name, b"after purge"))
        assert (await consumer.next()).id == mid
        assert await within(q.acknowledge(mid)) is True
    assert await within(q.delete_queue(name)) is True
    assert await within(q.delete_queue(name)) is False
    assert await within(q.get_queue_depth(name)) == 0


async def test_after_disconnect_errors_come_from_the_gateway_tree(
        backend: ContractTarget) -> None:
    q, name = backend.queue, backend.fresh_queue_name()
    await within(q.disconnect())
    assert await within(q.health_check()) is False
    with pytest.raises(QueueError):
        await within(q.publish(name, b"nowhere", message_id=new_message_id()))
    batch = [QueueMessage(new_message_id(), b"b") for _ in range(3)]
    results = await within(q.publish_batch(name, batch))
    assert [r.message_id for r in results] == [m.id for m in batch]
    assert all(isinstance(r.error, UplinkUnavailable) for r in results)
    await within(q.connect())
    assert await within(q.health_check()) is True
    assert await within(q.publish(name, b"back")) != ""
