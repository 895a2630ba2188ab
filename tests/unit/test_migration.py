"""A format-1 store (one row per message, ``user_version`` 1) is migrated to format 2 on the
daemon's first start: nothing lost, ids, attempts and order kept, bounded chunks, resumable."""

from __future__ import annotations

import sqlite3
import time
from collections import defaultdict
from pathlib import Path

import orjson
import pytest

from gateway.config import StoreConfig
from gateway.errors import StoreError
from gateway.message import new_message_id
from gateway.store import Settlement, Store, migrate
from gateway.store.db import Limits, StoreDb
from gateway.store.records import StoredMessage

Q = "default"

# The format-1 schema, as gateway/store/db.py created it up to this change.
V1_SCHEMA = """
CREATE TABLE messages(
    seq INTEGER PRIMARY KEY, id TEXT NOT NULL, queue TEXT NOT NULL, topic TEXT NOT NULL,
    payload BLOB NOT NULL, attributes BLOB, size INTEGER NOT NULL,
    priority INTEGER NOT NULL DEFAULT 0, received_at REAL NOT NULL,
    not_before REAL NOT NULL DEFAULT 0, attempts INTEGER NOT NULL DEFAULT 0,
    lease_until REAL NOT NULL DEFAULT 0, last_error TEXT);
CREATE INDEX messages_ready ON messages(queue, priority DESC, seq);
CREATE INDEX messages_retrying ON messages(queue, topic) WHERE attempts > 0;
CREATE TABLE dead_letters(
    dl_seq INTEGER PRIMARY KEY, id TEXT NOT NULL, queue TEXT NOT NULL, topic TEXT NOT NULL,
    payload BLOB NOT NULL, attributes BLOB, size INTEGER NOT NULL, received_at REAL NOT NULL,
    failed_at REAL NOT NULL, attempts INTEGER NOT NULL, reason TEXT NOT NULL);
CREATE INDEX dead_letters_queue ON dead_letters(queue, dl_seq);
CREATE TABLE counters(queue TEXT NOT NULL, name TEXT NOT NULL, value INTEGER NOT NULL,
    PRIMARY KEY(queue, name)) WITHOUT ROWID;
"""

N = 3000
TOPICS = 7


def build_v1(path: Path, n: int = N) -> dict[str, tuple[str, bytes]]:
    """A format-1 store as an earlier gateway left it: ``n`` messages over ``TOPICS`` topics,
    a few retrying (one backing off for an hour), one delayed, one prioritised, leases
    written into rows, a dead letter and counters. Returns id -> (topic, payload)."""
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA page_size=1024")
    conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(V1_SCHEMA)
    conn.execute("PRAGMA user_version=1")
    now = time.time() - 60
    expected = {}
    rows = []
    for i in range(n):
        topic = f"sensors/{i % TOPICS}/t"
        payload = orjson.dumps({"i": i, "v": i * 0.5})
        msg_id = new_message_id(now + i / 1000)
        attrs = orjson.dumps({"mqtt_topic": topic, "mqtt_qos": "1", "unit": "C"})
        attempts, not_before, error, priority, lease = 0, 0.0, None, 0, 0.0
        if i == 10:  # retrying, due now: its topic waits behind it
            attempts, error = 2, "HTTP 503"
        if i == 20:  # retrying, backing off for an hour
            attempts, not_before, error = 1, time.time() + 3600, "throttled"
        if i == 30:  # delayed by the publisher (type: sqlite), due now
            not_before = time.time() - 1
        if i == 40:
            priority = 5
        if i % 100 == 7:  # a lease an earlier gateway wrote into the row
            lease = time.time() + 3600
        rows.append((msg_id, Q, topic, payload, attrs, len(payload) + len(topic) + len(attrs),
                     priority, now + i / 1000, not_before, attempts, lease, error))
        expected[msg_id] = (topic, payload)
    conn.executemany("INSERT INTO messages(id, queue, topic, payload, attributes, size, priority,"
                     " received_at, not_before, attempts, lease_until, last_error)"
                     " VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", rows)
    conn.execute("INSERT INTO dead_letters(id, queue, topic, payload, attributes, size,"
                 " received_at, failed_at, attempts, reason) VALUES"
                 " ('dead-1', ?, 'sensors/x', x'00ff', NULL, 2, ?, ?, 3, 'rejected')",
                 (Q, now, now))
    conn.execute("INSERT INTO counters VALUES (?, 'delivered_total', 12345)", (Q,))
    conn.execute("INSERT INTO counters VALUES (?, 'dropped:max_age', 7)", (Q,))
    conn.commit()
    conn.close()
    return expected


