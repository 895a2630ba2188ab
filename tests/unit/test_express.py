"""Write-avoidance (gateway/express.py with the forwarder's lane) against a real store and the
in-memory stub uplink: what is acknowledged without a write, what goes the stored way, and
that neither path loses, duplicates or reorders."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.config import Config, ForwarderConfig, QueueConfig, StoreConfig
from gateway.errors import RetryableError
from gateway.express import Express, Lane, LaneState
from gateway.forwarder import UPLINK_QUEUE, Forwarder
from gateway.message import (
    ATTR_GATEWAY_ID,
    ATTR_MESSAGE_ID,
    ATTR_MQTT_QOS,
    ATTR_MQTT_TOPIC,
    QueueMessage,
)
from gateway.observability.http import Snapshot, render_metrics, render_page
from gateway.store import NewMessage, Store
from gateway.store.db import Destination
from gateway.store.frames import FROM_MQTT
from gateway.store.records import AppendStatus
from tests.stub_uplink import StubUplink

COMMIT_MS = 30
STAMP = {ATTR_GATEWAY_ID: "gw-test"}


@dataclass
class Rig:
    store: Store
    express: Express
    uplinks: dict[str, StubUplink]
    forwarders: dict[str, Forwarder]
    tasks: list[asyncio.Task[None]]

    @property
    def uplink(self) -> StubUplink:
        return next(iter(self.uplinks.values()))

    @property
    def lane(self) -> Lane:
        return next(iter(self.forwarders.values())).lane

    async def send(self, *items: tuple[str, bytes]) -> list[AppendStatus]:
        msgs = [NewMessage("", t, b, {}, time.time(), mqtt_flags=FROM_MQTT | 1) for t, b in items]
        return [o.status for o in await self.express.sink(msgs)]

    async def until_open(self, name: str | None = None, timeout: float = 5.0) -> None:
        lane = self.forwarders[name].lane if name else self.lane
        deadline = time.monotonic() + timeout
        while lane.state is not LaneState.OPEN:
            assert time.monotonic() < deadline, f"lane still {lane.state}"
            await asyncio.sleep(0.005)


def config(**fw: object) -> Config:
    forwarder = dataclasses.replace(ForwarderConfig(retry_min_delay=0.01, retry_max_delay=0.05),
                                    **fw)  # type: ignore[arg-type]
    return Config(forwarder=forwarder, queue=QueueConfig(request_queue_name="up"))


def refuse_once(uplink: StubUplink, body: bytes) -> set[str]:
    """The stub refuses the message with ``body`` (RetryableError) the first time it sees
    each id; returns the ids it refused."""
    failed: set[str] = set()

    def once(m: QueueMessage) -> RetryableError | None:
        if m.body == body and m.id not in failed:
            failed.add(m.id)
            return RetryableError("throttled", backend="stub")
        return None

    uplink.fail = once
    return failed


@pytest.fixture
async def make_rig(tmp_path: Path) -> AsyncIterator[object]:
    rigs: list[Rig] = []

    async def make(uplinks: dict[str, tuple[tuple[str, ...], dict[str, object]]] | None = None,
                   durable: bool = True) -> Rig:
        store = Store(str(tmp_path / "s.db"), StoreConfig(commit_interval_ms=COMMIT_MS),
                      stamp=STAMP)
        await store.open()
        spec = uplinks or {UPLINK_QUEUE: ((), {})}
        await store.register(UPLINK_QUEUE, [Destination(n, t) for n, (t, _) in spec.items()])
        stubs, fwds, lanes = {}, {}, []
        for name, (topics, fw) in spec.items():
            stub = stubs[name] = StubUplink()
            stub.durable_acks = durable
            lane = Lane(name, topics)
            lanes.append(lane)
            fwds[name] = Forwarder(store, stub, config(**fw), queue=name, lane=lane)
        express = Express(store, UPLINK_QUEUE, lanes, COMMIT_MS / 1000, stamp=STAMP)
        rig = Rig(store, express, stubs, fwds,
                  [asyncio.create_task(f.run()) for f in fwds.values()])
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        for f in rig.forwarders.values():
            f.stop()
        await asyncio.gather(*rig.tasks)
        await rig.express.close()
        await rig.store.close()


async def test_accepted_in_time_is_acknowledged_without_a_write(make_rig) -> None:  # type: ignore[no-untyped-def]
    rig: Rig = await make_rig()
    await rig.until_open()
    commits = rig.store.commits
    for i in range(20):
        assert await rig.send(("s/1", b"a%d" % i), ("s/2", b"b%d" % i)) == [AppendStatus.UPLINKED] * 2
    assert rig.store.commits == commits  # nothing was written
    assert rig.express.acked_without_write == 40
    assert rig.forwarders[UPLINK_QUEUE].stats.express == 40
    assert [m.body for _, m in rig.uplink.published] == [
        b for i in range(20) for b in (b"a%d" % i, b"b%d" % i)]
    _, first = rig.uplink.published[0]
    assert first.attributes[ATTR_MQTT_TOPIC] == "s/1"
    assert first.attributes[ATTR_MQTT_QOS] == "1"
    assert first.attributes[ATTR_GATEWAY_ID] == "gw-test"
    assert first.attributes[ATTR_MESSAGE_ID] == first.id and len(first.id) == 32
    assert rig.store.message_count == 0


async def test_the_same_attributes_as_the_stored_path(make_rig) -> None:  # type: ignore[no-untyped-def]
    rig: Rig = await make_rig()
    rig.uplink.down = True  # first the stored way ...
    await rig.send(("s/1", b"x"))
    rig.uplink.down = False
    await rig.until_open()
    await rig.send(("s/1", b"y"))  # ... then from memory
    (_, stored), (_, express) = rig.uplink.published
    a, b = dict(stored.attributes), dict(express.attributes)
    assert a.pop(ATTR_MESSAGE_ID) != b.pop(ATTR_MESSAGE_ID)
    assert a == b


async def test_a_slow_uplink_goes_the_stored_way_and_is_not_sent_twice(make_rig) -> None:  # type: ignore[no-untyped-def]
    rig: Rig = await make_rig()
    await rig.until_open()
    rig.uplink.delay = COMMIT_MS / 1000 * 4  # accepts, but long after the commit was due
    started = time.monotonic()
    assert await rig.send(("s/1", b"slow")) == [AppendStatus.STORED]
    assert time.monotonic() - started < COMMIT_MS / 1000 * 3  # acked after the commit
    assert rig.lane.state is LaneState.CLOSED
    rig.uplink.delay = 0
    await rig.until_open()  # the late acceptance settled the stored copy
    assert [m.body for _, m in rig.uplink.published] == [b"slow"]
    assert (await rig.store.stats(UPLINK_QUEUE)).depth == 0
    assert rig.express.stored_after_offer == 1 and rig.express.acked_without_write == 0


async def test_a_failure_is_retried_from_the_store_in_topic_order(make_rig) -> None:  # type: ignore[no-untyped-def]
    rig: Rig = await make_rig()
    await rig.until_open()
    failed = refuse_once(rig.uplink, b"1")
    # one call: 0 and 2 accepted, 1 refused for now (as on the stored path, the rest of a
    # call is not held back by a retryable failure inside it); 1 alone is stored
    assert await rig.send(("t", b"0"), ("t", b"1"), ("t", b"2")) == [
        AppendStatus.UPLINKED, AppendStatus.STORED, AppendStatus.UPLINKED]
    assert rig.lane.state is not LaneState.OPEN
    await rig.send(("t", b"3"))
    await rig.until_open()
    await rig.send(("t", b"4"))
    bodies = [m.body for _, m in rig.uplink.published]
    # 1 was stored and retried with the id it had, before anything that came after it
    assert bodies.count(b"1") == 1 and bodies[-1] == b"4"
    assert bodies.index(b"1") < bodies.index(b"3") < bodies.index(b"4")
    ids = {m.body: m.id for _, m in rig.uplink.published}
    assert ids[b"1"] in failed
    assert (await rig.store.stats(UPLINK_QUEUE)).depth == 0


async def test_an_outage_stores_everything_and_order_holds_after_it(make_rig) -> None:  # type: ignore[no-untyped-def]
    rig: Rig = await make_rig()
    await rig.until_open()
    await rig.send(("t", b"0"))
    rig.uplink.down = True
    await rig.send(("t", b"1"))  # may have been on offer when the link died: now stored
    # many batches while down (concurrent, like the ingress's pipelined sink calls)
    statuses = await asyncio.gather(*(rig.send(("t", b"%d" % i)) for i in range(2, 30)))
    assert all(s == [AppendStatus.STORED] for s in statuses)
    rig.uplink.down = False
    await rig.until_open(timeout=10)
    for i in range(30, 40):
        await rig.send(("t", b"%d" % i))
    bodies = [int(m.body) for _, m in rig.uplink.published]
    assert bodies == list(range(40))


async def test_stored_by_setting_or_by_the_backend_default(make_rig) -> None:  # type: ignore[no-untyped-def]
    rig: Rig = await make_rig(durable=False)  # e.g. Redis: its acks are not durable
    await rig.send(("t", b"a"))
    await asyncio.sleep(0.2)
    assert rig.lane.state is LaneState.CLOSED
    assert await rig.send(("t", b"b")) == [AppendStatus.STORED]
    rig.forwarders[UPLINK_QUEUE].configure(
        dataclasses.replace(rig.forwarders[UPLINK_QUEUE].cfg, ack_when="uplinked_or_stored"))
    await rig.until_open()
    assert await rig.send(("t", b"c")) == [AppendStatus.UPLINKED]


async def test_routed_to_two_uplinks_needs_both(make_rig) -> None:  # type: ignore[no-untyped-def]
    rig: Rig = await make_rig({"a": ((), {}), "b": (("alarm/#",), {})})
    await rig.until_open("a")
    await rig.until_open("b")
    assert await rig.send(("alarm/1", b"x"), ("tele/1", b"y")) == [AppendStatus.UPLINKED] * 2
    assert [m.body for _, m in rig.uplinks["b"].published] == [b"x"]
    # b slow: the alarm is stored, a's copy of it is settled by its early acceptance
    rig.uplinks["b"].delay = COMMIT_MS / 1000 * 4
    assert await rig.send(("alarm/1", b"z")) == [AppendStatus.STORED]
    rig.uplinks["b"].delay = 0
    await rig.until_open("a")
    await rig.until_open("b")
    assert [m.body for _, m in rig.uplinks["a"].published] == [b"x", b"y", b"z"]
    assert [m.body for _, m in rig.uplinks["b"].published] == [b"x", b"z"]
    # a message whose other uplink does not take offers goes the stored way for both
    rig.forwarders["b"].configure(dataclasses.replace(rig.forwarders["b"].cfg,
                                                      ack_when="stored"))
    await rig.send(("tele/2", b"w"))  # only a: still from memory
    await asyncio.sleep(0.1)
    assert rig.forwarders["b"].lane.state is LaneState.CLOSED
    assert await rig.send(("alarm/2", b"v")) == [AppendStatus.STORED]


async def test_ack_wait_gives_a_slow_uplink_longer(make_rig) -> None:  # type: ignore[no-untyped-def]
    rig: Rig = await make_rig({UPLINK_QUEUE: ((), {"ack_wait": COMMIT_MS / 1000 * 10})})
    await rig.until_open()
    rig.uplink.delay = COMMIT_MS / 1000 * 4  # past the commit interval, within ack_wait
    commits = rig.store.commits
    assert await rig.send(("t", b"a")) == [AppendStatus.UPLINKED]
    assert rig.store.commits == commits


async def test_batches_stored_at_a_deadline_keep_their_order(make_rig) -> None:  # type: ignore[no-untyped-def]
    """Found by the daemon test: the batch whose deadline passed closed its lane first, which
    withdrew (and queued for the commit) the batch behind it before itself: the later batch
    got the lower seq, and went out first when the early one had failed."""
    rig: Rig = await make_rig()
    await rig.until_open()
    failed = refuse_once(rig.uplink, b"1")
    rig.uplink.delay = COMMIT_MS / 1000 * 3  # "1" is refused, long after its deadline
    first = asyncio.ensure_future(rig.send(("t", b"1")))
    await asyncio.sleep(COMMIT_MS / 1000 / 3)
    second = asyncio.ensure_future(rig.send(("t", b"2")))  # queued behind it
    assert await first == [AppendStatus.STORED] and await second == [AppendStatus.STORED]
    rig.uplink.delay = 0
    await rig.until_open()
    await rig.send(("t", b"3"))
    assert [m.body for _, m in rig.uplink.published] == [b"1", b"2", b"3"]
    assert rig.uplink.published[0][1].id in failed  # stored with the id it was offered under


async def test_a_message_stored_around_the_lane_is_delivered_at_once(make_rig) -> None:  # type: ignore[no-untyped-def]
    """Something else than the ingress appends (a test, a replay): an open lane's forwarder,
    woken by the commit, leases it at once (not after the 5 s safety net) and the lane opens
    afresh behind it. Found by the Kafka and Pub/Sub outage tests, which feed the store."""
    rig: Rig = await make_rig()
    await rig.until_open()
    started = time.monotonic()
    await rig.store.append(UPLINK_QUEUE, [NewMessage("", "t", b"direct", {}, time.time(),
                                                     mqtt_flags=FROM_MQTT | 1)])
    while not rig.uplink.published:
        assert time.monotonic() - started < 1.0, "not delivered within a second"
        await asyncio.sleep(0.005)
    await rig.until_open()
    assert await rig.send(("t", b"after")) == [AppendStatus.UPLINKED]
    assert [m.body for _, m in rig.uplink.published] == [b"direct", b"after"]


def test_metrics_and_page_show_writes_per_payload_byte_since_ready() -> None:
    snap = Snapshot(
        taken_at=0, started_at=0, ingress_connected=True, store_ok=True, store_messages=0,
        store_bytes=0, store_file_bytes=0, commits=0, commit_seconds_total=0.0, uplinks=[],
        counters={"acked_without_write": 7, "ingress_payload_bytes": 1000},
        disk_write_bytes=9_000_400, disk_write_base=9_000_000)  # start-up wrote 9 MB
    text = render_metrics(snap)
    assert "openhqm_gateway_acked_without_write_total 7" in text
    assert "openhqm_gateway_disk_write_bytes_total 9000400" in text
    assert "openhqm_gateway_disk_written_per_payload_byte 0.4" in text
    page = render_page(snap, [], [])
    assert '<td id="without-write">7</td>' in page
    assert '<td id="written-per-byte">0.40</td>' in page
    no_proc = dataclasses.replace(snap, disk_write_bytes=None)
    assert "disk_written_per_payload_byte" not in render_metrics(no_proc)
    assert '<td id="written-per-byte">-</td>' in render_page(no_proc, [], [])
