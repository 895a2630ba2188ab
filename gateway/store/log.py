"""The log: frames appended at the head, read from any position, segments freed at the tail.

Holds the writer's state (head position, next seq, counted bytes so far), the live segments
in position order and the free ring segments waiting for reuse. Everything here runs on the
store thread inside transactions the caller (``StoreDb``) opens and commits; ``snapshot`` and
``restore`` undo the in-memory side of a transaction that rolled back.

Invariants kept here (numbers as in ``docs/architecture.md``):

- (1) the head moves only when the caller commits: ``append`` returns the new frames and the
  caller calls ``restore`` when the transaction fails;
- (4) ``free_upto`` frees only segments that end at or before the position the caller passes,
  which is the lowest *persisted* cursor;
- (5) a reader accepts a frame only when its header names the position it is read from; a frame
  that fails its CRC or decoding is returned as damaged so the caller counts and skips it.

Several readers of one queue (several uplinks) read the same frames: with ``shared_reads``
on, the last ``SHARED_FRAMES`` decoded frames are kept by position, so the second uplink's
read of a frame costs no blob read, CRC or decompression. A position names one frame for as
long as it is live (positions only grow; ``restore`` forgets them, since the rolled-back
positions are written again).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from gateway.store.frames import HEADER_SIZE, Frame, FrameError, Header, Record, encode, read_header
from gateway.store.segments import RING, Segment, SegmentIndex, SegmentIo

log = logging.getLogger("gateway.store")

#: free ring segments kept for reuse; more are deleted (their pages go to the freelist)
SPARE_SEGMENTS = 4
#: how much of a segment a reader fetches with one blob read
READ_CHUNK = 256 * 1024
#: decoded frames kept for the other readers of a queue (``shared_reads``) ...
SHARED_FRAMES = 8
#: ... of at most this many stored bytes each
SHARED_FRAME_MAX = 512 * 1024


@dataclass(slots=True)
class Damaged:
    """A frame whose header is right and whose body is not: ``header.count`` records lost."""

    header: Header
    reason: str


@dataclass(slots=True)
class _Snapshot:
    head_pos: int
    head_seq: int
    head_cum: int
    live: int
    free: list[tuple[Segment, int]]
    current: Segment | None


class Chunk:
    """A reader's window onto one segment: the bytes of ``[start, start + len(data))``."""

    __slots__ = ("data", "slot", "start")

    def __init__(self) -> None:
        self.slot = -1
        self.start = 0
        self.data = b""

    def get(self, io: SegmentIo, seg: Segment, pos: int, size: int, end: int) -> bytes:
        """``size`` bytes at ``pos`` of ``seg`` (fewer at ``end``), from the window when it
        holds them, else by reading a new window."""
        if (self.slot == seg.slot and self.start <= pos
                and pos + size <= self.start + len(self.data)):
            off = pos - self.start
            return self.data[off:off + size]
        want = max(size, min(READ_CHUNK, end - pos))
        self.slot, self.start = seg.slot, pos
        self.data = io.read(seg, pos, want)
        return self.data[:size]

    def forget(self) -> None:
        self.slot, self.data = -1, b""


