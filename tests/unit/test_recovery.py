"""A damaged store at start is moved aside and a fresh one opened (gateway.store.recovery)."""

from __future__ import annotations

import logging
import sqlite3
import time
from pathlib import Path

import pytest

from gateway.config import StoreConfig
from gateway.errors import StoreError
from gateway.message import new_message_id
from gateway.store import NewMessage, Store, recovery

Q = "default"


def msg(n: int, size: int = 1000) -> NewMessage:
    return NewMessage(new_message_id(), "t", b"%06d" % n + b"x" * size, {"mqtt_topic": "t"},
                      time.time())


async def open_store(path: Path, exclusive: bool = True) -> Store:
    store = Store(str(path), StoreConfig(), exclusive=exclusive)
    await store.open()
    return store


async def make_store(path: Path, n: int = 500) -> None:
    store = await open_store(path)
    await store.append(Q, [msg(i) for i in range(n)])
    await store.close()


def counter(path: Path) -> int | None:
    with sqlite3.connect(path) as conn:
        row = conn.execute("SELECT value FROM counters WHERE queue = ? AND name = ?",
                           (recovery.COUNTER_QUEUE, recovery.COUNTER_NAME)).fetchone()
    return None if row is None else int(row[0])


def corrupt_pages(path: Path, first: int, count: int, page: int = 4096) -> None:
    with open(path, "r+b") as fh:
        fh.seek(first * page)
        fh.write(b"\xa5" * (count * page))


def leave_crash_files(path: Path) -> None:
    """The -wal and -shm a crashed process leaves beside the file."""
    Path(f"{path}-wal").write_bytes(b"")
    Path(f"{path}-shm").write_bytes(b"\0" * 32768)


def side_files_exist(path: Path) -> bool:
    return Path(f"{path}-wal").exists() and Path(f"{path}-shm").exists()


def quarantined(path: Path) -> list[Path]:
    return sorted(p for p in path.parent.glob(path.name + ".corrupt-*")
                  if not p.name.endswith(("-wal", "-shm")))


async def test_healthy_store_opens_untouched(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    await make_store(path)
    store = await open_store(path)
    assert store.message_count == 500
    await store.close()
    assert quarantined(path) == [] and counter(path) is None


async def test_not_a_database_is_quarantined_and_fresh_store_works(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "s.db"
    junk = b"this is not an SQLite file at all\n" * 200
    path.write_bytes(junk)
    with caplog.at_level(logging.ERROR, logger="gateway.store"):
        store = await open_store(path)
    assert store.message_count == 0
    await store.append(Q, [msg(1)])  # the fresh store takes messages
    await store.close()
    (moved,) = quarantined(path)
    assert moved.read_bytes() == junk, "the damaged file is kept as it was"
    assert counter(path) == 1
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "damaged" in errors[0].getMessage()
    assert str(moved) in errors[0].getMessage()


async def test_damaged_pages_are_found_and_moved_with_wal_and_shm(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    await make_store(path)
    corrupt_pages(path, 20, 40)  # in the middle of the messages b-tree
    leave_crash_files(path)
    with pytest.raises(sqlite3.DatabaseError) as err:
        recovery.check(str(path))
    assert recovery.is_damage(err.value)
    store = await open_store(path)
    assert store.message_count == 0
    await store.close()
    (moved,) = quarantined(path)
    assert side_files_exist(moved)
    assert counter(path) == 1


async def test_a_second_quarantine_in_the_same_second_gets_its_own_name(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    for _ in range(2):
        path.write_bytes(b"garbage" * 1000)
        store = await open_store(path)
        await store.close()
    assert len(quarantined(path)) == 2


async def test_large_file_gets_only_the_cheap_check(tmp_path: Path) -> None:
    """Above the size limit quick_check is skipped: page damage is found later, not at start."""
    path = tmp_path / "s.db"
    await make_store(path)
    corrupt_pages(path, 20, 40)
    recovery.check(str(path), quick_check_max_bytes=1024)  # header and schema are fine
    with pytest.raises(sqlite3.DatabaseError):
        recovery.check(str(path))


async def test_newer_schema_is_not_damage_and_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    await make_store(path, 3)
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA user_version=99")
    store = Store(str(path), StoreConfig())
    with pytest.raises(StoreError, match="format 99, written by a newer gateway"):
        await store.open()
    await store.close()  # releases the lock file a failed open leaves behind
    assert quarantined(path) == []


async def test_shared_store_is_never_quarantined(tmp_path: Path) -> None:
    """Only the daemon (holding the lock) may move the file; others report the damage."""
    path = tmp_path / "s.db"
    path.write_bytes(b"garbage" * 1000)
    store = Store(str(path), StoreConfig(), exclusive=False)
    with pytest.raises(StoreError, match="not a database"):
        await store.open()
    await store.close()
    assert quarantined(path) == []


def test_locked_or_busy_is_not_damage() -> None:
    busy = sqlite3.OperationalError("database is locked")
    busy.sqlite_errorcode = 5  # type: ignore[attr-defined]
    assert not recovery.is_damage(busy)
    assert not recovery.is_damage(sqlite3.DatabaseError("schema version 99"))
