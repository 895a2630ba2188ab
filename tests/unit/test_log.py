"""Store format 2's log: frames, segments, cursors (docs/architecture.md, The store)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import sqlite3
import time
from pathlib import Path

import pytest

from gateway.config import StoreConfig
from gateway.store import NewMessage, Settlement, Store
from gateway.store.db import Limits, StoreDb
from gateway.store.frames import (
    FROM_MQTT,
    HEADER_SIZE,
    Frame,
    FrameError,
    Record,
    encode,
    extras_blob,
    read_header,
)

Q = "default"


def mqtt(topic: str, body: bytes, **attrs: str) -> NewMessage:
    return NewMessage("", topic, body, {"mqtt_topic": topic, "mqtt_qos": "1", **attrs},
                      time.time())


def open_db(path: Path, **cfg: object) -> StoreDb:
    db = StoreDb(str(path), Limits.from_config(dataclasses.replace(StoreConfig(), **cfg)))  # type: ignore[arg-type]
    db.open()
    return db


def drain(db: StoreDb, limit: int = 1000) -> list[bytes]:
    out = []
    while batch := db.lease(Q, limit, 60.0, time.time()):
        db.settle(Settlement(delivered=[m.seq for m in batch]), time.time())
        out += [m.payload for m in batch]
    return out


def pages_written(db: StoreDb) -> int:
    conn = db.conn
    assert conn is not None
    return int(conn.execute("PRAGMA page_count").fetchone()[0])


# -- frames ------------------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [True, False])
def test_frame_round_trip(compress: bool) -> None:
    records = [Record("a/b", b'{"v": 1}' * 20, 1_000, FROM_MQTT | 1),
               Record("c", b"", 1_005, 0, extras_blob("an-id", {"k": "v"})),
               Record("a/b", bytes(range(256)), 1_010, FROM_MQTT | 2 | 4)]
    raw = encode(records, pos=77, first_seq=5, cum_bytes=9, qid=3, compress=compress)
    header = read_header(raw, 77)
    assert header is not None and (header.first_seq, header.count, header.qid) == (5, 3, 3)
    frame = Frame(header, raw[HEADER_SIZE:])
    assert [frame.payload(i) for i in range(3)] == [r.payload for r in records]
    assert [frame.topic(i) for i in range(3)] == ["a/b", "c", "a/b"]
    assert [frame.received_ms(i) for i in range(3)] == [1_000, 1_005, 1_010]
    assert frame.explicit_id(1) == "an-id" and frame.explicit_id(0) is None
    assert frame.attributes(1) == {"k": "v"}
    assert frame.attributes(2) == {"mqtt_topic": "a/b", "mqtt_qos": "2", "mqtt_retain": "1"}
    assert frame.size(1) == len('{"k":"v"}') + 1  # payload + topic + attributes, not the id


def test_a_header_for_another_position_is_not_a_frame() -> None:
    raw = encode([Record("t", b"x", 1)], pos=100, first_seq=0, cum_bytes=0, qid=1,
                 compress=False)
    assert read_header(raw, 100) is not None
    assert read_header(raw, 4196) is None, "stale bytes of a reused segment"
    assert read_header(b"\0" * 64, 100) is None


def test_a_damaged_body_is_refused() -> None:
    raw = bytearray(encode([Record("t", b"hello", 1)], pos=0, first_seq=0, cum_bytes=0, qid=1,
                           compress=False))
    raw[-1] ^= 0xFF
    header = read_header(bytes(raw), 0)
    assert header is not None
    with pytest.raises(FrameError, match="CRC"):
        Frame(header, bytes(raw[HEADER_SIZE:]))


# -- the log in the store ---------------------------------------------------------------------


def test_delivery_writes_nothing_until_the_cursor_is_synced(tmp_path: Path) -> None:
    db = open_db(tmp_path / "s.db")
    db.append([(Q, [mqtt("t", b"%d" % i) for i in range(100)])])
    conn = db.conn
    assert conn is not None
    before = conn.total_changes
    assert len(drain(db)) == 100
    assert conn.total_changes == before, "lease and delivery write nothing"
    assert db.sync_cursors(force=True)
    assert conn.total_changes == before + 2  # the cursor row and the delivered counter
    db.close()


def test_ring_segments_are_reused_in_place(tmp_path: Path) -> None:
    """A steady stream of small commits, delivered as it goes, keeps reusing a few ring
    segments: the file stops growing and no segment row is inserted or deleted."""
    db = open_db(tmp_path / "s.db", segment_bytes=8192, compression="none")
    body = os.urandom(200)
    for _ in range(30):  # warm up: enough segments for the spare pool
        db.append([(Q, [mqtt("t", body) for _ in range(5)])])
        drain(db)
        db.sync_cursors(force=True)
    conn = db.conn
    assert conn is not None
    pages = pages_written(db)
    slots = {r[0] for r in conn.execute("SELECT slot FROM segments")}
    for _ in range(300):  # ~300 KB through 8 KB segments
        db.append([(Q, [mqtt("t", body) for _ in range(5)])])
        assert len(drain(db)) == 5
        db.sync_cursors(force=True)
    assert pages_written(db) == pages
    assert {r[0] for r in conn.execute("SELECT slot FROM segments")} == slots
    db.close()


def test_large_commits_get_sealed_segments_deleted_once_passed(tmp_path: Path) -> None:
    db = open_db(tmp_path / "s.db", segment_bytes=16384, compression="none")
    conn = db.conn
    assert conn is not None
    db.append([(Q, [mqtt("t", os.urandom(1000)) for _ in range(20)])])  # ~20 KB: sealed
    sealed = conn.execute("SELECT slot, length(data) FROM segments").fetchall()
    assert len(sealed) == 1 and sealed[0][1] < 16384 + 64 + 21_000
    db.append([(Q, [mqtt("t", b"small")])])  # a ring segment after it
    assert len(drain(db)) == 21
    db.sync_cursors(force=True)
    assert sealed[0][0] not in {r[0] for r in conn.execute("SELECT slot FROM segments")}
    db.close()


def test_cursor_resumes_after_a_restart_and_a_crash_redelivers_only_the_window(
        tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    db = open_db(path, cursor_sync_messages=10)
    db.append([(Q, [mqtt("t", b"%d" % i) for i in range(50)])])
    first = db.lease(Q, 25, 60.0, time.time())
    db.settle(Settlement(delivered=[m.seq for m in first]), time.time())
    # synced at 10 settled (cursor_sync_messages); the rest of the 25 is the window
    conn = db.conn
    assert conn is not None
    (saved,) = conn.execute("SELECT seq FROM cursors WHERE name = ?", (Q,)).fetchone()
    assert saved == first[-1].seq + 1, "one settle of 25 >= 10 persists at once"
    crashed = StoreDb(str(path), db.limits)  # the daemon dies: no close, no final sync
    db.conn = None
    crashed.open()
    again = [m.payload for m in crashed.lease(Q, 100, 60.0, time.time())]
    assert again == [b"%d" % i for i in range(25, 50)]
    assert crashed.counter(Q, "redelivery_window") == 10, "unclean stop: the window counted"
    crashed.close()


def test_ids_are_derived_stable_and_unique(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    db = open_db(path)
    db.append([(Q, [mqtt("t", b"%d" % i) for i in range(3)])])
    ids = [m.id for m in db.lease(Q, 10, 60.0, time.time())]
    db.close()
    db = open_db(path)
    again = [m.id for m in db.lease(Q, 10, 60.0, time.time())]
    assert ids == again and len(set(ids)) == 3 and all(len(i) == 32 for i in ids)
    # received milliseconds, the store's 40-bit prefix, the seq (docs/architecture.md)
    assert all(i[12:22] == db.id_prefix for i in ids)
    assert [int(i[22:], 16) for i in ids] == [0, 1, 2]
    assert all(abs(int(i[:12], 16) / 1000 - time.time()) < 60 for i in ids)
    db.close()


def test_a_damaged_frame_is_counted_and_skipped(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    db = open_db(path, compression="none")
    for n in range(3):
        db.append([(Q, [mqtt("t", b"frame-%d-%d" % (n, i)) for i in range(4)])])
    db.close()
    conn = sqlite3.connect(path)  # one byte of the second frame's payload flips on the card
    (slot,) = conn.execute("SELECT slot FROM segments").fetchone()
    blob = conn.blobopen("segments", "data", slot)
    data = bytearray(blob.read())
    at = data.index(b"frame-1-2")
    blob.seek(at)
    blob.write(b"F")
    blob.close()
    conn.commit()
    conn.close()
    db = open_db(path)
    got = drain(db)
    assert got == [b"frame-0-%d" % i for i in range(4)] + [b"frame-2-%d" % i for i in range(4)]
    db.sync_cursors(force=True)
    assert db.stats(Q, time.time()).dropped == {"corrupt": 4}
    db.close()


async def test_store_stats_and_status_agree_after_delivery(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "s.db"), StoreConfig(cursor_sync_interval=0.05))
    await store.open()
    await store.append(Q, [mqtt("t", b"x") for _ in range(10)])
    batch = await store.lease(Q, 4)
    await store.settle(Settlement(delivered=[m.seq for m in batch]))
    live = await store.stats(Q)
    assert (live.depth, live.delivered_total) == (6, 4)
    reader = StoreDb(str(tmp_path / "s.db"), Limits.from_config(StoreConfig()), readonly=True)
    deadline = time.monotonic() + 2
    while True:  # the timer writes the cursor within cursor_sync_interval
        reader.open()
        seen = reader.stats(Q, time.time())
        reader.close()
        if (seen.depth, seen.delivered_total) == (6, 4) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.02)
    assert (seen.depth, seen.delivered_total) == (6, 4)
    await store.close()
