"""A damaged store at start: check it, move it aside, start a fresh one, keep running.

A gateway that cannot open its store cannot take a single message, so at daemon start the
store file is checked before it is used:

- a file up to ``QUICK_CHECK_MAX_BYTES`` gets ``PRAGMA quick_check`` (reads every page;
  about a second per 20-50 MB on an SD card); a larger one only has its header and schema
  read, so a huge store does not delay the start by minutes;
- opening it, or any statement during the check, failing with SQLITE_CORRUPT ("database
  disk image is malformed") or SQLITE_NOTADB ("file is not a database") counts as damage.

A damaged file is renamed, with its ``-wal`` and ``-shm``, to ``<path>.corrupt-<UTC time>``
(nothing is deleted: an operator can try ``sqlite3 .recover`` on it), an ERROR line says so,
a fresh store is created in its place, and the counter ``quarantined_files`` (queue
``default``) is incremented in the fresh store.

What is *not* damage, and is raised as before: a file we may not read (permissions), a
locked file, a schema version newer than this gateway knows (moving that aside would throw
away a newer gateway's data). Messages in a quarantined file are not delivered; they are
counted by nobody, which is why this is loud.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time
import urllib.parse

from gateway.store.db import StoreDb

log = logging.getLogger("gateway.store")

#: files up to this size get a full ``PRAGMA quick_check`` at start
QUICK_CHECK_MAX_BYTES = 64 * 1024**2
#: the counter row written into the fresh store (the uplink's queue, gateway.forwarder)
COUNTER_QUEUE = "default"
COUNTER_NAME = "quarantined_files"

SQLITE_CORRUPT = 11
SQLITE_NOTADB = 26
_DAMAGE_CODES = frozenset({SQLITE_CORRUPT, SQLITE_NOTADB})
_SIDE_FILES = ("-wal", "-shm")


class StoreDamaged(sqlite3.DatabaseError):
    """``PRAGMA quick_check`` reported problems."""


def is_damage(exc: BaseException) -> bool:
    """SQLITE_CORRUPT or SQLITE_NOTADB (and their extended codes), or a failed check."""
    if isinstance(exc, StoreDamaged):
        return True
    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(exc, sqlite3.DatabaseError) and code is not None and (code & 0xFF) in _DAMAGE_CODES


def check(path: str, quick_check_max_bytes: int = QUICK_CHECK_MAX_BYTES) -> None:
    """Raise a damage error (see ``is_damage``) when the file at ``path`` is damaged.

    A missing or empty file is fine (SQLite creates a new database in it)."""
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        return
    if size == 0:
        return
    # read-only: no checkpoint into the file and no -wal/-shm deleted on close
    uri = f"file:{urllib.parse.quote(os.path.abspath(path))}?mode=ro"
    conn = sqlite3.connect(uri, uri=True, isolation_level=None)
    try:
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        if size <= quick_check_max_bytes:
            rows = [r[0] for r in conn.execute("PRAGMA quick_check")]
            if rows != ["ok"]:
                raise StoreDamaged("; ".join(str(r) for r in rows[:5]))
    finally:
        conn.close()


def quarantine(path: str, now: float | None = None) -> str:
    """Move ``path`` and its -wal/-shm aside; return the new name of the main file."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now is None else now))
    target = f"{path}.corrupt-{stamp}"
    n = 1
    while any(os.path.exists(target + s) for s in ("", *_SIDE_FILES)):
        n += 1
        target = f"{path}.corrupt-{stamp}-{n}"
    for suffix in _SIDE_FILES:  # side files first: a WAL left beside a new file would be replayed
        with contextlib.suppress(FileNotFoundError):
            os.replace(path + suffix, target + suffix)
    with contextlib.suppress(FileNotFoundError):
        os.replace(path, target)
    return target


def open_checked(db: StoreDb) -> str | None:
    """Check and open ``db``; a damaged file is quarantined and a fresh store opened.

    Returns the quarantined file's new name, or None when the store was fine. Runs on the
    store thread, before anything else touches the file."""
    try:
        check(db.path)
        db.open()
        return None
    except sqlite3.Error as exc:
        if not is_damage(exc):
            raise
        if db.conn is not None:  # no checkpoint into a damaged file: leave it as it is
            db.conn.close()
            db.conn = None
        reason = str(exc) or type(exc).__name__
    moved = quarantine(db.path)
    log.error("the store %s is damaged (%s): moved it aside to %s (with its -wal/-shm) and "
              "started an empty store; messages buffered in it are NOT delivered",
              db.path, reason, moved)
    db.open()
    conn = db.conn
    assert conn is not None
    conn.execute("INSERT INTO counters(queue, name, value) VALUES (?, ?, 1) "
                 "ON CONFLICT(queue, name) DO UPDATE SET value = value + 1",
                 (COUNTER_QUEUE, COUNTER_NAME))
    return moved
