"""The store's SQLite layer (format 2): a log of segments with a cursor per destination.

Synchronous; the async ``Store`` runs all of it on one dedicated thread, so there is one
connection and one writer. The on-disk layout and the invariants are written down in
``docs/architecture.md`` (*The store*); the numbers below refer to them:

1. ``append`` returns only after the transaction holding the frame committed with the
   configured durability (``synchronous=FULL`` by default).
2. A cursor passes a record only when it was delivered, parked or dead-lettered (durably,
   before the cursor's new position is persisted), or dropped by a counted retention policy.
3. A crash makes a cursor resume from its persisted position: redelivery, never loss; the
   window is counted at the next start (``redelivery_window``).
4. Segments are freed only behind every *persisted* cursor, in the transaction that persists
   them (``sync_cursors``).
5. A frame is read only when its header names the position read from, and its CRC matches;
   a damaged frame is counted (``dropped:corrupt``) and skipped.
6. Per destination: seq order, merged with ready parked messages by (priority desc, seq); a
   topic with a parked chain takes nothing from the log (its records are parked behind).
7. Retention is store-wide (count and counted bytes between the lowest cursor and the head,
   plus parked) and every drop is counted per queue.
8. A full disk never wedges the store (reuse needs no new space; the reserve covers a
   checkpoint; ``drop_oldest`` frees the oldest segment).
9. Only the owner (the daemon) appends, moves cursors or frees segments; side users
   (``dlq replay|purge``) write ``parked``, ``dead_letters`` and ``counters`` only.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from gateway.config import StoreConfig
from gateway.message import new_message_id
from gateway.store import parked
from gateway.store.cursors import Cursor
from gateway.store.frames import (
    MAX_DELTA_MS,
    Frame,
    Record,
    extras_blob,
    mqtt_attributes,
    mqtt_flags,
    record_size,
)
from gateway.store.leases import Leases
from gateway.store.log import Chunk, Damaged, Log
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
from gateway.store.segments import SegmentIo

R = TypeVar("R")

SCHEMA_VERSION = 2
SQLITE_FULL = 13
#: after a full disk refused an append, how long appends are refused without trying
FULL_PROBE_SECONDS = 1.0
#: the most messages one lease hands out
MAX_LEASE = 10_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS queues(qid INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS segments(slot INTEGER PRIMARY KEY, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS cursors(
    name TEXT PRIMARY KEY,
    queue TEXT NOT NULL,
    seq INTEGER NOT NULL,
    pos INTEGER NOT NULL,
    updated_at REAL NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS counters(
    queue TEXT NOT NULL,
    name TEXT NOT NULL,
    value INTEGER NOT NULL,
    PRIMARY KEY(queue, name)
) WITHOUT ROWID;
""" + parked.SCHEMA

#: the dead-letter table's byte cap (its message cap is store.dead_letter_max_messages)
DEAD_LETTER_MAX_BYTES = 64 * 1024**2


@dataclass(frozen=True, slots=True)
class Limits:
    """The retention, retry and log settings the SQL layer enforces."""

    max_bytes: int
    max_messages: int
    when_full: str
    max_attempts: int
    dead_letter_max_messages: int
    dead_letter_max_bytes: int = DEAD_LETTER_MAX_BYTES
    max_page_count: int = 0
    durability: str = "full"
    segment_bytes: int = 256 * 1024
    compression: str = "zlib"
    cursor_sync_interval: float = 1.0
    cursor_sync_messages: int = 1000

    @classmethod
    def from_config(cls, cfg: StoreConfig) -> Limits:
        return cls(max_bytes=cfg.max_bytes, max_messages=cfg.max_messages,
                   when_full=cfg.when_full, max_attempts=cfg.max_attempts,
                   dead_letter_max_messages=cfg.dead_letter_max_messages,
                   max_page_count=cfg.max_page_count, durability=cfg.durability,
                   segment_bytes=cfg.segment_bytes, compression=cfg.compression,
                   cursor_sync_interval=cfg.cursor_sync_interval,
                   cursor_sync_messages=cfg.cursor_sync_messages)


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, sqlite3.Error) and getattr(exc, "sqlite_errorcode", None) == SQLITE_FULL


def _full_attributes(m: NewMessage) -> dict[str, str]:
    """A new message's attributes with the MQTT ones its flags stand for."""
    if m.mqtt_flags < 0:
        return dict(m.attributes)
    return {**mqtt_attributes(m.topic, m.mqtt_flags), **m.attributes}


class NewerStore(sqlite3.DatabaseError):
    """A store written by a newer gateway: refused, left untouched."""


