"""Leases live in the store thread's memory (gateway.store.leases): leasing and releasing
write nothing, expiry redelivers and counts an attempt, a restart forgets them."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from gateway.config import StoreConfig
from gateway.message import new_message_id
from gateway.store import NewMessage, Settlement, Store
from gateway.store.db import Limits, StoreDb
from gateway.store.leases import Leases

Q = "default"


def msg(topic: str, body: bytes) -> NewMessage:
    return NewMessage(new_message_id(), topic, body, {}, time.time())


async def open_store(path: Path) -> Store:
    store = Store(str(path), StoreConfig())
    await store.open()
    return store


def changes(store: Store) -> int:
    """Rows written through the store's connection so far."""
    conn = store._db.conn
    assert conn is not None
    return conn.total_changes


async def test_lease_and_release_write_nothing(tmp_path: Path) -> None:
    store = await open_store(tmp_path / "s.db")
    await store.append(Q, [msg("t/a", b"%d" % i) for i in range(50)])
    before = changes(store)
    leased = await store.lease(Q, 20)
    assert [m.payload for m in leased] == [b"%d" % i for i in range(20)]
    await store.settle(Settlement(release=[m.seq for m in leased[10:]]))
    assert changes(store) == before, "a lease or a release wrote rows"
    again = await store.lease(Q, 100)  # the released ten and the thirty never leased
    assert [m.payload for m in again] == [b"%d" % i for i in range(10, 50)]
    assert all(m.attempts == 0 for m in again), "a release is not an attempt"
    await store.settle(Settlement(delivered=[m.seq for m in leased[:10] + again]))
    assert changes(store) == before, "a delivery wrote rows (format 2 moves a cursor)"
    assert await store.depth(Q) == 0
    await store._run(store._db.sync_cursors, True)
    # the cursor's position and the delivered_total counter, once, not a row per message
    assert changes(store) == before + 2
    await store.close()


async def test_expired_lease_redelivers_and_counts_an_attempt(tmp_path: Path) -> None:
    store = await open_store(tmp_path / "s.db")
    await store.append(Q, [msg("t/a", b"a1"), msg("t/a", b"a2"), msg("t/b", b"b1")])
    (first,) = await store.lease(Q, 1, lease_seconds=0.2)
    assert await store.lease(Q, 10, lease_seconds=0.2) != []  # a2, b1: a1 has no retry yet
    started = time.monotonic()
    await store.wait_ready(Q, 5)  # woken by the lease running out, not after 5 s
    assert time.monotonic() - started < 1.5
    await asyncio.sleep(0.05)
    again = await store.lease(Q, 10)
    assert [m.payload for m in again] == [b"a1", b"a2", b"b1"]
    assert [m.attempts for m in again] == [1, 1, 1]
    assert again[0].id == first.id  # the same message (its handle is now a parked row's)
    await store.close()


async def test_retried_message_in_flight_blocks_its_topic(tmp_path: Path) -> None:
    store = await open_store(tmp_path / "s.db")
    await store.append(Q, [msg("t/a", b"a1"), msg("t/a", b"a2"), msg("t/b", b"b1")])
    (a1,) = await store.lease(Q, 1)
    await store.settle(Settlement(retry=[(a1.seq, 0.0, "busy")]))
    (again,) = await store.lease(Q, 1)
    assert again.payload == b"a1" and again.attempts == 1
    # a1 is in flight after a failure: a2 must not overtake it; t/b flows
    assert [m.payload for m in await store.lease(Q, 10)] == [b"b1"]
    await store.settle(Settlement(delivered=[again.seq]))
    assert [m.payload for m in await store.lease(Q, 10)] == [b"a2"]
    await store.close()


async def test_in_flight_counted_by_the_holder_unknown_to_a_reader(tmp_path: Path) -> None:
    store = await open_store(tmp_path / "s.db")
    await store.append(Q, [msg("t/a", b"x"), msg("t/a", b"y")])
    await store.lease(Q, 1)
    stats = await store.stats(Q)
    assert (stats.depth, stats.in_flight) == (2, 1)
    reader = StoreDb(str(tmp_path / "s.db"), Limits.from_config(StoreConfig()), readonly=True)
    reader.open()
    try:
        st = reader.stats(Q, time.time())
        assert (st.depth, st.in_flight) == (2, None)
    finally:
        reader.close()
    await store.close()


async def test_restart_forgets_leases(tmp_path: Path) -> None:
    """(Format 1 kept leases in the rows; tests/unit/test_migration.py checks that a format-1
    store with leases written into it delivers everything after the migration.)"""
    path = tmp_path / "s.db"
    store = await open_store(path)
    await store.append(Q, [msg("t/a", b"x"), msg("t/a", b"y")])
    assert len(await store.lease(Q, 10)) == 2
    await store.close()
    store = await open_store(path)
    assert [m.payload for m in await store.lease(Q, 10)] == [b"x", b"y"]
    await store.close()


async def test_lease_stops_at_the_byte_budget(tmp_path: Path) -> None:
    store = await open_store(tmp_path / "s.db")
    await store.append(Q, [msg("t/a", bytes(1000)) for _ in range(10)]
                       + [msg("t/a", bytes(50_000)), msg("t/a", b"tail")])
    first = await store.lease(Q, 100, max_bytes=2500)
    assert [len(m.payload) for m in first] == [1000, 1000]  # a third would pass 2500
    rest = await store.lease(Q, 100, max_bytes=8000)
    assert [len(m.payload) for m in rest] == [1000] * 8
    (big,) = await store.lease(Q, 100, max_bytes=10)
    assert len(big.payload) == 50_000  # the first message always goes, whatever the budget
    (tail,) = await store.lease(Q, 100)  # 0 = no byte budget
    assert tail.payload == b"tail"
    assert await store.lease(Q, 100, max_bytes=10) == []
    await store.close()


def test_leases_registry() -> None:
    leases = Leases()
    leases.hold("q", [(1, "t/a", 0), (2, "t/a", 1), (3, "t/b", 0)], until=10.0)
    leases.hold("r", [(4, "t/c", 2)], until=20.0)
    assert leases.held("q") == [1, 2, 3] and leases.blocked_topics("q") == ["t/a"]
    assert leases.count("q", now=5.0) == 3 and leases.next_expiry("r") == 20.0
    assert leases.expire("q", now=10.0) == [1, 2, 3] and leases.held("q") == []
    leases.drop([4, 99])
    assert len(leases) == 0 and leases.next_expiry("r") is None
    leases.hold("q", [(5, "t/a", 0)], until=1.0)
    leases.drop_queue("q")
    assert len(leases) == 0

