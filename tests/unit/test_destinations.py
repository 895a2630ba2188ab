"""Several destinations (uplinks) over one stored copy: a cursor each, topic routes, isolation,
counted drops per destination (store format 2, gateway.store.db.StoreDb.register)."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

import pytest

import gateway.store.log as log_module
from gateway.config import StoreConfig
from gateway.store import NewMessage, Settlement
from gateway.store.db import Destination, Limits, StoreDb
from gateway.store.frames import FROM_MQTT
from gateway.store.records import AppendStatus

Q = "default"
TELEMETRY = Destination("kafka", ("sensors/+/telemetry",))
ALARMS = Destination("sqs", ("sensors/+/alarm",), max_attempts=2)
EVERYTHING = Destination("archive")


def msg(topic: str, body: bytes) -> NewMessage:
    return NewMessage("", topic, body, {}, time.time(), mqtt_flags=FROM_MQTT | 1)


def open_db(path: Path, *dests: Destination, **cfg: object) -> StoreDb:
    db = StoreDb(str(path), Limits.from_config(dataclasses.replace(StoreConfig(), **cfg)))  # type: ignore[arg-type]
    db.open()
    db.register(Q, dests)
    return db


def drain(db: StoreDb, name: str) -> list[bytes]:
    out = []
    while batch := db.lease(name, 100, 60.0, time.time()):
        db.settle(Settlement(delivered=[m.seq for m in batch]), time.time())
        out += [m.payload for m in batch]
    return out


def mixed(n: int) -> list[NewMessage]:
    return [msg(f"sensors/d{i % 3}/{'alarm' if i % 5 == 0 else 'telemetry'}", b"%d" % i)
            for i in range(n)]


def test_each_destination_gets_exactly_its_topics_in_order(tmp_path: Path) -> None:
    db = open_db(tmp_path / "s.db", TELEMETRY, ALARMS, EVERYTHING)
    db.append([(Q, mixed(100))])
    assert db.depth("kafka") == 80 and db.depth("sqs") == 20 and db.depth("archive") == 100
    assert drain(db, "kafka") == [b"%d" % i for i in range(100) if i % 5]
    assert drain(db, "sqs") == [b"%d" % i for i in range(100) if i % 5 == 0]
    assert drain(db, "archive") == [b"%d" % i for i in range(100)]
    assert [db.depth(n) for n in ("kafka", "sqs", "archive")] == [0, 0, 0]
    db.close()


def test_a_dead_destination_holds_back_no_other_and_pins_only_its_segments(
        tmp_path: Path) -> None:
    db = open_db(tmp_path / "s.db", TELEMETRY, ALARMS, segment_bytes=8192, compression="none")
    conn = db.conn
    assert conn is not None
    for _ in range(20):  # ~70 KB through 8 KB segments; the alarms uplink is down throughout
        db.append([(Q, [msg("sensors/d1/telemetry", os.urandom(200)) for _ in range(15)]
                    + [msg("sensors/d1/alarm", b"A")])])
        assert len(drain(db, "kafka")) == 15
    db.sync_cursors(force=True)
    segments = conn.execute("SELECT count(*) FROM segments").fetchone()[0]
    assert segments > 5, "the segments the dead uplink has not passed are kept"
    assert len(drain(db, "sqs")) == 20  # back: everything it missed
    db.sync_cursors(force=True)
    assert conn.execute("SELECT count(*) FROM segments").fetchone()[0] < segments
    db.close()


def test_retention_counts_what_each_destination_never_got(tmp_path: Path) -> None:
    db = open_db(tmp_path / "s.db", TELEMETRY, ALARMS, max_messages=50)
    for _ in range(4):
        db.append([(Q, mixed(25))])
        drain(db, "kafka")  # kafka keeps up; sqs is down
    stats = {n: db.stats(n, time.time()) for n in ("kafka", "sqs")}
    assert stats["kafka"].dropped == {}, "kafka had settled everything that was dropped"
    dropped = stats["sqs"].dropped["max_messages"]
    assert dropped > 0 and dropped + stats["sqs"].depth == 20
    db.close()


def test_a_message_no_destination_takes_is_acknowledged_not_kept_and_counted(
        tmp_path: Path) -> None:
    db = open_db(tmp_path / "s.db", TELEMETRY, ALARMS)
    outcomes = db.append([(Q, [msg("other/topic", b"x"), msg("sensors/d1/alarm", b"y")])])
    assert [o.status for o in outcomes[0]] == [AppendStatus.UNROUTED, AppendStatus.STORED]
    assert outcomes[0][0].durable, "the broker may forget it: no uplink wanted it"
    db.sync_cursors(force=True)
    assert db.counter(Q, "unrouted") == 1
    assert db.count == 1
    db.close()


def test_removed_destination_counted_new_one_starts_at_the_head(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    db = open_db(path, TELEMETRY, ALARMS)
    db.append([(Q, mixed(10))])
    db.close()
    db = StoreDb(str(path), Limits.from_config(StoreConfig()))
    db.open()
    assert db.register(Q, [TELEMETRY, EVERYTHING]) == ["sqs"]
    assert db.counter("sqs", "dropped:uplink_removed") == 2
    assert db.depth("archive") == 0, "a new uplink takes what arrives from now on"
    db.append([(Q, mixed(5))])
    assert db.depth("archive") == 5 and db.depth("kafka") == 8 + 4
    db.close()


def test_depths_survive_a_restart_and_read_the_same_from_the_file(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    db = open_db(path, TELEMETRY, ALARMS)
    db.append([(Q, mixed(50))])
    half = db.lease("kafka", 20, 60.0, time.time())
    db.settle(Settlement(delivered=[m.seq for m in half]), time.time())
    db.close()
    db = open_db(path, TELEMETRY, ALARMS)
    assert (db.depth("kafka"), db.depth("sqs")) == (20, 10)
    reader = StoreDb(str(path), Limits.from_config(StoreConfig()), readonly=True)
    reader.open()
    reader.register(Q, [TELEMETRY, ALARMS])
    assert (reader.depth("kafka"), reader.depth("sqs")) == (20, 10)
    reader.close()
    db.close()


def test_max_attempts_is_per_destination(tmp_path: Path) -> None:
    db = open_db(tmp_path / "s.db", TELEMETRY, ALARMS, max_attempts=10)
    db.append([(Q, [msg("sensors/d1/alarm", b"a"), msg("sensors/d1/telemetry", b"t")])])
    for _ in range(2):
        (alarm,) = db.lease("sqs", 10, 60.0, time.time())
        db.settle(Settlement(retry=[(alarm.seq, 0.0, "throttled")]), time.time())
    (dead,) = db.list_dead("sqs", 10)
    assert "gave up after 2 attempts" in dead.reason
    (tele,) = db.lease("kafka", 10, 60.0, time.time())
    db.settle(Settlement(retry=[(tele.seq, 0.0, "throttled")]), time.time())
    assert db.list_dead("kafka", 10) == [], "kafka keeps the store's 10"
    db.close()


def test_settlements_name_their_destination_the_cursors_share_seqs(tmp_path: Path) -> None:
    """B delivers seq N while A, which holds the same seq N in flight, gives it back: A must
    still get it (a settlement without its cursor once took it from A's books)."""
    db = open_db(tmp_path / "s.db", Destination("a"), Destination("b"))
    db.append([(Q, [msg("t/1", b"m0"), msg("t/1", b"m1")])])
    held_a = db.lease("a", 10, 60.0, time.time())
    held_b = db.lease("b", 10, 60.0, time.time())
    assert [m.seq for m in held_a] == [m.seq for m in held_b]
    db.settle(Settlement(delivered=[m.seq for m in held_b], cursor="b"), time.time())
    db.settle(Settlement(release=[m.seq for m in held_a], cursor="a"), time.time())
    assert [m.payload for m in db.lease("a", 10, 60.0, time.time())] == [b"m0", b"m1"]
    assert db.depth("b") == 0
    db.close()


def test_readers_of_one_queue_share_decoded_frames_and_forget_them_on_rollback(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    decoded = []

    class CountedFrame(log_module.Frame):
        def __init__(self, header: Any, body: Any) -> None:
            decoded.append(header.pos)
            super().__init__(header, body)

    monkeypatch.setattr(log_module, "Frame", CountedFrame)
    db = open_db(tmp_path / "s.db", TELEMETRY, EVERYTHING)
    assert db.log is not None and db.log.shared_reads
    db.append([(Q, mixed(50))])
    first = db.lease("archive", 100, 60.0, time.time())
    second = db.lease("kafka", 100, 60.0, time.time())
    assert len(first) == 50 and len(second) == 40
    assert len(decoded) == 1  # one frame, decoded once, read by both cursors
    snap = db.log.snapshot()
    db.log.restore(snap)  # a rolled-back append: its positions are written again
    assert not db.log._recent
    db.close()
    single = open_db(tmp_path / "one.db", EVERYTHING)
    assert single.log is not None and not single.log.shared_reads
    single.close()
