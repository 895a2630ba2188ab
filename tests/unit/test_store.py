"""The store's promises, against a real SQLite file (no servers needed)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import sqlite3
import time
from pathlib import Path

import pytest

from gateway.config import StoreConfig
from gateway.errors import StoreError
from gateway.message import new_message_id
from gateway.store import AppendStatus, NewMessage, Settlement, Store

Q = "default"


def msg(topic: str, body: bytes, **kw: object) -> NewMessage:
    return NewMessage(new_message_id(), topic, body, {"mqtt_topic": topic}, time.time(), **kw)  # type: ignore[arg-type]


async def open_store(path: Path, **cfg: object) -> Store:
    store = Store(str(path), dataclasses.replace(StoreConfig(), **cfg))  # type: ignore[arg-type]
    await store.open()
    return store


async def test_append_then_lease_in_order(tmp_path: Path) -> None:
    store = await open_store(tmp_path / "s.db")
    outcomes = await store.append(Q, [msg("a", b"%d" % i) for i in range(10)])
    assert [o.status for o in outcomes] == [AppendStatus.STORED] * 10
    leased = await store.lease(Q, 100)
    assert [m.payload for m in leased] == [b"%d" % i for i in range(10)]
    assert await store.lease(Q, 100) == []  # all leased
    await store.settle(Settlement(delivered=[m.seq for m in leased]))
    stats = await store.stats(Q)
    assert (stats.depth, stats.delivered_total) == (0, 10)
    await store.close()


async def test_survives_reopen_and_releases_leases(tmp_path: Path) -> None:
    store = await open_store(tmp_path / "s.db")
    await store.append(Q, [msg("a", b"x"), msg("a", b"y")])
    assert len(await store.lease(Q, 10)) == 2
    await store.close()  # leases held by a process that is gone
    store = await open_store(tmp_path / "s.db")
    assert [m.payload for m in await store.lease(Q, 10)] == [b"x", b"y"]
    await store.close()


async def test_concurrent_appends_share_commits(tmp_path: Path) -> None:
    store = await open_store(tmp_path / "s.db", commit_interval_ms=50)
    await asyncio.gather(*(store.append(Q, [msg("t", b"%d" % i)]) for i in range(200)))
    assert store.message_count == 200
    assert store.commits < 20, "200 concurrent appends should be grouped into few commits"
    await store.close()


async def test_second_daemon_is_refused(tmp_path: Path) -> None:
    first = await open_store(tmp_path / "s.db")
    with pytest.raises(StoreError, match="in use"):
        await open_store(tmp_path / "s.db")
    await first.close()


async def test_retry_blocks_its_topic_only(tmp_path: Path) -> None:
    store = await open_store(tmp_path / "s.db")
    await store.append(Q, [msg("a", b"a1"), msg("a", b"a2"), msg("b", b"b1")])
    first = await store.lease(Q, 1)
    assert first[0].payload == b"a1"
    await store.settle(Settlement(retry=[(first[0].seq, 0.3, "busy")]))
    # a2 must wait behind a1; b1 flows.
    assert [m.payload for m in await store.lease(Q, 10)] == [b"b1"]
    await asyncio.sleep(0.35)
    again = await store.lease(Q, 10)
    assert [m.payload for m in again] == [b"a1", b"a2"]
    assert again[0].attempts == 1
    await store.close()


async def test_max_attempts_dead_letters_with_reason(tmp_path: Path) -> None:
    store = await open_store(tmp_path / "s.db", max_attempts=2)
    await store.append(Q, [msg("a", b"bad"), msg("a", b"good")])
    for _ in range(2):
        (bad,) = await store.lease(Q, 1)
        await store.settle(Settlement(retry=[(bad.seq, 0.0, "HTTP 500")]))
    (good,) = await store.lease(Q, 10)
    assert good.payload == b"good"
    (dead,) = await store.list_dead(Q)
    assert dead.payload == b"bad" and "gave up after 2 attempts: HTTP 500" in dead.reason
    await store.close()


async def test_priority_and_delay(tmp_path: Path) -> None:
    store = await open_store(tmp_path / "s.db")
    await store.append(Q, [msg("a", b"low"), msg("b", b"high", priority=5),
                           msg("c", b"later", delay_seconds=0.3)])
    assert [m.payload for m in await store.lease(Q, 10)] == [b"high", b"low"]
    started = time.monotonic()
    await store.wait_ready(Q, 5)  # wakes when the delayed one falls due, not after 5 s
    assert time.monotonic() - started < 1.0
    assert [m.payload for m in await store.lease(Q, 10)] == [b"later"]
    await store.close()


async def test_drop_oldest_counts_by_reason(tmp_path: Path) -> None:
    store = await open_store(tmp_path / "s.db", max_messages=100, when_full="drop_oldest")
    for i in range(3):
        await store.append(Q, [msg("t", b"%d-%d" % (i, j)) for j in range(60)])
    stats = await store.stats(Q)
    assert stats.depth <= 100
    assert stats.dropped["max_messages"] == 180 - stats.depth
    leased = await store.lease(Q, 1000)
    assert leased[-1].payload == b"2-59", "the newest survive"
    assert leased[0].payload > b"0-", "the oldest went first"
    await store.close()


async def test_reject_new_keeps_the_old(tmp_path: Path) -> None:
    store = await open_store(tmp_path / "s.db", max_bytes=4096, when_full="reject_new")
    outcomes = await store.append(Q, [msg("t", b"x" * 1000) for _ in range(10)])
    stored = [o for o in outcomes if o.status is AppendStatus.STORED]
    dropped = [o for o in outcomes if o.status is AppendStatus.DROPPED]
    assert len(stored) == 4 and len(dropped) == 6  # each counts ~1019 bytes
    assert {o.reason for o in dropped} == {"max_bytes"}
    assert (await store.stats(Q)).dropped == {"max_bytes": 6}
    await store.close()


async def test_disk_full_follows_policy_and_keeps_running(tmp_path: Path) -> None:
    # max_page_count makes SQLite report SQLITE_FULL exactly as a full disk does; random
    # payloads, so compression cannot make them fit
    store = await open_store(tmp_path / "s.db", max_page_count=64, when_full="reject_new")
    outcomes = []
    for _ in range(40):
        outcomes += await store.append(Q, [msg("t", os.urandom(3000)) for _ in range(5)])
    reasons = {o.reason for o in outcomes if o.status is AppendStatus.DROPPED}
    assert reasons == {"disk_full"}
    assert (await store.stats(Q)).dropped["disk_full"] > 0
    leased = await store.lease(Q, 1000)  # still readable and writable
    await store.settle(Settlement(delivered=[m.seq for m in leased]))
    after = await store.append(Q, [msg("t", b"small")])
    assert after[0].status is AppendStatus.STORED
    await store.close()


async def test_disk_full_drop_oldest_makes_room(tmp_path: Path) -> None:
    store = await open_store(tmp_path / "s.db", max_page_count=64, when_full="drop_oldest")
    for i in range(120):
        outcomes = await store.append(Q, [msg("t", b"%04d" % i + os.urandom(3000))])
        assert outcomes[0].status is AppendStatus.STORED, (i, outcomes)
    stats = await store.stats(Q)
    assert stats.dropped.get("disk_full", 0) > 0
    leased = await store.lease(Q, 1000)
    assert leased[-1].payload.startswith(b"0119")
    assert leased[0].payload > b"0000", "the oldest made room"
    await store.close()


async def test_max_age_expiry(tmp_path: Path) -> None:
    store = await open_store(tmp_path / "s.db", max_age=60)
    old = msg("t", b"old")
    old.received_at = time.time() - 120
    await store.append(Q, [old, msg("t", b"new")])
    assert await store.expire() == 1
    assert [m.payload for m in await store.lease(Q, 10)] == [b"new"]
    assert (await store.stats(Q)).dropped == {"max_age": 1}
    await store.close()


async def test_dead_letter_on_arrival_and_replay(tmp_path: Path) -> None:
    store = await open_store(tmp_path / "s.db")
    big = msg("t", b"B" * 10)
    big.dead_letter_reason = "too large"
    outcomes = await store.append(Q, [big, msg("t", b"ok")])
    assert [o.status for o in outcomes] == [AppendStatus.DEAD_LETTERED, AppendStatus.STORED]
    (dead,) = await store.list_dead()
    assert (dead.id, dead.reason) == (big.id, "too large")
    assert await store.replay_dead(ids=[big.id]) == 1
    assert await store.list_dead() == []
    assert sorted(m.payload for m in await store.lease(Q, 10)) == [b"B" * 10, b"ok"]
    await store.close()


async def test_schema_and_pragmas(tmp_path: Path) -> None:
    store = await open_store(tmp_path / "s.db")
    await store.append(Q, [msg("t", b"x")])
    await store.close()
    conn = sqlite3.connect(tmp_path / "s.db")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # incremental
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
    conn.close()


async def test_commits_are_spaced_wider_while_the_uplink_is_down(tmp_path: Path) -> None:
    store = await open_store(tmp_path / "s.db", commit_interval_ms=10,
                             offline_commit_interval_ms=200)

    async def trickle(seconds: float) -> int:
        before = store.commits
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            await store.append(Q, [msg("t", b"x")])
        return store.commits - before

    online = await trickle(0.4)
    store.uplink_state("default", online=False)
    offline = await trickle(0.4)
    assert online >= 15 and offline <= 3, (online, offline)
    store.uplink_state("default", online=False)
    pending = asyncio.create_task(store.append(Q, [msg("t", b"y")]))
    await asyncio.sleep(0.01)
    store.uplink_state("default", online=True)  # back: what waits is committed at once
    started = time.monotonic()
    await pending
    assert time.monotonic() - started < 0.1
    await store.close()
