"""Forwarder decisions against a real store and the in-memory stub uplink."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path

import pytest

from gateway.config import Config, ForwarderConfig, QueueConfig, Route, StoreConfig
from gateway.errors import RetryableError
from gateway.forwarder import UPLINK_QUEUE, Forwarder
from gateway.message import ATTR_MESSAGE_ID, ATTR_MQTT_TOPIC, new_message_id
from gateway.store import NewMessage, Store
from gateway.store.records import StoredMessage
from tests.stub_uplink import StubUplink, reject_body


def make_config(**fw: object) -> Config:
    forwarder = dataclasses.replace(ForwarderConfig(retry_min_delay=0.01, retry_max_delay=0.05),
                                    **fw)  # type: ignore[arg-type]
    return Config(forwarder=forwarder, queue=QueueConfig(request_queue_name="up"))


async def filled_store(path: Path, items: list[tuple[str, bytes]], **cfg: object) -> Store:
    store = Store(str(path), dataclasses.replace(StoreConfig(), **cfg))  # type: ignore[arg-type]
    await store.open()
    await store.append(UPLINK_QUEUE, [NewMessage(new_message_id(), t, b, {ATTR_MQTT_TOPIC: t},
                                                 time.time()) for t, b in items])
    return store


async def published(uplink: StubUplink, n: int, timeout: float = 5.0) -> None:
    """Wait up to ``timeout`` for the stub uplink to hold ``n`` messages (it has no event to
    wait on); the caller's assertions say what arrived."""
    for _ in range(int(timeout / 0.02)):
        if len(uplink.published) >= n:
            return
        await asyncio.sleep(0.02)


async def test_delivers_with_stable_id_and_topic(tmp_path: Path) -> None:
    store = await filled_store(tmp_path / "s.db", [("s/1", b"a"), ("s/2", b"b")])
    uplink = StubUplink()
    fwd = Forwarder(store, uplink, make_config())
    assert await fwd.drain_once() == 2
    (q1, m1), (_, m2) = uplink.published
    assert q1 == "up" and m1.body == b"a" and m2.body == b"b"
    assert m1.attributes[ATTR_MQTT_TOPIC] == "s/1"
    assert m1.attributes[ATTR_MESSAGE_ID] == m1.id
    assert (await store.stats(UPLINK_QUEUE)).depth == 0
    await store.close()


async def test_batches_end_at_max_batch_bytes(tmp_path: Path) -> None:
    store = await filled_store(tmp_path / "s.db", [("s/1", bytes(400)) for _ in range(10)])
    uplink = StubUplink()
    fwd = Forwarder(store, uplink, make_config(batch_size=100, max_batch_bytes=1000))
    sizes = []
    while sent := await fwd.drain_once():
        sizes.append(sent)
    await fwd.flush()
    assert sizes == [2, 2, 2, 2, 2]  # 2 x 400 bytes fit in 1000, a third would not
    assert len(uplink.published) == 10
    await store.close()


async def test_outage_costs_no_attempts_and_loses_nothing(tmp_path: Path) -> None:
    store = await filled_store(tmp_path / "s.db", [("t", b"%d" % i) for i in range(50)],
                               max_attempts=2)
    uplink = StubUplink()
    uplink.down = True
    fwd = Forwarder(store, uplink, make_config(batch_size=20))
    task = asyncio.create_task(fwd.run())
    await asyncio.sleep(0.5)  # many failed rounds, far more than max_attempts
    assert uplink.published == []
    uplink.down = False
    await published(uplink, 50)
    fwd.stop()
    await task
    assert uplink.bodies() == [b"%d" % i for i in range(50)]
    assert (await store.stats(UPLINK_QUEUE)).dead_letter == 0
    await store.close()


