"""The store's SQLite layer: schema, invariants and every statement. Synchronous; the async
``Store`` runs all of it on one dedicated thread, so there is one connection and one writer.

Schema (``PRAGMA user_version`` = 1; WAL journal; auto_vacuum=INCREMENTAL)::

    messages(seq INTEGER PRIMARY KEY,   -- arrival order, assigned at insert
             id TEXT,                   -- stable gateway message id
             queue TEXT,                -- the uplink (or store-backend queue) it waits for
             topic TEXT,                -- order key: the MQTT topic
             payload BLOB, attributes BLOB (JSON object or NULL),
             size INTEGER,              -- bytes counted against store.max_bytes
             priority INTEGER, received_at REAL, not_before REAL,
             attempts INTEGER,          -- failed deliveries so far
             lease_until REAL,          -- unused (leases are in memory); cleared at start
             last_error TEXT)
    dead_letters(dl_seq INTEGER PRIMARY KEY, id, queue, topic, payload, attributes,
                 size, received_at, failed_at, attempts, reason)
    counters(queue, name, value)        -- delivered_total, dropped:<reason>, ...

Invariants:

1. A message is in exactly one place: ``messages``, ``dead_letters``, or gone. It leaves
   ``messages`` only by (a) delivery confirmed by the uplink, (b) dead-lettering with a
   reason, or (c) a retention drop, which increments ``dropped:<reason>`` in the same
   transaction.
2. ``append`` returns only after the transaction holding the message committed with the
   configured durability (``synchronous=FULL`` by default), so an acknowledgement sent after
   it survives a crash or power cut. Settle and expiry transactions run with
   ``synchronous=NORMAL``: losing one of them on power loss only causes a redelivery, and
   the next FULL commit syncs the WAL frames before it.
3. Order: within a queue, ready messages are leased by (priority DESC, seq). A topic with a
   message waiting for a retry (attempts > 0, backoff or in flight) leases nothing behind
   it, so per-topic order holds across retries, outages and restarts. Messages held back
   by ``delay_seconds`` do not block their topic.
4. A lease is a deadline on the monotonic clock, held in memory (``gateway.store.leases``),
   never written: leasing is a read, a release costs nothing. An expired lease makes the
   message ready again and counts as an attempt. A restart forgets every lease, so what was
   not settled is delivered again. (``lease_until`` is only read to clear leases that
   earlier gateways wrote.)
5. A full disk never wedges the store: an 8 MiB reserve file beside it is given back on
   SQLITE_FULL so deletes and checkpoints can still be written (``reserve``). The
   WAL's committed, uncheckpointed content stays under the reserve (autocheckpoint at half
   of it, one transaction at most a quarter), so a checkpoint always fits in what the
   reserve gives back; appends are refused without writing for a second at a time after
   SQLITE_FULL, so what was given back goes to the drain.
6. Retention is store-wide on counted bytes and messages: when_full=drop_oldest deletes the
   oldest messages of any queue; reject_new refuses the newcomer. Both are counted.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson

from gateway.config import StoreConfig
from gateway.store.leases import Leases
from gateway.store.records import (
    STORED,
    AppendOutcome,
    AppendStatus,
    DeadLetter,
    NewMessage,
    QueueStats,
    Settlement,
    StoredMessage,
)
from gateway.store.reserve import RESERVE_BYTES, DiskReserve

R = TypeVar("R")

SCHEMA_VERSION = 1
SQLITE_FULL = 13
#: after a full disk refused an append, how long appends are refused without trying
FULL_PROBE_SECONDS = 1.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages(
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL,
    queue TEXT NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    attributes BLOB,
    size INTEGER NOT NULL,
    priority INTEGER NOT NULL DEFAULT 0,
    received_at REAL NOT NULL,
    not_before REAL NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    lease_until REAL NOT NULL DEFAULT 0,
    last_error TEXT
);
CREATE INDEX IF NOT EXISTS messages_ready ON messages(queue, priority DESC, seq);
CREATE INDEX IF NOT EXISTS messages_retrying ON messages(queue, topic) WHERE attempts > 0;
CREATE TABLE IF NOT EXISTS dead_letters(
    dl_seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL,
    queue TEXT NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    attributes BLOB,
    size INTEGER NOT NULL,
    received_at REAL NOT NULL,
    failed_at REAL NOT NULL,
    attempts INTEGER NOT NULL,
    reason TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS dead_letters_queue ON dead_letters(queue, dl_seq);
CREATE TABLE IF NOT EXISTS counters(
    queue TEXT NOT NULL,
    name TEXT NOT NULL,
    value INTEGER NOT NULL,
    PRIMARY KEY(queue, name)
) WITHOUT ROWID;
"""

