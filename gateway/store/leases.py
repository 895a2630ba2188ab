"""Leases, held in memory by the store thread, never written to the database.

A lease is a deadline on the monotonic clock (a wall-clock step cannot shorten or stretch
it). Leasing a batch is therefore a read, and releasing one costs nothing: before this a
lease rewrote every leased row and a release rewrote it again, about half of the drain's
SQLite work and SD card writes. What is lost with them is nothing a restart kept anyway:
the daemon always started by releasing every lease of the process before it, so a crash
makes every unsettled message ready again (at least once, never lost).

Invariants (the SQL side is in ``gateway.store.db``):

- A seq is leased at most once at a time, to one queue.
- A lease held for a message that already failed once (attempts > 0) blocks its MQTT
  topic: nothing behind it is leased while it is in flight (per-topic order).
- An expired lease is dropped by the next ``expire`` of its queue, which reports it so the
  caller counts the attempt; the message is then ready again.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(slots=True)
class _Lease:
    queue: str
    until: float  # time.monotonic()
    topic: str
    retried: bool  # attempts > 0 when leased


class Leases:
    """Every lease of one store, by seq and by queue. Not thread-safe (store thread only)."""

    def __init__(self) -> None:
        self._by_seq: dict[int, _Lease] = {}
        self._by_queue: dict[str, dict[int, _Lease]] = {}

    def hold(self, queue: str, leased: Iterable[tuple[int, str, int]], until: float) -> None:
        """Record leases until ``until`` for (seq, topic, attempts) rows of ``queue``."""
        held = self._by_queue.setdefault(queue, {})
        for seq, topic, attempts in leased:
            lease = _Lease(queue, until, topic, attempts > 0)
            self._by_seq[seq] = held[seq] = lease

    def drop(self, seqs: Iterable[int]) -> None:
        """Forget these leases (settled, released or gone); unknown seqs are ignored."""
        by_seq, by_queue = self._by_seq, self._by_queue
        for seq in seqs:
            lease = by_seq.pop(seq, None)
            if lease is not None:
                del by_queue[lease.queue][seq]

    def drop_queue(self, queue: str) -> None:
        for seq in self._by_queue.pop(queue, {}):
            del self._by_seq[seq]

    def clear(self) -> None:
        self._by_seq.clear()
        self._by_queue.clear()

    def expire(self, queue: str, now: float) -> list[int]:
        """Drop the leases of ``queue`` that ran out by ``now`` (monotonic); returns them."""
        held = self._by_queue.get(queue)
        if not held:
            return []
        expired = [seq for seq, lease in held.items() if lease.until <= now]
        self.drop(expired)
        return expired

    def owner(self, seq: int) -> str | None:
        """The queue (cursor) holding the lease on ``seq``, or None."""
        lease = self._by_seq.get(seq)
        return None if lease is None else lease.queue

    def held(self, queue: str) -> list[int]:
        return list(self._by_queue.get(queue, ()))

    def blocked_topics(self, queue: str) -> list[str]:
        """Topics with a retried message in flight: nothing behind it may be leased."""
        return sorted({lease.topic for lease in self._by_queue.get(queue, {}).values()
                       if lease.retried})

    def count(self, queue: str, now: float) -> int:
        return sum(1 for lease in self._by_queue.get(queue, {}).values() if lease.until > now)

    def next_expiry(self, queue: str) -> float | None:
        held = self._by_queue.get(queue)
        return min(lease.until for lease in held.values()) if held else None

    def __len__(self) -> int:
        return len(self._by_seq)