class Log:
    def __init__(self, io: SegmentIo, segment_bytes: int, compress: bool) -> None:
        self.io = io
        self.segment_bytes = segment_bytes
        #: frames at least this large get a sealed segment of their own
        self.sealed_threshold = max(HEADER_SIZE + 1, segment_bytes // 4)
        self.compress = compress
        self.index = SegmentIndex([])
        self.free: list[Segment] = []
        #: the ring segment being filled (the newest live segment), or None
        self.current: Segment | None = None
        self.head_pos = 0
        self.head_seq = 0
        self.head_cum = 0
        #: put even large frames into a spare ring segment when one is free (a full disk:
        #: a sealed segment would need new pages)
        self.reuse_first = False
        #: keep recently decoded frames for other readers (a queue has several cursors)
        self.shared_reads = False
        self._recent: dict[int, Frame] = {}

    # -- opening -----------------------------------------------------------------------

    def load(self, tail_pos: int, start: tuple[int, int, int]) -> list[int]:
        """Read the segment headers; those ending at or before ``tail_pos`` (the lowest
        persisted cursor) are free. Find the head by reading the newest segment's frames.
        ``start`` = (pos, seq, cum) to use when no segment is live. Returns slots to delete
        (free beyond the spares, sealed ones, unreadable ones)."""
        segments, unreadable = self.io.load_all()
        live = [s for i, s in enumerate(segments)
                if not self._ends_by(segments, i, tail_pos)]
        freed = [s for s in segments if s not in live]
        self.index = SegmentIndex(live)
        self.free = [s for s in freed if s.kind == RING][:SPARE_SEGMENTS]
        doomed = [s.slot for s in freed if s not in self.free] + unreadable
        self.head_pos, self.head_seq, self.head_cum = start
        if live:
            self._find_head(live[-1])
        return doomed

    @staticmethod
    def _ends_by(segments: list[Segment], i: int, tail_pos: int) -> bool:
        nxt = segments[i + 1].base if i + 1 < len(segments) else None
        return nxt is not None and nxt <= tail_pos

    def _find_head(self, seg: Segment) -> None:
        """Walk the newest segment's frames to its fill point."""
        pos, last, chunk = seg.base, None, Chunk()
        while pos + HEADER_SIZE <= seg.limit:
            header = read_header(chunk.get(self.io, seg, pos, HEADER_SIZE, seg.limit), pos)
            if header is None or header.end > seg.limit:
                break
            last, pos = header, header.end
        if last is not None:
            body = chunk.get(self.io, seg, last.pos + HEADER_SIZE, last.body_len, seg.limit)
            self.head_pos, self.head_seq = last.end, last.next_seq
            try:
                frame = Frame(last, body)
                self.head_cum = last.cum_bytes + sum(frame.size(i) for i in range(last.count))
            except FrameError:
                self.head_cum = last.cum_bytes
        else:
            self.head_pos = seg.base
        self.current = seg if seg.kind == RING else None

    # -- writing -----------------------------------------------------------------------

    def snapshot(self) -> _Snapshot:
        return _Snapshot(self.head_pos, self.head_seq, self.head_cum, len(self.index),
                         [(s, s.base) for s in self.free], self.current)

    def restore(self, snap: _Snapshot) -> None:
        self._recent.clear()
        self.head_pos, self.head_seq, self.head_cum = snap.head_pos, snap.head_seq, snap.head_cum
        del self.index.live[snap.live:]
        self.index = SegmentIndex(self.index.live)
        for seg, base in snap.free:
            seg.base = base
        self.free = [s for s, _ in snap.free]
        self.current = snap.current

    def append(self, records: Sequence[Record], qid: int, sizes: int) -> Header:
        """Write one frame of ``records`` (``sizes``: their counted bytes) at the head."""
        frame = encode(records, pos=self.head_pos, first_seq=self.head_seq,
                       cum_bytes=self.head_cum, qid=qid, compress=self.compress)
        seg = self._place(len(frame))
        if seg is None:  # a frame of its own: the sealed segment is the write
            self.index.append(self.io.insert_sealed(self.head_pos, frame))
            self.current = None
        else:
            self.io.write(seg, self.head_pos, frame)
        header = read_header(frame, self.head_pos)
        assert header is not None
        self.head_pos = header.end
        self.head_seq = header.next_seq
        self.head_cum += sizes
        return header

    def _place(self, length: int) -> Segment | None:
        """The ring segment the next frame goes into, or None for a sealed segment."""
        cur = self.current
        if cur is not None and self.head_pos + length <= cur.limit:
            return cur
        if length >= self.sealed_threshold and not (self.reuse_first and self.free
                                                    and length <= self.free[0].capacity):
            return None
        if self.free:
            seg = self.free.pop(0)
            self.io.reuse_ring(seg, self.head_pos)
        else:
            seg = self.io.allocate_ring(self.head_pos, self.segment_bytes)
        self.index.append(seg)
        self.current = seg
        return seg

    # -- reading -----------------------------------------------------------------------

    def frame_at(self, pos: int, chunk: Chunk) -> tuple[Frame | Damaged | None, int]:
        """The frame at or after ``pos``: (frame, its position), or (None, pos) when ``pos``
        is the head. A position past a segment's data moves on to the next segment."""
        index = self.index
        while pos < self.head_pos:
            i = index.find(pos)
            if i < 0:  # before every live segment (dropped): start at the oldest
                pos = index.live[0].base
                continue
            recent = self._recent.get(pos)
            if recent is not None:
                return recent, pos
            seg = index.live[i]
            end = index.end(i, self.head_pos)
            raw = chunk.get(self.io, seg, pos, HEADER_SIZE, end) if pos + HEADER_SIZE <= end else b""
            header = read_header(raw, pos)
            if header is None or header.end > end:
                pos = end  # the segment's data ends here (stale bytes follow)
                continue
            body = chunk.get(self.io, seg, pos + HEADER_SIZE, header.body_len, end)
            try:
                frame = Frame(header, body)
            except FrameError as exc:
                return Damaged(header, str(exc)), pos
            if self.shared_reads and header.body_len <= SHARED_FRAME_MAX:
                if len(self._recent) >= SHARED_FRAMES:
                    del self._recent[next(iter(self._recent))]
                self._recent[pos] = frame
            return frame, pos
        return None, pos

    # -- freeing -----------------------------------------------------------------------

    def free_upto(self, tail_pos: int) -> list[int]:
        """Free the segments that end at or before ``tail_pos``: ring segments are kept for
        reuse (up to ``SPARE_SEGMENTS``), the rest are returned as slots to delete."""
        live = self.index.live
        n = 0
        while n + 1 < len(live) and live[n + 1].base <= tail_pos:
            n += 1
        if not n:
            return []
        doomed = []
        for seg in self.index.pop_front(n):
            if seg.kind == RING and len(self.free) < SPARE_SEGMENTS:
                self.free.append(seg)
            else:
                doomed.append(seg.slot)
        return doomed

    def oldest_end(self) -> int | None:
        """Where the oldest live segment ends (None when only the head segment is live)."""
        live = self.index.live
        return live[1].base if len(live) > 1 else None
