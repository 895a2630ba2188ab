"""The store's SQLite layer, part 3: appending (group commits become frames; retention
applied per newcomer; dead letters on arrival; delayed and prioritised messages parked).
Invariant 1 of ``gateway.store.db``: the caller acknowledges only after ``append``
returned."""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Sequence

from gateway.message import new_message_id
from gateway.store import parked
from gateway.store.core import SQLITE_FULL, is_disk_full
from gateway.store.cursors import Cursor
from gateway.store.frames import (
    MAX_DELTA_MS,
    Record,
    extras_blob,
    mqtt_attributes,
    mqtt_flags,
    record_size,
)
from gateway.store.records import (
    STORED,
    UNROUTED,
    AppendOutcome,
    AppendStatus,
    NewMessage,
    StoredMessage,
)
from gateway.store.retention import RetentionDb

log = logging.getLogger("gateway.store")

#: after a full disk refused an append, how long appends are refused without trying
FULL_PROBE_SECONDS = 1.0


def full_attributes(m: NewMessage) -> dict[str, str]:
    """A new message's attributes with the MQTT ones its flags stand for."""
    if m.mqtt_flags < 0:
        return dict(m.attributes)
    return {**mqtt_attributes(m.topic, m.mqtt_flags), **m.attributes}



class WouldGrow(sqlite3.OperationalError):
    """An append that would lengthen the file while the disk reserve is given back."""

    sqlite_errorcode = SQLITE_FULL


