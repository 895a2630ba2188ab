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
from collections.abc import Sequence
from dataclasses import dataclass

import orjson

from gateway.store.core import (  # re-exported: the names callers import from here
    DEAD_LETTER_MAX_BYTES,
    SCHEMA_VERSION,
    Limits,
    NewerStore,
    is_disk_full,
)
from gateway.store.cursors import Cursor
from gateway.store.delivery import DeliveryDb
from gateway.store.frames import (
    Frame,
)
from gateway.store.log import Chunk, Damaged
from gateway.store.records import (
    QueueStats,
)

__all__ = ["DEAD_LETTER_MAX_BYTES", "SCHEMA_VERSION", "Destination", "Limits", "NewerStore", "StoreDb",
           "is_disk_full"]


@dataclass(frozen=True, slots=True)
class Destination:
    """One destination of a queue: an uplink, with the MQTT topic filters it takes (empty =
    every message) and its own max_attempts (0 = store.max_attempts)."""

    name: str
    topics: tuple[str, ...] = ()
    max_attempts: int = 0


class StoreDb(DeliveryDb):
    """One connection; not thread-safe; every method runs on the store thread.

    ``readonly``: a reader (``status``, ``dlq list``). ``owner=False``: a side user that may
    write dead letters and replays (``dlq replay|purge``) while the daemon owns the log."""

    def _migrate_v1(self) -> None:
        from gateway.store.migrate import migrate_v1

        migrate_v1(self)

    # -- queue management and stats -----------------------------------------------------

    def _depth(self, cur: Cursor) -> int:
        """Messages for ``cur``: routed to it from its watermark to the head (not handed out,
        or handed out and not settled), plus its parked ones."""
        if self.owner:
            return cur.backlog + len(cur.outstanding) + cur.parked_count
        return self._scan_backlog(cur, cur.saved_seq, cur.saved_pos) + cur.parked_count

    def register(self, queue: str, destinations: Sequence[Destination]) -> list[str]:
        """Make ``destinations`` the queue's cursors, exactly: each keeps its cursor or gets
        one at the head (a new uplink takes what arrives from now on), with its topic filter
        and attempts. The queue's other cursors (uplinks no longer configured) are removed and
        what they had not delivered counted as ``dropped:uplink_removed``; returns their
        names. A reader (``status``) only learns the filters."""
        names = {d.name for d in destinations}
        removed = [c for c in self.cursors.values() if c.queue == queue and c.name not in names]
        if self.owner:
            self._begin(durable=False)
            try:
                for d in destinations:
                    self._cursor_for(queue, d.name)
                    self._c.execute("UPDATE cursors SET topics = ? WHERE name = ?",
                                    (orjson.dumps(list(d.topics)).decode() if d.topics else "",
                                     d.name))
                for c in removed:
                    self._bump(c.name, "dropped:uplink_removed", self._depth(c))
                    self._c.execute("DELETE FROM cursors WHERE name = ?", (c.name,))
                    self._c.execute("DELETE FROM parked WHERE cursor = ?", (c.name,))
                self._commit()
            except BaseException:
                self._rollback()
                raise
            for c in removed:
                del self.cursors[c.name]
                self.leases.drop_queue(c.name)
            self.registered.add(queue)
        for d in destinations:
            cur = self.cursors.get(d.name)
            if cur is None:
                continue
            if cur.queue != queue:
                raise sqlite3.IntegrityError(f"{d.name!r} is the cursor of queue {cur.queue!r}, "
                                             f"not of {queue!r}")
            cur.route(tuple(d.topics))
            cur.max_attempts = d.max_attempts
            if self.owner:
                cur.backlog = self._scan_backlog(cur, cur.read_seq, cur.read_pos)
        if self.log is not None:
            readers = Counter(c.queue for c in self.cursors.values())
            self.log.shared_reads = any(n > 1 for n in readers.values())
        self._retotal()
        return [c.name for c in removed]

    def caught_up(self, name: str) -> bool:
        """The daemon's cursor ``name`` has nothing to deliver: no record past its watermark,
        nothing handed out, nothing parked (write-avoidance opens its lane only then)."""
        cur = self.cursors.get(name)
        return (self.owner and self.log is not None and cur is not None
                and self._depth(cur) == 0)

    def depth(self, queue: str) -> int:
        cur = self.cursors.get(queue)
        return 0 if cur is None or self.log is None else self._depth(cur)

    def purge(self, queue: str) -> int:
        cur = self.cursors.get(queue)
        if cur is None:
            return 0
        n = self._depth(cur)
        log = self._log
        gone = cur.skip_to(log.head_seq, log, self._on_loss, cur.backlog)
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