async def test_outage_probes_with_one_message_not_a_batch(tmp_path: Path) -> None:
    store = await filled_store(tmp_path / "s.db", [("t", b"%d" % i) for i in range(50)])
    uplink = StubUplink()
    uplink.down = True
    leased: list[int] = []
    lease = store.lease

    async def counted_lease(queue: str, limit: int, lease_seconds: float | None = None,
                            max_bytes: int = 0) -> list[StoredMessage]:
        got = await lease(queue, limit, lease_seconds, max_bytes)
        leased.append(len(got))
        return got

    async def lazy_connect() -> None:  # like redis-py: connecting does not reach the server
        pass

    store.lease = counted_lease  # type: ignore[method-assign]
    uplink.connect = lazy_connect  # type: ignore[method-assign]
    fwd = Forwarder(store, uplink, make_config(batch_size=20))
    task = asyncio.create_task(fwd.run())
    await asyncio.sleep(0.5)
    # one batch and the one leased ahead, then one message per backoff round
    assert len(leased) >= 6 and leased[:2] == [20, 20] and set(leased[2:]) == {1}, leased
    outage_leases = len(leased)
    uplink.down = False
    await published(uplink, 50)
    fwd.stop()
    await task
    assert uplink.bodies() == [b"%d" % i for i in range(50)]
    assert 20 in leased[outage_leases:], "full batches again once the probe went through"
    await store.close()