_MSG_COLUMNS = "seq, id, queue, topic, payload, attributes, received_at, priority, attempts"


def _attrs_blob(attributes: dict[str, str]) -> bytes | None:
    return orjson.dumps(attributes) if attributes else None


def _attrs(blob: bytes | None) -> dict[str, str]:
    return orjson.loads(blob) if blob else {}


def _row_to_message(row: Sequence[Any]) -> StoredMessage:
    return StoredMessage(row[0], row[1], row[2], row[3], row[4], _attrs(row[5]), row[6],
                         row[7], row[8])


#: the dead-letter table's byte cap (its message cap is store.dead_letter_max_messages)
DEAD_LETTER_MAX_BYTES = 64 * 1024**2


@dataclass(frozen=True, slots=True)
class Limits:
    """The retention and retry settings the SQL layer enforces."""

    max_bytes: int
    max_messages: int
    when_full: str
    max_attempts: int
    dead_letter_max_messages: int
    dead_letter_max_bytes: int = DEAD_LETTER_MAX_BYTES
    max_page_count: int = 0
    durability: str = "full"

    @classmethod
    def from_config(cls, cfg: StoreConfig) -> Limits:
        return cls(max_bytes=cfg.max_bytes, max_messages=cfg.max_messages,
                   when_full=cfg.when_full, max_attempts=cfg.max_attempts,
                   dead_letter_max_messages=cfg.dead_letter_max_messages,
                   max_page_count=cfg.max_page_count, durability=cfg.durability)

def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, sqlite3.Error) and getattr(exc, "sqlite_errorcode", None) == SQLITE_FULL


