"""The store's SQLite layer, part 2: retention (dropping the oldest frames and segments,
max_age) and the parked rows' totals. Every drop is counted per uplink (invariant 7 of
``gateway.store.db``)."""

from __future__ import annotations

from gateway.store import parked
from gateway.store.core import CoreDb
from gateway.store.cursors import Cursor
from gateway.store.frames import (
    Frame,
)
from gateway.store.log import Chunk, Damaged


class RetentionDb(CoreDb):
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
            self._skip(cur, found, target, reason)
        return target - seq

    def _skip(self, cur: Cursor, frame: Frame | Damaged, target: int, reason: str) -> None:
        """Move ``cur`` past ``frame``'s records before ``target``, counting what it had not
        settled of the records routed to it (a damaged frame's: all of its queue's)."""
        if cur.watermark()[0] >= target:
            return
        header = frame.header
        routed = 0
        if header.qid == cur.qid and target > cur.read_seq:
            routed = (cur.routed_in(frame, cur.read_seq, target) if isinstance(frame, Frame)
                      else target - max(cur.read_seq, header.first_seq))
        gone = cur.skip_to(target, self._log, self._on_loss, routed)
        self._unsaved[(cur.name, f"dropped:{reason}")] += routed + len(gone)

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

    def _segments_freed(self) -> None:
        if self._reserve_released:  # the drain after a full disk: back to normal at once
            self.vacuum_if_sparse()

    def vacuum_if_sparse(self) -> int:
        """Give free pages back to the file system when a quarter of the file is free.

        While the disk reserve is given back (a full disk), newcomers may only use the file's
        free pages (``AppendDb._append``): they are given back only when that lets the
        reserve be taken again, else the store could take nothing until the disk has room."""
        if self.reserve.ensure():
            self._reserve_released = False
        c = self._c
        free = int(c.execute("PRAGMA freelist_count").fetchone()[0])
        total = int(c.execute("PRAGMA page_count").fetchone()[0])
        if not (total and free * 4 > total):
            return 0
        if self._reserve_released and not self.reserve.would_fit(free * self.page_size):
            return 0
        c.execute("PRAGMA incremental_vacuum")
        if self._reserve_released and self.reserve.ensure():
            self._reserve_released = False
        return free

