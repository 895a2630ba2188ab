"""Segments: where frames live in the SQLite file (format 2), and how they are read and written.

A segment is one row of ``segments(slot INTEGER PRIMARY KEY, data BLOB)``: a 64-byte header
(``magic "HQSEG2", kind, base, capacity``) and then frames, the first at position ``base``
(blob offset ``SEGMENT_HEADER``). Positions are log-wide and only grow.

- A *ring* segment is allocated once with ``zeroblob`` and filled with incremental blob I/O,
  which writes only the pages a frame touches; once freed it is reused in place for a new base
  (its header rewritten), so a steady stream of small commits never allocates or frees pages.
- A *sealed* segment holds one large frame, exactly its size; it is deleted when freed.

Promises: a segment's extent is ``[base, end)`` where ``end`` is the next segment's base (or
the writer's head for the newest); ``read`` returns bytes as committed (the caller checks every
frame header's position, invariant 5 in ``docs/architecture.md``); nothing here commits: the
caller owns the transaction.
"""

from __future__ import annotations

import bisect
import sqlite3
import struct
from dataclasses import dataclass

SEGMENT_HEADER = 64
_HEADER = struct.Struct("<6sBxQQ")
_MAGIC = b"HQSEG2"
RING = 1
SEALED = 2


@dataclass(slots=True)
class Segment:
    slot: int
    kind: int
    base: int
    #: bytes available for frames (the blob's size minus the header)
    capacity: int

    @property
    def limit(self) -> int:
        """The first position past this segment's space."""
        return self.base + self.capacity


def header_bytes(kind: int, base: int, capacity: int) -> bytes:
    return _HEADER.pack(_MAGIC, kind, base, capacity).ljust(SEGMENT_HEADER, b"\0")


def parse_header(slot: int, raw: bytes) -> Segment | None:
    if len(raw) < _HEADER.size:
        return None
    magic, kind, base, capacity = _HEADER.unpack_from(raw)
    if magic != _MAGIC or kind not in (RING, SEALED):
        return None
    return Segment(slot, kind, base, capacity)


class SegmentIo:
    """Blob reads and writes of segments through one connection (the store thread's)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def load_all(self) -> tuple[list[Segment], list[int]]:
        """Every segment whose header reads, and the slots whose header does not (never
        written: a crash right after allocation, which the allocation's transaction rules
        out, or damage)."""
        good: list[Segment] = []
        bad: list[int] = []
        for (slot,) in self.conn.execute("SELECT slot FROM segments ORDER BY slot").fetchall():
            with self.conn.blobopen("segments", "data", slot, readonly=True) as blob:
                seg = parse_header(slot, blob.read(SEGMENT_HEADER))
            if seg is None:
                bad.append(slot)
            else:
                good.append(seg)
        good.sort(key=lambda s: s.base)
        return good, bad

    def read(self, seg: Segment, pos: int, size: int) -> bytes:
        """Up to ``size`` bytes of ``seg`` from position ``pos`` (fewer at its limit)."""
        size = min(size, seg.limit - pos)
        if size <= 0:
            return b""
        with self.conn.blobopen("segments", "data", seg.slot, readonly=True) as blob:
            blob.seek(SEGMENT_HEADER + pos - seg.base)
            return blob.read(size)

    def write(self, seg: Segment, pos: int, data: bytes) -> None:
        with self.conn.blobopen("segments", "data", seg.slot) as blob:
            blob.seek(SEGMENT_HEADER + pos - seg.base)
            blob.write(data)

    def allocate_ring(self, base: int, capacity: int) -> Segment:
        cur = self.conn.execute("INSERT INTO segments(data) VALUES (zeroblob(?))",
                                (SEGMENT_HEADER + capacity,))
        slot = cur.lastrowid
        assert slot is not None
        seg = Segment(slot, RING, base, capacity)
        self.write_header(seg)
        return seg

    def reuse_ring(self, seg: Segment, base: int) -> None:
        seg.base = base
        self.write_header(seg)

    def write_header(self, seg: Segment) -> None:
        with self.conn.blobopen("segments", "data", seg.slot) as blob:
            blob.write(header_bytes(seg.kind, seg.base, seg.capacity))

    def insert_sealed(self, base: int, frame: bytes) -> Segment:
        data = header_bytes(SEALED, base, len(frame)) + frame
        cur = self.conn.execute("INSERT INTO segments(data) VALUES (?)", (data,))
        slot = cur.lastrowid
        assert slot is not None
        return Segment(slot, SEALED, base, len(frame))

    def delete(self, slots: list[int]) -> None:
        self.conn.executemany("DELETE FROM segments WHERE slot = ?", [(s,) for s in slots])


class SegmentIndex:
    """The live segments in position order, in memory (a few thousand at most: their number is
    bounded by ``max_bytes`` / segment size and the sealed segments' minimum size)."""

    def __init__(self, segments: list[Segment]) -> None:
        self.live = segments
        self._bases = [s.base for s in segments]

    def append(self, seg: Segment) -> None:
        self.live.append(seg)
        self._bases.append(seg.base)

    def find(self, pos: int) -> int:
        """Index of the segment whose extent holds ``pos``; -1 when ``pos`` lies before all."""
        return bisect.bisect_right(self._bases, pos) - 1

    def end(self, index: int, head: int) -> int:
        """Where segment ``index``'s data ends: the next segment's base, or the head."""
        return self.live[index + 1].base if index + 1 < len(self.live) else head

    def pop_front(self, count: int) -> list[Segment]:
        gone = self.live[:count]
        del self.live[:count]
        del self._bases[:count]
        return gone

    def __len__(self) -> int:
        return len(self.live)
