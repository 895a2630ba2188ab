"""Migration of a format-1 store (one row per message in ``messages``) to format 2, in place.

Runs when the daemon opens a store with ``user_version = 1`` (or with a ``messages`` table
left by an interrupted migration), before anything else uses it.

Promises (``docs/architecture.md``, *Migration from format 1*):

- Nothing is lost: each transaction appends a chunk of rows (at most ``CHUNK_ROWS`` rows and
  about ``CHUNK_BYTES`` of payload, so memory stays bounded whatever the store's size) to the
  log or to ``parked`` and deletes exactly those rows from ``messages``. A row is therefore
  in one place at any moment, and a migration interrupted by a crash or a power cut resumes
  where it stopped at the next start.
- Ids are kept (each record carries its format-1 id in its extras), and so are attempts,
  back-off times and last errors of retrying rows (parked), delayed and prioritised rows
  (parked outside any topic chain), and per-topic order (a row of a topic with a retrying row
  before it is parked behind it).
- When ``messages`` is empty it is dropped and ``user_version`` becomes 2. Dead letters and
  counters have the same schema in both formats and stay as they are.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import orjson

from gateway.store import parked
from gateway.store.frames import MAX_DELTA_MS, Record, extras_blob, mqtt_flags, record_size
from gateway.store.records import StoredMessage

if TYPE_CHECKING:
    from gateway.store.db import StoreDb

log = logging.getLogger("gateway.store")

CHUNK_ROWS = 1000
CHUNK_BYTES = 4 * 1024**2


def migrate_v1(db: StoreDb) -> int:
    """Move every row of ``messages`` into the format-2 tables; returns how many."""
    c = db._c
    total = int(c.execute("SELECT count(*) FROM messages").fetchone()[0])
    started = time.monotonic()
    if total:
        log.warning("store %s has format 1: migrating %d buffered messages to format 2",
                    db.path, total)
    moved = 0
    while True:
        rows = _chunk(c)
        if not rows:
            break
        db._begin(durable=True)
        try:
            _move(db, rows)
            c.execute("DELETE FROM messages WHERE seq <= ?", (rows[-1][0],))
            db._commit()
        except BaseException:
            db._rollback()
            raise
        moved += len(rows)
    db._begin(durable=True)
    try:
        c.execute("DROP TABLE messages")
        c.execute(f"PRAGMA user_version={2}")
        db._commit()
    except BaseException:
        db._rollback()
        raise
    c.execute("PRAGMA incremental_vacuum")
    if total:
        log.warning("store %s migrated to format 2: %d messages in %.1f s", db.path, moved,
                    time.monotonic() - started)
    return moved


def _chunk(c: Any) -> list[tuple[Any, ...]]:
    rows: list[tuple[Any, ...]] = []
    size = 0
    for row in c.execute("SELECT seq, id, queue, topic, payload, attributes, priority,"
                         " received_at, not_before, attempts, last_error FROM messages"
                         " ORDER BY seq LIMIT ?", (CHUNK_ROWS,)):
        rows.append(tuple(row))
        size += len(row[4])
        if size >= CHUNK_BYTES:
            break
    return rows


def _move(db: StoreDb, rows: list[tuple[Any, ...]]) -> None:
    """One chunk, in the caller's transaction: log records per queue, the rest parked."""
    log_ = db._log
    pending: dict[str, tuple[list[Record], list[int]]] = {}
    for _, msg_id, queue, topic, payload, attributes, priority, received_at, not_before, \
            attempts, last_error in rows:
        cur = db._cursor_for(queue)
        attrs = orjson.loads(attributes) if attributes else {}
        records, sizes = pending.setdefault(queue, ([], []))
        order = log_.head_seq + sum(len(r) for r, _ in pending.values())
        retrying = attempts > 0
        if retrying or cur.chains.get(topic) or priority or not_before > 0:
            msg = StoredMessage.detached(0, queue, topic, payload, received_at, order=order,
                                         priority=priority, attempts=attempts, msg_id=msg_id,
                                         attributes=attrs)
            chain = 1 if retrying or cur.chains.get(topic) else 0
            db._park_rows(cur, [parked.ParkedRow(msg, attempts, not_before, chain, last_error)])
            continue
        flags, rest = mqtt_flags(attrs)
        extras = extras_blob(msg_id, rest)
        ms = int(received_at * 1000)
        if records and abs(records[0].received_ms - ms) > MAX_DELTA_MS // 2:
            db._write_frame(cur.qid, [cur], records, sizes)
        records.append(Record(topic, payload, ms, flags, extras))
        sizes.append(record_size(topic, len(payload), extras))
    for queue, (records, sizes) in pending.items():
        cur = db.cursors[queue]
        db._write_frame(cur.qid, [cur], records, sizes)