class StoreDb:
    """One connection; not thread-safe; every method runs on the store thread.

    ``readonly``: a reader (``status``, ``dlq list``). ``owner=False``: a side user that may
    write dead letters and replays (``dlq replay|purge``) while the daemon owns the log."""

    def __init__(self, path: str, limits: Limits, readonly: bool = False,
                 owner: bool = True) -> None:
        self.path = path
        self.limits = limits
        self.readonly = readonly
        self.owner = owner and not readonly
        self.conn: sqlite3.Connection | None = None
        self._sync_mode = ""
        self.dead_count = 0
        self.dead_bytes = 0
        #: drops that could not be written (disk full); flushed with the next transaction
        self._unsaved: Counter[tuple[str, str]] = Counter()
        #: monotonic time until which appends are refused without writing (disk full)
        self._refuse_appends_until = 0.0
        self.page_size = 1024
        self.leases = Leases()
        #: soft cap on what one transaction writes (payload bytes of an append)
        self.max_txn_bytes = 64 * 1024**2
        self.reserve = DiskReserve(path + ".reserve", RESERVE_BYTES if self.owner else 0)
        self.log: Log | None = None
        self.cursors: dict[str, Cursor] = {}
        self.qids: dict[str, int] = {}
        self.id_prefix = ""
        self.clean_start = True
        #: (messages, counted bytes) held, as of the last operation (read by other threads)
        self.totals = (0, 0)

    # -- lifecycle ---------------------------------------------------------------------

    def open(self) -> None:
        if self.readonly:
            uri = f"file:{self.path}?mode=ro"
            self.conn = sqlite3.connect(uri, uri=True, isolation_level=None,
                                        check_same_thread=False)
            self.conn.execute("PRAGMA query_only=1")
            if self._check_version(self.conn) == 1 or self._has_table("messages"):
                raise sqlite3.DatabaseError(self._needs_migration())
            if self._has_table("meta"):
                self._load()
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.conn = conn
        conn.execute("PRAGMA page_size=1024")  # only takes effect on a new file
        conn.execute("PRAGMA auto_vacuum=INCREMENTAL")  # only takes effect on a new file
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise sqlite3.OperationalError(f"cannot switch {self.path} to WAL (got {mode})")
        conn.execute("PRAGMA busy_timeout=5000")
        conn.execute("PRAGMA temp_store=MEMORY")
        if self.limits.max_page_count:
            conn.execute(f"PRAGMA max_page_count={int(self.limits.max_page_count)}")
        self._size_wal()
        version = self._check_version(conn)
        if not self.owner:
            if version == 1 or self._has_table("messages"):
                raise sqlite3.DatabaseError(self._needs_migration())
            self._load()
            return
        if version == 1 or self._has_table("messages"):
            from gateway.store.migrate import migrate_v1

            self._create_schema()
            self._load()
            migrate_v1(self)
        else:
            self._create_schema()
            self._load()
        self._start()
        self.reserve.ensure()

    def _size_wal(self) -> None:
        """A checkpoint copies the WAL's new pages into the database file, so on a full disk
        it needs up to the WAL's committed size in free space: the autocheckpoint threshold
        plus one transaction, both kept small enough for the reserve to cover them."""
        c = self._c
        self.page_size = int(c.execute("PRAGMA page_size").fetchone()[0])
        reserve = self.reserve.planned_size()
        if reserve > 0:
            wal_pages = max(64, min(1000, reserve // 2 // self.page_size))
            c.execute(f"PRAGMA wal_autocheckpoint={wal_pages}")
            self.max_txn_bytes = max(64 * 1024, reserve // 4)

    def _check_version(self, conn: sqlite3.Connection) -> int:
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise NewerStore(f"{self.path} is a store of format {version}, written by a newer "
                             f"gateway; this gateway reads formats 1 and {SCHEMA_VERSION}. "
                             "Run the newer gateway, or move the file aside")
        return version

    def _needs_migration(self) -> str:
        return (f"{self.path} is a store of format 1; the daemon migrates it to format "
                f"{SCHEMA_VERSION} when it starts (openhqm-gateway run)")

    def _has_table(self, name: str) -> bool:
        return self._c.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                               (name,)).fetchone() is not None

    def _create_schema(self) -> None:
        c = self._c
        c.executescript(_SCHEMA)
        if c.execute("SELECT 1 FROM meta WHERE key = 'id_prefix'").fetchone() is None:
            c.execute("INSERT INTO meta(key, value) VALUES ('id_prefix', ?)", (os.urandom(5).hex(),))
            c.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('clean_stop', 1)")
        if not self._has_table("messages"):
            c.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def _segment_bytes(self) -> int:
        """The configured ring segment size, smaller for tiny stores (a sixteenth of their
        byte or page budget, at least 4 KiB)."""
        size = self.limits.segment_bytes
        size = min(size, max(4096, self.limits.max_bytes // 16))
        if self.limits.max_page_count:
            size = min(size, max(4096, self.limits.max_page_count * self.page_size // 16))
        return size

    def _load(self) -> None:
        """Read meta, queues, cursors, parked and dead-letter totals and the log's segments."""
        c = self._c
        meta = dict(c.execute("SELECT key, value FROM meta").fetchall())
        self.id_prefix = str(meta.get("id_prefix", "0000000000"))
        self.clean_start = str(meta.get("clean_stop", "1")) == "1"
        self.qids = {name: qid for qid, name in c.execute("SELECT qid, name FROM queues")}
        self.cursors = {}
        for name, queue, seq, pos in c.execute("SELECT name, queue, seq, pos FROM cursors"):
            self.cursors[name] = Cursor(name, queue, self.qids.get(queue, -1), seq, pos,
                                        prefix=self.id_prefix)
        self._load_parked()
        self._load_dead()
        self.log = Log(SegmentIo(c), self._segment_bytes(), self.limits.compression == "zlib")
        tail = min((cur.saved_pos for cur in self.cursors.values()), default=None)
        start = max(((cur.saved_pos, cur.saved_seq) for cur in self.cursors.values()),
                    default=(0, 0))
        doomed = self.log.load(tail if tail is not None else 1 << 62, (*start, 0))
        if doomed and self.owner:
            self._begin(durable=False)
            self.log.io.delete(doomed)
            self._commit()

    def _load_parked(self) -> None:
        totals = parked.totals(self._c)
        for cur in self.cursors.values():
            count, nbytes, chains = totals.get(cur.name, (0, 0, {}))
            cur.parked_count, cur.parked_bytes, cur.chains = count, nbytes, chains

    def _load_dead(self) -> None:
        self.dead_count, self.dead_bytes = self._c.execute(
            "SELECT count(*), coalesce(sum(size), 0) FROM dead_letters").fetchone()

    def _start(self) -> None:
        """The owner takes over: position every cursor, count the redelivery window after an
        unclean stop, mark the store open."""
        log = self._log
        window: Counter[str] = Counter()
        for cur in self.cursors.values():
            cur.position(log, self._on_loss)
            if not self.clean_start:
                window[cur.queue] += min(max(0, log.head_seq - cur.saved_seq),
                                         self.limits.cursor_sync_messages)
        self._begin(durable=False)
        for queue, n in window.items():
            self._bump(queue, "redelivery_window", n)
        self._c.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('clean_stop', 0)")
        self._commit()
        self._retotal()

    def close(self) -> None:
        if self.conn is not None:
            if self.owner:
                with contextlib.suppress(sqlite3.Error):
                    self.sync_cursors(force=True)
                    self._begin(durable=True)
                    self._c.execute("INSERT OR REPLACE INTO meta(key, value) "
                                    "VALUES ('clean_stop', 1)")
                    self._commit()
            if not self.readonly:
                with contextlib.suppress(sqlite3.Error):
                    self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self.conn.close()
            self.conn = None

    def refresh_totals(self) -> None:
        """Re-read what side users (``dlq replay|purge``) may have changed."""
        self._load_parked()
        self._load_dead()

    def release_all_leases(self) -> int:
        """At daemon start: leases live in memory, a new process holds none."""
        n = len(self.leases)
        self.leases.clear()
        return n

    @property
    def _c(self) -> sqlite3.Connection:
        if self.conn is None:
            raise sqlite3.ProgrammingError("store is not open")
        return self.conn

    @property
    def _log(self) -> Log:
        if self.log is None:
            raise sqlite3.ProgrammingError("store is not open")
        return self.log

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

    def _on_loss(self, cur: Cursor, n: int) -> None:
        """Records a reader found damaged or missing: counted, never silently skipped."""
        if n > 0:
            self._unsaved[(cur.queue, "dropped:corrupt")] += n

    # -- totals ------------------------------------------------------------------------

    def _live(self) -> tuple[int, int]:
        """(messages, counted bytes) the store holds: the log between the lowest cursor and
        the head, and every parked message (invariant 7)."""
        log = self._log
        count = nbytes = 0
        low: tuple[int, int, int] | None = None
        for cur in self.cursors.values():
            count += cur.parked_count
            nbytes += cur.parked_bytes
            mark = cur.watermark()
            if low is None or mark[0] < low[0]:
                low = mark
        if low is not None:
            count += log.head_seq - low[0]
            nbytes += log.head_cum - low[2]
        return count, nbytes

    @property
    def count(self) -> int:
        return self._live()[0] if self.log is not None else 0

    @property
    def bytes(self) -> int:
        return self._live()[1] if self.log is not None else 0

    # -- append ------------------------------------------------------------------------

    def append(self, groups: Sequence[tuple[str, Sequence[NewMessage]]]) -> list[list[AppendOutcome]]:
        """Store every group in one durable transaction; per-message outcomes.

        After SQLITE_FULL, appends are refused without touching the file for
        ``FULL_PROBE_SECONDS`` at a time: what the disk reserve gave back is for the cursor
        writes and the checkpoint that drain the store, not for newcomers that cannot fit."""
        try:
            return self._append(groups)
        finally:
            self._retotal()

    def _append(self, groups: Sequence[tuple[str, Sequence[NewMessage]]]) -> list[list[AppendOutcome]]:
        if time.monotonic() < self._refuse_appends_until:
            return self._refuse_all(groups)
        try:
            return self._append_once(groups)
        except sqlite3.Error as exc:
            if not is_disk_full(exc):
                raise
        # The disk (or max_page_count) is full. drop_oldest: free the oldest segment, retry.
        self.reserve.release()
        self.checkpoint()
        if self.limits.when_full == "drop_oldest":
            try:
                while self._free_oldest_segment("disk_full"):
                    try:
                        return self._append_once(groups)
                    except sqlite3.Error as exc:
                        if not is_disk_full(exc):
                            raise
            except sqlite3.Error as exc:
                self._rollback()
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
        log = self._log
        snap = log.snapshot()
        cursors_before = set(self.cursors)
        self._begin(durable=True)
        try:
            out = [self._append_group(queue, msgs) for queue, msgs in groups]
            self._trim_dead()
            self._commit()
        except BaseException:
            self._rollback()
            log.restore(snap)
            for name in set(self.cursors) - cursors_before:
                del self.cursors[name]
            self._load_parked()
            self._load_dead()
            raise
        return out

    def _append_group(self, queue: str, msgs: Sequence[NewMessage]) -> list[AppendOutcome]:
        cur = self._cursor_for(queue)
        log = self._log
        outcomes: list[AppendOutcome] = []
        records: list[Record] = []
        sizes: list[int] = []
        count, nbytes = self._live()
        max_count, max_bytes = self.limits.max_messages, self.limits.max_bytes
        now = time.time()
        lo = hi = 0
        for m in msgs:
            attrs: dict[str, str] | None = m.attributes
            flags = m.mqtt_flags
            if flags < 0:
                flags, attrs = mqtt_flags(attrs) if attrs else (0, None)
            extras = extras_blob(m.id, attrs) if m.id or attrs else b""
            topic, payload = m.topic, m.payload
            size = (len(payload) + len(topic) if not extras
                    else record_size(topic, len(payload), extras))
            if m.dead_letter_reason is not None:
                self._dead_on_arrival(queue, m, size)
                outcomes.append(AppendOutcome(AppendStatus.DEAD_LETTERED, m.dead_letter_reason))
                continue
            if count + 1 > max_count or nbytes + size > max_bytes:
                refused = self._make_room(queue, size, count, nbytes, pending=records,
                                          pending_sizes=sizes)
                if refused is not None:
                    outcomes.append(refused)
                    continue
                if not records:  # _make_room wrote them and dropped older messages
                    count, nbytes = self._live()
            count += 1
            nbytes += size
            outcomes.append(STORED)
            if m.priority or m.delay_seconds > 0:
                self._park_new(cur, m, log.head_seq + len(records), now)
                continue
            ms = int(m.received_at * 1000)
            if not records:
                lo = hi = ms
            elif ms < lo or ms > hi:
                lo, hi = min(lo, ms), max(hi, ms)
                if hi - lo > MAX_DELTA_MS:  # a frame spans at most 49 days
                    self._write_frame(cur, records, sizes)
                    lo = hi = ms
            records.append(Record(topic, payload, ms, flags, extras))
            sizes.append(size)
        self._write_frame(cur, records, sizes)
        return outcomes

    def _write_frame(self, cur: Cursor, records: list[Record], sizes: list[int]) -> None:
        if not records:
            return
        log = self._log
        if cur.frame is None and cur.read_seq == log.head_seq and not cur.outstanding:
            cur.read_pos, cur.read_cum = log.head_pos, log.head_cum  # caught up: follow the head
        log.append(records, cur.qid, sum(sizes))
        records.clear()
        sizes.clear()

    def _cursor_for(self, queue: str) -> Cursor:
        """The queue's cursor, created at the head (in the caller's transaction) when new."""
        cur = self.cursors.get(queue)
        if cur is not None:
            return cur
        c, log = self._c, self._log
        qid = self.qids.get(queue)
        if qid is None:
            row = c.execute("INSERT INTO queues(name) VALUES (?) RETURNING qid", (queue,)).fetchone()
            qid = self.qids[queue] = int(row[0])
        c.execute("INSERT OR REPLACE INTO cursors(name, queue, seq, pos, updated_at) "
                  "VALUES (?, ?, ?, ?, ?)", (queue, queue, log.head_seq, log.head_pos, time.time()))
        cur = self.cursors[queue] = Cursor(queue, queue, qid, log.head_seq, log.head_pos,
                                           prefix=self.id_prefix)
        cur.read_cum = log.head_cum
        return cur

    def _dead_on_arrival(self, queue: str, m: NewMessage, size: int) -> None:
        msg = StoredMessage.detached(0, queue, m.topic, m.payload, m.received_at, order=0,
                                     priority=m.priority, attempts=0,
                                     msg_id=m.id or new_message_id(m.received_at),
                                     attributes=_full_attributes(m))
        parked.insert_dead(self._c, queue, msg, 0, m.dead_letter_reason or "", now=time.time())
        self.dead_count += 1
        self.dead_bytes += size
        self._bump(queue, "dead_lettered_total")

    def _park_new(self, cur: Cursor, m: NewMessage, order: int, now: float) -> None:
        """A delayed or prioritised message waits in ``parked``, outside any topic chain."""
        msg = StoredMessage.detached(0, cur.queue, m.topic, m.payload, m.received_at,
                                     order=order, priority=m.priority, attempts=0,
                                     msg_id=m.id or new_message_id(m.received_at),
                                     attributes=_full_attributes(m))
        not_before = m.received_at + m.delay_seconds if m.delay_seconds > 0 else 0.0
        n, size = parked.park(self._c, cur.name, [parked.ParkedRow(msg, 0, not_before, 0)])
        cur.parked_count += n
        cur.parked_bytes += size

    def _make_room(self, queue: str, size: int, count: int, nbytes: int, *,
                   pending: list[Record], pending_sizes: list[int]) -> AppendOutcome | None:
        """Apply retention for one newcomer of ``size`` bytes; None when it may be stored.
        ``pending`` holds this group's records not written yet: they go before older
        messages can be dropped, so the oldest really go first."""
        lim = self.limits
        if size > lim.max_bytes:
            self._bump(queue, "dropped:max_bytes")
            return AppendOutcome(AppendStatus.DROPPED, "max_bytes")
        if count + 1 <= lim.max_messages and nbytes + size <= lim.max_bytes:
            return None
        reason = "max_messages" if count + 1 > lim.max_messages else "max_bytes"
        if lim.when_full == "reject_new":
            self._bump(queue, f"dropped:{reason}")
            return AppendOutcome(AppendStatus.DROPPED, reason)
        cur = self.cursors[queue]
        self._write_frame(cur, pending, pending_sizes)
        while True:
            count, nbytes = self._live()
            over = count + 1 - lim.max_messages
            if over <= 0 and nbytes + size <= lim.max_bytes:
                return None
            # the oldest first: as many as the count needs (at least 16 at a time, so a full
            # store does not pay a drop per newcomer), a whole frame when bytes are short
            if not self._drop_oldest_frame(reason, at_most=max(over, 16) if nbytes + size
                                           <= lim.max_bytes else None):
                return None  # nothing left to drop but parked messages: store it anyway

    # -- retention ---------------------------------------------------------------------

    def _lowest(self) -> Cursor | None:
        low: Cursor | None = None
        mark = 0
        for cur in self.cursors.values():
            seq = cur.watermark()[0]
            if low is None or seq < mark:
                low, mark = cur, seq
        return low

    def _frame_holding(self, cur: Cursor) -> tuple[Frame | Damaged | None, int]:
        """The frame holding ``cur``'s watermark."""
        seq, pos, _ = cur.watermark()
        chunk = Chunk()
        log = self._log
        while True:
            found, _ = log.frame_at(pos, chunk)
            if found is None or found.header.next_seq > seq:
                return found, seq
            pos = found.header.end

    def _drop_oldest_frame(self, reason: str, before_ms: int | None = None,
                           at_most: int | None = None) -> int:
        """Move every cursor past the oldest frame still held (only ``at_most`` of its
        records, or with ``before_ms`` only those received before that time), counting each
        record a cursor had not settled as ``dropped:<reason>``. Returns how many records
        were passed (0: none)."""
        low = self._lowest()
        if low is None:
            return 0
        found, seq = self._frame_holding(low)
        if found is None:
            return 0
        header = found.header
        target = header.next_seq
        if before_ms is not None:
            if isinstance(found, Damaged):
                return 0
            i = seq - header.first_seq
            while i < header.count and found.received_ms(i) < before_ms:
                i += 1
            target = header.first_seq + i
            if target <= seq:
                return 0
        if at_most is not None:
            target = min(target, seq + at_most)
        for cur in self.cursors.values():
            self._skip(cur, header.qid, header.first_seq, target, reason)
        return target - seq

    def _skip(self, cur: Cursor, qid: int, first: int, target: int, reason: str) -> None:
        if cur.watermark()[0] >= target:
            return
        lost = max(0, target - max(cur.read_seq, first)) if qid == cur.qid else 0
        gone = cur.skip_to(target, self._log, self._on_loss)
        self._unsaved[(cur.queue, f"dropped:{reason}")] += lost + len(gone)

    def _free_oldest_segment(self, reason: str) -> bool:
        """Disk full: move every cursor past the oldest segment, persist them and free it.
        False when only the head segment is left."""
        log = self._log
        end = log.oldest_end()
        if end is None:
            return False
        while min((c.watermark()[1] for c in self.cursors.values()), default=end) < end:
            if not self._drop_oldest_frame(reason):
                break
        self.sync_cursors(force=True)
        return True

    def expire(self, max_age: float, now: float, chunk: int = 1000) -> int:
        """Drop messages received more than ``max_age`` ago (reason max_age): move cursors
        past them in the log and delete old parked rows. Returns how many."""
        cutoff = now - max_age
        total = 0
        while total < chunk:
            n = self._drop_oldest_frame("max_age", before_ms=int(cutoff * 1000))
            if not n:
                break
            total += n
        self._begin(durable=False)
        try:
            for name, topic, size, chain in parked.expire(self._c, cutoff):
                self._parked_gone(name, topic, size, chain)
                self._unsaved[(self.cursors[name].queue if name in self.cursors else name,
                               "dropped:max_age")] += 1
                total += 1
            self._commit()
        except BaseException:
            self._rollback()
            raise
        if total:
            self.sync_cursors(force=True)
        self._retotal()
        return total

    def _parked_gone(self, name: str, topic: str, size: int, chain: int) -> None:
        cur = self.cursors.get(name)
        if cur is None:
            return
        cur.parked_count -= 1
        cur.parked_bytes -= size
        if chain:
            left = cur.chains.get(topic, 0) - 1
            if left > 0:
                cur.chains[topic] = left
            else:
                cur.chains.pop(topic, None)

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

    # -- cursors -----------------------------------------------------------------------

    def sync_due(self) -> bool:
        """Some cursor has unsaved progress."""
        return any(c.dirty() for c in self.cursors.values()) or bool(self._unsaved)

    def sync_cursors(self, force: bool = False) -> bool:
        """Persist cursors that moved (with their delivered counters) and free the segments
        every persisted cursor has passed, in one transaction (invariant 4). Without
        ``force``, only when a cursor's sync is due (interval or message count)."""
        if not self.owner:
            return False
        lim = self.limits
        mono = time.monotonic()
        due = [c for c in self.cursors.values() if c.dirty() and (
            force or c.unsaved >= lim.cursor_sync_messages
            or mono - c.last_sync >= lim.cursor_sync_interval)]
        if not due and not (force and self._unsaved):
            return False
        snap = self._log.snapshot()
        self._begin(durable=False)
        try:
            now = time.time()
            marks = {}
            for cur in due:
                seq, pos, _ = marks[cur.name] = cur.watermark()
                self._c.execute("UPDATE cursors SET seq = ?, pos = ?, updated_at = ? "
                                "WHERE name = ?", (seq, pos, now, cur.name))
                self._bump(cur.queue, "delivered_total", cur.delivered_unsaved)
            tail = min((marks[c.name][1] if c.name in marks else c.saved_pos)
                       for c in self.cursors.values())
            doomed = self._log.free_upto(tail)
            if doomed:
                self._log.io.delete(doomed)
            self._commit()
        except BaseException:
            self._rollback()
            self._log.restore(snap)
            raise
        for cur in due:
            cur.saved_seq, cur.saved_pos, _ = marks[cur.name]
            cur.unsaved = cur.delivered_unsaved = 0
            cur.last_sync = mono
        return True

    def sync_and_check(self) -> bool:
        """The timer's sync: persist what is due; True when some cursor still has unsaved
        progress (the caller arms the timer again)."""
        self.sync_cursors()
        self._retotal()
        return self.sync_due()

    def _retotal(self) -> None:
        if self.log is not None:
            self.totals = self._live()

    def next_sync(self) -> float | None:
        """Seconds until the earliest pending cursor write is due; None when none is."""
        mono = time.monotonic()
        waits = [max(0.0, c.last_sync + self.limits.cursor_sync_interval - mono)
                 for c in self.cursors.values() if c.dirty()]
        return min(waits) if waits else None

    # -- delivery ----------------------------------------------------------------------

    def lease(self, queue: str, limit: int, lease_seconds: float, now: float,
              max_bytes: int = 0) -> list[StoredMessage]:
        """Up to ``limit`` messages and, when ``max_bytes`` > 0, up to that many payload
        bytes (the first message always, however large)."""
        try:
            return self._with_room(self._lease, queue, min(limit, MAX_LEASE), lease_seconds, now,
                                   max_bytes)
        finally:
            self._retotal()

    def settle(self, s: Settlement, now: float) -> None:
        try:
            self._with_room(self._settle, s, now)
        finally:
            self._retotal()

    def _with_room(self, fn: Callable[..., R], *args: Any) -> R:
        """Run a write; on SQLITE_FULL, give back the reserve, checkpoint, try once more."""
        try:
            return fn(*args)
        except sqlite3.Error as exc:
            self._rollback()
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
        cur = self.cursors.get(queue)
        if cur is None:
            return []
        mono = time.monotonic()
        expired_log = cur.expired(mono)
        expired_parked = self.leases.expire(cur.name, mono)
        if expired_log or expired_parked:
            self._expired(cur, expired_log, expired_parked, now)
        main, behind = cur.pull(self._log, limit, max_bytes, until=mono + lease_seconds,
                                on_loss=self._on_loss)
        if behind:  # parked first, so the parked candidates below include them in seq order
            self._park_log(cur, [parked.ParkedRow(m) for m in behind])
        if not cur.parked_count:
            return main
        side = parked.ready(self._c, cur.name, queue, now, limit,
                            held=[-h for h in self.leases.held(cur.name)],
                            blocked=self.leases.blocked_topics(cur.name))
        if not side:
            return main
        batch = self._merge(cur, side, main, limit, max_bytes)
        self.leases.hold(cur.name, ((m.seq, m.topic, m.attempts) for m in batch if m.seq < 0),
                         mono + lease_seconds)
        return batch

    @staticmethod
    def _merge(cur: Cursor, side: list[StoredMessage], main: list[StoredMessage], limit: int,
               max_bytes: int) -> list[StoredMessage]:
        """Parked and log candidates in (priority desc, seq) order, within the limits; log
        records not taken go back to the front of the cursor."""
        merged = sorted(side + main, key=lambda m: (-m.priority, m.order))
        out: list[StoredMessage] = []
        size = 0
        for m in merged:
            size += len(m.payload)
            if len(out) >= limit or (max_bytes and out and size > max_bytes):
                break
            out.append(m)
        taken = {id(m) for m in out}
        cur.give_back([m for m in main if id(m) not in taken])
        return out

    def _expired(self, cur: Cursor, log_msgs: list[StoredMessage], pids: list[int],
                 now: float) -> None:
        """Leases that ran out count as an attempt: log records are parked for a retry, parked
        ones get one more attempt."""
        self._begin(durable=False)
        try:
            if log_msgs:
                self._park_rows(cur, [parked.ParkedRow(m, 1, now, 1, "lease expired")
                                      for m in log_msgs])
            if pids:
                parked.retry(self._c, [(-h, now, "lease expired") for h in pids])
            self._commit()
        except BaseException:
            self._rollback()
            self._load_parked()
            raise
        cur.settle_many([m.seq for m in log_msgs])

    def _park_log(self, cur: Cursor, rows: list[parked.ParkedRow]) -> None:
        """Park log records behind their topic's chain, in their own transaction."""
        self._begin(durable=False)
        try:
            self._park_rows(cur, rows)
            self._commit()
        except BaseException:
            self._rollback()
            self._load_parked()
            cur.give_back([r.message for r in rows])
            raise
        cur.settle_many([r.message.seq for r in rows])

    def _park_rows(self, cur: Cursor, rows: list[parked.ParkedRow]) -> None:
        n, size = parked.park(self._c, cur.name, rows)
        cur.parked_count += n
        cur.parked_bytes += size
        for r in rows:
            if r.chain:
                cur.chains[r.message.topic] = cur.chains.get(r.message.topic, 0) + 1

    def _owner_of(self, handle: int) -> Cursor | None:
        """The cursor a handle was handed out by: a parked message's lease names it, a log
        record is in its cursor's ``outstanding``."""
        if handle < 0:
            name = self.leases.owner(handle)
            return None if name is None else self.cursors.get(name)
        for cur in self.cursors.values():
            if handle in cur.outstanding:
                return cur
        return None

    def _settle(self, s: Settlement, now: float) -> None:
        pids_done = [-h for h in s.delivered if h < 0]
        if pids_done or s.retry or s.dead:
            self._settle_writes(s, pids_done, now)
        delivered = s.delivered if not pids_done else [h for h in s.delivered if h >= 0]
        if delivered:
            for cur in self.cursors.values():
                before = len(delivered)
                delivered = cur.settle_many(delivered)
                cur.delivered_unsaved += before - len(delivered)
                if not delivered:
                    break
            self._refuse_appends_until = 0.0  # the drain made room
        for h in s.release:
            owner = self._owner_of(h) if h >= 0 else None
            if owner is not None:
                owner.give_back([owner.outstanding[h]])
        leases = self.leases
        if len(leases):
            leases.drop(h for h in s.delivered if h < 0)
            leases.drop(h for h, _, _ in s.retry if h < 0)
            leases.drop(h for h, _ in s.dead if h < 0)
            leases.drop(h for h in s.release if h < 0)
        self.sync_cursors()

    def _settle_writes(self, s: Settlement, pids_done: list[int], now: float) -> None:
        """Delivered parked rows, retries and dead letters: one NORMAL transaction."""
        c = self._c
        self._begin(durable=False)
        settled_log: list[tuple[Cursor, int]] = []
        try:
            for name, topic, size, chain in parked.delete(c, pids_done):
                self._parked_gone(name, topic, size, chain)
                if name in self.cursors:
                    self.cursors[name].delivered_unsaved += 1
            dead: list[tuple[int, str]] = list(s.dead)
            retry_pids: list[tuple[int, float, str]] = []
            for h, delay, error in s.retry:
                attempts = self._attempts(h)
                if attempts is None:
                    continue
                if attempts + 1 >= self.limits.max_attempts:
                    dead.append((h, f"gave up after {attempts + 1} attempts: {error}"))
                elif h < 0:
                    retry_pids.append((-h, now + delay, error))
                elif (cur := self._owner_of(h)) is not None and h in cur.outstanding:
                    self._park_rows(cur, [parked.ParkedRow(cur.outstanding[h], 1, now + delay, 1,
                                                           error[:1000])])
                    settled_log.append((cur, h))
            parked.retry(c, retry_pids)
            settled_log += self._move_to_dead(dead, now)
            self._trim_dead()
            self._commit()
        except BaseException:
            self._rollback()
            self._load_parked()
            self._load_dead()
            raise
        for cur, h in settled_log:
            cur.settle(h)

    def _attempts(self, handle: int) -> int | None:
        if handle < 0:
            return parked.attempts_of(self._c, -handle)
        cur = self._owner_of(handle)
        return 0 if cur is not None and handle in cur.outstanding else None

    def _move_to_dead(self, items: list[tuple[int, str]], now: float) -> list[tuple[Cursor, int]]:
        c = self._c
        settled: list[tuple[Cursor, int]] = []
        for h, reason in items:
            if h < 0:
                row = c.execute("DELETE FROM parked WHERE pid = ? RETURNING cursor, seq, id, topic,"
                                " payload, attributes, priority, received_at, attempts, size,"
                                " chain", (-h,)).fetchone()
                if row is None:
                    continue
                name = row[0]
                cur = self.cursors.get(name)
                queue = cur.queue if cur is not None else name
                msg = StoredMessage.detached(h, queue, row[3], row[4], row[7], order=row[1],
                                             priority=row[6], attempts=row[8], msg_id=row[2],
                                             attributes=parked._attrs(row[5]))
                self._parked_gone(name, row[3], row[9], row[10])
                attempts = row[8]
            else:
                cur = self._owner_of(h)
                if cur is None or h not in cur.outstanding:
                    continue
                msg, queue, attempts = cur.outstanding[h], cur.queue, 0
                settled.append((cur, h))
            size = parked.insert_dead(c, queue, msg, attempts, reason, now=now)
            self.dead_count += 1
            self.dead_bytes += size
            self._bump(queue, "dead_lettered_total")
        return settled

    def _trim_dead(self) -> None:
        lim = self.limits
        while self.dead_count > 0 and (self.dead_count > lim.dead_letter_max_messages
                                       or self.dead_bytes > lim.dead_letter_max_bytes):
            gone = parked.trim_dead(self._c)
            if gone is None:
                break
            self.dead_count -= 1
            self.dead_bytes -= gone[1]
            self._bump(gone[0], "dropped:dead_letter_full")

    def may_fall_due(self, queue: str) -> bool:
        """Whether anything of ``queue`` waits for a time (parked, or leased): read from
        another thread without a lock, so only a hint that spares a round trip."""
        cur = self.cursors.get(queue)
        return cur is None or bool(cur.parked_count or cur.deadlines or len(self.leases))

    def next_due(self, queue: str, now: float) -> float | None:
        """The earliest time (wall clock) a waiting message becomes ready: a parked one falls
        due, or a lease runs out."""
        cur = self.cursors.get(queue)
        if cur is None:
            return None
        due = parked.next_due(self._c, cur.name, now) if cur.parked_count else None
        expiries = [e for e in (self.leases.next_expiry(cur.name), cur.next_expiry())
                    if e is not None]
        if expiries:
            expiry = min(expiries)
            lease_due = now + max(0.0, expiry - time.monotonic())
            due = lease_due if due is None else min(due, lease_due)
        return due

    # -- dead letters ------------------------------------------------------------------

    def list_dead(self, queue: str | None, limit: int) -> list[DeadLetter]:
        return parked.list_dead(self._c, queue, limit)

    def replay_dead(self, queue: str | None, ids: Sequence[str] | None) -> int:
        """Move dead letters into ``parked`` (ready, attempts reset); returns how many."""
        seq = self._log.head_seq if self.log is not None else 0
        self._begin(durable=True)
        try:
            rows = parked.replay_dead(self._c, queue, ids, seq)
            self._commit()
        except BaseException:
            self._rollback()
            raise
        self.dead_count -= len(rows)
        self.dead_bytes -= sum(size for _, size in rows)
        if self.owner:
            self._load_parked()
            self._retotal()
        return len(rows)

    def purge_dead(self, queue: str | None, ids: Sequence[str] | None) -> int:
        self._begin(durable=False)
        try:
            sizes = parked.purge_dead(self._c, queue, ids)
            self._commit()
        except BaseException:
            self._rollback()
            raise
        self.dead_count -= len(sizes)
        self.dead_bytes -= sum(sizes)
        return len(sizes)

    # -- queue management and stats -----------------------------------------------------

    def _depth(self, cur: Cursor) -> int:
        """Messages of ``cur``'s queue from its watermark to the head, plus its parked ones."""
        log = self._log
        seq = cur.watermark()[0] if self.owner else cur.saved_seq
        if len(self.qids) <= 1:
            return max(0, log.head_seq - seq) + cur.parked_count
        n, pos, chunk = 0, cur.watermark()[1] if self.owner else cur.saved_pos, Chunk()
        while True:
            found, _ = log.frame_at(pos, chunk)
            if found is None:
                break
            h = found.header
            if h.qid == cur.qid and h.next_seq > seq:
                n += h.next_seq - max(seq, h.first_seq)
            pos = h.end
        return n + cur.parked_count

    def depth(self, queue: str) -> int:
        cur = self.cursors.get(queue)
        return 0 if cur is None or self.log is None else self._depth(cur)

    def purge(self, queue: str) -> int:
        cur = self.cursors.get(queue)
        if cur is None:
            return 0
        n = self._depth(cur)
        log = self._log
        gone = cur.skip_to(log.head_seq, log, self._on_loss)
        self.leases.drop_queue(cur.name)
        del gone
        self._begin(durable=False)
        try:
            self._c.execute("DELETE FROM parked WHERE cursor = ?", (cur.name,))
            self._commit()
        except BaseException:
            self._rollback()
            raise
        cur.parked_count = cur.parked_bytes = 0
        cur.chains.clear()
        self.sync_cursors(force=True)
        self._retotal()
        return n

    def create_queue(self, queue: str) -> bool:
        """Queues exist implicitly; this records one (and its cursor) explicitly. True when it
        was new."""
        if queue in self.cursors:
            return False
        self._begin(durable=False)
        try:
            self._cursor_for(queue)
            self._bump(queue, "created")
            self._commit()
        except BaseException:
            self._rollback()
            self.cursors.pop(queue, None)
            raise
        return True

    def delete_queue(self, queue: str) -> bool:
        """Remove a queue's cursor, parked messages, dead letters and counters; its records in
        the log are freed with their segments. True when any existed."""
        self._begin(durable=False)
        c = self._c
        try:
            existed = c.execute("DELETE FROM cursors WHERE name = ?", (queue,)).rowcount
            existed += c.execute("DELETE FROM parked WHERE cursor = ?", (queue,)).rowcount
            dead = c.execute("DELETE FROM dead_letters WHERE queue = ? RETURNING size",
                             (queue,)).fetchall()
            existed += len(dead) + c.execute("DELETE FROM counters WHERE queue = ?",
                                             (queue,)).rowcount
            self._commit()
        except BaseException:
            self._rollback()
            raise
        self.leases.drop_queue(queue)
        self.cursors.pop(queue, None)
        self.dead_count -= len(dead)
        self.dead_bytes -= sum(r[0] for r in dead)
        return bool(existed)

    def queues(self) -> list[str]:
        names = set(self.cursors)
        names |= {r[0] for r in self._c.execute("SELECT DISTINCT queue FROM counters")}
        names |= {r[0] for r in self._c.execute("SELECT DISTINCT queue FROM dead_letters")}
        return sorted(names)

    def _oldest(self, cur: Cursor, now: float) -> float | None:
        """Age of the oldest message waiting for ``cur``: at its watermark, or parked."""
        oldest: float | None = None
        if self.log is not None:
            if self.owner:
                found, seq = self._frame_holding(cur)
            else:
                found, seq = self._saved_frame(cur)
            if isinstance(found, Frame):
                oldest = found.received_ms(seq - found.header.first_seq) / 1000
        if cur.parked_count or not self.owner:
            row = self._c.execute("SELECT min(received_at) FROM parked WHERE cursor = ?",
                                  (cur.name,)).fetchone()
            if row and row[0] is not None:
                oldest = row[0] if oldest is None else min(oldest, row[0])
        return None if oldest is None else max(0.0, now - oldest)

    def _saved_frame(self, cur: Cursor) -> tuple[Frame | Damaged | None, int]:
        pos, seq, chunk = cur.saved_pos, cur.saved_seq, Chunk()
        log = self._log
        while True:
            found, _ = log.frame_at(pos, chunk)
            if found is None or (found.header.qid == cur.qid and found.header.next_seq > seq):
                return found, max(seq, found.header.first_seq) if found is not None else seq
            pos = found.header.end

    def stats(self, queue: str, now: float) -> QueueStats:
        c = self._c
        cur = self.cursors.get(queue)
        depth = 0 if cur is None or self.log is None else self._depth(cur)
        # leases live in the memory of the process holding them: unknown to a reader
        in_flight = None
        if self.owner:
            in_flight = self.leases.count(queue, time.monotonic())
            if cur is not None:
                in_flight += cur.in_flight()
        oldest = None if cur is None or depth == 0 else self._oldest(cur, now)
        dead = c.execute("SELECT count(*) FROM dead_letters WHERE queue = ?",
                         (queue,)).fetchone()[0]
        counters = dict(c.execute("SELECT name, value FROM counters WHERE queue = ?", (queue,)))
        dropped = {k.split(":", 1)[1]: int(v) for k, v in counters.items()
                   if k.startswith("dropped:")}
        for (q, name), n in self._unsaved.items():
            if q == queue and name.startswith("dropped:"):
                key = name.split(":", 1)[1]
                dropped[key] = dropped.get(key, 0) + n
        delivered = int(counters.get("delivered_total", 0))
        if cur is not None and self.owner:
            delivered += cur.delivered_unsaved
        return QueueStats(queue, int(depth), in_flight, oldest, int(dead), delivered, dropped)

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
