"""The store's SQLite layer, part 4: handing messages out and settling them (leases,
parking for retries and behind retries, dead letters, wake-up times). Invariants 2, 3
and 6 of ``gateway.store.db``."""

from __future__ import annotations

import time
from collections.abc import Sequence

from gateway.store import parked
from gateway.store.appending import AppendDb
from gateway.store.cursors import Cursor
from gateway.store.records import (
    DeadLetter,
    Settlement,
    StoredMessage,
)

#: the most messages one lease hands out
MAX_LEASE = 10_000


class DeliveryDb(AppendDb):
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
                            blocked=self.leases.blocked_topics(cur.name), stamp=self.stamp)
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

    def _owner_of(self, handle: int, within: list[Cursor]) -> Cursor | None:
        """The cursor a handle was handed out by: a parked message's lease names it, a log
        record is in the ``outstanding`` of one of ``within`` (the cursors of one queue share
        seqs: a settlement names its cursor, see ``_within``)."""
        if handle < 0:
            name = self.leases.owner(handle)
            return None if name is None else self.cursors.get(name)
        for cur in within:
            if handle in cur.outstanding:
                return cur
        return None

    def _within(self, s: Settlement) -> list[Cursor]:
        """The cursors a settlement may be about: the one it names, else every one."""
        if s.cursor:
            cur = self.cursors.get(s.cursor)
            return [] if cur is None else [cur]
        return list(self.cursors.values())

    def _settle(self, s: Settlement, now: float) -> None:
        within = self._within(s)
        pids_done = [-h for h in s.delivered if h < 0]
        if pids_done or s.retry or s.dead:
            self._settle_writes(s, pids_done, now, within)
        delivered = s.delivered if not pids_done else [h for h in s.delivered if h >= 0]
        if delivered:
            for cur in within:
                before = len(delivered)
                delivered = cur.settle_many(delivered)
                cur.delivered_unsaved += before - len(delivered)
                if not delivered:
                    break
            self._refuse_appends_until = 0.0  # the drain made room
        for h in s.release:
            owner = self._owner_of(h, within) if h >= 0 else None
            if owner is not None:
                owner.give_back([owner.outstanding[h]])
        leases = self.leases
        if len(leases):
            leases.drop(h for h in s.delivered if h < 0)
            leases.drop(h for h, _, _ in s.retry if h < 0)
            leases.drop(h for h, _ in s.dead if h < 0)
            leases.drop(h for h in s.release if h < 0)
        self.sync_cursors()

    def _settle_writes(self, s: Settlement, pids_done: list[int], now: float,
                       within: list[Cursor]) -> None:
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
                attempts = self._attempts(h, within)
                if attempts is None:
                    continue
                if attempts + 1 >= self._max_attempts(h, within):
                    dead.append((h, f"gave up after {attempts + 1} attempts: {error}"))
                elif h < 0:
                    retry_pids.append((-h, now + delay, error))
                elif (cur := self._owner_of(h, within)) is not None and h in cur.outstanding:
                    self._park_rows(cur, [parked.ParkedRow(cur.outstanding[h], 1, now + delay, 1,
                                                           error[:1000])])
                    settled_log.append((cur, h))
            parked.retry(c, retry_pids)
            settled_log += self._move_to_dead(dead, now, within)
            self._trim_dead()
            self._commit()
        except BaseException:
            self._rollback()
            self._load_parked()
            self._load_dead()
            raise
        for cur, h in settled_log:
            cur.settle(h)

    def _max_attempts(self, handle: int, within: list[Cursor]) -> int:
        """The destination's own limit (its uplink's max_attempts), else the store's."""
        owner = self._owner_of(handle, within)
        return (owner.max_attempts if owner is not None else 0) or self.limits.max_attempts

    def _attempts(self, handle: int, within: list[Cursor]) -> int | None:
        if handle < 0:
            return parked.attempts_of(self._c, -handle)
        cur = self._owner_of(handle, within)
        return 0 if cur is not None and handle in cur.outstanding else None

    def _move_to_dead(self, items: list[tuple[int, str]], now: float,
                      within: list[Cursor]) -> list[tuple[Cursor, int]]:
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
                queue = name  # dead letters and their counters are the destination's
                msg = StoredMessage.detached(h, queue, row[3], row[4], row[7], order=row[1],
                                             priority=row[6], attempts=row[8], msg_id=row[2],
                                             attributes=parked._attrs(row[5]))
                self._parked_gone(name, row[3], row[9], row[10])
                attempts = row[8]
            else:
                cur = self._owner_of(h, within)
                if cur is None or h not in cur.outstanding:
                    continue
                msg, queue, attempts = cur.outstanding[h], cur.name, 0
                settled.append((cur, h))
            size = parked.insert_dead(c, queue, msg, attempts, reason, now=now)
            self.dead_count += 1
            self.dead_bytes += size
            self._bump(queue, "dead_lettered_total")
        return settled

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

