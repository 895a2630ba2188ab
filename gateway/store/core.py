"""The store's SQLite layer, part 1: the connection, the schema, opening and closing, the
counters, the totals and writing the cursors (format 2; ``gateway.store.db`` has the whole
class and its invariants, ``docs/architecture.md`` the layout).

The layers build on each other, one module each: ``core`` (this one) <- ``retention`` <-
``appending`` <- ``delivery`` <- ``db`` (queues and stats). They split one class by concern;
every method still runs on the store thread.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson

from gateway.config import StoreConfig
from gateway.store import parked
from gateway.store.cursors import Cursor
from gateway.store.frames import Frame
from gateway.store.leases import Leases
from gateway.store.log import Chunk, Log
from gateway.store.reserve import RESERVE_BYTES, DiskReserve
from gateway.store.segments import SegmentIo

R = TypeVar("R")

SCHEMA_VERSION = 2
SQLITE_FULL = 13

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS queues(qid INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS segments(slot INTEGER PRIMARY KEY, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS cursors(
    name TEXT PRIMARY KEY,
    queue TEXT NOT NULL,
    seq INTEGER NOT NULL,
    pos INTEGER NOT NULL,
    updated_at REAL NOT NULL DEFAULT 0,
    topics TEXT NOT NULL DEFAULT ''   -- JSON list of MQTT filters ('' = every record)
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


class NewerStore(sqlite3.DatabaseError):
    """A store written by a newer gateway: refused, left untouched."""


class CoreDb:
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
        #: the reserve was given back on a full disk and not taken again yet
        self._reserve_released = False
        self.log: Log | None = None
        self.cursors: dict[str, Cursor] = {}
        self.qids: dict[str, int] = {}
        self.id_prefix = ""
        #: attributes added to every message handed out (the gateway id; Store(stamp=))
        self.stamp: dict[str, str] = {}
        self.clean_start = True
        #: (messages, counted bytes) held, as of the last operation (read by other threads)
        self.totals = (0, 0)
        #: queues whose destinations were registered: they have exactly those cursors
        self.registered: set[str] = set()
        self._unrouted_topics: set[str] = set()

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
        self._create_schema()
        self._load()
        if version == 1 or self._has_table("messages"):
            self._migrate_v1()
        self._start()
        self.reserve.ensure()

    def _migrate_v1(self) -> None:
        """Move a format-1 store's rows into the log (``gateway.store.migrate``); the whole
        class (``StoreDb``) does it."""
        raise NotImplementedError

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
        for name, queue, seq, pos, topics in c.execute(
                "SELECT name, queue, seq, pos, topics FROM cursors"):
            cur = self.cursors[name] = Cursor(name, queue, self.qids.get(queue, -1), seq, pos,
                                              prefix=self.id_prefix, stamp=self.stamp)
            cur.route(tuple(orjson.loads(topics)) if topics else ())
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
            cur.backlog = self._scan_backlog(cur, cur.read_seq, cur.read_pos)
            if not self.clean_start:
                window[cur.name] += min(max(0, log.head_seq - cur.saved_seq),
                                         self.limits.cursor_sync_messages)
        self._begin(durable=False)
        for queue, n in window.items():
            self._bump(queue, "redelivery_window", n)
        self._c.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('clean_stop', 0)")
        self._commit()
        self._retotal()

    def _scan_backlog(self, cur: Cursor, seq: int, pos: int) -> int:
        """Records of ``cur``'s queue routed to it from ``seq`` (in the frame at ``pos``) to
        the head: arithmetic for a store of one queue and a cursor that takes everything,
        otherwise a read of every frame from there (at start, and for ``status``)."""
        log = self._log
        if not cur.topics and len(self.qids) <= 1:
            return max(0, log.head_seq - seq)
        n, chunk = 0, Chunk()
        while True:
            found, _ = log.frame_at(pos, chunk)
            if found is None:
                return n
            h = found.header
            if h.qid == cur.qid and h.next_seq > seq:
                n += (cur.routed_in(found, seq, h.next_seq) if isinstance(found, Frame)
                      else h.next_seq - max(seq, h.first_seq))
            pos = h.end

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
            self._unsaved[(cur.name, "dropped:corrupt")] += n

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
                self._bump(cur.name, "delivered_total", cur.delivered_unsaved)
            tail = min((marks[c.name][1] if c.name in marks else c.saved_pos)
                       for c in self.cursors.values())
            live = len(self._log.index)
            doomed = self._log.free_upto(tail)
            if doomed:
                self._log.io.delete(doomed)
            self._commit()
            if len(self._log.index) < live:
                self._refuse_appends_until = 0.0  # segments freed: a newcomer may fit now
                self._segments_freed()
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

    # -- shared by the layers above ---------------------------------------------------

    def _with_room(self, fn: Callable[..., R], *args: Any) -> R:
        """Run a write; on SQLITE_FULL, give back the reserve, checkpoint, try once more."""
        try:
            return fn(*args)
        except sqlite3.Error as exc:
            self._rollback()
            if not is_disk_full(exc):
                raise
        self._disk_full()
        return fn(*args)

    def _segments_freed(self) -> None:
        """Called after a cursor write freed segments (``RetentionDb`` takes the disk reserve
        back as soon as that is possible)."""

    def _disk_full(self) -> None:
        """SQLITE_FULL: give back the disk reserve (appends then wait until it can be taken
        again, see ``AppendDb._append``) and checkpoint, which empties the WAL."""
        if self.reserve.release():
            self._reserve_released = True
        self.checkpoint()

    def checkpoint(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._c.execute("PRAGMA wal_checkpoint(TRUNCATE)")

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