class AppendDb(RetentionDb):
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
        # After a full disk, until the reserve can be taken again, the space it gave back is
        # for the cursor writes and checkpoints that drain the store: a newcomer that grew the
        # file into it would leave the drain no room and wedge it. Newcomers then go into the
        # file's free pages and spare segments only (or drop_oldest's room).
        no_growth = self._reserve_spent()
        grew = False  # refused only for lack of free pages: no write was attempted
        try:
            return self._append_once(groups, no_growth=no_growth)
        except sqlite3.Error as exc:
            if not is_disk_full(exc):
                raise
            grew = isinstance(exc, WouldGrow)
        # The disk (or max_page_count) is full. drop_oldest: free the oldest segment, retry.
        if not grew:
            self._disk_full()
        if self.limits.when_full == "drop_oldest":
            try:
                while self._free_oldest_segment("disk_full"):
                    try:
                        return self._append_once(groups, no_growth=self._reserve_released)
                    except sqlite3.Error as exc:
                        if not is_disk_full(exc):
                            raise
            except sqlite3.Error as exc:
                self._rollback()
                if not is_disk_full(exc):
                    raise
        if not grew:  # the next commit tries again when only free pages were lacking
            self._refuse_appends_until = time.monotonic() + FULL_PROBE_SECONDS
        out = self._refuse_all(groups)
        self._save_counters()
        return out

    def _reserve_spent(self) -> bool:
        """The disk reserve was given back on a full disk and cannot be taken again yet (the
        file system lacks twice its size)."""
        if self._reserve_released and self.reserve.ensure():
            self._reserve_released = False
        return self._reserve_released

    def _page_count(self) -> int:
        return int(self._c.execute("PRAGMA page_count").fetchone()[0])

    def _refuse_all(self, groups: Sequence[tuple[str, Sequence[NewMessage]]]) -> list[list[AppendOutcome]]:
        return [[self._drop_unsaved(q, "disk_full") for _ in msgs] for q, msgs in groups]

    def _drop_unsaved(self, queue: str, reason: str) -> AppendOutcome:
        self._unsaved[(queue, f"dropped:{reason}")] += 1
        return AppendOutcome(AppendStatus.DROPPED, reason)

    def _append_once(self, groups: Sequence[tuple[str, Sequence[NewMessage]]], *,
                     no_growth: bool = False) -> list[list[AppendOutcome]]:
        """One transaction; with ``no_growth``, rolled back as SQLITE_FULL when it would make
        the file longer."""
        log = self._log
        snap = log.snapshot()
        cursors_before = set(self.cursors)
        self._begin(durable=True)
        log.reuse_first = no_growth
        try:
            pages = self._page_count() if no_growth else 0
            out = [self._append_group(queue, msgs) for queue, msgs in groups]
            self._trim_dead()
            if no_growth and self._page_count() > pages:
                raise WouldGrow("database or disk is full: the store would grow into the "
                                "space the disk reserve gave back for draining")
            self._commit()
        except BaseException:
            self._rollback()
            log.restore(snap)
            for name in set(self.cursors) - cursors_before:
                del self.cursors[name]
            self._load_parked()
            self._load_dead()
            raise
        finally:
            log.reuse_first = False
        return out

    def _append_group(self, queue: str, msgs: Sequence[NewMessage]) -> list[AppendOutcome]:
        qid, cursors = self._queue_cursors(queue)
        filtered = any(c.topics for c in cursors)
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
            takers = [c for c in cursors if c.routes(topic)] if filtered else cursors
            if not takers:  # no destination takes this topic: nothing to keep
                self._unrouted(queue, topic)
                outcomes.append(UNROUTED)
                continue
            if count + 1 > max_count or nbytes + size > max_bytes:
                refused = self._make_room(qid, cursors, takers, size, count, nbytes,
                                          pending=records, pending_sizes=sizes)
                if refused is not None:
                    outcomes.append(refused)
                    continue
                if not records:  # _make_room wrote them and dropped older messages
                    count, nbytes = self._live()
            count += 1
            nbytes += size
            outcomes.append(STORED)
            if m.priority or m.delay_seconds > 0:
                for cur in takers:
                    self._park_new(cur, m, log.head_seq + len(records), now)
                continue
            ms = int(m.received_at * 1000)
            if not records:
                lo = hi = ms
            elif ms < lo or ms > hi:
                lo, hi = min(lo, ms), max(hi, ms)
                if hi - lo > MAX_DELTA_MS:  # a frame spans at most 49 days
                    self._write_frame(qid, cursors, records, sizes)
                    lo = hi = ms
            records.append(Record(topic, payload, ms, flags, extras))
            sizes.append(size)
        self._write_frame(qid, cursors, records, sizes)
        return outcomes

    def _write_frame(self, qid: int, cursors: list[Cursor], records: list[Record],
                     sizes: list[int]) -> None:
        """Append ``records`` as one frame of queue ``qid``; ``cursors`` (the queue's) learn
        how many of them are theirs."""
        if not records:
            return
        log = self._log
        for cur in cursors:
            if cur.frame is None and cur.read_seq == log.head_seq and not cur.outstanding:
                cur.read_pos, cur.read_cum = log.head_pos, log.head_cum  # caught up: follow
            cur.backlog += (len(records) if not cur.topics
                            else sum(1 for r in records if cur.routes(r.topic)))
        log.append(records, qid, sum(sizes))
        records.clear()
        sizes.clear()

    def _queue_cursors(self, queue: str) -> tuple[int, list[Cursor]]:
        """The queue's id and cursors. A queue whose destinations were registered
        (``register``) has exactly those; any other gets one cursor named like it, created
        at the head (in the caller's transaction) on its first message."""
        if queue in self.registered:
            return self.qids[queue], [c for c in self.cursors.values() if c.queue == queue]
        return self._qid(queue), [self._cursor_for(queue)]

    def _qid(self, queue: str) -> int:
        qid = self.qids.get(queue)
        if qid is None:
            row = self._c.execute("INSERT INTO queues(name) VALUES (?) RETURNING qid",
                                  (queue,)).fetchone()
            qid = self.qids[queue] = int(row[0])
        return qid

    def _cursor_for(self, queue: str, name: str | None = None) -> Cursor:
        """The cursor ``name`` (default: the queue's name) of ``queue``, created at the head
        (in the caller's transaction) when new."""
        name = name or queue
        cur = self.cursors.get(name)
        if cur is not None:
            return cur
        log = self._log
        qid = self._qid(queue)
        self._c.execute("INSERT OR REPLACE INTO cursors(name, queue, seq, pos, updated_at) "
                        "VALUES (?, ?, ?, ?, ?)",
                        (name, queue, log.head_seq, log.head_pos, time.time()))
        cur = self.cursors[name] = Cursor(name, queue, qid, log.head_seq, log.head_pos,
                                          prefix=self.id_prefix, stamp=self.stamp)
        cur.read_cum = log.head_cum
        return cur

    def _unrouted(self, queue: str, topic: str) -> None:
        """A message no destination takes: acknowledged, not kept, counted (and logged once
        per topic, a few topics at most)."""
        self._unsaved[(queue, "unrouted")] += 1
        if len(self._unrouted_topics) < 32 and topic not in self._unrouted_topics:
            self._unrouted_topics.add(topic)
            log.warning("messages on %r match no uplink's topics: acknowledged and not kept "
                        "(counted as unrouted; ingress.subscriptions or uplinks.*.topics)",
                        topic)

    def _refuse(self, takers: list[Cursor], reason: str) -> AppendOutcome:
        for cur in takers:
            self._bump(cur.name, f"dropped:{reason}")
        return AppendOutcome(AppendStatus.DROPPED, reason)

    def _dead_on_arrival(self, queue: str, m: NewMessage, size: int) -> None:
        msg = StoredMessage.detached(0, queue, m.topic, m.payload, m.received_at, order=0,
                                     priority=m.priority, attempts=0,
                                     msg_id=m.id or new_message_id(m.received_at),
                                     attributes=full_attributes(m))
        parked.insert_dead(self._c, queue, msg, 0, m.dead_letter_reason or "", now=time.time())
        self.dead_count += 1
        self.dead_bytes += size
        self._bump(queue, "dead_lettered_total")

    def _park_new(self, cur: Cursor, m: NewMessage, order: int, now: float) -> None:
        """A delayed or prioritised message waits in ``parked``, outside any topic chain."""
        msg = StoredMessage.detached(0, cur.queue, m.topic, m.payload, m.received_at,
                                     order=order, priority=m.priority, attempts=0,
                                     msg_id=m.id or new_message_id(m.received_at),
                                     attributes=full_attributes(m))
        not_before = m.received_at + m.delay_seconds if m.delay_seconds > 0 else 0.0
        n, size = parked.park(self._c, cur.name, [parked.ParkedRow(msg, 0, not_before, 0)])
        cur.parked_count += n
        cur.parked_bytes += size

    def _make_room(self, qid: int, cursors: list[Cursor], takers: list[Cursor], size: int,  # noqa: PLR0917
                   count: int, nbytes: int, *, pending: list[Record],
                   pending_sizes: list[int]) -> AppendOutcome | None:
        """Apply retention for one newcomer of ``size`` bytes, routed to ``takers``; None when
        it may be stored. A refusal is counted for each taker (they never got it).
        ``pending`` holds this group's records not written yet: they go before older
        messages can be dropped, so the oldest really go first."""
        lim = self.limits
        if size > lim.max_bytes:
            return self._refuse(takers, "max_bytes")
        if count + 1 <= lim.max_messages and nbytes + size <= lim.max_bytes:
            return None
        reason = "max_messages" if count + 1 > lim.max_messages else "max_bytes"
        if lim.when_full == "reject_new":
            return self._refuse(takers, reason)
        self._write_frame(qid, cursors, pending, pending_sizes)
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