async def test_permanent_rejection_dead_letters_and_the_rest_flow(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = await filled_store(tmp_path / "s.db", [("t", b"ok1"), ("t", b"POISON"), ("t", b"ok2")])
    uplink = StubUplink()
    uplink.fail = reject_body(b"POISON")
    fwd = Forwarder(store, uplink, make_config())
    assert await fwd.drain_once() == 2
    (logged,) = [r for r in caplog.records if "dead-lettered" in r.getMessage()]
    assert logged.__dict__["uplink"] == uplink.backend_name  # a journald field (OPENHQM_UPLINK)
    assert uplink.bodies() == [b"ok1", b"ok2"]
    (dead,) = await store.list_dead()
    assert dead.payload == b"POISON" and "MessageRejected" in dead.reason and "poison" in dead.reason
    await store.close()


async def test_retryable_failure_keeps_topic_order(tmp_path: Path) -> None:
    store = await filled_store(tmp_path / "s.db", [("a", b"a1"), ("a", b"a2"), ("b", b"b1")])
    uplink = StubUplink()
    failures = {"a1": 2}

    def flaky(m: object) -> RetryableError | None:
        body = m.body.decode()  # type: ignore[attr-defined]
        if failures.get(body, 0) > 0:
            failures[body] -= 1
            return RetryableError("throttled", backend="stub")
        return None

    uplink.fail = flaky
    fwd = Forwarder(store, uplink, make_config(batch_size=1))
    task = asyncio.create_task(fwd.run())
    await published(uplink, 3)
    fwd.stop()
    await task
    bodies = uplink.bodies()
    assert bodies.index(b"a1") < bodies.index(b"a2"), bodies
    await store.close()


async def test_routes_pick_destinations(tmp_path: Path) -> None:
    store = await filled_store(tmp_path / "s.db",
                               [("sensors/temp/1", b"t"), ("alarms/x", b"al"), ("other", b"o")])
    uplink = StubUplink()
    cfg = make_config(routes=[Route("sensors/temp/+", "temps"), Route("alarms/#", "alarms")])
    assert await Forwarder(store, uplink, cfg).drain_once() == 3
    assert sorted((q, m.body) for q, m in uplink.published) == [
        ("alarms", b"al"), ("temps", b"t"), ("up", b"o")]
    await store.close()


async def test_max_rate_paces_batches(tmp_path: Path) -> None:
    store = await filled_store(tmp_path / "s.db", [("t", b"x")] * 40)
    fwd = Forwarder(store, StubUplink(), make_config(batch_size=20, max_rate=100))
    started = time.monotonic()
    assert await fwd.drain_once() + await fwd.drain_once() == 40
    assert time.monotonic() - started >= 0.35  # 40 messages at 100/s
    await store.close()


async def test_stop_returns_while_idle(tmp_path: Path) -> None:
    store = await filled_store(tmp_path / "s.db", [])
    fwd = Forwarder(store, StubUplink(), make_config())
    task = asyncio.create_task(fwd.run())
    await asyncio.sleep(0.05)
    fwd.stop()
    await asyncio.wait_for(task, 2)
    await store.close()


async def test_new_settings_are_taken_between_batches(tmp_path: Path) -> None:
    """configure() (a reload) changes the batch size and routes from the next batch on."""
    store = await filled_store(tmp_path / "s.db", [("s/1", b"%d" % i) for i in range(30)])
    uplink = StubUplink()
    fwd = Forwarder(store, uplink, make_config(batch_size=10))
    assert await fwd.drain_once() == 10
    await fwd.flush()  # a full batch leased the next one ahead: given back
    fwd.configure(dataclasses.replace(fwd.cfg, batch_size=4, routes=[Route("s/#", "moved")]))
    assert fwd.cfg.batch_size == 10  # not before the next batch
    task = asyncio.create_task(fwd.run())
    await published(uplink, 30)
    fwd.stop()
    await task
    assert fwd.cfg.batch_size == 4
    assert uplink.bodies() == [b"%d" % i for i in range(30)]
    assert {q for q, _ in uplink.published[10:]} == {"moved"}
    assert fwd.stats.delivered == 30
    await store.close()


async def test_a_replacement_carries_the_counters_on(tmp_path: Path) -> None:
    store = await filled_store(tmp_path / "s.db", [("s/1", b"%d" % i) for i in range(5)])
    first = Forwarder(store, StubUplink(), make_config())
    assert await first.drain_once() == 5
    first.stats.state = "backing_off"
    second = Forwarder(store, StubUplink(), make_config(), stats=first.stats)
    assert second.stats.delivered == 5 and second.stats.state == "connecting"
    assert second._probe  # the link was down: the new one probes with one message first
    await store.close()


async def _trickle(store: Store, n: int, every: float) -> float:
    """Append ``n`` messages one at a time, ``every`` seconds apart; returns when the first was
    appended (monotonic)."""
    first = time.monotonic()
    for i in range(n):
        await store.append(UPLINK_QUEUE, [NewMessage(new_message_id(), "t", b"%d" % i,
                                                     {ATTR_MQTT_TOPIC: "t"}, time.time())])
        await asyncio.sleep(every)
    return first


@pytest.mark.parametrize("linger", [0.0, 0.4])
async def test_linger_gathers_a_trickle_into_fewer_batches(tmp_path: Path, linger: float) -> None:
    """While the forwarder keeps up, forwarder.linger lets a trickle gather: 10 messages 30 ms
    apart go in one or two batches instead of about one each, the first no sooner than the
    linger after it was stored."""
    store = await filled_store(tmp_path / "s.db", [])
    uplink = StubUplink()
    fwd = Forwarder(store, uplink, make_config(linger=linger))
    task = asyncio.create_task(fwd.run())
    await asyncio.sleep(0.1)  # connected, found the store empty, waiting
    first = await _trickle(store, 10, 0.03)
    await published(uplink, 10)
    fwd.stop()
    await task
    assert uplink.bodies() == [b"%d" % i for i in range(10)]
    if linger:
        assert len(uplink.calls) <= 2, uplink.calls
        assert uplink.calls[0][0] - first >= linger - 0.05
    else:
        assert len(uplink.calls) >= 5, uplink.calls
    await store.close()


async def test_linger_never_holds_a_backlog_back(tmp_path: Path) -> None:
    """Full batches go one after the other: a backlog of three batches is drained long before
    a 2 s linger would have passed once."""
    store = await filled_store(tmp_path / "s.db", [("t", b"%d" % i) for i in range(30)])
    uplink = StubUplink()
    fwd = Forwarder(store, uplink, make_config(batch_size=10, linger=2.0))
    started = time.monotonic()
    task = asyncio.create_task(fwd.run())
    await published(uplink, 30)
    elapsed = time.monotonic() - started
    fwd.stop()
    await task
    assert len(uplink.published) == 30
    assert elapsed < 1.0
    await store.close()