async def drain(store: Store, *, until: int) -> list[StoredMessage]:
    """Lease and deliver until ``until`` messages came out (or nothing more is ready)."""
    got: list[StoredMessage] = []
    while len(got) < until:
        batch = await store.lease(Q, 500)
        if not batch:
            break
        await store.settle(Settlement(delivered=[m.seq for m in batch]))
        got.extend(batch)
    return got


async def test_v1_store_is_migrated_and_every_message_arrives(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    expected = build_v1(path)
    store = Store(str(path), StoreConfig())
    await store.open()
    assert store.message_count == N
    got = await drain(store, until=N)
    # everything but the topic of the message backing off for an hour came out (as in format 1,
    # a back-off holds its whole topic), with its format-1 id, payload and attributes
    waiting = {i for i in range(N) if i % TOPICS == 20 % TOPICS}
    assert len(got) == N - len(waiting)
    by_id = {m.id: m for m in got}
    assert len(by_id) == len(got), "no message came out twice"
    for msg_id, m in by_id.items():
        assert (m.topic, m.payload) == expected[msg_id]
        assert m.attributes["unit"] == "C" and m.attributes["mqtt_qos"] == "1"
    assert {int(orjson.loads(m.payload)["i"]) for m in got}.isdisjoint(waiting)
    # the prioritised message first; otherwise per-topic order; the retried one kept its attempts
    assert orjson.loads(got[0].payload)["i"] == 40
    order: dict[str, list[int]] = defaultdict(list)
    for m in got[1:]:
        order[m.topic].append(int(orjson.loads(m.payload)["i"]))
    for topic, seen in order.items():
        assert seen == sorted(seen), f"{topic} out of order"
    retried = next(m for m in got if orjson.loads(m.payload)["i"] == 10)
    assert retried.attempts == 2
    # dead letters and counters survived
    (dead,) = await store.list_dead()
    assert (dead.id, dead.payload, dead.reason) == ("dead-1", b"\x00\xff", "rejected")
    stats = await store.stats(Q)
    assert stats.dropped == {"max_age": 7}
    assert stats.delivered_total == 12345 + len(got)
    await store.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
        assert conn.execute("SELECT count(*) FROM sqlite_master WHERE name = 'messages'"
                            ).fetchone()[0] == 0


async def test_interrupted_migration_resumes_without_loss_or_duplicates(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "store.db"
    expected = build_v1(path)
    monkeypatch.setattr(migrate, "CHUNK_ROWS", 400)
    real_move = migrate._move
    moved = 0

    def crash_after_three_chunks(db: object, rows: list[tuple[object, ...]]) -> None:
        nonlocal moved
        if moved == 3:
            raise sqlite3.OperationalError("power cut")  # inside the fourth transaction
        real_move(db, rows)  # type: ignore[arg-type]
        moved += 1

    monkeypatch.setattr(migrate, "_move", crash_after_three_chunks)
    store = Store(str(path), StoreConfig())
    with pytest.raises(StoreError, match="power cut"):
        await store.open()
    await store.close()
    with sqlite3.connect(path) as conn:
        left = conn.execute("SELECT count(*) FROM messages").fetchone()[0]
    assert left == N - 3 * 400, "three chunks moved, the fourth rolled back"
    monkeypatch.setattr(migrate, "_move", real_move)
    store = Store(str(path), StoreConfig())
    await store.open()
    assert store.message_count == N
    got = await drain(store, until=N)
    ids = [m.id for m in got]
    assert len(ids) == len(set(ids)) and set(ids) <= set(expected)
    assert len(ids) == N - len({i for i in range(N) if i % TOPICS == 20 % TOPICS})
    await store.close()


def test_chunks_are_bounded_in_rows_and_bytes(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    build_v1(path, n=50)
    conn = sqlite3.connect(path)
    conn.executemany("INSERT INTO messages(id, queue, topic, payload, size, received_at)"
                     " VALUES (?, 'default', 't', ?, 0, 0)",
                     [(f"big-{i}", b"x" * (1024 * 1024)) for i in range(10)])
    conn.commit()
    assert len(migrate._chunk(conn)) == 50 + 4, "stops at the first row past 4 MB"
    conn.close()


async def test_a_reader_refuses_a_format_1_store_with_the_reason(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    build_v1(path, n=5)
    reader = StoreDb(str(path), Limits.from_config(StoreConfig()), readonly=True)
    with pytest.raises(sqlite3.DatabaseError, match="format 1; the daemon migrates it"):
        reader.open()
    reader.close()
