"""A destination's cursor over the log, in memory (format 2; persisted by ``StoreDb``).

State: the read position (``read_seq`` in the frame ``frame``), the records handed out and
not settled (``outstanding``, in seq order: the log is read in order and a re-handed record
keeps its first place), the records given back to be handed out again first (``released``),
and the parked messages' totals and topic chains. A handed-out record's lease is its
``until`` (monotonic); ``deadlines`` holds one deadline per hand-out, so finding expired
leases costs nothing until one is due (log records never block a topic: they have no
attempts yet).

Invariants:

- ``watermark`` (the persisted cursor's next value) is the lowest unsettled seq: the first
  outstanding record, else the read position. It never passes a record that is neither
  settled nor parked (invariant 2 of ``docs/architecture.md``).
- Records are handed out in seq order; a released record goes back in front, in seq order.
- A record whose topic has a parked chain is not handed out: ``pull`` returns it separately so
  the caller parks it (invariant 6).
- A cursor with ``topics`` (MQTT filters: the uplink's routes) hands out only the records
  whose topic matches one; the others it passes as settled, for this destination they do
  not exist. ``backlog`` counts the routed records at or after ``read_seq``.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Mapping

from gateway.store.frames import NO_STAMP, Frame
from gateway.store.log import Chunk, Damaged, Log
from gateway.store.records import StoredMessage
from gateway.topics import topic_matches

#: called with (cursor, count) for records lost to damage, so the caller can count them
OnLoss = Callable[["Cursor", int], None]
#: ``until`` of a record given back: not leased, so never expired
_RELEASED = float("inf")
#: topics whose routing a cursor remembers
_ROUTE_CACHE = 8192


class Cursor:
    def __init__(self, name: str, queue: str, qid: int, seq: int, pos: int, *,
                 prefix: str, stamp: Mapping[str, str] = NO_STAMP) -> None:
        self.name = name
        self.queue = queue
        self.qid = qid
        #: the store's id prefix (derived message ids)
        self.prefix = prefix
        #: attributes the store adds to every message it hands out (the gateway id)
        self.stamp = stamp
        self.saved_seq = seq
        self.saved_pos = pos
        self.read_seq = seq
        self.read_pos = pos
        #: counted bytes of the log before ``read_pos``'s frame (retention)
        self.read_cum = 0
        self.frame: Frame | None = None
        self.chunk = Chunk()
        self.outstanding: dict[int, StoredMessage] = {}
        self.released: list[StoredMessage] = []
        #: one lease deadline per hand-out (monotonic), in hand-out order
        self.deadlines: list[float] = []
        self.unsaved = 0
        self.delivered_unsaved = 0
        self.last_sync = time.monotonic()
        self.parked_count = 0
        self.parked_bytes = 0
        self.chains: dict[str, int] = {}
        #: MQTT topic filters of the records this cursor takes; () = every record
        self.topics: tuple[str, ...] = ()
        self._routes: dict[str, bool] = {}
        #: failed deliveries before a message is dead-lettered; 0 = store.max_attempts
        self.max_attempts = 0
        #: records routed here at or after ``read_seq`` (not handed out yet)
        self.backlog = 0

    def route(self, topics: tuple[str, ...]) -> None:
        """Take only records whose topic matches one of ``topics`` (() = all of them)."""
        self.topics = topics
        self._routes.clear()

    def routes(self, topic: str) -> bool:
        """Whether a record of ``topic`` is for this cursor (cached per topic)."""
        if not self.topics:
            return True
        routed = self._routes.get(topic)
        if routed is None:
            if len(self._routes) >= _ROUTE_CACHE:
                self._routes.clear()
            routed = self._routes[topic] = any(topic_matches(f, topic) for f in self.topics)
        return routed

    def routed_in(self, frame: Frame, lo: int, hi: int) -> int:
        """How many of ``frame``'s records with seqs in [lo, hi) are for this cursor."""
        first = frame.header.first_seq
        lo, hi = max(lo, first) - first, min(hi, frame.header.next_seq) - first
        if hi <= lo:
            return 0
        if not self.topics:
            return hi - lo
        topics, idx, routes = frame.topics, frame.topic_idx, self.routes
        return sum(1 for k in range(lo, hi) if routes(topics[idx[k]]))

    # -- position ----------------------------------------------------------------------

    def watermark(self) -> tuple[int, int, int]:
        """(seq, frame position, counted bytes before that frame) of the lowest unsettled
        record, or of the read position when nothing is outstanding."""
        for first in self.outstanding.values():
            frame = first._frame
            assert frame is not None
            return first.order, frame.header.pos, frame.header.cum_bytes
        frame = self.frame
        if frame is not None and self.read_seq >= frame.header.next_seq:  # read to its end
            return self.read_seq, frame.header.end, frame.header.cum_bytes + frame.total_size
        return self.read_seq, self.read_pos, self.read_cum

    def dirty(self) -> bool:
        return self.watermark()[0] != self.saved_seq or self.delivered_unsaved > 0

    def position(self, log: Log, on_loss: OnLoss) -> None:
        """Load the frame holding ``read_seq`` (at start, or after a jump)."""
        self.frame = None
        self._advance(log, self.read_pos, on_loss)

    def _advance(self, log: Log, pos: int, on_loss: OnLoss) -> bool:
        """Move to the first frame of this queue at or after ``pos`` that still holds records
        at or after ``read_seq``; False when the reader is at the head."""
        while True:
            found, at = log.frame_at(pos, self.chunk)
            if found is None:
                self.frame, self.read_pos = None, at
                if self.read_seq < log.head_seq:  # records vanished (damage): skip them
                    self._lost(on_loss, log.head_seq - self.read_seq)
                    self.read_seq = log.head_seq
                self.read_cum = log.head_cum
                return False
            header = found.header
            if header.first_seq > self.read_seq:  # a damaged stretch ended a segment early
                self._lost(on_loss, header.first_seq - self.read_seq)
                self.read_seq = header.first_seq
            if isinstance(found, Damaged) or header.qid != self.qid or header.next_seq <= self.read_seq:
                if isinstance(found, Damaged) and header.qid == self.qid:
                    self._lost(on_loss, header.next_seq - max(self.read_seq, header.first_seq))
                self.read_seq = max(self.read_seq, header.next_seq)
                pos = header.end
                continue
            found.queue, found.prefix, found.stamp = self.queue, self.prefix, self.stamp
            self.frame, self.read_pos, self.read_cum = found, at, header.cum_bytes
            return True

    def _lost(self, on_loss: OnLoss, n: int) -> None:
        """Records that cannot be read (damage): counted; whose they were is unknown, so at
        most the backlog shrinks by them."""
        on_loss(self, min(n, self.backlog) if self.topics else n)
        self.backlog = max(0, self.backlog - n)

    # -- handing out -------------------------------------------------------------------

    def pull(self, log: Log, limit: int, max_bytes: int, *, until: float, on_loss: OnLoss,
             ) -> tuple[list[StoredMessage], list[StoredMessage]]:
        """Up to ``limit`` records for delivery, in seq order (released ones first), leased
        until ``until``, with at most ``max_bytes`` of payload (0 = no limit; the first record
        always), and the records pulled that must be parked behind their topic's chain."""
        out: list[StoredMessage] = []
        behind: list[StoredMessage] = []
        chains = self.chains
        budget = [max_bytes]
        while self.released and len(out) < limit:
            msg = self.released[0]
            if max_bytes and out and budget[0] - len(msg.payload) < 0:
                return out, behind
            del self.released[0]
            msg.until = until
            if chains.get(msg.topic):
                behind.append(msg)
                continue
            budget[0] -= len(msg.payload)
            out.append(msg)
        while len(out) < limit:
            frame = self.frame
            if frame is None or self.read_seq >= frame.header.next_seq:
                start = self.read_pos if frame is None else frame.header.end
                if not self._advance(log, start, on_loss):
                    break
                frame = self.frame
                assert frame is not None
            if not self._take(frame, limit, max_bytes, until=until, out=out, behind=behind,
                              budget=budget):
                break
        if out or behind:
            bisect.insort(self.deadlines, until)
        return out, behind

    def _take(self, frame: Frame, limit: int, max_bytes: int, *, until: float,
              out: list[StoredMessage], behind: list[StoredMessage], budget: list[int]) -> bool:
        """Hand out records of ``frame`` from ``read_seq``; False when the budget ran out."""
        if self.topics:
            return self._take_routed(frame, limit, max_bytes, until=until, out=out,
                                     behind=behind, budget=budget)
        header = frame.header
        first = header.first_seq
        i = self.read_seq - first
        stop = min(header.count, i + limit - len(out))
        if max_bytes:  # where the byte budget ends (the first record of a batch always goes)
            lengths, left, j = frame.lengths, budget[0], i
            while j < stop and (left - lengths[j] >= 0 or (not out and j == i)):
                left -= lengths[j]
                j += 1
            budget[0] = left
            stop = j
        topics, idx, body, offsets = frame.topics, frame.topic_idx, frame.body, frame.offsets
        made = [StoredMessage(first + k, topics[idx[k]], body[offsets[k]:offsets[k + 1]], frame,
                              k, until) for k in range(i, stop)]
        outstanding = self.outstanding
        chains = self.chains
        if chains:
            for msg in made:
                outstanding[msg.seq] = msg
                (behind if chains.get(msg.topic) else out).append(msg)
        else:
            outstanding.update(zip(range(first + i, first + stop), made, strict=True))
            out.extend(made)
        self.read_seq = first + stop
        self.backlog -= stop - i
        return stop >= header.count or len(out) >= limit

    def _take_routed(self, frame: Frame, limit: int, max_bytes: int, *, until: float,
                     out: list[StoredMessage], behind: list[StoredMessage],
                     budget: list[int]) -> bool:
        """``_take`` for a cursor with topic filters: records of other topics are passed."""
        header = frame.header
        first, count = header.first_seq, header.count
        topics, idx, body, offsets = frame.topics, frame.topic_idx, frame.body, frame.offsets
        lengths, routes, chains = frame.lengths, self.routes, self.chains
        k = self.read_seq - first
        while k < count and len(out) < limit:
            topic = topics[idx[k]]
            if not routes(topic):
                k += 1
                continue
            if max_bytes and out and budget[0] - lengths[k] < 0:
                self.read_seq = first + k
                return False
            msg = StoredMessage(first + k, topic, body[offsets[k]:offsets[k + 1]], frame, k, until)
            self.outstanding[msg.seq] = msg
            self.backlog -= 1
            if chains.get(topic):
                behind.append(msg)
            else:
                budget[0] -= lengths[k]
                out.append(msg)
            k += 1
        self.read_seq = first + k
        return True

    def give_back(self, msgs: list[StoredMessage]) -> None:
        """Released records: handed out again first, in seq order; no longer leased."""
        released = self.released
        for msg in msgs:
            if msg.seq in self.outstanding and msg.until != _RELEASED:
                msg.until = _RELEASED
                bisect.insort(released, msg, key=lambda m: m.seq)

    def settle(self, seq: int) -> StoredMessage | None:
        """Forget an outstanding record (delivered, parked or dead-lettered)."""
        msg = self.outstanding.pop(seq, None)
        if msg is not None:
            self.unsaved += 1
        return msg

    def settle_many(self, seqs: list[int]) -> list[int]:
        """Forget the outstanding records among ``seqs``; returns the seqs that were not."""
        pop, missing = self.outstanding.pop, []
        for seq in seqs:
            if pop(seq, None) is None:
                missing.append(seq)
        self.unsaved += len(seqs) - len(missing)
        if not self.outstanding:
            self.deadlines.clear()  # nothing handed out: no lease can run out
        return missing

    def expired(self, now: float) -> list[StoredMessage]:
        """Handed-out records whose lease ran out by ``now`` (monotonic)."""
        if not self.deadlines or self.deadlines[0] > now:
            return []
        self.deadlines = [d for d in self.deadlines if d > now]
        return [m for m in self.outstanding.values() if m.until <= now]

    def in_flight(self) -> int:
        return len(self.outstanding) - len(self.released)

    def next_expiry(self) -> float | None:
        return self.deadlines[0] if self.deadlines else None

    def skip_to(self, seq: int, log: Log, on_loss: OnLoss, routed: int) -> list[StoredMessage]:
        """Retention: move past every record before ``seq`` (``routed`` of them, not handed
        out yet, were for this cursor); returns the outstanding and released records that
        were dropped with them (their settlements are ignored later)."""
        self.backlog = max(0, self.backlog - routed)
        gone = [m for s, m in self.outstanding.items() if s < seq]
        for m in gone:
            del self.outstanding[m.seq]
        self.released = [m for m in self.released if m.seq >= seq]
        if self.read_seq < seq:
            self.read_seq = seq
            frame = self.frame
            if frame is None or seq >= frame.header.next_seq:
                start = self.read_pos if frame is None else frame.header.end
                self._advance(log, start, on_loss)
        self.unsaved += 1
        return gone