class StoreDb:
    """One connection; not thread-safe; every method runs on the store thread."""

    def __init__(self, path: str, limits: Limits, readonly: bool = False) -> None:
        self.path = path
        self.limits = limits
        self.readonly = readonly
        self.conn: sqlite3.Connection | None = None
        self._sync_mode = ""
        self.count = 0  # messages in ``messages``
        self.bytes = 0  # sum of ``messages.size``
        self.dead_count = 0
        self.dead_bytes = 0
        #: drops that could not be written (disk full); flushed with the next transaction
        self._unsaved: Counter[tuple[str, str]] = Counter()
        #: monotonic time until which appends are refused without writing (disk full)
        self._refuse_appends_until = 0.0
        self.page_size = 1024
        self.leases = Leases()
        #: soft cap on what one transaction writes (payload bytes of an append, pages of a settle)
        self.max_txn_bytes = 64 * 1024**2
        self.reserve = DiskReserve(path + ".reserve", 0 if readonly else RESERVE_BYTES)

    # -- lifecycle ---------------------------------------------------------------------

    def open(self) -> None:
        if self.readonly:
            uri = f"file:{self.path}?mode=ro"
            self.conn = sqlite3.connect(uri, uri=True, isolation_level=None,
                                        check_same_thread=False)
            self.conn.execute("PRAGMA query_only=1")
            return
        parent = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(parent, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.conn = conn
        # Small pages: a commit of a few dozen messages rewrites ~1 KB leaves instead of
        # 4 KB ones, which cuts bytes written per message by ~40% (SD card wear).
        conn.execute("PRAGMA page_size=1024")  # only takes effect on a new file
        conn.execute("PRAGMA auto_vacuum=INCREMENTAL")  # only takes effect on a new file
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise sqlite3.OperationalError(f"cannot switch {self.path} to WAL (got {mode})")
        conn.execute("PRAGMA busy_timeout=5000")
        conn.execute("PRAGMA temp_store=MEMORY")
        if self.limits.max_page_count:
            conn.execute(f"PRAGMA max_page_count={int(self.limits.max_page_count)}")
        # A checkpoint copies the WAL's new pages into the database file, so on a full disk it
        # needs up to the WAL's committed size in free space: the autocheckpoint threshold
        # plus one transaction. Both are kept small enough for the reserve to cover them.
        self.page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
        reserve = self.reserve.planned_size()
        if reserve > 0:
            wal_pages = max(64, min(1000, reserve // 2 // self.page_size))
            conn.execute(f"PRAGMA wal_autocheckpoint={wal_pages}")
            self.max_txn_bytes = max(64 * 1024, reserve // 4)
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise sqlite3.DatabaseError(
                f"{self.path} has schema version {version}; this gateway knows {SCHEMA_VERSION}")
        conn.executescript(_SCHEMA)
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        self._load_totals()
        self.reserve.ensure()

    def close(self) -> None:
        if self.conn is not None:
            if not self.readonly:
                with contextlib.suppress(sqlite3.Error):
                    self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self.conn.close()
            self.conn = None

    def refresh_totals(self) -> None:
        """Recount after writers outside this process (``dlq replay``) changed the tables."""
        self._load_totals()

    def _load_totals(self) -> None:
        c = self._c
        self.count, self.bytes = c.execute(
            "SELECT count(*), coalesce(sum(size), 0) FROM messages").fetchone()
        self.dead_count, self.dead_bytes = c.execute(
            "SELECT count(*), coalesce(sum(size), 0) FROM dead_letters").fetchone()

    @property
    def _c(self) -> sqlite3.Connection:
        if self.conn is None:
            raise sqlite3.ProgrammingError("store is not open")
        return self.conn

    def _sync(self, mode: str) -> None:
        if mode != self._sync_mode:
            self._c.execute(f"PRAGMA synchronous={mode}")
            self._sync_mode = mode

    def _begin(self, durable: bool) -> None:
        self._sync("FULL" if durable and self.limits.durability == "full" else "NORMAL")
        self._c.execute("BEGIN IMMEDIATE")

    def _commit(self) -> None:
        flushed = self._flush_unsaved() if self._unsaved else None
        self._c.execute("COMMIT")
        if flushed:  # only once written: a failed commit keeps them for the next
            self._unsaved -= flushed

    def _rollback(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._c.execute("ROLLBACK")

    def release_all_leases(self) -> int:
        """At daemon start: whoever held leases is gone. Leases live in memory; this clears
        the ``lease_until`` that earlier gateways wrote into the rows."""
        self.leases.clear()
        self._begin(durable=False)
        n = self._c.execute("UPDATE messages SET lease_until = 0 WHERE lease_until > 0").rowcount
        self._commit()
        return n

    # -- counters ----------------------------------------------------------------------

    def _bump(self, queue: str, name: str, by: int = 1) -> None:
        if by:
            self._c.execute(
                "INSERT INTO counters(queue, name, value) VALUES (?, ?, ?) "
                "ON CONFLICT(queue, name) DO UPDATE SET value = value + excluded.value",
                (queue, name, by))

    def _flush_unsaved(self) -> Counter[tuple[str, str]]:
        pending = Counter(self._unsaved)
        for (queue, name), n in pending.items():
            self._bump(queue, name, n)
        return pending

    def _save_counters(self) -> None:
        """Write pending drop counters in their own small transaction, if there is room."""
        if not self._unsaved:
            return
        try:
            self._begin(durable=False)
            self._commit()
        except sqlite3.Error:
            self._rollback()

    # -- append ------------------------------------------------------------------------

    def append(self, groups: Sequence[tuple[str, Sequence[NewMessage]]]) -> list[list[AppendOutcome]]:
        """Store every group in one durable transaction; per-message outcomes.

        After SQLITE_FULL, appends are refused without touching the file for
        ``FULL_PROBE_SECONDS`` at a time: what the disk reserve gave back is for the lease, the
        delete and the checkpoint that drain the store, not for newcomers that cannot fit."""
        if time.monotonic() < self._refuse_appends_until:
            return self._refuse_all(groups)
        try:
            return self._append_once(groups)
        except sqlite3.Error as exc:
            self._rollback()
            self._load_totals()
            if not is_disk_full(exc):
                raise
        # The disk (or max_page_count) is full. drop_oldest: make room and try once more.
        self.reserve.release()
        self.checkpoint()
        if self.limits.when_full == "drop_oldest" and self.count:
            try:
                self._free_for_disk(sum(len(msgs) for _, msgs in groups))
                return self._append_once(groups)
            except sqlite3.Error as exc:
                self._rollback()
                self._load_totals()
                if not is_disk_full(exc):
                    raise
        self._refuse_appends_until = time.monotonic() + FULL_PROBE_SECONDS
        out = self._refuse_all(groups)
        self._save_counters()
        return out

    def _refuse_all(self, groups: Sequence[tuple[str, Sequence[NewMessage]]]) -> list[list[AppendOutcome]]:
        return [[self._drop_unsaved(q, "disk_full") for _ in msgs] for q, msgs in groups]

    def _drop_unsaved(self, queue: str, reason: str) -> AppendOutcome:
        self._unsaved[(queue, f"dropped:{reason}")] += 1
        return AppendOutcome(AppendStatus.DROPPED, reason)

    def _append_once(self, groups: Sequence[tuple[str, Sequence[NewMessage]]]) -> list[list[AppendOutcome]]:
        self._begin(durable=True)
        c = self._c
        out: list[list[AppendOutcome]] = []
        rows: list[tuple[Any, ...]] = []
        for queue, msgs in groups:
            outcomes: list[AppendOutcome] = []
            for m in msgs:
                attrs = _attrs_blob(m.attributes)
                size = len(m.payload) + len(m.topic) + (len(attrs) if attrs else 0)
                if m.dead_letter_reason is not None:
                    self._insert_dead(c, queue, m, attrs, size)
                    outcomes.append(AppendOutcome(AppendStatus.DEAD_LETTERED, m.dead_letter_reason))
                    continue
                refused = self._make_room(queue, size, rows)
                if refused is not None:
                    outcomes.append(refused)
                    continue
                not_before = m.received_at + m.delay_seconds if m.delay_seconds > 0 else 0.0
                rows.append((m.id, queue, m.topic, m.payload, attrs, size, m.priority,
                             m.received_at, not_before))
                self.count += 1
                self.bytes += size
                outcomes.append(STORED)
            out.append(outcomes)
        self._insert_rows(rows)
        self._trim_dead(c)
        self._commit()
        return out

    def _insert_rows(self, rows: list[tuple[Any, ...]]) -> None:
        self._c.executemany(
            "INSERT INTO messages(id, queue, topic, payload, attributes, size, priority, "
            "received_at, not_before) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
        rows.clear()

    def _make_room(self, queue: str, size: int, pending: list[tuple[Any, ...]]) -> AppendOutcome | None:
        """Apply retention for one newcomer of ``size`` bytes; None when it may be stored.

        ``pending`` holds rows of this transaction not inserted yet; they are inserted
        before anything is dropped so that the oldest really go first."""
        lim = self.limits
        if size > lim.max_bytes:
            self._bump(queue, "dropped:max_bytes")
            return AppendOutcome(AppendStatus.DROPPED, "max_bytes")
        over_count = self.count + 1 - lim.max_messages
        over_bytes = self.bytes + size - lim.max_bytes
        if over_count <= 0 and over_bytes <= 0:
            return None
        reason = "max_messages" if over_count > 0 else "max_bytes"
        if lim.when_full == "reject_new":
            self._bump(queue, f"dropped:{reason}")
            return AppendOutcome(AppendStatus.DROPPED, reason)
        self._insert_rows(pending)
        self._drop_oldest(max(over_count, 0), max(over_bytes, 0), reason)
        return None

    def _drop_oldest(self, need_count: int, need_bytes: int, reason: str,
                     chunk: int = 256) -> None:
        """Delete the oldest messages until ``need_count`` and ``need_bytes`` are freed.

        Frees at least a small chunk at a time, so a full store does not pay one DELETE per
        newcomer."""
        c = self._c
        need_count = max(need_count, 1 if need_bytes <= 0 else 0)
        freed_n = freed_b = 0
        last = None
        per_queue: Counter[str] = Counter()
        while freed_n < need_count or freed_b < need_bytes:
            rows = c.execute("SELECT seq, queue, size FROM messages WHERE seq > ? ORDER BY seq "
                             "LIMIT ?", (last or 0, chunk)).fetchall()
            if not rows:
                break
            for seq, q, size in rows:
                last = seq
                freed_n += 1
                freed_b += size
                per_queue[q] += 1
                if freed_n >= need_count and freed_b >= need_bytes and freed_n >= min(chunk, 16):
                    break
            else:
                continue
            break
        if last is None:
            return
        c.execute("DELETE FROM messages WHERE seq <= ?", (last,))
        self.count -= freed_n
        self.bytes -= freed_b
        for q, n in per_queue.items():
            self._bump(q, f"dropped:{reason}", n)

    def _free_for_disk(self, n: int) -> None:
        """Disk full under drop_oldest: delete at least n (and 1% of) the oldest messages."""
        self._begin(durable=False)
        self._drop_oldest(max(n, self.count // 100, 1), 0, "disk_full")
        self._commit()
        self._c.execute("PRAGMA incremental_vacuum")

    # -- dead letters ------------------------------------------------------------------

    def _insert_dead(self, c: sqlite3.Connection, queue: str, m: NewMessage,
                     attrs: bytes | None, size: int) -> None:
        c.execute(
            "INSERT INTO dead_letters(id, queue, topic, payload, attributes, size, received_at,"
            " failed_at, attempts, reason) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0, ?)",
            (m.id, queue, m.topic, m.payload, attrs, size, m.received_at, time.time(),
             m.dead_letter_reason))
        self.dead_count += 1
        self.dead_bytes += size
        self._bump(queue, "dead_lettered_total")

    def _move_to_dead(self, c: sqlite3.Connection, items: Iterable[tuple[int, str]], now: float) -> None:
        for seq, reason in items:
            row = c.execute("DELETE FROM messages WHERE seq = ? RETURNING id, queue, topic, "
                            "payload, attributes, size, received_at, attempts",
                            (seq,)).fetchone()
            if row is None:
                continue
            c.execute(
                "INSERT INTO dead_letters(id, queue, topic, payload, attributes, size,"
                " received_at, failed_at, attempts, reason) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (*row[:7], now, row[7], reason))
            self.count -= 1
            self.bytes -= row[5]
            self.dead_count += 1
            self.dead_bytes += row[5]
            self._bump(row[1], "dead_lettered_total")

    def _trim_dead(self, c: sqlite3.Connection) -> None:
        lim = self.limits
        while self.dead_count > 0 and (self.dead_count > lim.dead_letter_max_messages
                                       or self.dead_bytes > lim.dead_letter_max_bytes):
            row = c.execute("DELETE FROM dead_letters WHERE dl_seq = "
                            "(SELECT min(dl_seq) FROM dead_letters) RETURNING queue, size"
                            ).fetchone()
            if row is None:
                break
            self.dead_count -= 1
            self.dead_bytes -= row[1]
            self._bump(row[0], "dropped:dead_letter_full")

    def list_dead(self, queue: str | None, limit: int) -> list[DeadLetter]:
        sql = ("SELECT dl_seq, id, queue, topic, payload, attributes, received_at, failed_at, "
               "attempts, reason FROM dead_letters")
        args: tuple[Any, ...] = ()
        if queue is not None:
            sql += " WHERE queue = ?"
            args = (queue,)
        rows = self._c.execute(sql + " ORDER BY dl_seq LIMIT ?", (*args, limit)).fetchall()
        return [DeadLetter(r[0], r[1], r[2], r[3], r[4], _attrs(r[5]), r[6], r[7], r[8], r[9])
                for r in rows]

    def replay_dead(self, queue: str | None, ids: Sequence[str] | None) -> int:
        """Move dead letters back into ``messages`` (attempts reset); returns how many."""
        where, args = self._dead_filter(queue, ids)
        self._begin(durable=True)
        c = self._c
        rows = c.execute("DELETE FROM dead_letters" + where + " RETURNING id, queue, topic, "
                         "payload, attributes, size, received_at", args).fetchall()
        c.executemany("INSERT INTO messages(id, queue, topic, payload, attributes, size, "
                      "received_at, not_before) VALUES (?, ?, ?, ?, ?, ?, ?, 0)",
                      [tuple(r) for r in rows])
        for r in rows:
            self.dead_count -= 1
            self.dead_bytes -= r[5]
            self.count += 1
            self.bytes += r[5]
        self._commit()
        return len(rows)

    def purge_dead(self, queue: str | None, ids: Sequence[str] | None) -> int:
        where, args = self._dead_filter(queue, ids)
        self._begin(durable=False)
        rows = self._c.execute("DELETE FROM dead_letters" + where + " RETURNING size",
                               args).fetchall()
        self.dead_count -= len(rows)
        self.dead_bytes -= sum(r[0] for r in rows)
        self._commit()
        return len(rows)

    @staticmethod
    def _dead_filter(queue: str | None, ids: Sequence[str] | None) -> tuple[str, tuple[Any, ...]]:
        clauses: list[str] = []
        args: list[Any] = []
        if queue is not None:
            clauses.append("queue = ?")
            args.append(queue)
        if ids is not None:
            clauses.append(f"id IN ({','.join('?' * len(ids))})" if ids else "0")
            args.extend(ids)
        return (" WHERE " + " AND ".join(clauses) if clauses else ""), tuple(args)

    # -- delivery ----------------------------------------------------------------------

    def lease(self, queue: str, limit: int, lease_seconds: float, now: float,
              max_bytes: int = 0) -> list[StoredMessage]:
        """Up to ``limit`` messages and, when ``max_bytes`` > 0, up to that many payload
        bytes (the first message always, however large)."""
        # leasing writes nothing; settling a batch rewrites at worst a table and an index
        # leaf page per row, and one transaction stays under max_txn_bytes
        limit = min(limit, max(8, self.max_txn_bytes // (2 * self.page_size)))
        return self._with_room(self._lease, queue, limit, lease_seconds, now, max_bytes)

    def settle(self, s: Settlement, now: float) -> None:
        self._with_room(self._settle, s, now)

    def expire(self, max_age: float, now: float, chunk: int = 1000) -> int:
        return self._with_room(self._expire, max_age, now, chunk)

    def _with_room(self, fn: Callable[..., R], *args: Any) -> R:
        """Run a write; on SQLITE_FULL, checkpoint and try once more.

        On a full file system even a DELETE fails when the WAL must grow. After a
        RESTART checkpoint the next transaction writes from the start of the existing WAL
        file, so the lease and the delete that free space can still be written."""
        try:
            return fn(*args)
        except sqlite3.Error as exc:
            self._rollback()
            self._load_totals()
            if not is_disk_full(exc):
                raise
        self.reserve.release()
        self.checkpoint()
        return fn(*args)

    def checkpoint(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._c.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def _lease(self, queue: str, limit: int, lease_seconds: float, now: float,
               max_bytes: int) -> list[StoredMessage]:
        """Lease up to ``limit`` ready messages, in delivery order (invariants 3 and 4)."""
        c = self._c
        mono = time.monotonic()
        expired = self.leases.expire(queue, mono)
        if expired:  # an expired lease was an attempt
            self._begin(durable=False)
            c.execute("UPDATE messages SET attempts = attempts + 1 "
                      "WHERE seq IN (SELECT value FROM json_each(?))", (orjson.dumps(expired),))
            self._commit()
        cursor = c.execute(
            f"""SELECT {_MSG_COLUMNS} FROM messages
                WHERE queue = :q
                  AND not_before <= :now
                  AND seq NOT IN (SELECT value FROM json_each(:held))
                  AND topic NOT IN (SELECT value FROM json_each(:blocked))
                  AND topic NOT IN (
                      SELECT topic FROM messages
                      WHERE queue = :q AND attempts > 0 AND not_before > :now)
                ORDER BY priority DESC, seq
                LIMIT :limit""",
            {"q": queue, "now": now, "limit": limit,
             "held": orjson.dumps(self.leases.held(queue)),
             "blocked": orjson.dumps(self.leases.blocked_topics(queue))})
        rows: list[Any]
        if max_bytes > 0:  # read row by row and stop at the budget
            rows, size = [], 0
            for row in cursor:
                size += len(row[4])
                if rows and size > max_bytes:
                    break
                rows.append(row)
                if size >= max_bytes:
                    break
            cursor.close()
        else:
            rows = cursor.fetchall()
        self.leases.hold(queue, ((r[0], r[3], r[8]) for r in rows), mono + lease_seconds)
        return [_row_to_message(r) for r in rows]

    def _settle(self, s: Settlement, now: float) -> None:
        self._begin(durable=False)
        c = self._c
        if s.delivered:
            # One statement for the whole batch: per-row DELETEs cost as much as the uplink.
            rows = c.execute("DELETE FROM messages WHERE seq IN (SELECT value FROM json_each(?)) "
                             "RETURNING queue, size", (orjson.dumps(s.delivered),)).fetchall()
            if rows:
                self._refuse_appends_until = 0.0  # the drain made room
            by_queue: Counter[str] = Counter()
            for queue, size in rows:
                by_queue[queue] += 1
                self.bytes -= size
            self.count -= len(rows)
            for q, n in by_queue.items():
                self._bump(q, "delivered_total", n)
        dead = list(s.dead)
        retry_rows = []
        for seq, delay, error in s.retry:
            row = c.execute("SELECT attempts FROM messages WHERE seq = ?", (seq,)).fetchone()
            if row is None:
                continue
            if row[0] + 1 >= self.limits.max_attempts:
                dead.append((seq, f"gave up after {row[0] + 1} attempts: {error}"))
            else:
                retry_rows.append((now + delay, error[:1000], seq))
        c.executemany("UPDATE messages SET attempts = attempts + 1, not_before = ?, "
                      "last_error = ? WHERE seq = ?", retry_rows)
        self._move_to_dead(c, dead, now)
        self._trim_dead(c)
        self._commit()
        # only once committed: a failed settle keeps its leases until they expire
        leases = self.leases
        leases.drop(s.delivered)
        leases.drop(seq for seq, _, _ in s.retry)
        leases.drop(seq for seq, _ in s.dead)
        leases.drop(s.release)

    def next_due(self, queue: str, now: float) -> float | None:
        """The earliest time (wall clock) a waiting message becomes ready: a delayed or
        backing-off one falls due, or a lease runs out."""
        row = self._c.execute("SELECT min(not_before) FROM messages WHERE queue = ? AND "
                              "not_before > ?", (queue, now)).fetchone()
        due = float(row[0]) if row and row[0] is not None else None
        expiry = self.leases.next_expiry(queue)
        if expiry is not None:
            lease_due = now + max(0.0, expiry - time.monotonic())
            due = lease_due if due is None else min(due, lease_due)
        return due

    def _expire(self, max_age: float, now: float, chunk: int = 1000) -> int:
        """Drop messages older than ``max_age`` (reason max_age). Returns how many."""
        cutoff = now - max_age
        self._begin(durable=False)
        c = self._c
        rows = c.execute("SELECT seq, queue, size FROM messages WHERE received_at < ? "
                         "ORDER BY seq LIMIT ?", (cutoff, chunk)).fetchall()
        per_queue: Counter[str] = Counter()
        for seq, q, size in rows:
            c.execute("DELETE FROM messages WHERE seq = ?", (seq,))
            per_queue[q] += 1
            self.count -= 1
            self.bytes -= size
        for q, n in per_queue.items():
            self._bump(q, "dropped:max_age", n)
        self._commit()
        return len(rows)

    def vacuum_if_sparse(self) -> int:
        """Give free pages back to the file system when a quarter of the file is free."""
        self.reserve.ensure()
        c = self._c
        free = c.execute("PRAGMA freelist_count").fetchone()[0]
        total = c.execute("PRAGMA page_count").fetchone()[0]
        if total and free * 4 > total:
            c.execute("PRAGMA incremental_vacuum")
            return int(free)
        return 0

    # -- queue management and stats -----------------------------------------------------

    def depth(self, queue: str) -> int:
        return int(self._c.execute("SELECT count(*) FROM messages WHERE queue = ?",
                                   (queue,)).fetchone()[0])

    def purge(self, queue: str) -> int:
        self._begin(durable=False)
        rows = self._c.execute("DELETE FROM messages WHERE queue = ? RETURNING size",
                               (queue,)).fetchall()
        self.count -= len(rows)
        self.bytes -= sum(r[0] for r in rows)
        self._commit()
        self.leases.drop_queue(queue)
        return len(rows)

    def create_queue(self, queue: str) -> bool:
        """Queues exist implicitly; this records one explicitly. True when it was new."""
        self._begin(durable=False)
        n = self._c.execute("INSERT OR IGNORE INTO counters(queue, name, value) "
                            "VALUES (?, 'created', 1)", (queue,)).rowcount
        self._commit()
        return bool(n)

    def delete_queue(self, queue: str) -> bool:
        """Remove a queue's messages, dead letters and counters. True when any existed."""
        self._begin(durable=False)
        c = self._c
        rows = c.execute("DELETE FROM messages WHERE queue = ? RETURNING size", (queue,)).fetchall()
        dead = c.execute("DELETE FROM dead_letters WHERE queue = ? RETURNING size",
                         (queue,)).fetchall()
        counters = c.execute("DELETE FROM counters WHERE queue = ?", (queue,)).rowcount
        self._commit()
        self.leases.drop_queue(queue)
        self.count -= len(rows)
        self.bytes -= sum(r[0] for r in rows)
        self.dead_count -= len(dead)
        self.dead_bytes -= sum(r[0] for r in dead)
        return bool(rows or dead or counters)

    def queues(self) -> list[str]:
        names = {r[0] for r in self._c.execute("SELECT DISTINCT queue FROM messages")}
        names |= {r[0] for r in self._c.execute("SELECT DISTINCT queue FROM counters")}
        names |= {r[0] for r in self._c.execute("SELECT DISTINCT queue FROM dead_letters")}
        return sorted(names)

    def stats(self, queue: str, now: float) -> QueueStats:
        c = self._c
        depth = c.execute("SELECT count(*) FROM messages WHERE queue = ?", (queue,)).fetchone()[0]
        # leases live in the memory of the process holding them: unknown to a reader
        in_flight = None if self.readonly else self.leases.count(queue, time.monotonic())
        oldest = c.execute("SELECT min(received_at) FROM messages WHERE queue = ?",
                           (queue,)).fetchone()[0]
        dead = c.execute("SELECT count(*) FROM dead_letters WHERE queue = ?",
                         (queue,)).fetchone()[0]
        counters = dict(c.execute("SELECT name, value FROM counters WHERE queue = ?", (queue,)))
        dropped = {k.split(":", 1)[1]: int(v) for k, v in counters.items()
                   if k.startswith("dropped:")}
        for (q, name), n in self._unsaved.items():
            if q == queue and name.startswith("dropped:"):
                key = name.split(":", 1)[1]
                dropped[key] = dropped.get(key, 0) + n
        return QueueStats(queue, int(depth), in_flight,
                          None if oldest is None else max(0.0, now - oldest), int(dead),
                          int(counters.get("delivered_total", 0)), dropped)

    def counter(self, queue: str, name: str) -> int:
        row = self._c.execute("SELECT value FROM counters WHERE queue = ? AND name = ?",
                              (queue, name)).fetchone()
        return int(row[0]) if row else 0

    def ping(self) -> bool:
        return bool(self._c.execute("SELECT 1").fetchone()[0] == 1)

    def file_bytes(self) -> int:
        total = 0
        for suffix in ("", "-wal"):
            with contextlib.suppress(OSError):
                total += os.path.getsize(self.path + suffix)
        return total
