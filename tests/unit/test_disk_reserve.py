"""After a full disk the disk reserve is given back so the store can drain; until it can be
taken again newcomers may not grow the file into that space (they would wedge the drain:
cursor writes failing with SQLITE_FULL forever), but they do use the file's free pages and
spare segments (gateway/store/appending.py, reserve.py)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest

from gateway.config import StoreConfig
from gateway.store.db import Destination, Limits, StoreDb
from gateway.store.frames import FROM_MQTT
from gateway.store.records import AppendStatus, NewMessage, Settlement

Q = "default"


def readings(n: int, size: int = 300) -> list[NewMessage]:
    return [NewMessage("", f"s/{i % 4}", bytes([65 + i % 26]) * size, {}, time.time(),
                       mqtt_flags=FROM_MQTT | 1) for i in range(n)]


def open_db(path: Path) -> StoreDb:
    cfg = dataclasses.replace(StoreConfig(), when_full="reject_new", compression="none",
                              segment_bytes=64 * 1024)
    db = StoreDb(str(path), Limits.from_config(cfg))
    db.open()
    db.register(Q, [Destination(Q)])
    return db


def drain(db: StoreDb) -> int:
    n = 0
    while batch := db.lease(Q, 500, 60.0, time.time()):
        db.settle(Settlement(delivered=[m.seq for m in batch], cursor=Q), time.time())
        n += len(batch)
    db.sync_cursors(force=True)
    return n


def test_newcomers_use_free_room_only_until_the_reserve_is_taken_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = open_db(tmp_path / "s.db")
    for _ in range(40):  # small commits: several ring segments' worth
        db.append([(Q, readings(20))])
    assert drain(db) == 800
    assert db.log is not None and db.log.free, "drained ring segments are kept for reuse"
    # the disk filled up: the reserve was given back and the file system has no room for it
    db.reserve.release()
    db._reserve_released = True
    monkeypatch.setattr(db.reserve, "ensure", lambda: False)
    monkeypatch.setattr(db.reserve, "would_fit", lambda freed: False)
    pages = db._page_count()
    stored = db.append([(Q, readings(100))])[0]  # a large frame, into a spare segment
    assert {o.status for o in stored} == {AppendStatus.STORED}
    big = db.append([(Q, readings(2000))])[0]  # would need new pages: refused, counted
    assert {o.status for o in big} == {AppendStatus.DROPPED}
    assert {o.reason for o in big} == {"disk_full"}
    assert db._page_count() == pages, "the file did not grow into the reserve's space"
    assert db.append([(Q, readings(10))])[0][0].status == AppendStatus.STORED  # no back-off
    assert drain(db) == 110
    monkeypatch.undo()  # the disk has room again: the reserve is taken back
    assert db.append([(Q, readings(2000))])[0][0].status == AppendStatus.STORED
    assert db.reserve.held() and not db._reserve_released
    db.close()
